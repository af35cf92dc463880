// IWYU pragma: private
// A compiled PCRE2 regex that matches as Hugging Face tokenizers' Oniguruma
// regexes do: Unicode classes (PCRE2_UTF | PCRE2_UCP), `^` and `$` at line
// boundaries (PCRE2_MULTILINE: Oniguruma's default Ruby syntax has no other
// meaning for them), JIT when the library has it, and `\s` / `\S` meaning the
// Unicode White_Space property, as in Oniguruma. (PCRE2 10.42's UCP `\s` also
// takes U+180E MONGOLIAN VOWEL SEPARATOR, which left White_Space in Unicode
// 6.3; Oniguruma and Rust's regex follow Unicode.)
//
// The compiled code is immutable and shared by copies: PCRE2 allows concurrent
// matching on one code object, each thread with its own match data, which is
// kept thread_local so that matching never allocates.
#pragma once

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include <qlora/core/error.hpp>

namespace qlora::detail {

/// [begin, end) byte offsets of a match.
struct RegexMatch {
  std::size_t begin = 0;
  std::size_t end = 0;
};

/// PCRE2's message for an error code.
inline std::string pcre2_message(int error_code) {
  std::array<PCRE2_UCHAR, 256> buffer{};
  const int length = pcre2_get_error_message(error_code, buffer.data(), buffer.size());
  return length < 0 ? fmt::format("PCRE2 error {}", error_code)
                    : std::string(reinterpret_cast<const char*>(buffer.data()), static_cast<std::size_t>(length));
}

/// `pattern` with `\s` and `\S` spelled as the White_Space property (valid in
/// and out of character classes). Escapes whose meaning differs between
/// Oniguruma and PCRE2 are refused with Error("UnsupportedTokenizer") rather
/// than matched differently; `what` names the pattern in the message:
///   - `\w`, `\W`, `\b`, `\B`: Unicode word characters (Marks, numbers other
///     than Nd) differ;
///   - `\h`, `\H`: a hexadecimal digit in Oniguruma, horizontal white space
///     in PCRE2;
///   - `\v`, `\V`: the vertical tab (U+000B) in Oniguruma, vertical white
///     space in PCRE2;
///   - `\C`: one code unit in PCRE2 (it would cut UTF-8 sequences apart, and
///     PCRE2 then runs on invalid UTF-8: undefined behaviour); Oniguruma
///     refuses the pattern. Pcre2Regex also compiles with
///     PCRE2_NEVER_BACKSLASH_C, so no path can reach it.
inline std::string oniguruma_compatible_pattern(std::string_view pattern, std::string_view what) {
  std::string rewritten;
  rewritten.reserve(pattern.size() + 32);
  for (std::size_t pos = 0; pos < pattern.size(); ++pos) {
    if (pattern[pos] != '\\' || pos + 1 == pattern.size()) {
      rewritten += pattern[pos];
      continue;
    }
    const char escaped = pattern[++pos];
    if (escaped == 'Q') {  // \Q...\E is literal text: copy it untouched
      const std::size_t close = pattern.find("\\E", pos + 1);
      const std::size_t stop = close == std::string_view::npos ? pattern.size() : close + 2;
      rewritten.append(pattern.substr(pos - 1, stop - (pos - 1)));
      pos = stop - 1;
    } else if (escaped == 's') {
      rewritten += "\\p{White_Space}";
    } else if (escaped == 'S') {
      rewritten += "\\P{White_Space}";
    } else if (std::string_view("wWbBhHvVC").find(escaped) != std::string_view::npos) {
      throw Error("UnsupportedTokenizer",
                  fmt::format("{}: the regex uses \\{} at offset {}, whose meaning differs between "
                              "Oniguruma (Hugging Face tokenizers) and PCRE2; not supported",
                              what, escaped, pos - 1));
    } else {
      rewritten += '\\';
      rewritten += escaped;
    }
  }
  return rewritten;
}

class Pcre2Regex {
 public:
  /// Where a match may start.
  enum class Anchor : std::uint8_t { anywhere, at_start };

