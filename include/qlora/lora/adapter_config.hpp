// AdapterConfig: the content of a PEFT adapter_config.json, read as PEFT reads
// it and written byte for byte as PEFT writes it.
//
// Writing reproduces peft 0.21.2 (`peft_format_version`): the dataclass's full
// field set, `json.dumps(asdict(config), indent=2, sort_keys=True)`, no newline
// at the end. tests/reference/peft_adapter.py checks our bytes against what
// that peft writes for the same config (and that peft loads our file without
// a warning); lora/adapter_config_test.cpp re-writes a peft-written file and
// gets the same bytes.
//
// Reading follows PEFT's rules: only peft_type is required; a missing field
// takes PEFT's default. Beyond PEFT it checks types, so that a bad file fails
// here with the field named rather than later inside the maths:
//   - malformed JSON or a field of the wrong type: Error("InvalidAdapterConfig")
//     naming the file, the field and what was expected (syntax errors with line
//     and column; a key repeated in one object: Error("DuplicateKey"));
//   - a field that turns on a feature that changes the maths and that qlora
//     does not implement (use_dora, fan_in_fan_out, lora_bias,
//     layers_to_transform, megatron_config, ...): Error("UnsupportedAdapter");
//   - a field we do not know (a newer peft) or carry without interpreting
//     (auto_mapping, loftq_config, ...): kept in extra_fields, written back.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <iterator>
#include <limits>
#include <optional>
#include <regex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/io/detail/json.hpp>
#include <qlora/io/detail/python_json.hpp>
#include <qlora/io/mapped_file.hpp>
#include <qlora/lora/lora_config.hpp>
#include <qlora/version.hpp>

namespace qlora {

/// The peft release whose adapter_config.json adapter_config_json() reproduces.
inline constexpr std::string_view peft_format_version = "0.21.2";

/// The `peft_version` of a config qlora creates: the peft format version with
/// qlora's as a PEP 440 local label, e.g. "0.21.2+qlora.0.1.0". PEFT fills the
/// field with its own version (and keeps the one it read when it re-saves); it
/// parses it as a version only for OFT (packaging.version.Version, which
/// accepts a local label). So peft sees the format it can expect, and a reader
/// sees which program wrote the file.
inline std::string default_peft_version() {
  const Version v = version();
  return fmt::format("{}+qlora.{}.{}.{}", peft_format_version, v.major, v.minor, v.patch);
}

/// adapter_config.json of a LoRA adapter (peft_type "LORA").
struct AdapterConfig {
  LoraConfig lora;
  /// The base model the adapter was trained on (Hub id or path); "" writes null.
  std::string base_model_name_or_path;
  /// The base model's Hub revision, if pinned.
  std::optional<std::string> revision;
  /// PEFT's task type; "" writes null (PEFT's default; it then writes auto_mapping).
  std::string task_type = "CAUSAL_LM";
  /// PEFT's save_pretrained always writes true; from_pretrained overrides it.
  bool inference_mode = true;
  /// Who wrote the file: kept as read, default_peft_version() for a new config.
  std::string peft_version = default_peft_version();
  /// An init_lora_weights that qlora cannot reproduce (false, "pissa", "olora",
  /// "loftq", "eva", ...), as its JSON text; nullopt when lora.init describes it.
  /// Such an adapter loads (its weights are trained), but a fresh one cannot be
  /// created from this config: see check_can_initialise().
  std::optional<std::string> foreign_init;
  /// Fields carried without being interpreted, name -> JSON text: fields of a
  /// newer peft, and peft's own that do not change the maths of a trained
  /// LoRA (auto_mapping, loftq_config, eva_config, megatron_core, ...). Written
  /// back as they are, in place of peft's defaults.
  std::vector<std::pair<std::string, std::string>> extra_fields;

