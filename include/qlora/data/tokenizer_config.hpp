// TokenizerConfig: what qlora needs from a Hugging Face tokenizer_config.json
// (the special tokens, the added tokens with their ids and flags, the BOS/EOS
// switches, the class name and the length limit), read as transformers 4.x
// reads it in PreTrainedTokenizerBase._from_pretrained.
//
// Why a reader of its own: the tokenizer model files (tokenizer.model,
// tokenizer.json) do not say which token is the EOS or the pad, and for
// SentencePiece models such as InternLM2 the chat tokens' flags live only here.
//
// Rules, with transformers' behaviour where it is lenient:
//   - unknown keys are ignored (real files carry chat_template, auto_map, ...);
//   - a special token (bos_token, eos_token, unk_token, sep_token, pad_token,
//     cls_token, mask_token, each entry of additional_special_tokens) is a
//     string, an AddedToken object {"content": ...} (older files add "__type":
//     "AddedToken"), or null (the attributes; additional_special_tokens itself
//     is a list or null). transformers registers the special tokens that are
//     no added tokens yet when it builds the tokenizer, in that order, so both
//     tokenizers of qlora do (special_tokens());
//   - "added_tokens_decoder" maps decimal ids to AddedToken objects; a missing
//     "normalized" defaults to !special, as tokenizers' AddedToken does;
//   - model_max_length: transformers writes int(1e30) (VERY_LARGE_INTEGER) for
//     "no limit", which JSON readers see as a float above any integer type:
//     a value that does not fit std::size_t is read as "no limit";
//   - anything of the wrong type, an id that is not a non-negative 32-bit
//     decimal, an id given twice, or an unknown field inside an AddedToken
//     object (detail/tokenizer_json.hpp says why) is
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
#include <qlora/data/detail/tokenizer_json.hpp>
#include <qlora/data/tokenizer.hpp>
#include <qlora/io/detail/json.hpp>
#include <qlora/io/mapped_file.hpp>

namespace qlora {

struct TokenizerConfig {
  /// The special-token attributes, each as transformers registers it: a
  /// string entry is {content, special, normalized = false}; an AddedToken
  /// object keeps its flags, and special is set, as transformers 4.x sets it.
  /// Absent when the key is missing or null.
  std::optional<AddedToken> bos_token, eos_token, unk_token, sep_token, pad_token, cls_token, mask_token;
  /// "additional_special_tokens", in file order, in the same form.
  std::vector<AddedToken> additional_special_tokens;
  /// "added_tokens_decoder", sorted by id, with the flags the file gives.
  std::vector<AddedToken> added_tokens;
  /// Whether the tokenizer adds BOS/EOS around encoded text; absent when the
  /// file does not say (the tokenizer class's default applies). null reads as
  /// false: transformers passes None, which every tokenizer tests for truth.
  std::optional<bool> add_bos_token, add_eos_token;
  /// "InternLM2Tokenizer", "CodeGenTokenizer", ...; "" when absent or null.
  std::string tokenizer_class;
  /// The longest input the model takes; absent for "no limit".
  std::optional<std::size_t> model_max_length;

  /// transformers' all_special_tokens_extended: bos, eos, unk, sep, pad, cls,
  /// mask, then additional_special_tokens, the first entry of each content
  /// only. The order decides the ids of those the vocabulary lacks.
  [[nodiscard]] std::vector<AddedToken> special_tokens() const {
    std::vector<AddedToken> tokens;
    const auto add = [&](const AddedToken& token) {
      if (std::ranges::none_of(tokens, [&](const AddedToken& known) { return known.content == token.content; })) {
        tokens.push_back(token);
      }
    };
    for (const auto* role : {&bos_token, &eos_token, &unk_token, &sep_token, &pad_token, &cls_token, &mask_token}) {
      if (role->has_value()) add(**role);
    }
    for (const AddedToken& token : additional_special_tokens) add(token);
    return tokens;
  }

