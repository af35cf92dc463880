// IWYU pragma: private
// Typed access to the fields of a Hugging Face config.json, with errors that
// name the file, the field and what was expected (Error("InvalidModelConfig")).
// transformers fills a missing field from the config class's defaults; callers
// pass those defaults, so a checkpoint that omits a field loads as it does there.
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/io/detail/json.hpp>
#include <qlora/io/mapped_file.hpp>

#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

namespace qlora::detail {

class ConfigFields {
 public:
  /// Reads and parses `path` (a config.json).
  static ConfigFields open(const std::filesystem::path& path) {
    const MappedFile file(path);
    const auto bytes = file.bytes();
    const std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    return ConfigFields(path.string(), parse_json_rejecting_duplicates(text, "InvalidModelConfig", path.string()));
  }
  ConfigFields(std::string source, Json document) : source_(std::move(source)), document_(std::move(document)) {
    check(document_.is_object(), "InvalidModelConfig", "{}: expected a JSON object at the top level", source_);
  }

  [[nodiscard]] const std::string& source() const noexcept { return source_; }
  /// Whether `key` is present and not null (transformers treats null as "use the default").
  [[nodiscard]] bool has(std::string_view key) const {
    const auto it = document_.find(key);
    return it != document_.end() && !it->is_null();
  }

  [[nodiscard]] std::int64_t integer(std::string_view key, std::optional<std::int64_t> fallback = std::nullopt) const {
    const Json* value = find(key, fallback.has_value());
    if (value == nullptr) return *fallback;
    check(value->is_number_integer(), "InvalidModelConfig", "{}: field \"{}\" is {}, expected an integer", source_,
          key, value->dump());
    return value->get<std::int64_t>();
  }
  /// An integer that must be positive and fit an int (sizes, counts).
  [[nodiscard]] int positive(std::string_view key, std::optional<std::int64_t> fallback = std::nullopt) const {
    const std::int64_t value = integer(key, fallback);
    check(value > 0 && value <= std::numeric_limits<int>::max(), "InvalidModelConfig",
          "{}: field \"{}\" is {}, expected a positive integer", source_, key, value);
    return static_cast<int>(value);
  }
  [[nodiscard]] double number(std::string_view key, std::optional<double> fallback = std::nullopt) const {
    const Json* value = find(key, fallback.has_value());
    if (value == nullptr) return *fallback;
    check(value->is_number(), "InvalidModelConfig", "{}: field \"{}\" is {}, expected a number", source_, key,
          value->dump());
    return value->get<double>();
  }
  [[nodiscard]] bool boolean(std::string_view key, std::optional<bool> fallback = std::nullopt) const {
    const Json* value = find(key, fallback.has_value());
    if (value == nullptr) return *fallback;
    check(value->is_boolean(), "InvalidModelConfig", "{}: field \"{}\" is {}, expected true or false", source_, key,
          value->dump());
    return value->get<bool>();
  }
  [[nodiscard]] std::string string(std::string_view key, std::optional<std::string> fallback = std::nullopt) const {
    const Json* value = find(key, fallback.has_value());
    if (value == nullptr) return *fallback;
    check(value->is_string(), "InvalidModelConfig", "{}: field \"{}\" is {}, expected a string", source_, key,
          value->dump());
    return value->get<std::string>();
  }
  /// A sub-object (e.g. rope_scaling), or nullopt when absent or null.
  [[nodiscard]] std::optional<ConfigFields> object(std::string_view key) const {
    if (!has(key)) return std::nullopt;
    const Json& value = document_.at(std::string(key));
    check(value.is_object(), "InvalidModelConfig", "{}: field \"{}\" is {}, expected an object or null", source_, key,
          value.dump());
    return ConfigFields(fmt::format("{} (field \"{}\")", source_, key), value);
  }
  /// The first entry of "architectures", or "" when the field is absent.
  [[nodiscard]] std::string architecture() const {
    if (!has("architectures")) return {};
    const Json& list = document_.at("architectures");
    check(list.is_array() && !list.empty() && list[0].is_string(), "InvalidModelConfig",
          "{}: field \"architectures\" is {}, expected a list of class names", source_, list.dump());
    return list[0].get<std::string>();
  }

 private:
  const Json* find(std::string_view key, bool optional) const {
    const auto it = document_.find(key);
    if (it == document_.end() || it->is_null()) {
      check(optional, "InvalidModelConfig", "{}: field \"{}\" is missing", source_, key);
      return nullptr;
    }
    return &*it;
  }

  std::string source_;
  Json document_;
};

}  // namespace qlora::detail