  /// Throws Error("UnsupportedAdapter") when `foreign_init` is set: qlora
  /// initialises only true (kaiming-uniform A) and "gaussian"; PiSSA, OLoRA,
  /// LoftQ and the data-driven inits also rewrite the base weights or need data.
  void check_can_initialise() const {
    check(!foreign_init, "UnsupportedAdapter",
          "init_lora_weights = {}: qlora can load an adapter trained from this init but cannot create one "
          "(it initialises only true and \"gaussian\")",
          foreign_init.value_or(""));
  }
};

namespace detail {

/// adapter_config.json files are a few KiB; refuse to map anything absurd.
inline constexpr std::size_t max_adapter_config_size = std::size_t{16} << 20;

/// PEFT LoraConfig fields that switch on something qlora does not implement,
/// with the default peft writes. A file may carry them only when inactive.
struct UnsupportedField {
  std::string_view name;
  std::string_view default_json;
  std::string_view feature;
};
inline constexpr UnsupportedField unsupported_lora_fields[] = {
    {"alora_invocation_tokens", "null", "activated LoRA (aLoRA)"},
    {"arrow_config", "null", "Arrow routing between adapters"},
    {"exclude_modules", "null", "excluding modules from target_modules"},
    {"fan_in_fan_out", "false", "transposed (Conv1D-layout) base weights"},
    {"kasa_config", "null", "KaSA singular-value adaptation"},
    {"layer_replication", "null", "layer replication"},
    {"layers_pattern", "null", "selecting target layers by index"},
    {"layers_to_transform", "null", "selecting target layers by index"},
    {"lora_bias", "false", "a trainable bias on lora_B"},
    {"megatron_config", "null", "Megatron tensor-parallel layers"},
    {"monteclora_config", "null", "MonteCLoRA sampling"},
    {"target_parameters", "null", "LoRA on nn.Parameter targets"},
    {"trainable_token_indices", "null", "trainable token embeddings"},
    {"use_bdlora", "null", "block-diagonal LoRA"},
    {"use_dora", "false", "DoRA (weight-decomposed LoRA)"},
    {"use_qalora", "false", "QA-LoRA input pooling"},
    {"velora_config", "null", "VeLoRA's compressed-activation backward"},
};

/// PEFT fields we carry in extra_fields, with the default peft writes when a
/// config does not carry them.
struct CarriedField {
  std::string_view name;
  std::string_view default_json;
};
inline constexpr CarriedField carried_lora_fields[] = {
    {"auto_mapping", "null"},
    {"corda_config", "null"},
    {"ensure_weight_tying", "false"},
    {"eva_config", "null"},
    {"loftq_config", "{}"},
    {"lora_ga_config", "null"},
    {"megatron_core", "\"megatron.core\""},
    {"qalora_group_size", "16"},
};

/// The fields AdapterConfig holds in named members (read_interpreted_field reads them).
inline constexpr std::string_view interpreted_fields[] = {
    "alpha_pattern", "base_model_name_or_path", "bias",         "inference_mode", "init_lora_weights", "lora_alpha",
    "lora_dropout",  "modules_to_save",         "peft_type",    "peft_version",   "r",                 "rank_pattern",
    "revision",      "target_modules",          "task_type",    "use_rslora",
};

/// peft's TaskType values; peft refuses any other task_type.
inline constexpr std::string_view peft_task_types[] = {"SEQ_CLS",      "SEQ_2_SEQ_LM", "CAUSAL_LM",
                                                       "TOKEN_CLS",    "QUESTION_ANS", "FEATURE_EXTRACTION"};

/// PEFT drops it on load (with a warning) and never writes it.
inline constexpr std::string_view runtime_config_field = "runtime_config";

/// The entry of `table` called `name`, or nullptr.
template <class Entry, std::size_t N>
const Entry* find_field(const Entry (&table)[N], std::string_view name) {
  for (const Entry& entry : table) {
    if (entry.name == name) return &entry;
  }
  return nullptr;
}

inline bool is_interpreted(std::string_view name) {
  return std::find(std::begin(interpreted_fields), std::end(interpreted_fields), name) != std::end(interpreted_fields);
}

/// null, false, [] and {}: what PEFT treats as "feature off".
inline bool is_inactive(const OrderedJson& value) {
  return value.is_null() || (value.is_boolean() && !value.get<bool>()) ||
         ((value.is_array() || value.is_object()) && value.empty());
}

/// A JSON value shortened for a message.
inline std::string json_excerpt(const OrderedJson& value) {
  std::string text = value.dump();
  if (text.size() > 80) text = text.substr(0, 77) + "...";
  return text;
}

/// Typed access to one field of the config, failing with the file and the field named.
class ConfigField {
 public:
  ConfigField(std::string_view file, std::string name, const OrderedJson& value)
      : file_(file), name_(std::move(name)), value_(value) {}

