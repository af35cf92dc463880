// Blockwise 4-bit (NF4/FP4) quantization kernel, with optional double
// quantization of the block absmax in the same launch. Device code only; the
// launcher (argument checks, grid, cooperative launch, status check) is
// cuda/quantize_4bit.cuh.
//
// The result is bit-identical to quantize_4bit_ref (quant/blockwise_4bit.hpp):
// every per-element decision goes through the same host-device functions
// (detail::block_scale, detail::normalize, Q::encode, detail::pack_nibbles,
// detail::lut_bin), every float operation is a single IEEE-rounded op (no
// multiply-add pairs that nvcc could contract into an FMA; the explicit ones
// are written __fmul_rn/__fsub_rn/__fdiv_rn), and the double-quantization
// mean is summed in the CPU's order (mean_offset in quant/double_quant.hpp).
//
// Layout:
//  - 256 threads per CTA; a CTA tile is 4096 consecutive elements (the largest
//    block size), 16 per thread (one or two 16-byte loads per 16-bit input,
//    four for fp32; one 8-byte store of packed codes). Tiles start at
//    multiples of every block size, so a block lies in one tile and is covered
//    by blocksize/16 consecutive threads, which reduce its absmax with warp
//    shuffles (and shared memory for blocks wider than a warp).
//  - CTAs loop over tiles (grid-stride), so any n (64-bit) works with any grid.
//  - Double quantization (Nested) runs as three more phases of the same
//    cooperative launch, separated by grid-wide barriers (grid.sync()):
//      1. one warp per run of 256 block absmax: the run's sum in double,
//         added sequentially by one lane (mean_offset's inner loop);
//      2. every CTA adds the run sums sequentially in one thread (the outer
//         loop) and rounds total/count to float: the same bits in every CTA
//         (same inputs, same order), so no broadcast barrier is needed;
//      3. one warp per nested block of 256: absmax2 = max |absmax - offset|,
//         codes from the 65,536-bin LUT via detail::lut_bin.
//    Race-free because each phase reads only what an earlier phase wrote, and
//    grid.sync() orders all memory of the grid; deterministic because no
//    result depends on which thread or CTA ran first (max is exact and order
//    free, the sums have one fixed order, each output has a single writer).
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/kernel/quantize_4bit.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include <qlora/core/dtype.hpp>
#include <qlora/quant/blockwise_8bit.hpp>
#include <qlora/quant/detail/block_scale.hpp>
#include <qlora/quant/quant_policy.hpp>
#include <qlora/quant/quant_state.hpp>

