// IWYU pragma: private, include <qlora/lora/lora_linear.hpp>
// The two products with a frozen base weight W̃ [out, in] that every CPU
// linear layer runs — y = x·W̃ᵀ (+ b + extra terms) and dx = dy·W̃ (+ extra
// terms) — dequantizing W̃ one tile at a time, so no full-precision copy of
// the weight ever exists. LoraLinear adds its adapter through the `extra`
// callbacks; FrozenLinear (a base layer without an adapter) passes none.
#pragma once

#include <qlora/core/detail/eigen_matrix.hpp>
#include <qlora/core/dtype.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/tensor_view.hpp>

#include <algorithm>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace qlora::detail {

/// Rows of W̃ dequantized per tile, for tiles `width` floats wide: about
/// 2^21 floats (8 MiB). Every GEMM call re-packs its other operand (x or
/// the fp32 accumulator, [T, ...]), so tiles must be large for that cost to
/// vanish next to the product; 8 MiB per thread is the price.
inline std::int64_t tile_rows_for(std::int64_t width) noexcept {
  constexpr std::int64_t tile_floats = std::int64_t{1} << 21;
  return std::max<std::int64_t>(64, tile_floats / std::max<std::int64_t>(1, width) / 64 * 64);
}

/// Copies float values of any storage dtype (`what` names them in errors) into `out`.
inline void widen_into(const TensorView& values, std::span<float> out, std::string_view what) {
  visit_float_dtype(values.dtype(), [&]<class T>(T) {
    const auto source = values.span<const T>();
    for (std::size_t i = 0; i < source.size(); ++i) out[i] = to_float(source[i]);
  }, what);
}
inline std::vector<float> widened(const TensorView& values) {
  std::vector<float> result(static_cast<std::size_t>(values.numel()));
  widen_into(values, result, "input");
  return result;
}

/// Rounds an fp32 [T, width] block into columns [c0, c0 + width) of `out` (Compute [T, n]).
template <FloatStorage Compute>
void store_columns(const float* block, std::int64_t tokens, std::int64_t width, const TensorView& out,
                   std::int64_t c0) {
  Compute* destination = out.data<Compute>();
  const std::int64_t n = out.shape()[1];
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t c = 0; c < width; ++c) destination[t * n + c0 + c] = from_float<Compute>(block[t * width + c]);
  }
}

/// y = round(x·W̃ᵀ + b + extra) by tiles of output rows. `x` is fp32 [T, in];
/// `bias` fp32 [out] or nullptr; `add_extra(acc, r0, rows)` adds further terms
/// to the fp32 accumulator `acc` [T, rows] of output rows [r0, r0 + rows)
/// before the one rounding to Compute.
template <FloatStorage Compute, class Weight, class AddExtra>
void project_frozen(const Weight& weight, const float* x, std::int64_t tokens, const float* bias, const TensorView& y,
                    unsigned threads, AddExtra&& add_extra) {
  const std::int64_t in = weight.in_features(), out = weight.out_features();
  parallel_for(out, 64, [&](std::int64_t o0, std::int64_t o1) {
    const std::int64_t tile_rows = std::min(o1 - o0, tile_rows_for(in));
    std::vector<float> tile(static_cast<std::size_t>(tile_rows * in));
    std::vector<float> acc(static_cast<std::size_t>(tokens * tile_rows));
    for (std::int64_t r0 = o0; r0 < o1; r0 += tile_rows) {
      const std::int64_t rows = std::min(tile_rows, o1 - r0);
      weight.dequantize_tile(r0, r0 + rows, 0, in, tile.data(), in);
      auto acc_matrix = matrix(acc.data(), tokens, rows, rows);
      acc_matrix.noalias() = matrix(x, tokens, in, in) * matrix(tile.data(), rows, in, in).transpose();
      add_extra(acc_matrix, r0, rows);
      if (bias != nullptr) acc_matrix.rowwise() += matrix(bias + r0, 1, rows, rows).row(0);
      store_columns<Compute>(acc.data(), tokens, rows, y, r0);
    }
  }, threads);
}

/// dx = round(start + dy·W̃) by columns of the input. `dy` is fp32 [T, out];
/// `start(acc, c0, c1)` writes the fp32 accumulator `acc` [T, c1 - c0] the
/// product is added to (zeros, or the adapter's share of dx).
template <FloatStorage Compute, class Weight, class Start>
void backward_input_frozen(const Weight& weight, const float* dy, std::int64_t tokens, const TensorView& dx,
                           unsigned threads, Start&& start) {
  const std::int64_t in = weight.in_features(), out = weight.out_features();
  parallel_for(in, 64, [&](std::int64_t c0, std::int64_t c1) {
    const std::int64_t width = c1 - c0;
    std::vector<float> acc(static_cast<std::size_t>(tokens * width));
    auto acc_matrix = matrix(acc.data(), tokens, width, width);
    start(acc_matrix, c0, c1);
    const std::int64_t tile_rows = std::min(out, tile_rows_for(width));
    std::vector<float> tile(static_cast<std::size_t>(tile_rows * width));
    for (std::int64_t r0 = 0; r0 < out; r0 += tile_rows) {
      const std::int64_t rows = std::min(tile_rows, out - r0);
      weight.dequantize_tile(r0, r0 + rows, c0, c1, tile.data(), width);
      acc_matrix.noalias() += matrix(dy + r0, tokens, rows, out) * matrix(tile.data(), rows, width, width);
    }
    store_columns<Compute>(acc.data(), tokens, width, dx, c0);
  }, threads);
}

}  // namespace qlora::detail