  [[noreturn]] void fail(std::string_view expected) const {
    throw Error("InvalidAdapterConfig",
                fmt::format("{}: field \"{}\": expected {}, found {}", file_, name_, expected, json_excerpt(value_)));
  }

  [[nodiscard]] std::string_view file() const noexcept { return file_; }
  [[nodiscard]] const OrderedJson& value() const noexcept { return value_; }
  [[nodiscard]] bool is_null() const noexcept { return value_.is_null(); }
  [[nodiscard]] ConfigField item(std::string_view key, const OrderedJson& value) const {
    return {file_, fmt::format("{}[\"{}\"]", name_, key), value};
  }

  [[nodiscard]] std::string string() const {
    if (!value_.is_string()) fail("a string");
    return value_.get<std::string>();
  }
  [[nodiscard]] std::optional<std::string> string_or_null() const {
    if (is_null()) return std::nullopt;
    if (!value_.is_string()) fail("a string or null");
    return value_.get<std::string>();
  }
  [[nodiscard]] bool boolean() const {
    if (!value_.is_boolean()) fail("true or false");
    return value_.get<bool>();
  }
  [[nodiscard]] double number() const {
    if (!value_.is_number()) fail("a number");
    return value_.get<double>();
  }
  [[nodiscard]] int integer() const {
    using Limits = std::numeric_limits<int>;
    if (!value_.is_number_integer() || (value_.is_number_unsigned() && value_.get<std::uint64_t>() > Limits::max()) ||
        value_.get<std::int64_t>() < Limits::min() || value_.get<std::int64_t>() > Limits::max()) {
      fail("an integer");
    }
    return static_cast<int>(value_.get<std::int64_t>());
  }
  /// A list of strings; null is the empty list.
  [[nodiscard]] std::vector<std::string> string_list() const {
    std::vector<std::string> list;
    if (is_null()) return list;
    if (!value_.is_array()) fail("a list of strings or null");
    for (const OrderedJson& item : value_) {
      if (!item.is_string()) fail("a list of strings or null");
      list.push_back(item.get<std::string>());
    }
    return list;
  }
  /// An object read in file order (PEFT's patterns: the first matching key wins).
  template <class ReadValue>
  [[nodiscard]] auto pattern_map(ReadValue read_value) const {
    std::vector<std::pair<std::string, decltype(read_value(*this))>> map;
    if (is_null()) return map;
    if (!value_.is_object()) fail("an object");
    for (auto it = value_.begin(); it != value_.end(); ++it) {
      const ConfigField entry = item(it.key(), it.value());
      entry.check_regex(fmt::format("(.*\\.)?({})$", it.key()), it.key());
      map.emplace_back(it.key(), read_value(entry));
    }
    return map;
  }

  /// Fails unless `pattern` is a regular expression std::regex accepts (PEFT's
  /// are Python's: look-behind or named groups would be read differently).
  void check_regex(const std::string& pattern, std::string_view as_written) const {
    try {
      std::regex compiled(pattern);
    } catch (const std::regex_error& e) {
      throw Error("InvalidAdapterConfig",
                  fmt::format("{}: field \"{}\": \"{}\" is not a regular expression qlora can use ({})", file_, name_,
                              as_written, e.what()));
    }
  }

