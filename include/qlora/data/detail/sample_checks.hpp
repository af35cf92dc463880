// The checks every consumer of EncodedSample (packers, collators) makes before
// trusting one, and how their errors name the sample: its index in the input
// and, when it came from a file, its source line.
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
inline void check_sample(const EncodedSample& sample, std::size_t index) {
  check(sample.labels.size() == sample.input_ids.size(), "LabelsLengthMismatch",
        "{}: {} labels for {} input_ids; expected one label per token (ignore_index where it is not learned)",
        describe_sample(index, sample.line), sample.labels.size(), sample.input_ids.size());
  check(!sample.input_ids.empty(), "EmptySample", "{}: no tokens; expected at least one (empty samples are dropped before packing)",
        describe_sample(index, sample.line));
}

}  // namespace qlora::detail
