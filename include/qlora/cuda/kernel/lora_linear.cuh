// Kernels of the CUDA LoraLinear (cuda/lora_linear.cuh): the element-wise
// work around its cuBLAS GEMMs. Device code only; the launchers are in the
// class. Every kernel is a plain grid-stride loop over elements (or, for the
// column sums, over columns): simple, and bound by memory bandwidth.
//
// Bit-for-bit rules shared with the CPU backend (lora/lora_linear.hpp):
//  - a base weight element is Compute(fl32(decode(code) * absmax)), the absmax
//    rebuilt with rebuild_nested_absmax, exactly as FrozenWeight::dequantize_tile;
//  - the dropout factor of flat element t * in + i is DropoutMask::factor, the
//    same host/device function the CPU path calls, so masks are identical;
//  - products and sums of single values use __fmul_rn / __fadd_rn, which
//    nvcc never contracts into an FMA (the CPU does one rounding per op too);
//  - db is summed in double and rounded once to fp32 before it is added to
//    the fp32 gradient, as the CPU does.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/kernel/lora_linear.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include <qlora/core/dtype.hpp>
#include <qlora/cuda/quant_state.cuh>
#include <qlora/lora/dropout.hpp>
#include <qlora/quant/quant_policy.hpp>
#include <qlora/quant/quant_state.hpp>

namespace qlora::cuda {

/// What merge_error_kernel accumulates (device memory, zeroed before the launch).
struct MergeErrorSums {
  double sum_squared_error;                ///< Σ (stored - exact)²
  double sum_squared;                      ///< Σ exact²
  unsigned long long max_abs_error_bits;   ///< bits of max |stored - exact| (a non-negative double orders as its bits)
};

namespace kernel {

inline constexpr int lora_threads = 256;

/// First element and stride of a 1-D grid-stride loop.
QLORA_DEVICE std::int64_t grid_first() { return std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x; }
QLORA_DEVICE std::int64_t grid_stride() { return std::int64_t{gridDim.x} * blockDim.x; }

// ---- where base weight values come from ---------------------------------------
// A "values" functor maps a flat index of the [out, in] weight to the float
// the GEMMs multiply with. Both are trivially copyable kernel arguments.

/// W̃ of a 4-bit weight: to_float(Compute(fl32(decode(code) * absmax(block)))).
template <class Quant, class Compute, bool Nested>
struct QuantizedValues {
  const std::uint8_t* packed;  ///< [(numel + 1) / 2], the whole weight
  DeviceQuantState state;      ///< the whole weight's state
  int log2_blocksize;