namespace qlora::cuda {

/// What a quantization kernel reports back; lives in device memory, zeroed
/// before the launch (cuda/quantize_4bit.cuh reads it).
struct Quantize4bitStatus {
  /// ~(index of the first NaN or Inf input element), 0 when every element is
  /// finite: the complement turns "smallest index" into an atomicMax.
  unsigned long long nonfinite_key;
  /// Bit flags, see quantize_status_flush_to_zero.
  unsigned int flags;
  unsigned int reserved;
};
static_assert(sizeof(Quantize4bitStatus) == 16);

/// Flag: the kernel was compiled with flush-to-zero (nvcc --use_fast_math or
/// -ftz=true), under which subnormal absmax values, the 1e-38 clamp and
/// subnormal inputs round differently from the CPU path.
inline constexpr unsigned int quantize_status_flush_to_zero = 1u;

/// Kernel arguments (trivially copyable, built by the launcher).
template <class T>
struct Quantize4bitParams {
  const T* input;                ///< [n] device
  std::int64_t n;                ///< element count, >= 1
  std::int64_t blocksize;        ///< power of two in [32, 4096]
  int log2_blocksize;
  std::int64_t blocks;           ///< ceil(n / blocksize)
  std::uint8_t* packed;          ///< [(n + 1) / 2]
  float* absmax;                 ///< [blocks] first-level absmax (scratch when nested)
  // Double quantization (Nested kernels only).
  std::int64_t nested_blocks;    ///< ceil(blocks / 256)
  std::uint8_t* nested_codes;    ///< [blocks]
  float* nested_absmax;          ///< [nested_blocks]
  float* nested_offset;          ///< [1]
  const std::uint8_t* code_lut;  ///< [65536] detail::build_code_lut(code map)
  double* run_sums;              ///< [nested_blocks] scratch
  Quantize4bitStatus* status;    ///< [1], zeroed before the launch
  float subnormal_probe;         ///< detail::min_block_absmax: a subnormal the FTZ check adds to itself
  bool vector_io;                ///< input 16-byte and packed 8-byte aligned
};

namespace kernel {

inline constexpr int quantize_threads = 256;
inline constexpr int quantize_elements_per_thread = 16;
inline constexpr std::int64_t quantize_tile_elements = std::int64_t{quantize_threads} * quantize_elements_per_thread;
static_assert(quantize_tile_elements == 4096, "a tile must hold the largest block size (4096) exactly once");
static_assert(nested_blocksize == 256, "the nested phases use one warp (32 lanes x 8) per run of 256");

namespace cg = cooperative_groups;

/// True for NaN and +-Inf (an exponent of all ones); a bit test, so that no
/// compiler flag changes it.
QLORA_DEVICE bool is_nonfinite(float x) {
  return (qlora::detail::bit_cast<std::uint32_t>(x) & 0x7F800000u) == 0x7F800000u;
}

/// Element `bits` of a 16-bit storage type as float (exact).
template <class T>
QLORA_DEVICE float half_bits_to_float(std::uint32_t bits) {
  return T{static_cast<std::uint16_t>(bits)}.to_float();
}

/// Loads 16 consecutive elements (16-byte aligned) as floats.
template <class T>
QLORA_DEVICE void load_16_aligned(const T* source, float (&values)[16]) {
  if constexpr (sizeof(T) == 4) {
    const auto* vectors = reinterpret_cast<const float4*>(source);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float4 v = __ldg(vectors + k);
      values[4 * k + 0] = v.x;
      values[4 * k + 1] = v.y;
      values[4 * k + 2] = v.z;
      values[4 * k + 3] = v.w;
    }
  } else {
    const auto* vectors = reinterpret_cast<const uint4*>(source);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const uint4 v = __ldg(vectors + k);
      const std::uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {  // little-endian: the lower half is the earlier element
        values[8 * k + 2 * w] = half_bits_to_float<T>(words[w] & 0xFFFFu);
        values[8 * k + 2 * w + 1] = half_bits_to_float<T>(words[w] >> 16);
      }
    }
  }
}

/// Phase 1 for one tile: absmax of each block (written by the block's first
/// thread), codes packed and stored. `first_nonfinite_key` keeps the
/// complement of this thread's first NaN/Inf index (0 while none).
template <class Q, class T>
QLORA_DEVICE void quantize_tile(const Quantize4bitParams<T>& p, std::int64_t tile, float* warp_max,
                                unsigned long long& first_nonfinite_key) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const std::int64_t first = tile * quantize_tile_elements + std::int64_t{quantize_elements_per_thread} * threadIdx.x;
  const bool full = first + quantize_elements_per_thread <= p.n;

  float values[quantize_elements_per_thread];  // elements past n read as 0: they cannot raise a max
  if (full && p.vector_io) {
    load_16_aligned(p.input + first, values);
  } else {
#pragma unroll
    for (int k = 0; k < quantize_elements_per_thread; ++k) {
      values[k] = first + k < p.n ? to_float(p.input[first + k]) : 0.0f;
    }
  }

  float max_magnitude = 0.0f;
