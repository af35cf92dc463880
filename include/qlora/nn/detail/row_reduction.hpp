// IWYU pragma: private
// The sums of the per-row ops (norms): a row's statistics and a parameter
// gradient's sum over tokens, both in double (cheap next to the memory
// traffic, and it keeps long rows and many tokens as accurate as torch's fp32
// cascade sums or better) and both in a fixed order, so a result never
// depends on the thread count.
#pragma once

#include <qlora/core/parallel.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace qlora::detail {

/// Below this many elements of work a per-row op runs on the calling thread:
/// starting threads costs more than the work.
inline constexpr std::int64_t min_parallel_elements = 16384;

/// Σ term(i) for i in [0, count), in double. Eight interleaved partial sums:
/// independent lanes let the compiler vectorise without -ffast-math, and the
/// order of the additions is fixed.
template <class Term>
double lane_sum(std::int64_t count, Term&& term) {
  constexpr std::int64_t lanes = 8;
  std::array<double, lanes> partial{};
  std::int64_t i = 0;
  for (; i + lanes <= count; i += lanes) {
    for (std::int64_t lane = 0; lane < lanes; ++lane) partial[static_cast<std::size_t>(lane)] += term(i + lane);
  }
  double sum = 0.0;
  for (; i < count; ++i) sum += term(i);
  for (const double p : partial) sum += p;
  return sum;
}

/// Calls body(begin, end) on chunks of [0, rows) rows of `cols` elements,
/// on up to `threads` threads when the work is big enough to pay for them.
template <class Body>
void for_row_chunks(std::int64_t rows, std::int64_t cols, Body&& body, unsigned threads) {
  parallel_for(rows, std::max<std::int64_t>(1, min_parallel_elements / std::max<std::int64_t>(1, cols)), body,
               threads);
}

/// out[c] += Σ_t term(t, c) over rows t in [0, rows), for each column c in
/// [0, cols). Threads split the columns, and each column is summed over the
/// rows in order in double: the same bits for any thread count.
template <class Term>
void accumulate_column_sums(std::int64_t rows, std::int64_t cols, float* out, Term&& term, unsigned threads) {
  // Columns per thread: at least 16 (a few cache lines per row) and enough
  // rows x columns to pay for a thread.
  const std::int64_t min_columns = std::max<std::int64_t>(16, min_parallel_elements / std::max<std::int64_t>(1, rows));
  parallel_for(
      cols, min_columns,
      [&](std::int64_t begin, std::int64_t end) {
        std::vector<double> sums(static_cast<std::size_t>(end - begin), 0.0);
        for (std::int64_t t = 0; t < rows; ++t) {
          for (std::int64_t c = begin; c < end; ++c) sums[static_cast<std::size_t>(c - begin)] += term(t, c);
        }
        for (std::int64_t c = begin; c < end; ++c) {
          out[c] = static_cast<float>(static_cast<double>(out[c]) + sums[static_cast<std::size_t>(c - begin)]);
        }
      },
      threads);
}

}  // namespace qlora::detail
