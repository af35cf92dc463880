// Kernels of the CUDA LayerNorm and RMSNorm (cuda/norms.cuh). Device code
// only; the launchers check the arguments and pick the launch shapes.
//
// The arithmetic is nn/layer_norm.hpp's and nn/rms_norm.hpp's, operation by
// operation: row sums in double, the per-element formulas in fp32 with one
// rounding per operation (__fmul_rn / __fadd_rn / __fsub_rn, which nvcc never
// contracts into an FMA, as the CPU build does not), the parameter gradients
// summed per column in token order in double and rounded once. Only the order
// of the double row sums differs from the CPU's, so a row's mean or rstd can
// differ from it by one fp32 rounding at most.
//
//   * norm_forward_kernel: one CTA per row (norm_threads threads);
//   * norm_backward_input_kernel: one CTA per row, dx;
//   * norm_parameter_gradient_kernel: one thread per column over every row.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/kernel/norms.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>

#include <cstdint>

namespace qlora::cuda {

/// Threads of a row CTA: a multiple of the warp size.
inline constexpr int norm_threads = 256;

/// The sum over the CTA of every thread's `value` (every thread gets it).
/// `shared` holds norm_threads / 32 doubles; all threads must call it.
__device__ inline double block_sum(double value, double* shared) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x) / 32; ++w) total += shared[w];
    shared[0] = total;
  }
  __syncthreads();
  const double total = shared[0];
  __syncthreads();  // shared is reused by the next call
  return total;
}

/// x̂ of element i of a row: (x − mean)·rstd (LayerNorm) or x·rstd (RMSNorm), in fp32.
template <bool Centred>
__device__ inline float normalized(float x, float mean, float rstd) {
  if constexpr (Centred) {
    return __fmul_rn(__fsub_rn(x, mean), rstd);
  } else {
    return __fmul_rn(x, rstd);
  }
}

/// y = LayerNorm(x)·w + b (Centred) or RMSNorm(x)·w, one CTA per row; writes the
/// row's mean (Centred) and rstd. bias may be null. y may be x.
template <bool Centred>
__global__ void norm_forward_kernel(const float* x, const float* weight, const float* bias, float eps,
                                    std::int64_t hidden, float* y, float* means, float* rstds) {
  __shared__ double shared[norm_threads / 32];
  const std::int64_t row = blockIdx.x;
  const float* in = x + row * hidden;
  float* out = y + row * hidden;
  double mean = 0;
  if constexpr (Centred) {
    double sum = 0;
    for (std::int64_t i = threadIdx.x; i < hidden; i += blockDim.x) sum += static_cast<double>(in[i]);
    mean = block_sum(sum, shared) / static_cast<double>(hidden);
  }
  double squares = 0;
  for (std::int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const double centred = static_cast<double>(in[i]) - mean;
    squares += centred * centred;
  }
  const double variance = block_sum(squares, shared) / static_cast<double>(hidden);
  float rstd = 0;
  float mean_f = 0;
  if constexpr (Centred) {
    rstd = static_cast<float>(1.0 / sqrt(variance + static_cast<double>(eps)));  // in double, as the CPU
    mean_f = static_cast<float>(mean);
  } else {
    rstd = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(static_cast<float>(variance), eps)));  // in fp32, as the CPU
  }
  if (threadIdx.x == 0) {
    if constexpr (Centred) means[row] = mean_f;
    rstds[row] = rstd;
  }
  // Every thread has read its own elements above and writes only those: y may be x.
  const float shift = -__fmul_rn(rstd, mean_f);
  for (std::int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    if constexpr (Centred) {
      const float scaled = __fmul_rn(__fadd_rn(__fmul_rn(in[i], rstd), shift), weight[i]);
      out[i] = bias != nullptr ? __fadd_rn(scaled, bias[i]) : scaled;
    } else {
      out[i] = __fmul_rn(weight[i], __fmul_rn(in[i], rstd));
    }
  }
}

/// dx of one row per CTA: with g = dy·w, dx = rstd·(g − mean(g) − x̂·mean(g·x̂))
/// (LayerNorm) or rstd·(g − x̂·mean(g·x̂)) (RMSNorm). dx may be dy.
template <bool Centred>
__global__ void norm_backward_input_kernel(const float* x, const float* weight, const float* means, const float* rstds,
                                           const float* dy, std::int64_t hidden, float* dx) {
  __shared__ double shared[norm_threads / 32];
  const std::int64_t row = blockIdx.x;
  const float* in = x + row * hidden;
  const float* grad = dy + row * hidden;
  float* out = dx + row * hidden;
  const float mean = Centred ? means[row] : 0.0f;
  const float rstd = rstds[row];
  double sum_g = 0, sum_g_xhat = 0;
  for (std::int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const double g = static_cast<double>(grad[i]) * static_cast<double>(weight[i]);
    if constexpr (Centred) sum_g += g;
    sum_g_xhat += g * static_cast<double>(normalized<Centred>(in[i], mean, rstd));
  }
  float mean_g = 0;
  if constexpr (Centred) mean_g = static_cast<float>(block_sum(sum_g, shared) / static_cast<double>(hidden));
  const auto mean_g_xhat = static_cast<float>(block_sum(sum_g_xhat, shared) / static_cast<double>(hidden));
  for (std::int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float g = __fmul_rn(grad[i], weight[i]);
    const float centred_g = Centred ? __fsub_rn(g, mean_g) : g;
    out[i] = __fmul_rn(rstd, __fsub_rn(centred_g, __fmul_rn(normalized<Centred>(in[i], mean, rstd), mean_g_xhat)));
  }
}

/// dweight[i] += Σ_t dy[t, i]·x̂[t, i] and (when dbias is set) dbias[i] += Σ_t dy[t, i],
/// one thread per column, summed in token order in double (the CPU's order).
template <bool Centred>
__global__ void norm_parameter_gradient_kernel(const float* x, const float* means, const float* rstds, const float* dy,
                                               std::int64_t tokens, std::int64_t hidden, float* dweight, float* dbias) {
  for (std::int64_t column = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; column < hidden;
       column += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    double weight_sum = 0, bias_sum = 0;
    for (std::int64_t t = 0; t < tokens; ++t) {
      const float grad = dy[t * hidden + column];
      const float mean = Centred ? means[t] : 0.0f;
      weight_sum += static_cast<double>(grad) * static_cast<double>(normalized<Centred>(x[t * hidden + column], mean, rstds[t]));
      bias_sum += static_cast<double>(grad);
    }
    if (dweight != nullptr) dweight[column] = static_cast<float>(static_cast<double>(dweight[column]) + weight_sum);
    if (dbias != nullptr) dbias[column] = static_cast<float>(static_cast<double>(dbias[column]) + bias_sum);
  }
}

}  // namespace qlora::cuda