  /// Whether `content` is one of special_tokens() (transformers' all_special_tokens).
  [[nodiscard]] bool is_special_token(std::string_view content) const {
    return std::ranges::any_of(special_tokens(), [&](const AddedToken& token) { return token.content == content; });
  }
};

namespace detail {

/// tokenizer_config.json files are a few KiB (a chat template, a few hundred
/// added tokens); refuse to map anything absurd.
inline constexpr std::size_t max_tokenizer_config_size = std::size_t{64} << 20;

/// A special-token entry as transformers registers it (see TokenizerConfig).
inline AddedToken special_token_entry(const TokenizerJson& value) {
  if (value.json().is_string()) {
    return {.content = value.string(), .special = true, .normalized = false};
  }
  if (!value.json().is_object()) value.fail("a token string, an AddedToken object or null");
  AddedToken token = value.added_token(AddedTokenLayout::tokenizer_config);
  token.special = true;  // after normalized took its default from the object's own "special"
  return token;
}

/// A non-negative integer; a value beyond std::size_t (transformers'
/// int(1e30) sentinel, read as a float) and null mean "no limit".
inline std::optional<std::size_t> length_limit(const TokenizerJson& value) {
  const Json& json = value.json();
  if (json.is_null()) return std::nullopt;
  if (json.is_number_unsigned()) return static_cast<std::size_t>(json.get<std::uint64_t>());
  if (json.is_number_float()) {
    const double number = json.get<double>();
    // 2^64 as a double; every double below it that is integral fits.
    constexpr double size_limit = 18446744073709551616.0;
    if (number >= size_limit) return std::nullopt;
    if (number >= 0 && number == static_cast<double>(static_cast<std::uint64_t>(number))) {
      return static_cast<std::size_t>(number);
    }
  }
  value.fail("a non-negative integer or null");
}

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

  const detail::TokenizerJson root(source_name, document, "InvalidTokenizerConfig");
  TokenizerConfig config;
  // A key given as null counts as absent, as transformers passes None.
  const auto value_of = [&](const char* key) -> std::optional<detail::TokenizerJson> {
    std::optional<detail::TokenizerJson> value = root.find(key);
    if (value && value->is_null()) return std::nullopt;
    return value;
  };
  const std::pair<const char*, std::optional<AddedToken>*> roles[] = {
      {"bos_token", &config.bos_token}, {"eos_token", &config.eos_token}, {"unk_token", &config.unk_token},
      {"sep_token", &config.sep_token}, {"pad_token", &config.pad_token}, {"cls_token", &config.cls_token},
      {"mask_token", &config.mask_token}};
  for (const auto& [key, token] : roles) {
    if (const auto value = value_of(key)) *token = detail::special_token_entry(*value);
  }
  if (const auto list = value_of("additional_special_tokens")) {
    if (!list->json().is_array()) list->fail("a list of tokens or null");
    for (std::size_t index = 0; index < list->json().size(); ++index) {
      config.additional_special_tokens.push_back(detail::special_token_entry(list->element(index)));
    }
  }
  for (const auto& [key, flag] :
       {std::pair{"add_bos_token", &config.add_bos_token}, std::pair{"add_eos_token", &config.add_eos_token}}) {
    if (const auto value = root.find(key)) *flag = value->is_null() ? false : value->boolean();
  }
  if (const auto value = value_of("tokenizer_class")) config.tokenizer_class = value->string();
  if (const auto value = root.find("model_max_length")) config.model_max_length = detail::length_limit(*value);

  if (const auto decoder = value_of("added_tokens_decoder")) {
    if (!decoder->json().is_object()) decoder->fail("an object {\"<id>\": {\"content\": ...}, ...}");
    for (auto it = decoder->json().begin(); it != decoder->json().end(); ++it) {
      AddedToken token = decoder->at(it.key()).added_token(detail::AddedTokenLayout::tokenizer_config);
      token.id = detail::added_token_id(source_name, it.key());
      config.added_tokens.push_back(std::move(token));
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
