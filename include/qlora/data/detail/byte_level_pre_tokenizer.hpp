// IWYU pragma: private
// The pre-tokenizers a byte-level BPE tokenizer.json may have, run as Hugging
// Face tokenizers runs them (pre_tokenizers/byte_level.rs, split.rs,
// sequence.rs):
//   - ByteLevel (GPT-2, CodeGen, Phi-2): add_prefix_space puts a space before
//     each piece that does not start with one; use_regex splits each piece
//     with GPT-2's regex, keeping matches and gaps ("Isolated");
//   - Sequence of Split steps then ByteLevel(use_regex false) (Llama-3, Qwen2
//     style): each Split regex cuts every piece further, Isolated, before
//     ByteLevel.
// The byte -> character mapping of ByteLevel is done by the model, which works
// on bytes directly (detail/byte_level_bpe_model.hpp). Other pre-tokenizers,
// Split behaviours or inverted splits are Error("UnsupportedTokenizer").
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qlora/data/detail/pcre2_regex.hpp>
#include <qlora/data/detail/tokenizer_json.hpp>

namespace qlora::detail {

/// tokenizers' ByteLevel regex (byte_level.rs; openai/gpt-2 encoder.py), which
/// tokenizer.json does not store.
inline constexpr std::string_view gpt2_split_pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

/// The compiled GPT-2 regex, shared by every tokenizer of the process.
inline const Pcre2Regex& gpt2_split_regex() {
  static const Pcre2Regex regex(oniguruma_compatible_pattern(gpt2_split_pattern, "GPT-2 regex"),
                                "tokenizers' ByteLevel regex");
  return regex;
}

/// A regex that matches `literal` (a Split step's {"String": ...} pattern):
/// ASCII punctuation and symbols escaped, everything else as it is.
inline std::string regex_for_literal(std::string_view literal) {
  std::string pattern;
  for (const char c : literal) {
    const auto byte = static_cast<unsigned char>(c);
    const bool alphanumeric =
        (byte >= '0' && byte <= '9') || (byte >= 'A' && byte <= 'Z') || (byte >= 'a' && byte <= 'z');
    if (byte < 0x80 && byte > 0x20 && !alphanumeric) pattern += '\\';
    pattern += c;
  }
  return pattern;
}

class ByteLevelPreTokenizer {
 public:
  /// From tokenizer.json's "pre_tokenizer" value.
  static ByteLevelPreTokenizer from_json(const TokenizerJson& json) {
    if (json.is_null()) json.unsupported("no pre-tokenizer; byte-level BPE needs a ByteLevel pre-tokenizer");
    ByteLevelPreTokenizer pre_tokenizer;
    const std::string type = json.type();
    if (type == "ByteLevel") {
      pre_tokenizer.read_byte_level(json);
      return pre_tokenizer;
    }
    if (type != "Sequence") {
      json.unsupported(
          fmt::format("pre-tokenizer \"{}\" is not supported (expected ByteLevel, or a Sequence of "
                      "Split steps then ByteLevel)",
                      type));
    }
    const TokenizerJson steps = json.at("pretokenizers");
    if (!steps.json().is_array() || steps.json().empty()) steps.fail("a non-empty array of pre-tokenizers");
    const std::size_t last = steps.json().size() - 1;
    for (std::size_t index = 0; index < last; ++index) pre_tokenizer.add_split(steps.element(index));
    const TokenizerJson byte_level = steps.element(last);
    if (byte_level.type() != "ByteLevel") {
      byte_level.unsupported("the last pre-tokenizer of a Sequence must be ByteLevel (Split steps come first)");
    }
    pre_tokenizer.read_byte_level(byte_level);
    return pre_tokenizer;
  }

  /// Calls on_word(std::string_view) for each pre-token of `piece` (valid
  /// UTF-8, no added tokens in it), in order.
  template <class OnWord>
  void split(std::string_view piece, OnWord&& on_word) const {
    split_from(0, piece, on_word);
  }

 private:
  void read_byte_level(const TokenizerJson& json) {
    add_prefix_space_ = json.flag("add_prefix_space", true);
    use_regex_ = json.flag("use_regex", true);
  }

  void add_split(const TokenizerJson& json) {
    if (json.type() != "Split") {
      json.unsupported(
          fmt::format("pre-tokenizer \"{}\" in a Sequence is not supported (expected Split steps "
                      "then ByteLevel)",
                      json.type()));
    }
    if (json.flag("invert", false)) json.at("invert").unsupported("inverted Split is not supported");
    const TokenizerJson behavior = json.at("behavior");
    if (behavior.string() != "Isolated") {
      behavior.unsupported(
          fmt::format("Split behaviour \"{}\" is not supported (expected Isolated)", behavior.string()));
    }
    const TokenizerJson pattern = json.at("pattern");
    const std::string what = pattern.location();
    if (const auto regex = pattern.find("Regex")) {
      splits_.emplace_back(oniguruma_compatible_pattern(regex->string(), what), what);
    } else if (const auto literal = pattern.find("String")) {
      splits_.emplace_back(regex_for_literal(literal->string()), what);
    } else {
      pattern.fail("{\"Regex\": ...} or {\"String\": ...}");
    }
  }

  template <class OnWord>
  void split_from(std::size_t step, std::string_view piece, OnWord& on_word) const {
    if (step < splits_.size()) {
      split_isolated(splits_[step], piece, [&](std::string_view part) { split_from(step + 1, part, on_word); });
      return;
    }
    std::string prefixed;
    if (add_prefix_space_ && piece.front() != ' ') {
      prefixed.reserve(piece.size() + 1);
      prefixed += ' ';
      prefixed += piece;
      piece = prefixed;
    }
    if (use_regex_) {
      split_isolated(gpt2_split_regex(), piece, on_word);
    } else {
      on_word(piece);
    }
  }

  std::vector<Pcre2Regex> splits_;  // a Sequence's Split steps, in order
  bool add_prefix_space_ = true;
  bool use_regex_ = true;
};

}  // namespace qlora::detail
