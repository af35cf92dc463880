// Kernels of the CUDA embedding (cuda/embedding.cuh).
//   * embedding_forward_kernel: a grid-stride copy of table rows;
//   * embedding_backward_kernel: one thread per column, adding every token's
//     gradient in token order, as the CPU does — no atomics, so the sums are
//     deterministic and bit-identical to nn/embedding.hpp's.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/kernel/embedding.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>

#include <cstdint>

namespace qlora::cuda {

/// out[t, c] = table[ids[t], c] over tokens x hidden elements. (Templates, like
/// every kernel here, so that the header obeys the ODR.)
template <class T>
__global__ void embedding_forward_kernel(const T* table, const std::int32_t* ids, std::int64_t tokens,
                                         std::int64_t hidden, T* out) {
  for (std::int64_t e = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; e < tokens * hidden;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t t = e / hidden, c = e % hidden;
    out[e] = table[static_cast<std::int64_t>(ids[t]) * hidden + c];
  }
}

/// dtable[ids[t], c] += dout[t, c] for every token t (skipping `padding` when >= 0).
template <class T>
__global__ void embedding_backward_kernel(const std::int32_t* ids, const T* dout, std::int64_t tokens,
                                          std::int64_t hidden, std::int32_t padding, T* dtable) {
  for (std::int64_t c = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; c < hidden;
       c += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    for (std::int64_t t = 0; t < tokens; ++t) {
      const std::int32_t id = ids[t];
      if (id == padding) continue;
      T* cell = dtable + static_cast<std::int64_t>(id) * hidden + c;
      *cell = __fadd_rn(*cell, dout[t * hidden + c]);
    }
  }
}

}  // namespace qlora::cuda
