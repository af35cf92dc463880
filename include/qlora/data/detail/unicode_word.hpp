// IWYU pragma: private
// Word and white-space tests at the edges of a UTF-8 text, with the meaning of
// Rust regex's Unicode `\w` and `\s`: Hugging Face tokenizers' AddedVocabulary
// decides single_word, lstrip and rstrip with `^\w`, `\w$`, `^\s*` and `\s*$`.
#pragma once

#include <cstddef>
#include <string_view>

#include <qlora/data/detail/pcre2_regex.hpp>
#include <qlora/io/detail/utf8.hpp>

namespace qlora::detail {

/// Rust regex's `\s`: the Unicode White_Space property (unchanged since
/// Unicode 6.3, when U+180E left it).
constexpr bool is_white_space(char32_t c) noexcept {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/// Whether the character at `text[pos]` (valid UTF-8, pos < size) is Rust
/// regex's `\w`: Alphabetic, Mark, Decimal_Number, Connector_Punctuation
/// or Join_Control (UTS #18 annex C).
inline bool is_word_character_at(std::string_view text, std::size_t pos) {
  const auto lead = static_cast<unsigned char>(text[pos]);
  if (lead < 0x80) {
    return (lead >= 'a' && lead <= 'z') || (lead >= 'A' && lead <= 'Z') || (lead >= '0' && lead <= '9') || lead == '_';
  }
  static const Pcre2Regex word(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}])", "the \\w class",
                               Pcre2Regex::Anchor::at_start);
  return word.find(text, pos).has_value();
}

/// Offset of the first byte of the last character of `text` (non-empty, valid UTF-8).
constexpr std::size_t last_character_start(std::string_view text) noexcept {
  std::size_t pos = text.size() - 1;
  while (pos > 0 && (static_cast<unsigned char>(text[pos]) & 0xC0u) == 0x80u) --pos;
  return pos;
}

/// `^\w` on `text`.
inline bool starts_with_word_character(std::string_view text) { return !text.empty() && is_word_character_at(text, 0); }

/// `\w$` on `text`.
inline bool ends_with_word_character(std::string_view text) {
  return !text.empty() && is_word_character_at(text, last_character_start(text));
}

/// Length in bytes of the white space that starts `text` (`^\s*`).
inline std::size_t leading_white_space(std::string_view text) noexcept {
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t next = pos;
    if (!is_white_space(decode_utf8(text, next))) break;
    pos = next;
  }
  return pos;
}

/// Offset where the white space that ends `text` begins (`\s*$`).
inline std::size_t trailing_white_space_start(std::string_view text) noexcept {
  std::size_t end = text.size();
  while (end > 0) {
    const std::size_t start = last_character_start(text.substr(0, end));
    std::size_t next = start;
    if (!is_white_space(decode_utf8(text, next))) break;
    end = start;
  }
  return end;
}

}  // namespace qlora::detail
