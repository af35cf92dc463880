// TokenizerConfig: what qlora needs from a Hugging Face tokenizer_config.json
// (the special-token names, the added tokens with their ids and flags, the
// BOS/EOS switches, the class name and the length limit), read as transformers
// 4.x reads it in PreTrainedTokenizerBase._from_pretrained.
//
// Why a reader of its own: the tokenizer model files (tokenizer.model,
// tokenizer.json) do not say which token is the EOS or the pad, and for
// SentencePiece models such as InternLM2 the chat tokens' flags live only here.
//
// Rules, with transformers' behaviour where it is lenient:
//   - unknown keys are ignored (real files carry chat_template, auto_map, ...);
//   - a special token is a string, an AddedToken dict {"content": ...} (older
//     files add "__type": "AddedToken"), or null;
//   - "added_tokens_decoder" maps decimal ids to AddedToken dicts; a missing
//     "normalized" defaults to !special, as tokenizers' AddedToken does;
//   - model_max_length: transformers writes int(1e30) (VERY_LARGE_INTEGER) for
//     "no limit", which JSON readers see as a float above any integer type:
//     a value that does not fit std::size_t is read as "no limit";
//   - anything of the wrong type, an id that is not a non-negative 32-bit
//     decimal, an id given twice, or an unknown key inside an AddedToken dict
//     (transformers' AddedToken(**dict) raises TypeError) is
//     Error("InvalidTokenizerConfig") naming the file and the key; malformed
//     JSON too (with line and column), and a key repeated within one object is
//     Error("DuplicateKey") as for every JSON file qlora reads.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/tokenizer.hpp>
#include <qlora/io/detail/json.hpp>
#include <qlora/io/mapped_file.hpp>

namespace qlora {

struct TokenizerConfig {
  /// Names of the special tokens (the AddedToken dict's "content"); absent when
  /// the key is missing or null.
  std::optional<std::string> bos_token, eos_token, pad_token, unk_token;
  /// "added_tokens_decoder", sorted by id.
  std::vector<AddedToken> added_tokens;
  /// Whether the tokenizer adds BOS/EOS around encoded text; absent when the
  /// file does not say (the tokenizer class's default applies). null reads as
  /// false: transformers passes None, which every tokenizer tests for truth.
  std::optional<bool> add_bos_token, add_eos_token;
  /// "InternLM2Tokenizer", "CodeGenTokenizer", ...; "" when absent or null.
  std::string tokenizer_class;
  /// The longest input the model takes; absent for "no limit".
  std::optional<std::size_t> model_max_length;
};

namespace detail {

/// tokenizer_config.json files are a few KiB (a chat template, a few hundred
/// added tokens); refuse to map anything absurd.
inline constexpr std::size_t max_tokenizer_config_size = std::size_t{64} << 20;

/// One value of a tokenizer_config.json, with the path of keys that leads to
/// it, so that every failure names the file and the key.
class TokenizerConfigValue {
 public:
  TokenizerConfigValue(std::string_view file, std::string key, const Json& value)
      : file_(file), key_(std::move(key)), value_(value) {}

  [[noreturn]] void fail(std::string_view expected) const {
    std::string found = value_.dump();
    if (found.size() > 80) found = found.substr(0, 77) + "...";
    throw Error("InvalidTokenizerConfig",
                fmt::format("{}: key \"{}\": expected {}, found {}", file_, key_, expected, found));
  }

  [[nodiscard]] const Json& json() const noexcept { return value_; }
  [[nodiscard]] const std::string& key() const noexcept { return key_; }
  [[nodiscard]] TokenizerConfigValue member(std::string_view name, const Json& value) const {
    return {file_, fmt::format("{}.{}", key_, name), value};
  }

  [[nodiscard]] std::string string() const {
    if (!value_.is_string()) fail("a string");
    return value_.get<std::string>();
  }
  [[nodiscard]] bool boolean() const {
    if (!value_.is_boolean()) fail("true or false");
    return value_.get<bool>();
  }

  /// An AddedToken dict as transformers builds it: AddedToken(**dict), after
  /// dropping the "__type" marker of older files. `id` is not part of the dict.
  [[nodiscard]] AddedToken added_token(TokenId id) const {
    if (!value_.is_object()) fail("an AddedToken object {\"content\": ...}");
    AddedToken token;
    token.id = id;
    std::optional<bool> normalized;
    bool has_content = false;
    for (auto it = value_.begin(); it != value_.end(); ++it) {
      const TokenizerConfigValue field = member(it.key(), it.value());
      if (it.key() == "content") {
        token.content = field.string();
        has_content = true;
      } else if (it.key() == "special") {
        token.special = field.boolean();
      } else if (it.key() == "single_word") {
        token.single_word = field.boolean();
      } else if (it.key() == "lstrip") {
        token.lstrip = field.boolean();
      } else if (it.key() == "rstrip") {
        token.rstrip = field.boolean();
      } else if (it.key() == "normalized") {
        normalized = field.boolean();
      } else if (it.key() == "__type") {
        if (field.string() != "AddedToken") field.fail("\"AddedToken\"");
      } else {
        throw Error("InvalidTokenizerConfig",
                    fmt::format("{}: key \"{}\": unknown AddedToken field \"{}\" (expected content, special, "
                                "single_word, lstrip, rstrip, normalized)",
                                file_, key_, it.key()));
      }
    }
    if (!has_content) fail("an AddedToken object with a \"content\" string");
    if (token.content.empty()) fail("a non-empty token");
    token.normalized = normalized.value_or(!token.special);
    return token;
  }