#pragma unroll
  for (int k = 0; k < quantize_elements_per_thread; ++k) {
    if (is_nonfinite(values[k]) && first_nonfinite_key == 0) [[unlikely]] {
      first_nonfinite_key = ~static_cast<unsigned long long>(first + k);
    }
    max_magnitude = fmaxf(max_magnitude, fabsf(values[k]));
  }

  // Max over the blocksize/16 consecutive threads of each block: exact and
  // order-free, so the reduction tree cannot change the bits.
  const int group = static_cast<int>(p.blocksize / quantize_elements_per_thread);  // 2 .. 256 threads
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    if (offset < group) max_magnitude = fmaxf(max_magnitude, __shfl_xor_sync(0xFFFFFFFFu, max_magnitude, offset));
  }
  if (group > 32) {  // uniform across the CTA: the barriers below are reached by all threads
    if (lane == 0) warp_max[warp] = max_magnitude;
    __syncthreads();
    const int warps = group / 32;
    const int first_warp = warp & ~(warps - 1);
    max_magnitude = warp_max[first_warp];
    for (int w = 1; w < warps; ++w) max_magnitude = fmaxf(max_magnitude, warp_max[first_warp + w]);
    __syncthreads();  // warp_max is reused by the next tile
  }
  if (first >= p.n) return;

  const std::int64_t block = first >> p.log2_blocksize;
  const bool partial_block = ((block + 1) << p.log2_blocksize) > p.n;
  const qlora::detail::BlockScale scale = qlora::detail::block_scale(max_magnitude, partial_block);
  if ((first & (p.blocksize - 1)) == 0) p.absmax[block] = scale.stored_absmax;

  std::uint8_t codes[quantize_elements_per_thread];
  // Two copies of one loop, so that inside each the compiler knows
  // scale.divide and full blocks never carry the division's code path.
  if (!scale.divide) {
#pragma unroll
    for (int k = 0; k < quantize_elements_per_thread; ++k) codes[k] = Q::encode(qlora::detail::normalize(values[k], scale));
  } else {
#pragma unroll
    for (int k = 0; k < quantize_elements_per_thread; ++k) codes[k] = Q::encode(qlora::detail::normalize(values[k], scale));
  }
  if (!full) {
#pragma unroll
    for (int k = 0; k < quantize_elements_per_thread; ++k) {
      if (first + k >= p.n) codes[k] = Q::zero_code;  // the pad nibble of an odd n
    }
  }
  std::uint8_t bytes[quantize_elements_per_thread / 2];
#pragma unroll
  for (int j = 0; j < quantize_elements_per_thread / 2; ++j) bytes[j] = qlora::detail::pack_nibbles(codes[2 * j], codes[2 * j + 1]);

  std::uint8_t* destination = p.packed + first / 2;
  if (full && p.vector_io) {
    uint2 word;
    std::memcpy(&word, bytes, sizeof(word));
    *reinterpret_cast<uint2*>(destination) = word;
  } else {
    const std::int64_t packed_bytes = (p.n + 1) / 2;
#pragma unroll
    for (int j = 0; j < quantize_elements_per_thread / 2; ++j) {
      if (first / 2 + j < packed_bytes) destination[j] = bytes[j];
    }
  }
}

/// This thread's warp in a grid-wide warp loop: its index and the loop stride.
struct GridWarps {
  std::int64_t first, stride;
};
QLORA_DEVICE GridWarps grid_warps() {
  constexpr std::int64_t warps_per_cta = quantize_threads / 32;
  return {std::int64_t{blockIdx.x} * warps_per_cta + (threadIdx.x >> 5), std::int64_t{gridDim.x} * warps_per_cta};
}

/// Nested phase 1: run r's sum in double, sequential (mean_offset's inner loop).
template <class T>
QLORA_DEVICE void nested_run_sums(const Quantize4bitParams<T>& p, float* warp_stage) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const GridWarps warps = grid_warps();
  for (std::int64_t run = warps.first; run < p.nested_blocks; run += warps.stride) {
    const std::int64_t base = run * nested_blocksize;
    // Coalesced, L1-bypassing loads (other CTAs wrote these before the barrier).
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const std::int64_t i = base + lane + 32 * k;
      warp_stage[lane + 32 * k] = i < p.blocks ? __ldcg(p.absmax + i) : 0.0f;
    }
    __syncwarp();
    if (lane == 0) {
      const auto count = static_cast<int>(p.blocks - base < nested_blocksize ? p.blocks - base : nested_blocksize);
      double partial = 0.0;
      for (int i = 0; i < count; ++i) partial = __dadd_rn(partial, static_cast<double>(warp_stage[i]));
      p.run_sums[run] = partial;
    }
    __syncwarp();
  }
}