  /// Compiles `pattern` as it is (no rewriting); `what` names it in errors.
  /// With Anchor::at_start, find() only matches at its `start`. An invalid
  /// pattern is Error("InvalidRegex") with PCRE2's message and offset.
  Pcre2Regex(std::string_view pattern, std::string_view what, Anchor anchor = Anchor::anywhere) {
    int error_code = 0;
    PCRE2_SIZE error_offset = 0;
    const std::uint32_t options =
        PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE | PCRE2_NEVER_BACKSLASH_C | (anchor == Anchor::at_start ? PCRE2_ANCHORED : 0u);
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options, &error_code,
                                     &error_offset, nullptr);
    check(code != nullptr, "InvalidRegex", "{}: regex does not compile at offset {}: {}", what, error_offset,
          pcre2_message(error_code));
    code_.reset(code, pcre2_code_free);
    // Without JIT support (some platforms) PCRE2 interprets: slower, same result.
    jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  }

  /// The leftmost match that starts at or after `start`, or nullopt.
  /// `subject` must be valid UTF-8 and `start` on a character boundary
  /// (the callers check, so PCRE2 does not check again).
  [[nodiscard]] std::optional<RegexMatch> find(std::string_view subject, std::size_t start) const {
    pcre2_match_data* match_data = thread_match_data();
    const auto text = reinterpret_cast<PCRE2_SPTR>(subject.data());
    // pcre2_jit_match skips the argument checks; it never checks UTF-8.
    const int result =
        jit_ ? pcre2_jit_match(code_.get(), text, subject.size(), start, 0, match_data, nullptr)
             : pcre2_match(code_.get(), text, subject.size(), start, PCRE2_NO_UTF_CHECK, match_data, nullptr);
    if (result == PCRE2_ERROR_NOMATCH) return std::nullopt;
    // 0 means "ovector too small for the groups": the whole match is still there.
    check(result >= 0, "RegexFailed", "regex match failed at byte {}: {}", start, pcre2_message(result));
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match_data);
    return RegexMatch{ovector[0], ovector[1]};
  }

 private:
  /// One match-data block per thread, for every pattern: only the whole match
  /// (one offset pair) is ever read.
  static pcre2_match_data* thread_match_data() {
    thread_local const std::unique_ptr<pcre2_match_data, void (*)(pcre2_match_data*)> match_data(
        pcre2_match_data_create(1, nullptr), pcre2_match_data_free);
    check(match_data != nullptr, "OutOfMemory", "cannot allocate PCRE2 match data");
    return match_data.get();
  }

  std::shared_ptr<pcre2_code> code_;
  bool jit_ = false;
};

/// Calls on_piece(std::string_view) for each non-empty piece of `subject` in
/// order: every match of `regex` and every gap between matches, which is
/// tokenizers' Split with behaviour "Isolated". An empty match splits nothing
/// (tokenizers drops empty pieces); the search then moves one character on.
template <class OnPiece>
void split_isolated(const Pcre2Regex& regex, std::string_view subject, OnPiece&& on_piece) {
  std::size_t piece_start = 0;
  std::size_t search = 0;
  while (search < subject.size()) {
    const std::optional<RegexMatch> match = regex.find(subject, search);
    if (!match) break;
    if (match->end == match->begin) {
      // Step over one UTF-8 character: skip its continuation bytes.
      search = match->begin + 1;
      while (search < subject.size() && (static_cast<unsigned char>(subject[search]) & 0xC0u) == 0x80u) ++search;
      continue;
    }
    if (match->begin > piece_start) on_piece(subject.substr(piece_start, match->begin - piece_start));
    on_piece(subject.substr(match->begin, match->end - match->begin));
    piece_start = search = match->end;
  }
  if (piece_start < subject.size()) on_piece(subject.substr(piece_start));
}

}  // namespace qlora::detail
