// Blockwise 4-bit (NF4/FP4) dequantization kernel, plain or double-quantized
// state, in one launch. Device code only; the launcher is
// cuda/dequantize_4bit.cuh.
//
// Bit-identical to dequantize_4bit_ref (quant/blockwise_4bit.hpp):
// out[i] = Out(fl32(Q::decode(code_i) * absmax(block))), the absmax rebuilt
// from the nested codes with rebuild_nested_absmax (two roundings, no FMA),
// the conversion by the shared bf16/fp16 from_float.
//
// Layout (bandwidth first: the output is 4x-8x the bytes of the input):
//  - 256 threads per CTA, a CTA tile of 8192 elements; tiles start at
//    multiples of every block size. CTAs loop over tiles (grid-stride).
//  - Per tile, the CTA first computes each block's scale (one thread per
//    block) and then a 16-entry table of finished Out values per block in
//    shared memory (from_float runs 16 times per block, not once per element).
//  - Each thread then handles chunks of 16 output bytes (8 bf16/fp16 or 4 fp32
//    elements) from 4 or 2 packed bytes; consecutive threads take consecutive
//    chunks, so every warp-wide load and 16-byte store is fully coalesced.
//    A chunk never straddles a block (chunks are aligned and <= 8 elements,
//    blocks >= 32), so it uses one table. The packed loads are issued before
//    the table is built, to overlap their latency with the table work.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/kernel/dequantize_4bit.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <qlora/core/dtype.hpp>
#include <qlora/quant/quant_policy.hpp>
#include <qlora/quant/quant_state.hpp>

namespace qlora::cuda {

/// Kernel arguments (trivially copyable, built by the launcher).
template <class Out>
struct Dequantize4bitParams {
  const std::uint8_t* packed;  ///< [(n + 1) / 2]
  Out* out;                    ///< [n]
  std::int64_t n;
  int log2_blocksize;
  std::int64_t blocks;
  const float* absmax;  ///< [blocks] (plain state)
  // Nested state.
  const std::uint8_t* nested_codes;  ///< [blocks]
  const float* nested_absmax;        ///< [ceil(blocks / 256)]
  const float* nested_code_map;      ///< [256]
  const float* nested_offset;        ///< [1]
  bool vector_io;                    ///< packed 4-byte and out 16-byte aligned
};

namespace kernel {

inline constexpr int dequantize_threads = 256;
inline constexpr std::int64_t dequantize_tile_elements = 8192;
inline constexpr int dequantize_max_tile_blocks = static_cast<int>(dequantize_tile_elements / 32);
static_assert(dequantize_tile_elements % 4096 == 0, "tiles must start at a multiple of every block size");

/// Output elements per 16-byte store, and the packed bytes they come from.
template <class Out>
inline constexpr int dequantize_chunk = 16 / static_cast<int>(sizeof(Out));
template <class Out>
using packed_chunk_t = std::conditional_t<dequantize_chunk<Out> == 8, unsigned int, unsigned short>;

/// The float32 absmax of block `block`, plain or rebuilt from its nested code.
template <bool Nested, class Out>
QLORA_DEVICE float block_absmax(const Dequantize4bitParams<Out>& p, std::int64_t block, float offset) {
  if constexpr (Nested) {
    const std::uint8_t code = __ldg(p.nested_codes + block);
    return rebuild_nested_absmax(__ldg(p.nested_code_map + code), __ldg(p.nested_absmax + block / nested_blocksize),
                                 offset);
  } else {
    return __ldg(p.absmax + block);
  }
}

template <class Q, class Out, bool Nested>
__global__ void __launch_bounds__(dequantize_threads) dequantize_4bit_kernel(const Dequantize4bitParams<Out> p) {
  constexpr int chunk = dequantize_chunk<Out>;
  constexpr int chunks_per_thread = static_cast<int>(dequantize_tile_elements / chunk / dequantize_threads);
  using Packed = packed_chunk_t<Out>;
  static_assert(sizeof(Packed) * 2 == static_cast<std::size_t>(chunk));

  __shared__ float code_values[16];
  __shared__ float scales[dequantize_max_tile_blocks];
  alignas(16) __shared__ Out table[dequantize_max_tile_blocks * 16];  // [block in tile][code]

  if (threadIdx.x == 0) {
#pragma unroll
    for (int code = 0; code < 16; ++code) code_values[code] = Q::decode(static_cast<std::uint8_t>(code));
  }
  const float offset = Nested ? __ldg(p.nested_offset) : 0.0f;
  const std::int64_t tiles = (p.n + dequantize_tile_elements - 1) / dequantize_tile_elements;
  const auto tid = static_cast<int>(threadIdx.x);

  for (std::int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const std::int64_t tile_start = tile * dequantize_tile_elements;

    // 1. Packed codes of this thread's full chunks, in flight during 2-3.
    Packed raw[chunks_per_thread];
#pragma unroll
    for (int s = 0; s < chunks_per_thread; ++s) {
      const std::int64_t first = tile_start + std::int64_t{s * dequantize_threads + tid} * chunk;
      raw[s] = (p.vector_io && first + chunk <= p.n)
                   ? __ldg(reinterpret_cast<const Packed*>(p.packed + first / 2))
                   : Packed{0};
    }

    // 2. The scale of every block in the tile.
    const std::int64_t first_block = tile_start >> p.log2_blocksize;
    const std::int64_t blocks_left = p.blocks - first_block;
    const int tile_blocks = static_cast<int>(
        blocks_left < (dequantize_tile_elements >> p.log2_blocksize) ? blocks_left
                                                                     : (dequantize_tile_elements >> p.log2_blocksize));
    for (int b = tid; b < tile_blocks; b += dequantize_threads) scales[b] = block_absmax<Nested>(p, first_block + b, offset);
    __syncthreads();

    // 3. Per block, the 16 finished outputs: Out(fl32(decode(code) * scale)).
    for (int e = tid; e < tile_blocks * 16; e += dequantize_threads) {
      table[e] = from_float<Out>(__fmul_rn(code_values[e & 15], scales[e >> 4]));
    }
    __syncthreads();

    // 4. Look up and store.
#pragma unroll
    for (int s = 0; s < chunks_per_thread; ++s) {
      const int chunk_in_tile = s * dequantize_threads + tid;
      const std::int64_t first = tile_start + std::int64_t{chunk_in_tile} * chunk;
      if (first >= p.n) continue;
      const Out* block_table = table + (((chunk_in_tile * chunk) >> p.log2_blocksize) << 4);
      if (p.vector_io && first + chunk <= p.n) {
        Out values[chunk];
#pragma unroll
        for (int k = 0; k < chunk / 2; ++k) {  // byte k: element 2k in the high nibble
          const unsigned byte = (static_cast<unsigned>(raw[s]) >> (8 * k)) & 0xFFu;
          values[2 * k] = block_table[byte >> 4];
          values[2 * k + 1] = block_table[byte & 0xFu];
        }
        uint4 word;
        std::memcpy(&word, values, sizeof(word));
        *reinterpret_cast<uint4*>(p.out + first) = word;
      } else {  // the tail of the tensor, or unaligned pointers
        for (int k = 0; k < chunk && first + k < p.n; ++k) {
          const std::int64_t i = first + k;
          const std::uint8_t byte = p.packed[i / 2];
          p.out[i] = block_table[(i % 2 == 0) ? (byte >> 4) : (byte & 0xF)];
        }
      }
    }
    __syncthreads();  // scales and table are rewritten by the next tile
  }
}

}  // namespace kernel
}  // namespace qlora::cuda
