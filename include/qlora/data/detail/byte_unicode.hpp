// IWYU pragma: private
// GPT-2's byte <-> character table (openai/gpt-2 encoder.py bytes_to_unicode,
// tokenizers' byte_level.rs bytes_char): byte-level BPE vocabularies spell
// every byte as one printable character, so that no token holds a space or a
// control character. Bytes '!'..'~', 0xA1..0xAC and 0xAE..0xFF stand for
// themselves (as code points); every other byte, in increasing order, gets
// U+0100 + n: space is U+0120 'Ġ', '\n' is U+010A 'Ċ'.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <qlora/io/detail/utf8.hpp>

namespace qlora::detail {

/// Whether byte `b` is one of those that stand for themselves.
constexpr bool byte_is_printable(unsigned b) noexcept {
  return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

/// The code point that spells each byte.
inline constexpr std::array<char32_t, 256> byte_to_code_point = [] {
  std::array<char32_t, 256> table{};
  char32_t next_unprintable = 0x100;
  for (unsigned b = 0; b < 256; ++b) table[b] = byte_is_printable(b) ? char32_t(b) : next_unprintable++;
  return table;
}();

/// One past the largest code point in the table (0x100 + the 68 bytes that do not stand for themselves).
inline constexpr char32_t byte_code_point_end = 0x100 + 68;

/// The byte each code point below byte_code_point_end spells, or -1.
inline constexpr std::array<std::int16_t, byte_code_point_end> code_point_to_byte = [] {
  std::array<std::int16_t, byte_code_point_end> table{};
  table.fill(-1);
  for (unsigned b = 0; b < 256; ++b) table[byte_to_code_point[b]] = static_cast<std::int16_t>(b);
  return table;
}();

/// Appends the byte-level spelling (UTF-8, one or two bytes) of `byte`.
inline void append_byte_level_char(std::string& out, unsigned char byte) {
  const char32_t code_point = byte_to_code_point[byte];
  if (code_point < 0x80) {
    out += static_cast<char>(code_point);
  } else {  // all others are below U+0800: two UTF-8 bytes
    out += static_cast<char>(0xC0 | (code_point >> 6));
    out += static_cast<char>(0x80 | (code_point & 0x3F));
  }
}

/// Appends the bytes a token (valid UTF-8) stands for, as tokenizers'
/// ByteLevel decoder does: each character mapped back to its byte, unless some
/// character is outside the table (an added token such as a run of spaces,
/// stored literally), in which case the token's own bytes.
inline void append_byte_level_decoded(std::string& out, std::string_view token) {
  const std::size_t start = out.size();
  for (std::size_t pos = 0; pos < token.size();) {
    const char32_t code_point = decode_utf8(token, pos);
    if (code_point >= byte_code_point_end || code_point_to_byte[code_point] < 0) {
      out.resize(start);
      out += token;
      return;
    }
    out += static_cast<char>(code_point_to_byte[code_point]);
  }
}

}  // namespace qlora::detail
