// The checks made on tokens and their labels before they are trusted: by every
// consumer of EncodedSample (packers, collators) and by
// PackedSequence::append_segment, and how their errors name the tokens (a
// sample by its index in the input and, when it came from a file, its source
// line).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/encoded_sample.hpp>

namespace qlora::detail {

/// "sample 12 (line 40)", or "sample 12" for a sample not read from a file.
inline std::string describe_sample(std::size_t index, std::uint64_t line) {
  return line == 0 ? fmt::format("sample {}", index) : fmt::format("sample {} (line {})", index, line);
}

/// One label per token and at least one token: a shorter label list would shift
/// every later label onto the wrong token once samples are concatenated, and an
/// empty sample would become a zero-length segment (cu_seqlens not increasing).
/// `describe()` names the tokens in the message ("sample 12 (line 40)"); it is
/// called only on failure, so that the check costs no formatting per sample.
template <class Describe>
void check_labelled_tokens(std::size_t token_count, std::size_t label_count, const Describe& describe) {
  if (label_count != token_count) [[unlikely]] {
    throw Error("LabelsLengthMismatch",
                fmt::format("{}: {} labels for {} input_ids; expected one label per token (ignore_index where it is "
                            "not learned)",
                            describe(), label_count, token_count));
  }
  if (token_count == 0) [[unlikely]] {
    throw Error("EmptySample",
                fmt::format("{}: no tokens; expected at least one (empty samples are dropped before packing)",
                            describe()));
  }
}

inline void check_sample(const EncodedSample& sample, std::size_t index) {
  check_labelled_tokens(sample.input_ids.size(), sample.labels.size(),
                        [&] { return describe_sample(index, sample.line); });
}

}  // namespace qlora::detail