 private:
  std::string_view file_;
  std::string name_;
  const OrderedJson& value_;
};

/// Reads `field` into `config`; returns false when `field` is not one AdapterConfig interprets.
inline bool read_interpreted_field(const ConfigField& field, std::string_view name, AdapterConfig& config) {
  LoraConfig& lora = config.lora;
  if (name == "peft_type") {
    (void)field.string();  // checked by the caller: it is required
  } else if (name == "task_type") {
    config.task_type = field.string_or_null().value_or("");
    const auto* const known = std::find(std::begin(peft_task_types), std::end(peft_task_types), config.task_type);
    if (!config.task_type.empty() && known == std::end(peft_task_types)) {
      field.fail(fmt::format("null or one of peft's task types ({})", fmt::join(peft_task_types, ", ")));
    }
  } else if (name == "base_model_name_or_path") {
    config.base_model_name_or_path = field.string_or_null().value_or("");
  } else if (name == "revision") {
    config.revision = field.string_or_null();
  } else if (name == "inference_mode") {
    config.inference_mode = field.boolean();
  } else if (name == "peft_version") {
    config.peft_version = field.string_or_null().value_or(default_peft_version());
  } else if (name == "r") {
    lora.r = field.integer();
  } else if (name == "lora_alpha") {
    lora.lora_alpha = field.number();
  } else if (name == "lora_dropout") {
    lora.lora_dropout = field.number();
  } else if (name == "use_rslora") {
    lora.use_rslora = field.boolean();
  } else if (name == "bias") {
    const std::string bias = field.string();
    if (bias != "none" && bias != "all" && bias != "lora_only") field.fail("\"none\", \"all\" or \"lora_only\"");
    lora.bias = parse_lora_bias(bias);
  } else if (name == "init_lora_weights") {
    const OrderedJson& value = field.value();
    if (value.is_boolean() && value.get<bool>()) {
      lora.init = LoraInit::kaiming_uniform;
    } else if (value.is_string() && value.get<std::string>() == "gaussian") {
      lora.init = LoraInit::gaussian;
    } else if (value.is_boolean() || value.is_string()) {
      config.foreign_init = value.dump();
    } else {
      field.fail("true, false or the name of an initialisation");
    }
  } else if (name == "target_modules") {
    if (field.value().is_string()) {
      const std::string regex = field.string();
      check(regex != "all-linear", "UnsupportedAdapter",
            "{}: target_modules \"all-linear\" names no modules until resolved against a model (peft writes the "
            "resolved list into the adapter it saves)",
            field.file());
      field.check_regex(regex, regex);
      lora.target_modules_regex = regex;
    } else {
      lora.target_modules = field.string_list();
    }
  } else if (name == "modules_to_save") {
    lora.modules_to_save = field.string_list();
  } else if (name == "rank_pattern") {
    lora.rank_pattern = field.pattern_map([](const ConfigField& entry) { return entry.integer(); });
  } else if (name == "alpha_pattern") {
    lora.alpha_pattern = field.pattern_map([](const ConfigField& entry) { return entry.number(); });
  } else {
    return false;
  }
  return true;
}

/// A number as peft writes the int-typed fields (lora_alpha, alpha_pattern):
/// integral values as integers, others as floats. (A file's "16.0" is written
/// back as 16: the same value to peft.)
inline Json int_or_float(double value) {
  if (std::nearbyint(value) == value && std::abs(value) < 9007199254740992.0) {
    return Json(static_cast<std::int64_t>(value));
  }
  return Json(value);
}

}  // namespace detail

/// Parses the text of an adapter_config.json; `file_name` names it in errors.
inline AdapterConfig parse_adapter_config(std::string_view json_text, std::string_view file_name) {
  using detail::OrderedJson;
  // The shared parser reports syntax errors with line and column and rejects
  // repeated keys; the second parse keeps file order, which PEFT's first-match
  // rule for rank_pattern / alpha_pattern depends on.
  (void)detail::parse_json_rejecting_duplicates(json_text, "InvalidAdapterConfig", file_name);
  const OrderedJson document = OrderedJson::parse(json_text.begin(), json_text.end());
  check(document.is_object(), "InvalidAdapterConfig", "{}: expected a JSON object, found {}", file_name,
        detail::json_excerpt(document));

  const auto peft_type = document.find("peft_type");
  check(peft_type != document.end(), "InvalidAdapterConfig",
        "{}: no field \"peft_type\" (peft requires it; a LoRA adapter has \"LORA\")", file_name);
  const std::string type = detail::ConfigField(file_name, "peft_type", *peft_type).string();
  check(type == "LORA", "UnsupportedAdapter", "{}: peft_type \"{}\": qlora reads LoRA adapters only (\"LORA\")",
        file_name, type);

  // PEFT's defaults for what the file leaves out (its dataclass defaults).
  AdapterConfig config;
  config.task_type.clear();
  config.inference_mode = false;

  for (auto it = document.begin(); it != document.end(); ++it) {
    const std::string& name = it.key();
    const detail::ConfigField field(file_name, name, it.value());
    if (detail::read_interpreted_field(field, name, config)) continue;
    if (const auto* unsupported = detail::find_field(detail::unsupported_lora_fields, name)) {
      // Inactive is the same as peft's default, which the writer writes.
      check(detail::is_inactive(it.value()), "UnsupportedAdapter",
            "{}: field \"{}\" = {} turns on {}, which qlora does not implement", file_name, name,
            detail::json_excerpt(it.value()), unsupported->feature);
      continue;
    }
    if (name == detail::runtime_config_field) continue;
    config.extra_fields.emplace_back(name, it.value().dump());
  }

  try {
    config.lora.validate();
  } catch (const Error& e) {
    throw Error("InvalidAdapterConfig", fmt::format("{}: {}", file_name, e.message()));
  }
  return config;
}

/// Reads and parses the adapter_config.json at `file`.
inline AdapterConfig read_adapter_config(const std::filesystem::path& file) {
  const MappedFile mapped(file);
  check(mapped.size() <= detail::max_adapter_config_size, "InvalidAdapterConfig",
        "{}: {} bytes is over the {}-byte limit for an adapter config", file.string(), mapped.size(),
        detail::max_adapter_config_size);
  return parse_adapter_config(
      std::string_view(reinterpret_cast<const char*>(mapped.bytes().data()), mapped.size()), file.string());
}

/// The adapter_config.json text peft 0.21.2 writes for `config` (no trailing
/// newline, as peft). List orders are kept as given: peft writes target_modules
/// from a Python set, in an order that changes with the hash seed. Throws
/// Error("InvalidLoraConfig") for an invalid `lora`, Error("InvalidAdapterConfig")
/// for an extra field whose text is not JSON or that a member already holds.
inline std::string adapter_config_json(const AdapterConfig& config) {
  using detail::Json;
  const LoraConfig& lora = config.lora;
  lora.validate();
  const auto parse_value = [](std::string_view name, std::string_view text) {
    try {
      return Json::parse(text.begin(), text.end());
    } catch (const Json::exception& e) {
      throw Error("InvalidAdapterConfig", fmt::format("field \"{}\": {} is not JSON text: {}", name, text, e.what()));
    }
  };

  Json document = Json::object();
  // peft writes every field of its dataclass: start from its defaults.
  for (const auto& field : detail::unsupported_lora_fields) {
    document[field.name] = parse_value(field.name, field.default_json);
  }
  for (const auto& field : detail::carried_lora_fields) {
    document[field.name] = parse_value(field.name, field.default_json);
  }
  for (const auto& [name, text] : config.extra_fields) {
    check(!detail::is_interpreted(name) && detail::find_field(detail::unsupported_lora_fields, name) == nullptr &&
              name != detail::runtime_config_field,
          "InvalidAdapterConfig", "extra field \"{}\" is not carried: AdapterConfig holds it in a member", name);
    document[name] = parse_value(name, text);
  }

  const auto string_or_null = [](std::string_view text) { return text.empty() ? Json() : Json(text); };
  document["peft_type"] = "LORA";
  document["task_type"] = string_or_null(config.task_type);
  document["base_model_name_or_path"] = string_or_null(config.base_model_name_or_path);
  document["revision"] = config.revision ? Json(*config.revision) : Json();
  document["inference_mode"] = config.inference_mode;
  document["peft_version"] = string_or_null(config.peft_version);
  document["r"] = lora.r;
  document["lora_alpha"] = detail::int_or_float(lora.lora_alpha);
  document["lora_dropout"] = lora.lora_dropout;
  document["use_rslora"] = lora.use_rslora;
  document["bias"] = lora_bias_name(lora.bias);
  if (config.foreign_init) {
    document["init_lora_weights"] = parse_value("init_lora_weights", *config.foreign_init);
  } else {
    document["init_lora_weights"] = lora.init == LoraInit::gaussian ? Json("gaussian") : Json(true);
  }
  if (lora.target_modules_regex) {
    document["target_modules"] = *lora.target_modules_regex;
  } else {
    document["target_modules"] = lora.target_modules.empty() ? Json() : Json(lora.target_modules);
  }
  document["modules_to_save"] = lora.modules_to_save.empty() ? Json() : Json(lora.modules_to_save);
  Json& rank_pattern = document["rank_pattern"] = Json::object();
  for (const auto& [key, rank] : lora.rank_pattern) rank_pattern[key] = rank;
  Json& alpha_pattern = document["alpha_pattern"] = Json::object();
  for (const auto& [key, alpha] : lora.alpha_pattern) alpha_pattern[key] = detail::int_or_float(alpha);

  std::string text;
  detail::append_python_json(text, document);
  return text;
}

}  // namespace qlora
