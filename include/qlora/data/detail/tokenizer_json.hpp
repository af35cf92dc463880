// IWYU pragma: private
// Reading a Hugging Face tokenizer.json: one JSON value with the path of keys
// that leads to it, so that every failure names the file and the key. Wrong
// types are Error("InvalidTokenizer"); settings qlora does not implement are
// Error("UnsupportedTokenizer"), so that a tokenizer is refused rather than
// silently run differently from Hugging Face's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/tokenizer.hpp>
#include <qlora/io/detail/json.hpp>

namespace qlora::detail {

class TokenizerJson {
 public:
  TokenizerJson(std::string_view file, std::string path, const Json& value)
      : file_(file), path_(std::move(path)), value_(&value) {}

  [[nodiscard]] const Json& json() const noexcept { return *value_; }
  [[nodiscard]] const std::string& path() const noexcept { return path_; }
  [[nodiscard]] std::string_view file() const noexcept { return file_; }
  [[nodiscard]] bool is_null() const noexcept { return value_->is_null(); }

  /// Error("InvalidTokenizer"): this value is not what a tokenizer.json has here.
  [[noreturn]] void fail(std::string_view expected) const {
    std::string found = value_->dump();
    if (found.size() > 80) found = found.substr(0, 77) + "...";
    throw Error("InvalidTokenizer", fmt::format("{}: {}: expected {}, found {}", file_, path_, expected, found));
  }

  /// Error("UnsupportedTokenizer"): a valid setting that qlora does not implement.
  [[noreturn]] void unsupported(std::string_view what) const {
    throw Error("UnsupportedTokenizer", fmt::format("{}: {}: {}", file_, path_, what));
  }

  /// Member `name` of this object, or nullopt when it is absent.
  [[nodiscard]] std::optional<TokenizerJson> find(std::string_view name) const {
    if (!value_->is_object()) fail("an object");
    const auto found = value_->find(name);
    if (found == value_->end()) return std::nullopt;
    return TokenizerJson(file_, path_.empty() ? std::string(name) : fmt::format("{}.{}", path_, name), *found);
  }

  /// Member `name` of this object, which must be there.
  [[nodiscard]] TokenizerJson at(std::string_view name) const {
    std::optional<TokenizerJson> member = find(name);
    if (!member) fail(fmt::format("an object with a \"{}\" member", name));
    return *std::move(member);
  }

  /// Element `index` of this array (the caller checks the bounds).
  [[nodiscard]] TokenizerJson element(std::size_t index) const {
    return {file_, fmt::format("{}[{}]", path_, index), (*value_)[index]};
  }

  [[nodiscard]] std::string string() const {
    if (!value_->is_string()) fail("a string");
    return value_->get<std::string>();
  }

  [[nodiscard]] bool boolean() const {
    if (!value_->is_boolean()) fail("true or false");
    return value_->get<bool>();
  }

  /// Boolean member `name`; `absent` when it is missing or null.
  [[nodiscard]] bool flag(std::string_view name, bool absent) const {
    const std::optional<TokenizerJson> member = find(name);
    return member && !member->is_null() ? member->boolean() : absent;
  }

  /// Member `name` as a string, "" when it is missing or null.
  [[nodiscard]] std::string optional_string(std::string_view name) const {
    const std::optional<TokenizerJson> member = find(name);
    return member && !member->is_null() ? member->string() : std::string();
  }

  /// A token id: an integer from 0 to the largest TokenId.
  [[nodiscard]] TokenId id() const {
    if (value_->is_number_unsigned() &&
        value_->get<std::uint64_t>() <= std::uint64_t{std::numeric_limits<TokenId>::max()}) {
      return static_cast<TokenId>(value_->get<std::uint64_t>());
    }
    fail(fmt::format("a token id (an integer from 0 to {})", std::numeric_limits<TokenId>::max()));
  }

  /// The "type" member of this object.
  [[nodiscard]] std::string type() const { return at("type").string(); }

 private:
  std::string_view file_;
  std::string path_;
  const Json* value_;
};

}  // namespace qlora::detail