  QLORA_DEVICE float operator()(std::int64_t index) const {
    const std::int64_t block = index >> log2_blocksize;
    float absmax;
    if constexpr (Nested) {
      absmax = rebuild_nested_absmax(__ldg(state.nested_code_map + __ldg(state.nested_codes + block)),
                                     __ldg(state.nested_absmax + block / nested_blocksize), __ldg(state.nested_offset));
    } else {
      absmax = __ldg(state.absmax + block);
    }
    const std::uint8_t byte = __ldg(packed + index / 2);
    const auto code = static_cast<std::uint8_t>((index % 2 == 0) ? (byte >> 4) : (byte & 0xF));
    return to_float(from_float<Compute>(__fmul_rn(Quant::decode(code), absmax)));
  }
};

/// A dense weight: to_float(values[index]).
template <class T>
struct DenseValues {
  const T* values;
  QLORA_DEVICE float operator()(std::int64_t index) const { return to_float(values[index]); }
};

/// out[j] = Out(values(first + j)) for j in [0, count): a row range of the
/// weight (first = r0 * in, which may be odd or mid-block) written densely.
/// With Out = Compute the round trip through float is exact.
template <class Values, class Out>
__global__ void __launch_bounds__(lora_threads) materialize_kernel(const Values values, const std::int64_t first,
                                                                   const std::int64_t count, Out* const out) {
  for (std::int64_t j = grid_first(); j < count; j += grid_stride()) out[j] = from_float<Out>(values(first + j));
}

// ---- activations -----------------------------------------------------------------

/// out[i] = Out(fl32(float(x[i]) * mask.factor(first + i))): the adapter's
/// input drop(x), rounded in fp32 as the CPU rounds it, then stored as Out
/// (float, or double for the double-summed xa; widening is exact). `first` is
/// the flat index of x[0] in the whole [T, in] input, for chunks of tokens.
/// An inactive mask multiplies by exactly 1: a plain widening.
template <class T, class Out>
__global__ void __launch_bounds__(lora_threads) widen_dropout_kernel(const T* const x, Out* const out,
                                                                     const std::int64_t n, const DropoutMask mask,
                                                                     const std::int64_t first) {
  for (std::int64_t i = grid_first(); i < n; i += grid_stride()) {
    out[i] = static_cast<Out>(__fmul_rn(to_float(x[i]), mask.factor(static_cast<std::uint64_t>(first + i))));
  }
}

/// values[i] *= mask.factor(i): the dropout's backward on an fp32 [T, in] gradient.
/// (A template, like every kernel here, so that the header obeys the ODR.)
template <class T = float>
__global__ void __launch_bounds__(lora_threads) apply_dropout_kernel(T* const values, const std::int64_t n,
                                                                     const DropoutMask mask) {
  for (std::int64_t i = grid_first(); i < n; i += grid_stride()) {
    values[i] = __fmul_rn(values[i], mask.factor(static_cast<std::uint64_t>(i)));
  }
}

/// out[t, c] = Compute(acc[t, c] + bias[c]) (bias may be null): the one
/// rounding of y or dx from its fp32 sum, for a row-major [rows, cols] block.
/// With a double accumulator (xa), no bias: one rounding double -> fp32.
template <class Compute, class Acc = float>
__global__ void __launch_bounds__(lora_threads) store_rounded_kernel(const Acc* const acc, const float* const bias,
                                                                     Compute* const out, const std::int64_t n,
                                                                     const std::int64_t cols) {
  for (std::int64_t i = grid_first(); i < n; i += grid_stride()) {
    if constexpr (std::is_same_v<Acc, double>) {
      out[i] = from_float<Compute>(__double2float_rn(acc[i]));
    } else {
      const float value = bias != nullptr ? __fadd_rn(acc[i], bias[i % cols]) : acc[i];
      out[i] = from_float<Compute>(value);
    }
  }
}

/// Threads of column_sums_kernel: 32 columns x 8 partial sums each.
inline constexpr int column_sum_columns = 32;
inline constexpr int column_sum_lanes = 8;

/// sums[c] += fl32(Σ_t values[t, c]) over a row-major [rows, cols] Compute
/// matrix (db += column sums of dy), the sum in double (the CPU rule). A CTA
/// owns 32 columns; its 8 thread rows each sum every 8th row, then one thread
/// adds the 8 partials in a fixed order: deterministic, no atomics. Launch
/// with dim3(32, 8) threads and ceil(cols / 32) CTAs.
template <class T>
__global__ void __launch_bounds__(column_sum_columns* column_sum_lanes)
    column_sums_kernel(const T* const values, float* const sums, const std::int64_t rows, const std::int64_t cols) {
  __shared__ double partial[column_sum_lanes][column_sum_columns + 1];
  const std::int64_t column = std::int64_t{blockIdx.x} * column_sum_columns + threadIdx.x;
  double sum = 0.0;
  if (column < cols) {
    for (std::int64_t t = threadIdx.y; t < rows; t += column_sum_lanes) {
      sum = __dadd_rn(sum, static_cast<double>(to_float(values[t * cols + column])));
    }
  }
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && column < cols) {
    double total = partial[0][threadIdx.x];
    for (int lane = 1; lane < column_sum_lanes; ++lane) total = __dadd_rn(total, partial[lane][threadIdx.x]);
    sums[column] = __fadd_rn(sums[column], __double2float_rn(total));
  }
}

// ---- merge -------------------------------------------------------------------------

/// The error of the stored merged weight against the exact one, in double:
/// Σ err², Σ exact² and max |err|, with err = stored(i) - exact[i]. One
/// atomic update per warp (the sums' order is not fixed; they are a report).
template <class Stored>
__global__ void __launch_bounds__(lora_threads) merge_error_kernel(const Stored stored, const float* const exact,
                                                                   const std::int64_t n, MergeErrorSums* const sums) {
  double squared_error = 0.0, squared = 0.0, max_error = 0.0;
  for (std::int64_t i = grid_first(); i < n; i += grid_stride()) {
    const double value = exact[i];
    const double error = static_cast<double>(stored(i)) - value;
    squared_error += error * error;
    squared += value * value;
    max_error = fmax(max_error, fabs(error));
  }
  for (int offset = 16; offset >= 1; offset >>= 1) {
    squared_error += __shfl_down_sync(0xFFFFFFFFu, squared_error, offset);
    squared += __shfl_down_sync(0xFFFFFFFFu, squared, offset);
    max_error = fmax(max_error, __shfl_down_sync(0xFFFFFFFFu, max_error, offset));
  }
  if ((threadIdx.x & 31u) == 0) {
    atomicAdd(&sums->sum_squared_error, squared_error);
    atomicAdd(&sums->sum_squared, squared);
    atomicMax(&sums->max_abs_error_bits, static_cast<unsigned long long>(__double_as_longlong(max_error)));
  }
}

}  // namespace kernel
}  // namespace qlora::cuda
