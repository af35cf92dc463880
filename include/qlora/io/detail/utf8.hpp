// IWYU pragma: private
// Strict UTF-8 validation and decoding, as Rust's `str::from_utf8` does it: the
// safetensors reference rejects a header that is not valid UTF-8 before it looks
// at the JSON, and so must we (nlohmann only checks bytes inside strings).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace qlora::detail {

/// The length of the longest valid UTF-8 prefix of `text`: `text.size()` when all
/// of it is valid. Rejects overlong forms, surrogates (U+D800..U+DFFF) and code
/// points above U+10FFFF (Unicode 15, table 3-7).
inline std::size_t utf8_valid_prefix(std::string_view text) noexcept {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  std::size_t i = 0;
  while (i < text.size()) {
    // ASCII, the common case, eight bytes at a time.
    std::uint64_t word;
    if (text.size() - i >= sizeof word &&
        (std::memcpy(&word, text.data() + i, sizeof word), (word & 0x8080808080808080u) == 0)) {
      i += sizeof word;
      continue;
    }
    const unsigned lead = byte(i);
    if (lead < 0x80) {
      ++i;
      continue;
    }
    std::size_t length = 0;
    unsigned low = 0x80;  // range of the second byte, narrowed for E0, ED, F0, F4
    unsigned high = 0xBF;
    if (lead >= 0xC2 && lead <= 0xDF) {
      length = 2;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      length = 3;
      if (lead == 0xE0) low = 0xA0;   // no overlong 3-byte forms
      if (lead == 0xED) high = 0x9F;  // no surrogates
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      length = 4;
      if (lead == 0xF0) low = 0x90;   // no overlong 4-byte forms
      if (lead == 0xF4) high = 0x8F;  // nothing above U+10FFFF
    } else {
      return i;
    }
    if (text.size() - i < length || byte(i + 1) < low || byte(i + 1) > high) return i;
    for (std::size_t k = 2; k < length; ++k) {
      if ((byte(i + k) & 0xC0u) != 0x80u) return i;
    }
    i += length;
  }
  return text.size();
}

/// True when all of `text` is valid UTF-8.
inline bool is_valid_utf8(std::string_view text) noexcept { return utf8_valid_prefix(text) == text.size(); }

/// Decodes the code point that starts at `text[pos]` and advances `pos` past it.
/// `text` must be valid UTF-8 (checked by the caller).
inline char32_t decode_utf8(std::string_view text, std::size_t& pos) noexcept {
  const auto lead = static_cast<unsigned char>(text[pos]);
  const std::size_t length = lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
  char32_t code_point = length == 1 ? lead : lead & (0x7Fu >> length);
  for (std::size_t k = 1; k < length; ++k) {
    code_point = (code_point << 6) | (static_cast<unsigned char>(text[pos + k]) & 0x3Fu);
  }
  pos += length;
  return code_point;
}

}  // namespace qlora::detail
