// Kernels of the CUDA lm_head cross-entropy (cuda/cross_entropy.cuh): the
// work around its cuBLAS GEMMs on one chunk of supervised tokens. Device code
// only; the launcher checks the arguments and picks the launch shapes.
//
//   * copy_rows_kernel: gathers the chunk's rows of hidden into a contiguous
//     [rows, H] block, or scatters the chunk's dhidden rows back;
//   * cross_entropy_rows_kernel: one CTA per row of the logits chunk
//     [rows, V]: the row's max and Σ exp(z − max) in one pass (online
//     softmax), the row loss logsumexp − z[target], and, for a backward, the
//     logits turned in place into s·(softmax − onehot(target)).
//
// Numerics (nn/cross_entropy.hpp's, but for the order of the sums):
//   * z = fl32(logit + bias), exp(z − max) in fp32 (expf, within 2 ulp), as
//     the CPU's Eigen exp;
//   * Σ exp in double. A row has up to ~10^5 terms (Phi-2: 51200): an fp32
//     sum would lose ~V·2^-24 of it, Kahan would fix that with four fp32
//     operations per term, while double costs one conversion and one add —
//     and nothing measurable, because the kernel is bound by reading the
//     row (H100 and A100 run fp64 at half the fp32 rate);
//   * the loss max + log(Σ) − z[target] in double; the gradient
//     fl32(expf(z − max) · fl32(s / Σ)) − s at the target, one rounding per
//     operation (__fmul_rn / __fsub_rn: nvcc never fuses them into an FMA).
// Every reduction has a fixed shape (warp shuffles, then the warps in
// order): no atomics, the same bits on every run.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/kernel/cross_entropy.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace qlora::cuda {

/// Threads of a cross_entropy_rows_kernel CTA (a multiple of the warp size):
/// many loads in flight per row, since a chunk has only ~128 rows.
inline constexpr int cross_entropy_threads = 512;
/// Threads of a copy_rows_kernel CTA.
inline constexpr int cross_entropy_copy_threads = 256;

/// The softmax statistics of a set of logits: their max and Σ exp(z − max).
/// An empty set has sum 0 (a non-empty one has sum >= 1: its max counts 1).
struct SoftmaxStatistics {
  float max;
  double sum;
};

/// The statistics of the union of two disjoint sets.
__device__ inline SoftmaxStatistics merge_softmax_statistics(SoftmaxStatistics a, SoftmaxStatistics b) {
  if (b.sum == 0.0) return a;
  if (a.sum == 0.0) return b;
  const float max = fmaxf(a.max, b.max);
  return {max, a.sum * exp(static_cast<double>(a.max) - max) + b.sum * exp(static_cast<double>(b.max) - max)};
}

/// The statistics over the CTA of every thread's `own` (every thread gets
/// them): shuffles within each warp, then warp 0's thread 0 merges the warps
/// in order. `shared` holds cross_entropy_threads / 32 entries; all threads
/// must call it.
__device__ inline SoftmaxStatistics block_softmax_statistics(SoftmaxStatistics own, SoftmaxStatistics* shared) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const SoftmaxStatistics other{__shfl_down_sync(0xffffffffu, own.max, offset),
                                  __shfl_down_sync(0xffffffffu, own.sum, offset)};
    own = merge_softmax_statistics(own, other);
  }
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  if (lane == 0) shared[warp] = own;
  __syncthreads();
  if (threadIdx.x == 0) {
    SoftmaxStatistics total = shared[0];
    for (int w = 1; w < static_cast<int>(blockDim.x) / 32; ++w) total = merge_softmax_statistics(total, shared[w]);
    shared[0] = total;
  }
  __syncthreads();
  return shared[0];
}

/// For each row r of the chunk's logits [rows, vocab] (grid-stride over rows,
/// one CTA per row): with z = logits[r] + bias (bias may be null) and t the
/// target of hidden row positions[r],
///   row_losses[r] = logsumexp(z) − z[t]          (double)
/// and, when Backward, logits[r] = scale·(softmax(z) − onehot(t)) in place.
/// Targets are in [0, vocab): the launcher checked them.
template <bool Backward>
__global__ void __launch_bounds__(cross_entropy_threads)
    cross_entropy_rows_kernel(float* logits, const float* bias, const std::int32_t* targets,
                              const std::int64_t* positions, std::int64_t rows, std::int64_t vocab, float scale,
                              double* row_losses) {
  __shared__ SoftmaxStatistics shared[cross_entropy_threads / 32];
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float* z = logits + r * vocab;
    const std::int32_t target = targets[positions[r]];
    const auto logit = [&](std::int64_t v) { return bias != nullptr ? __fadd_rn(z[v], bias[v]) : z[v]; };
    // Read before the barriers in block_softmax_statistics: the gradient overwrites z after them.
    const float target_logit = threadIdx.x == 0 ? logit(target) : 0.0f;

    // Online softmax over this thread's elements: a new max rescales the sum so far.
    SoftmaxStatistics own{-INFINITY, 0.0};
    for (std::int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
      const float value = logit(v);
      if (value > own.max) {
        own.sum = own.sum * exp(static_cast<double>(own.max) - value) + 1.0;
        own.max = value;
      } else {
        own.sum += static_cast<double>(expf(value - own.max));
      }
    }
    const SoftmaxStatistics row = block_softmax_statistics(own, shared);
    if (threadIdx.x == 0) {
      row_losses[r] = static_cast<double>(row.max) + log(row.sum) - static_cast<double>(target_logit);
    }
    if constexpr (Backward) {
      const auto probability_scale = static_cast<float>(static_cast<double>(scale) / row.sum);
      for (std::int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
        const float gradient = __fmul_rn(expf(logit(v) - row.max), probability_scale);
        z[v] = v == target ? __fsub_rn(gradient, scale) : gradient;
      }
    }
    __syncthreads();  // shared[0] is read above; the next row's statistics overwrite it
  }
}

/// Which way copy_rows_kernel moves rows.
enum class RowCopy {
  gather,   ///< dense[r] = sparse[positions[r]]
  scatter,  ///< sparse[positions[r]] = dense[r]
};

/// Moves `rows` rows of `width` floats between a dense block [rows, width]
/// and the rows positions[0..rows) of a sparse [T, width] tensor (distinct
/// positions: no two threads write one element). Grid-stride over elements.
template <RowCopy Direction>
__global__ void __launch_bounds__(cross_entropy_copy_threads)
    copy_rows_kernel(const float* source, float* destination, const std::int64_t* positions, std::int64_t rows,
                     std::int64_t width) {
  const std::int64_t count = rows * width;
  for (std::int64_t e = std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < count;
       e += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t r = e / width;
    const std::int64_t sparse = positions[r] * width + (e - r * width);
    if constexpr (Direction == RowCopy::gather) {
      destination[e] = source[sparse];
    } else {
      destination[sparse] = source[e];
    }
  }
}

}  // namespace qlora::cuda
