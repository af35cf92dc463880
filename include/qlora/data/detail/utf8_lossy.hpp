// IWYU pragma: private
// Bytes to text as Rust's String::from_utf8_lossy (and Python's
// bytes.decode(errors="replace")) make it: each maximal invalid subsequence
// becomes one U+FFFD. Decoders need it because a token can end inside a
// multi-byte character, so the bytes of an arbitrary id sequence need not be
// UTF-8; tokenizers' ByteLevel decoder ends with from_utf8_lossy.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include <qlora/io/detail/utf8.hpp>

namespace qlora::detail {

/// Length of the invalid sequence that starts `bytes` (which must not start
/// with a valid character): the lead byte plus the continuation bytes that
/// still fit a valid character (Unicode's "maximal subpart"), or all of
/// `bytes` when they are a truncated character.
constexpr std::size_t utf8_invalid_length(std::string_view bytes) noexcept {
  const Utf8Lead lead = utf8_lead(static_cast<unsigned char>(bytes[0]));
  if (lead.length < 2) return 1;  // a byte that cannot start a sequence (0x80..0xC1, 0xF5..0xFF)
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(bytes[i]); };
  std::size_t taken = 1;
  if (taken < bytes.size() && byte(taken) >= lead.second_low && byte(taken) <= lead.second_high) {
    ++taken;
    while (taken < lead.length && taken < bytes.size() && (byte(taken) & 0xC0u) == 0x80u) ++taken;
  }
  return taken;
}

/// `bytes` with every invalid UTF-8 sequence replaced by U+FFFD.
inline std::string utf8_lossy(std::string bytes) {
  std::size_t valid = utf8_valid_prefix(bytes);
  if (valid == bytes.size()) return bytes;
  std::string text;
  text.reserve(bytes.size() + 16);
  std::string_view rest = bytes;
  while (valid < rest.size()) {
    text.append(rest.substr(0, valid));
    text += "\xEF\xBF\xBD";
    rest.remove_prefix(valid + utf8_invalid_length(rest.substr(valid)));
    valid = utf8_valid_prefix(rest);
  }
  text.append(rest);
  return text;
}

}  // namespace qlora::detail
