// Kernel of the CUDA rotary embedding (cuda/rotary.cuh): one thread per
// (token, head, pair i < rotary_dim/2), grid-stride. The angles' cos and sin
// come from the host (RotaryEmbedding::token_angles, the CPU's values), and
// the turn is rounded as the CPU rounds it (each product, then the sum:
// __fmul_rn / __fadd_rn / __fsub_rn, never an FMA), so results are
// bit-identical to nn/rotary.hpp's.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/kernel/rotary.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>

#include <cstdint>

namespace qlora::cuda {

/// Turns x [tokens, heads, head_dim] in place: dims i and i + half of each head by the token's
/// angle i (sin · sin_sign: +1 forward, −1 backward). cos, sin: [tokens, half].
template <class T>
__global__ void rotary_kernel(T* x, const T* cos, const T* sin, T sin_sign, std::int64_t tokens, std::int64_t heads,
                              std::int64_t head_dim, std::int64_t half) {
  const std::int64_t count = tokens * heads * half;
  for (std::int64_t e = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t i = e % half;
    const std::int64_t head_row = e / half;  // t · heads + head
    const std::int64_t t = head_row / heads;
    T* first = x + head_row * head_dim;
    const T c = cos[t * half + i];
    const T s = __fmul_rn(sin_sign, sin[t * half + i]);
    const T x1 = first[i];
    const T x2 = first[i + half];
    first[i] = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
    first[i + half] = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
  }
}

}  // namespace qlora::cuda