  /// A special-token entry: a string, an AddedToken dict (its content), or null.
  [[nodiscard]] std::optional<std::string> token_name() const {
    if (value_.is_null()) return std::nullopt;
    if (value_.is_string()) return value_.get<std::string>();
    if (!value_.is_object()) fail("a token string, an AddedToken object or null");
    return added_token(0).content;
  }

  /// A non-negative integer; a value beyond std::size_t (transformers'
  /// int(1e30) sentinel, read as a float) and null mean "no limit".
  [[nodiscard]] std::optional<std::size_t> length_limit() const {
    if (value_.is_null()) return std::nullopt;
    if (value_.is_number_unsigned()) return static_cast<std::size_t>(value_.get<std::uint64_t>());
    if (value_.is_number_float()) {
      const double value = value_.get<double>();
      // 2^64 as a double; every double below it that is integral fits.
      constexpr double size_limit = 18446744073709551616.0;
      if (value >= size_limit) return std::nullopt;
      if (value >= 0 && value == static_cast<double>(static_cast<std::uint64_t>(value))) {
        return static_cast<std::size_t>(value);
      }
    }
    fail("a non-negative integer or null");
  }

 private:
  std::string_view file_;
  std::string key_;
  const Json& value_;
};

/// The id an "added_tokens_decoder" key spells: plain decimal digits that fit
/// a non-negative TokenId. (Python's int() also takes signs, spaces and "_";
/// no real file uses them, and a strict reading keeps one spelling per id.)
inline TokenId added_token_id(std::string_view file, std::string_view key) {
  std::int64_t id = 0;
  bool valid = !key.empty() && key.size() <= 10;
  for (const char digit : key) {
    if (digit < '0' || digit > '9') valid = false;
    if (valid) id = id * 10 + (digit - '0');
  }
  check(valid && id <= std::numeric_limits<TokenId>::max(), "InvalidTokenizerConfig",
        "{}: key \"added_tokens_decoder.{}\": expected a token id (a decimal integer from 0 to {})", file, key,
        std::numeric_limits<TokenId>::max());
  return static_cast<TokenId>(id);
}

}  // namespace detail

/// Parses the text of a tokenizer_config.json; `source_name` names it in errors.
inline TokenizerConfig parse_tokenizer_config(std::string_view json_text, std::string_view source_name) {
  using detail::Json;
  const Json document = detail::parse_json_rejecting_duplicates(json_text, "InvalidTokenizerConfig", source_name);
  check(document.is_object(), "InvalidTokenizerConfig", "{}: expected a JSON object at the top level", source_name);

  TokenizerConfig config;
  const auto value_of = [&](const char* key) -> std::optional<detail::TokenizerConfigValue> {
    const auto found = document.find(key);
    if (found == document.end()) return std::nullopt;
    return detail::TokenizerConfigValue(source_name, key, *found);
  };
  if (const auto value = value_of("bos_token")) config.bos_token = value->token_name();
  if (const auto value = value_of("eos_token")) config.eos_token = value->token_name();
  if (const auto value = value_of("pad_token")) config.pad_token = value->token_name();
  if (const auto value = value_of("unk_token")) config.unk_token = value->token_name();
  for (const auto& [key, flag] :
       {std::pair{"add_bos_token", &config.add_bos_token}, std::pair{"add_eos_token", &config.add_eos_token}}) {
    if (const auto value = value_of(key)) *flag = value->json().is_null() ? false : value->boolean();
  }
  if (const auto value = value_of("tokenizer_class"); value && !value->json().is_null()) {
    config.tokenizer_class = value->string();
  }
  if (const auto value = value_of("model_max_length")) config.model_max_length = value->length_limit();

  if (const auto decoder = value_of("added_tokens_decoder"); decoder && !decoder->json().is_null()) {
    if (!decoder->json().is_object()) decoder->fail("an object {\"<id>\": {\"content\": ...}, ...}");
    for (auto it = decoder->json().begin(); it != decoder->json().end(); ++it) {
      const TokenId id = detail::added_token_id(source_name, it.key());
      config.added_tokens.push_back(decoder->member(it.key(), it.value()).added_token(id));
    }
    // nlohmann orders keys as strings ("10" before "9"): sort by number.
    std::ranges::sort(config.added_tokens, {}, &AddedToken::id);
    const auto repeated = std::ranges::adjacent_find(config.added_tokens, {}, &AddedToken::id);
    check(repeated == config.added_tokens.end(), "InvalidTokenizerConfig",
          "{}: key \"added_tokens_decoder\": id {} is given twice (keys with leading zeros?)", source_name,
          repeated == config.added_tokens.end() ? 0 : repeated->id);
  }
  return config;
}

/// Reads and parses the tokenizer_config.json at `path`. A file that cannot be
/// read is Error("IoError"), as for every file qlora maps.
inline TokenizerConfig read_tokenizer_config(const std::filesystem::path& path) {
  const MappedFile mapped(path);
  check(mapped.size() <= detail::max_tokenizer_config_size, "InvalidTokenizerConfig",
        "{}: {} bytes is over the {}-byte limit for a tokenizer config", path.string(), mapped.size(),
        detail::max_tokenizer_config_size);
  return parse_tokenizer_config(std::string_view(reinterpret_cast<const char*>(mapped.bytes().data()), mapped.size()),
                                path.string());
}

}  // namespace qlora
