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

/// What a UTF-8 lead byte allows (Unicode 15, table 3-7): the length of its
/// sequence (0: not a lead byte) and the range of the byte after it, narrowed
/// for E0 (no overlong 3-byte forms), ED (no surrogates), F0 (no overlong
/// 4-byte forms) and F4 (nothing above U+10FFFF). Shared by the validator
/// below and by decoders that replace invalid sequences (utf8_lossy.hpp).
struct Utf8Lead {
  std::size_t length = 0;
  unsigned second_low = 0x80;
  unsigned second_high = 0xBF;
};

constexpr Utf8Lead utf8_lead(unsigned char lead) noexcept {
  if (lead < 0x80) return {1, 0x80, 0xBF};
  if (lead >= 0xC2 && lead <= 0xDF) return {2, 0x80, 0xBF};
  if (lead >= 0xE0 && lead <= 0xEF) return {3, lead == 0xE0 ? 0xA0u : 0x80u, lead == 0xED ? 0x9Fu : 0xBFu};
  if (lead >= 0xF0 && lead <= 0xF4) return {4, lead == 0xF0 ? 0x90u : 0x80u, lead == 0xF4 ? 0x8Fu : 0xBFu};
  return {};
}

/// The length of the longest valid UTF-8 prefix of `text`: `text.size()` when all
/// of it is valid. Rejects overlong forms, surrogates (U+D800..U+DFFF) and code
/// points above U+10FFFF.
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
    const Utf8Lead lead = utf8_lead(byte(i));
    if (lead.length == 1) {
      ++i;
      continue;
    }
    if (lead.length == 0 || text.size() - i < lead.length || byte(i + 1) < lead.second_low ||
        byte(i + 1) > lead.second_high) {
      return i;
    }
    for (std::size_t k = 2; k < lead.length; ++k) {
      if ((byte(i + k) & 0xC0u) != 0x80u) return i;
    }
    i += lead.length;
  }
  return text.size();
}

/// True when all of `text` is valid UTF-8.
inline bool is_valid_utf8(std::string_view text) noexcept { return utf8_valid_prefix(text) == text.size(); }

/// Decodes the code point that starts at `text[pos]` and advances `pos` past it.
/// `text` must be valid UTF-8 (checked by the caller).
inline char32_t decode_utf8(std::string_view text, std::size_t& pos) noexcept {
  const auto lead = static_cast<unsigned char>(text[pos]);
  const std::size_t length = utf8_lead(lead).length;
  char32_t code_point = length == 1 ? lead : lead & (0x7Fu >> length);
  for (std::size_t k = 1; k < length; ++k) {
    code_point = (code_point << 6) | (static_cast<unsigned char>(text[pos + k]) & 0x3Fu);
  }
  pos += length;
  return code_point;
}

}  // namespace qlora::detail
