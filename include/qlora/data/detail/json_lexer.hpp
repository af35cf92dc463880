// IWYU pragma: private
// The token level of JsonDocument's parser: whitespace, strings (with their
// escapes decoded), numbers and literals. Each scanner reports a syntax error
// at the same character, and with the same reason, as CPython's json module
// (Lib/json/decoder.py and Modules/_json.c), so that a user who checks a bad
// line with `python -m json.tool` sees the column we print. (CPython's "... at"
// reasons, which it follows with the position, end in "here" instead.) The
// text has been validated as UTF-8 before it gets here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace qlora::detail {

/// A syntax error `reason` (a string literal) at byte `offset` of the text.
struct JsonSyntaxError {
  std::size_t offset;
  const char* reason;
};

/// JSON's four whitespace characters (RFC 8259 §2).
[[nodiscard]] constexpr bool is_json_whitespace(char c) noexcept {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/// The first position at or after `pos` that is not whitespace.
[[nodiscard]] inline std::size_t skip_json_whitespace(std::string_view text, std::size_t pos) noexcept {
  while (pos < text.size() && is_json_whitespace(text[pos])) ++pos;
  return pos;
}

[[nodiscard]] constexpr bool is_ascii_digit(char c) noexcept { return c >= '0' && c <= '9'; }

/// The end of the longest JSON number that starts at `pos`, or `pos` when none
/// does. Like CPython's scanner it takes the longest valid prefix and leaves
/// the rest to the caller: "1." is the number 1 followed by ".", and "1e+" is 1
/// followed by "e+" (so both end up as "Expecting ',' delimiter" inside an array).
[[nodiscard]] inline std::size_t scan_json_number(std::string_view text, std::size_t pos) noexcept {
  const auto digit_at = [&](std::size_t i) { return i < text.size() && is_ascii_digit(text[i]); };
  const auto skip_digits = [&](std::size_t i) {
    while (digit_at(i)) ++i;
    return i;
  };
  std::size_t end = pos;
  if (end < text.size() && text[end] == '-') ++end;
  if (!digit_at(end)) return pos;
  end = text[end] == '0' ? end + 1 : skip_digits(end);  // no leading zeros: "01" is 0 then "1"
  if (end < text.size() && text[end] == '.' && digit_at(end + 1)) end = skip_digits(end + 1);
  if (end < text.size() && (text[end] == 'e' || text[end] == 'E')) {
    std::size_t exponent = end + 1;
    if (exponent < text.size() && (text[exponent] == '+' || text[exponent] == '-')) ++exponent;
    if (digit_at(exponent)) end = skip_digits(exponent);  // else the 'e' is not part of the number
  }
  return end;
}

/// The position of the first `"`, `\` or control character (< 0x20) at or
/// after `pos`, or text.size(). Eight bytes at a time: string content is most
/// of a training file, and this loop is where the parser spends its time.
[[nodiscard]] inline std::size_t find_string_special(std::string_view text, std::size_t pos) noexcept {
  constexpr std::uint64_t ones = 0x0101010101010101u;
  constexpr std::uint64_t high_bits = 0x8080808080808080u;
  // A byte of (x - ones) & ~x has its high bit set where x's byte is zero; a
  // false hit (a borrow) can only follow a true one, so a nonzero mask means
  // "somewhere in these eight bytes" and the byte loop below finds where.
  const auto has_zero_byte = [](std::uint64_t x) { return (x - ones) & ~x & high_bits; };
  while (text.size() - pos >= sizeof(std::uint64_t)) {
    std::uint64_t word;
    std::memcpy(&word, text.data() + pos, sizeof word);
    const std::uint64_t hits = has_zero_byte(word ^ (ones * '"')) | has_zero_byte(word ^ (ones * '\\')) |
                               ((word - ones * 0x20) & ~word & high_bits);  // bytes below 0x20
    if (hits != 0) break;
    pos += sizeof word;
  }
  while (pos < text.size()) {
    const auto byte = static_cast<unsigned char>(text[pos]);
    if (byte == '"' || byte == '\\' || byte < 0x20) return pos;
    ++pos;
  }
  return pos;
}

/// Appends `code_point` (a Unicode scalar value) to `out` as UTF-8; returns the new end.
inline char* append_utf8(char* out, char32_t code_point) noexcept {
  const auto put = [&out](unsigned value) { *out++ = static_cast<char>(value); };
  if (code_point < 0x80) {
    put(code_point);
  } else if (code_point < 0x800) {
    put(0xC0u | (code_point >> 6));
    put(0x80u | (code_point & 0x3Fu));
  } else if (code_point < 0x10000) {
    put(0xE0u | (code_point >> 12));
    put(0x80u | ((code_point >> 6) & 0x3Fu));
    put(0x80u | (code_point & 0x3Fu));
  } else {
    put(0xF0u | (code_point >> 18));
    put(0x80u | ((code_point >> 12) & 0x3Fu));
    put(0x80u | ((code_point >> 6) & 0x3Fu));
    put(0x80u | (code_point & 0x3Fu));
  }
  return out;
}

/// A scanned string: its decoded bytes and the position after its closing quote.
struct ScannedJsonString {
  std::string_view value;
  std::size_t end;
};

/// Scans the string whose opening quote is at `quote`. A string without escapes
/// is returned as a view into `text` (no copy); one with escapes is decoded into
/// `scratch`, which must have room for the rest of the text (decoding never
/// lengthens: an escape takes at least as many bytes as it produces), and
/// `scratch` is advanced past it.
///
/// Errors and their positions, as CPython's scanstring: "Unterminated string
/// starting here" at the quote; "Invalid control character here" at the character;
/// "Invalid \escape" at the backslash; "Invalid \uXXXX escape" at the `u` (also
/// when fewer than five characters follow the `u`, as CPython insists). CPython
/// accepts an unpaired surrogate (\ud800 alone) and makes a string that is not
/// UTF-8; we reject it at its backslash.
[[nodiscard]] inline std::optional<JsonSyntaxError> scan_json_string(std::string_view text, std::size_t quote,
                                                                      char*& scratch, ScannedJsonString& result) {
  const JsonSyntaxError unterminated{quote, "Unterminated string starting here"};
  std::size_t pos = find_string_special(text, quote + 1);
  if (pos < text.size() && text[pos] == '"') {  // the common case: no escape at all
    result = {text.substr(quote + 1, pos - quote - 1), pos + 1};
    return std::nullopt;
  }
  char* const begin = scratch;
  char* out = scratch;
  std::size_t copied_from = quote + 1;
  const auto hex4 = [&](std::size_t u) -> std::optional<char32_t> {  // the 4 digits after the `u` at `u`
    if (u + 5 >= text.size()) return std::nullopt;
    char32_t value = 0;
    for (std::size_t i = u + 1; i <= u + 4; ++i) {
      const char c = text[i];
      const int digit = is_ascii_digit(c) ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
      if (digit < 0) return std::nullopt;
      value = value * 16 + static_cast<char32_t>(digit);
    }
    return value;
  };
  for (;;) {
    std::memcpy(out, text.data() + copied_from, pos - copied_from);
    out += pos - copied_from;
    if (pos == text.size()) return unterminated;
    const char c = text[pos];
    if (c == '"') break;
    if (c != '\\') return JsonSyntaxError{pos, "Invalid control character here"};
    const std::size_t backslash = pos;
    if (backslash + 1 == text.size()) return unterminated;
    const char escape = text[backslash + 1];
    pos = backslash + 2;
    switch (escape) {
      case '"':
      case '\\':
      case '/':
        *out++ = escape;
        break;
      case 'b':
        *out++ = '\b';
        break;
      case 'f':
        *out++ = '\f';
        break;
      case 'n':
        *out++ = '\n';
        break;
      case 'r':
        *out++ = '\r';
        break;
      case 't':
        *out++ = '\t';
        break;
      case 'u': {
        const std::size_t u = backslash + 1;
        const std::optional<char32_t> unit = hex4(u);
        if (!unit) return JsonSyntaxError{u, "Invalid \\uXXXX escape"};
        char32_t code_point = *unit;
        pos = u + 5;
        const JsonSyntaxError unpaired{backslash, "Unpaired surrogate in \\uXXXX escape (not valid UTF-8)"};
        if (code_point >= 0xDC00 && code_point <= 0xDFFF) return unpaired;
        if (code_point >= 0xD800 && code_point <= 0xDBFF) {
          if (text.substr(pos, 2) != "\\u") return unpaired;
          const std::optional<char32_t> low = hex4(pos + 1);
          if (!low) return JsonSyntaxError{pos + 1, "Invalid \\uXXXX escape"};
          if (*low < 0xDC00 || *low > 0xDFFF) return unpaired;
          code_point = 0x10000 + ((code_point - 0xD800) << 10) + (*low - 0xDC00);
          pos += 6;
        }
        out = append_utf8(out, code_point);
        break;
      }
      default:
        return JsonSyntaxError{backslash, "Invalid \\escape"};
    }
    copied_from = pos;
    pos = find_string_special(text, pos);
  }
  scratch = out;
  result = {std::string_view(begin, static_cast<std::size_t>(out - begin)), pos + 1};
  return std::nullopt;
}

}  // namespace qlora::detail