/// Nested phase 2: offset = fl32((sum of run sums, in order) / blocks),
/// computed by thread 0 of every CTA from a shared-memory copy of the run sums.
template <class T>
QLORA_DEVICE float nested_offset(const Quantize4bitParams<T>& p, double* stage, float* shared_offset) {
  constexpr int stage_count = 1024;
  double total = 0.0;
  for (std::int64_t chunk = 0; chunk < p.nested_blocks; chunk += stage_count) {
    __syncthreads();  // the stage is free
#pragma unroll
    for (int k = 0; k < stage_count / quantize_threads; ++k) {
      const int slot = static_cast<int>(threadIdx.x) + quantize_threads * k;
      if (chunk + slot < p.nested_blocks) stage[slot] = __ldcg(p.run_sums + chunk + slot);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const auto count = static_cast<int>(p.nested_blocks - chunk < stage_count ? p.nested_blocks - chunk : stage_count);
      for (int i = 0; i < count; ++i) total = __dadd_rn(total, stage[i]);
    }
  }
  if (threadIdx.x == 0) {
    const float offset = __double2float_rn(__ddiv_rn(total, static_cast<double>(p.blocks)));
    *shared_offset = offset;
    if (blockIdx.x == 0) *p.nested_offset = offset;
  }
  __syncthreads();
  return *shared_offset;
}

/// Nested phase 3: 8-bit blockwise quantization of absmax - offset in blocks
/// of 256, one warp per block (quantize_blockwise_8bit's rule).
template <class T>
QLORA_DEVICE void nested_quantize(const Quantize4bitParams<T>& p, float offset) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const GridWarps warps = grid_warps();
  for (std::int64_t nested_block = warps.first; nested_block < p.nested_blocks; nested_block += warps.stride) {
    const std::int64_t base = nested_block * nested_blocksize;
    float centered[8];
    float max_magnitude = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const std::int64_t i = base + lane + 32 * k;
      centered[k] = i < p.blocks ? __fsub_rn(__ldcg(p.absmax + i), offset) : 0.0f;
      max_magnitude = fmaxf(max_magnitude, fabsf(centered[k]));
    }
#pragma unroll
    for (int offset_lanes = 16; offset_lanes >= 1; offset_lanes >>= 1) {
      max_magnitude = fmaxf(max_magnitude, __shfl_xor_sync(0xFFFFFFFFu, max_magnitude, offset_lanes));
    }
    if (lane == 0) p.nested_absmax[nested_block] = max_magnitude;
    // An all-zero block keeps codes 0 (and absmax2 0), as bitsandbytes writes it.
    const float inverse = max_magnitude == 0.0f ? 0.0f : __fdiv_rn(1.0f, max_magnitude);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const std::int64_t i = base + lane + 32 * k;
      if (i < p.blocks) {
        p.nested_codes[i] =
            max_magnitude == 0.0f ? std::uint8_t{0} : __ldg(p.code_lut + qlora::detail::lut_bin(__fmul_rn(centered[k], inverse)));
      }
    }
  }
}

/// The quantization kernel; Nested kernels must be launched cooperatively
/// (cudaLaunchCooperativeKernel) with a grid that is co-resident.
template <class Q, class T, bool Nested>
__global__ void __launch_bounds__(quantize_threads) quantize_4bit_kernel(const Quantize4bitParams<T> p) {
  __shared__ float warp_max[quantize_threads / 32];
  // Phase staging: 8 warps x 256 floats (run sums) or 1024 doubles (offset).
  alignas(16) __shared__ unsigned char stage[8192];
  __shared__ float shared_offset;

  if (blockIdx.x == 0 && threadIdx.x == 0) {
    // A subnormal added to itself is 0 only under flush-to-zero.
    if (__fadd_rn(p.subnormal_probe, p.subnormal_probe) == 0.0f) atomicOr(&p.status->flags, quantize_status_flush_to_zero);
  }

  unsigned long long first_nonfinite_key = 0;
  const std::int64_t tiles = (p.n + quantize_tile_elements - 1) / quantize_tile_elements;
  for (std::int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    quantize_tile<Q>(p, tile, warp_max, first_nonfinite_key);
  }
  if (first_nonfinite_key != 0) [[unlikely]] atomicMax(&p.status->nonfinite_key, first_nonfinite_key);

  if constexpr (Nested) {
    cg::grid_group grid = cg::this_grid();
    grid.sync();  // every block absmax is written
    nested_run_sums(p, reinterpret_cast<float*>(stage) + (threadIdx.x >> 5) * nested_blocksize);
    grid.sync();  // every run sum is written
    const float offset = nested_offset(p, reinterpret_cast<double*>(stage), &shared_offset);
    nested_quantize(p, offset);
  }
}

}  // namespace kernel
}  // namespace qlora::cuda
