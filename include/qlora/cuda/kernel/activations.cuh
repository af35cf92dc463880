// Kernels of the CUDA MLP activations (cuda/activations.cuh): gelu_new, silu
// and swiglu, forward and backward, one grid-stride loop over elements each.
//
// The formulas are nn/activations.hpp's, operation by operation, with one
// rounding per operation (__fmul_rn / __fadd_rn / __fdiv_rn: never contracted
// into an FMA). exp and tanh are CUDA's expf and tanhf (a few ulp, where the
// CPU uses Eigen's); as there, tanh of |u| >= 0.625 is 1 − 2/(exp(2|u|) + 1), so
// that 1 + tanh(u) and 1 − tanh² keep their relative accuracy in the tails.
// Each output element reads only the same element of the inputs, before it
// writes: any output may alias any input.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/kernel/activations.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>

#include <cstdint>

namespace qlora::cuda {

/// Which activation an element-wise kernel computes.
enum class Activation : std::uint8_t { gelu_new, silu, swiglu };

namespace detail {

__device__ inline float accurate_tanh(float u) {
  const float magnitude = fabsf(u);
  if (magnitude < 0.625f) return tanhf(u);
  return copysignf(__fsub_rn(1.0f, __fdiv_rn(2.0f, __fadd_rn(expf(__fmul_rn(2.0f, magnitude)), 1.0f))), u);
}

/// tanh(√(2/π)·(x + 0.044715·x³)), rounded as transformers' chain of fp32 ops.
__device__ inline float gelu_new_tanh(float v) {
  constexpr float sqrt_2_over_pi = 0.7978845608028654f;  // nn/activations.hpp's constants
  constexpr float cubic = 0.044715f;
  const float inner = __fmul_rn(sqrt_2_over_pi, __fadd_rn(v, __fmul_rn(cubic, __fmul_rn(__fmul_rn(v, v), v))));
  return accurate_tanh(inner);
}

}  // namespace detail

/// out[i] = act(a[i]) (gelu_new, silu) or silu(a[i])·b[i] (swiglu).
template <Activation Act>
__global__ void activation_forward_kernel(const float* a, const float* b, float* out, std::int64_t count) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float v = a[i];
    if constexpr (Act == Activation::gelu_new) {
      out[i] = __fmul_rn(__fmul_rn(0.5f, v), __fadd_rn(1.0f, detail::gelu_new_tanh(v)));
    } else {
      const float silu = __fdiv_rn(v, __fadd_rn(1.0f, expf(-v)));
      out[i] = Act == Activation::silu ? silu : __fmul_rn(silu, b[i]);
    }
  }
}

/// gelu_new, silu: da[i] = dout[i]·act'(a[i]). swiglu (a = gate, b = up):
/// da = silu'(gate)·(dout·up), db = dout·silu(gate).
template <Activation Act>
__global__ void activation_backward_kernel(const float* a, const float* b, const float* dout, float* da, float* db,
                                           std::int64_t count) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float v = a[i];
    const float grad = dout[i];
    if constexpr (Act == Activation::gelu_new) {
      constexpr float sqrt_2_over_pi = 0.7978845608028654f;
      constexpr float cubic = 0.044715f;
      const float th = detail::gelu_new_tanh(v);
      const float through_sum =
          __fmul_rn(__fmul_rn(__fmul_rn(grad, __fmul_rn(0.5f, v)), __fsub_rn(1.0f, __fmul_rn(th, th))), sqrt_2_over_pi);
      const float through_cube = __fmul_rn(__fmul_rn(through_sum, cubic), __fmul_rn(3.0f, __fmul_rn(v, v)));
      da[i] = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(grad, __fadd_rn(1.0f, th)), 0.5f), through_sum), through_cube);
    } else if constexpr (Act == Activation::silu) {
      const float sigmoid = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-v)));
      da[i] = __fmul_rn(__fmul_rn(grad, sigmoid), __fadd_rn(1.0f, __fmul_rn(v, __fsub_rn(1.0f, sigmoid))));
    } else {
      const float up = b[i];
      const float denominator = __fadd_rn(1.0f, expf(-v));
      const float sigmoid = __fdiv_rn(1.0f, denominator);
      const float dup = __fmul_rn(grad, __fdiv_rn(v, denominator));
      da[i] = __fmul_rn(__fmul_rn(__fmul_rn(grad, up), sigmoid), __fadd_rn(1.0f, __fmul_rn(v, __fsub_rn(1.0f, sigmoid))));
      db[i] = dup;  // every input was read above: either output may alias any input
    }
  }
}

}  // namespace qlora::cuda
