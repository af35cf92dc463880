// IWYU pragma: private
// Python's str.strip() on UTF-8 bytes: XTuner's pretrain_map_fn strips every
// document with it, so a pre-training sample must lose exactly the characters
// Python removes. That is not C's isspace: Python strips the code points for
// which str.isspace() holds, which include U+001C..U+001F, NEL (U+0085),
// NBSP (U+00A0) and the Unicode spaces and separators (U+1680, U+2000..U+200A,
// U+2028, U+2029, U+202F, U+205F, U+3000).
//
// Works on the bytes, without decoding: each whitespace character is matched
// by its exact UTF-8 encoding, so text that is not valid UTF-8 is stripped of
// what surrounds it and never read past.
#pragma once

#include <cstddef>
#include <string_view>

namespace qlora::detail {

/// Length of the Python whitespace character whose UTF-8 encoding starts
/// `text`, or 0 when `text` does not start with one.
inline std::size_t python_space_length(std::string_view text) noexcept {
  if (text.empty()) return 0;
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned lead = byte(0);
  if ((lead >= 0x09 && lead <= 0x0D) || (lead >= 0x1C && lead <= 0x20)) return 1;
  if (lead == 0xC2) return text.size() >= 2 && (byte(1) == 0x85 || byte(1) == 0xA0) ? 2 : 0;
  if (text.size() < 3) return 0;
  const unsigned second = byte(1);
  const unsigned third = byte(2);
  const bool is_space = (lead == 0xE1 && second == 0x9A && third == 0x80) ||  // U+1680
                        (lead == 0xE2 && second == 0x80 &&                    // U+2000..200A, 2028, 2029, 202F
                         ((third >= 0x80 && third <= 0x8A) || third == 0xA8 || third == 0xA9 || third == 0xAF)) ||
                        (lead == 0xE2 && second == 0x81 && third == 0x9F) ||  // U+205F
                        (lead == 0xE3 && second == 0x80 && third == 0x80);    // U+3000
  return is_space ? 3 : 0;
}

/// `text` without the Python whitespace at either end.
inline std::string_view python_strip(std::string_view text) noexcept {
  while (const std::size_t length = python_space_length(text)) text.remove_prefix(length);
  while (!text.empty()) {
    // The last character starts at most 3 bytes before the end (every Python
    // space is 1 to 3 bytes long); try each start.
    std::size_t length = 0;
    for (std::size_t size = 1; size <= 3 && size <= text.size() && length == 0; ++size) {
      if (python_space_length(text.substr(text.size() - size)) == size) length = size;
    }
    if (length == 0) break;
    text.remove_suffix(length);
  }
  return text;
}

}  // namespace qlora::detail
