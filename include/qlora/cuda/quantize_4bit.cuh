// Host launchers for blockwise 4-bit (NF4/FP4) quantization on the GPU,
// bit-identical to quantize_4bit_ref (quant/blockwise_4bit.hpp), double
// quantization included, in one kernel launch (cuda/kernel/quantize_4bit.cuh).
//
// Three levels:
//  - quantize_4bit_async: raw device pointers and a caller-owned workspace;
//    enqueues a 16-byte memset of the status word and the kernel on the
//    caller's stream and returns. check_quantize_status reads the status
//    later (it synchronizes the stream) and throws what the CPU path throws.
//  - quantize_4bit: a device input span in, a DeviceQuantized4bit out. It
//    synchronizes the stream once, after the kernel, to report NaN/Inf input
//    as Error("NonFiniteInput") naming the first offending element, like the
//    CPU path. Quantization runs once per weight at load time, where a
//    synchronous error is worth far more than the few microseconds of
//    pipelining it costs; pipelines that want to overlap use the async level.
//  - quantize_4bit_host: host data in, host Quantized4bit out (copies both
//    ways); what the tests compare with quantize_4bit_ref.
//
// Bit-exactness needs IEEE float in device code: do not build with
// --use_fast_math, -ftz=true or -prec-div=false. The flush-to-zero part is
// detected at run time (Error "NonIeeeBuild"); -prec-div=false alone is not.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/quantize_4bit.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/cuda/common.cuh>
#include <qlora/cuda/kernel/quantize_4bit.cuh>
#include <qlora/cuda/quant_state.cuh>
#include <qlora/quant/blockwise_4bit.hpp>
#include <qlora/quant/blockwise_8bit.hpp>
#include <qlora/quant/double_quant.hpp>
#include <qlora/quant/dynamic_map.hpp>
#include <qlora/quant/quant_policy.hpp>
#include <qlora/quant/quant_state.hpp>

namespace qlora::cuda {

// ---- the code LUT ----------------------------------------------------------

/// A 256-entry code map and its 65,536-bin lookup table
/// (qlora::detail::build_code_lut) in device memory: what double quantization
/// needs. Built on the host once per map; keep one around to quantize many
/// tensors without rebuilding it.
class DeviceCodeLut {
 public:
  explicit DeviceCodeLut(cudaStream_t stream, std::span<const float, 256> code_map = signed_dynamic_map)
      : code_map_(to_device(std::span<const float>(code_map.data(), code_map.size()), stream)) {
    // The host vector may go out of scope right after: a pageable
    // host-to-device copy returns once the source has been staged.
    const std::vector<std::uint8_t> lut = qlora::detail::build_code_lut(code_map);
    lut_ = to_device(std::span<const std::uint8_t>(lut), stream);
  }
  [[nodiscard]] const std::uint8_t* lut() const noexcept { return lut_.data(); }
  [[nodiscard]] const float* code_map() const noexcept { return code_map_.data(); }

 private:
  DeviceBuffer<float> code_map_;   // [256]
  DeviceBuffer<std::uint8_t> lut_;  // [65536]
};

// ---- async level -----------------------------------------------------------

/// Where quantize_4bit_async writes; all device pointers. Sizes, for n
/// elements and b = ceil(n / blocksize) blocks: packed (n + 1) / 2 bytes,
/// absmax b floats (the block absmax; with double quantization a scratch
/// array that still holds them afterwards), status 1. With double
/// quantization also nested_codes b bytes, nested_absmax and run_sums
/// ceil(b / 256) floats / doubles, nested_offset 1 float.
struct Quantize4bitOutputs {
  std::uint8_t* packed = nullptr;
  float* absmax = nullptr;
  Quantize4bitStatus* status = nullptr;
  std::uint8_t* nested_codes = nullptr;
  float* nested_absmax = nullptr;
  float* nested_offset = nullptr;
  double* run_sums = nullptr;
};

/// Enqueues the quantization of `n` device elements at `input` on `stream`
/// and returns without waiting. `lut` (device) is required with
/// `double_quant` and ignored otherwise. Arguments are checked before
/// anything is enqueued (InvalidBlocksize, ShapeMismatch, NullPointer);
/// NaN/Inf input is reported through `outputs.status` (check_quantize_status).
template <FourBitCodebook Q, FloatStorage T>
void quantize_4bit_async(const T* input, std::int64_t n, std::int64_t blocksize, bool double_quant,
                         const Quantize4bitOutputs& outputs, const DeviceCodeLut* lut, cudaStream_t stream) {
  constexpr const char* function = "cuda::quantize_4bit";
  check(is_valid_4bit_blocksize(blocksize), "InvalidBlocksize",
        "{}: blocksize {} is not a power of two in [32, 4096] (bitsandbytes' allowed sizes)", function, blocksize);
  check(n > 0, "ShapeMismatch", "{}: element count {} is not positive", function, n);
  check_not_null(input, function, "input");
  check_not_null(outputs.packed, function, "outputs.packed");
  check_not_null(outputs.absmax, function, "outputs.absmax");
  check_not_null(outputs.status, function, "outputs.status");
  if (double_quant) {
    check_not_null(outputs.nested_codes, function, "outputs.nested_codes");
    check_not_null(outputs.nested_absmax, function, "outputs.nested_absmax");
    check_not_null(outputs.nested_offset, function, "outputs.nested_offset");
    check_not_null(outputs.run_sums, function, "outputs.run_sums");
    check(lut != nullptr && lut->lut() != nullptr, "NullPointer", "{}: double quantization needs a DeviceCodeLut",
          function);
  }

  Quantize4bitParams<T> params{};
  params.input = input;
  params.n = n;
  params.blocksize = blocksize;
  params.log2_blocksize = 0;
  while ((std::int64_t{1} << params.log2_blocksize) < blocksize) ++params.log2_blocksize;
  params.blocks = ceil_div(n, blocksize);
  params.packed = outputs.packed;
  params.absmax = outputs.absmax;
  params.nested_blocks = ceil_div(params.blocks, nested_blocksize);
  params.nested_codes = outputs.nested_codes;
  params.nested_absmax = outputs.nested_absmax;
  params.nested_offset = outputs.nested_offset;
  params.code_lut = double_quant ? lut->lut() : nullptr;
  params.run_sums = outputs.run_sums;
  params.status = outputs.status;
  params.subnormal_probe = qlora::detail::min_block_absmax;
  params.vector_io = is_aligned(input, 16) && is_aligned(outputs.packed, 8);

  const std::int64_t tiles = ceil_div(n, kernel::quantize_tile_elements);
  const auto arm_status = [&] {  // re-armed on every launch, after the last check that can throw
    QLORA_CUDA_CHECK(cudaMemsetAsync(outputs.status, 0, sizeof(Quantize4bitStatus), stream));
  };
  detail::dispatch_bool(double_quant, [&](auto nested) {
    constexpr bool Nested = decltype(nested)::value;
    void (*const kernel_function)(Quantize4bitParams<T>) = kernel::quantize_4bit_kernel<Q, T, Nested>;
    if constexpr (!Nested) {
      arm_status();
      kernel_function<<<grid_for(tiles), kernel::quantize_threads, 0, stream>>>(params);
      check_launch("quantize_4bit_kernel");
    } else {
      // The nested phases need grid-wide barriers, so the grid must be
      // co-resident: at most the occupancy limit, looping over the tiles.
      const DeviceLimits limits = current_device_limits();
      check(limits.cooperative_launch, "CudaUnsupported",
            "{}: double quantization runs as one cooperative launch, which device {} does not support", function,
            limits.device);
      int per_multiprocessor = 0;
      QLORA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, kernel_function,
                                                                     kernel::quantize_threads, 0));
      check(per_multiprocessor > 0, "CudaError", "{}: quantize_4bit_kernel cannot be resident on device {}", function,
            limits.device);
      const std::int64_t resident = std::int64_t{per_multiprocessor} * limits.multiprocessors;
      const dim3 grid(static_cast<unsigned>(tiles < resident ? tiles : resident));
      void* arguments[] = {&params};
      arm_status();
      QLORA_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel_function), grid,
                                                   dim3(kernel::quantize_threads), arguments, 0, stream));
      check_launch("quantize_4bit_kernel (cooperative)");
    }
  });
}

/// Waits for `stream` and throws what quantize_4bit_ref would have thrown:
/// Error("NonFiniteInput") naming the first NaN/Inf element of `input` (the
/// same `input` the quantization read), or Error("NonIeeeBuild") when the
/// kernel was compiled with flush-to-zero.
template <FloatStorage T>
void check_quantize_status(const Quantize4bitStatus* status, const T* input, cudaStream_t stream) {
  Quantize4bitStatus host{};
  QLORA_CUDA_CHECK(cudaMemcpyAsync(&host, status, sizeof(host), cudaMemcpyDeviceToHost, stream));
  synchronize(stream);
  check((host.flags & quantize_status_flush_to_zero) == 0, "NonIeeeBuild",
        "cuda::quantize_4bit was compiled with flush-to-zero (--use_fast_math or -ftz=true); 4-bit codes would "
        "differ from the CPU path");
  if (host.nonfinite_key != 0) {
    const auto index = static_cast<std::int64_t>(~host.nonfinite_key);
    T element{};
    QLORA_CUDA_CHECK(cudaMemcpyAsync(&element, input + index, sizeof(T), cudaMemcpyDeviceToHost, stream));
    synchronize(stream);
    // The CPU path's message (detail::finite_value), word for word.
    throw Error("NonFiniteInput", fmt::format("input element {} is {}; 4-bit quantization needs finite values", index,
                                              to_float(element)));
  }
}

// ---- synchronous level -----------------------------------------------------

/// Quantizes `input` (device memory, row-major `shape`) with policy Q into a
/// new DeviceQuantized4bit. Checks arguments as quantize_4bit_ref does
/// (ShapeMismatch, InvalidBlocksize), launches one kernel on `stream`, then
/// synchronizes `stream` to report NonFiniteInput (see the file comment).
/// `lut` is the double-quantization table; when null and
/// options.double_quant is set, one is built for this call (a 64 KiB upload).
/// options.threads is ignored.
template <FourBitCodebook Q, FloatStorage T>
DeviceQuantized4bit quantize_4bit(std::span<const T> input, std::vector<std::int64_t> shape,
                                  const Quantize4bitOptions& options, cudaStream_t stream,
                                  const DeviceCodeLut* lut = nullptr) {
  const QuantState state = qlora::detail::new_quant_state<Q, T>(input.size(), std::move(shape), options.blocksize);
  check_not_null(input.data(), "cuda::quantize_4bit", "input");
  const std::int64_t blocks = state.block_count();
  const std::int64_t nested_blocks = ceil_div(blocks, nested_blocksize);

  DeviceQuantized4bit result;
  result.quant_type = state.quant_type;
  result.blocksize = state.blocksize;
  result.dtype = state.dtype;
  result.shape = state.shape;
  result.nested = options.double_quant;
  result.packed = DeviceBuffer<std::uint8_t>(static_cast<std::size_t>(state.packed_bytes()), stream);
  DeviceBuffer<float> absmax(static_cast<std::size_t>(blocks), stream);
  DeviceBuffer<Quantize4bitStatus> status(1, stream);
  DeviceBuffer<double> run_sums;
  std::optional<DeviceCodeLut> own_lut;
  Quantize4bitOutputs outputs{result.packed.data(), absmax.data(), status.data()};
  if (options.double_quant) {
    if (lut == nullptr) lut = &own_lut.emplace(stream);
    result.nested_codes = DeviceBuffer<std::uint8_t>(static_cast<std::size_t>(blocks), stream);
    result.nested_absmax = DeviceBuffer<float>(static_cast<std::size_t>(nested_blocks), stream);
    result.nested_offset = DeviceBuffer<float>(1, stream);
    result.nested_code_map = DeviceBuffer<float>(256, stream);
    QLORA_CUDA_CHECK(cudaMemcpyAsync(result.nested_code_map.data(), lut->code_map(), 256 * sizeof(float),
                                     cudaMemcpyDeviceToDevice, stream));
    run_sums = DeviceBuffer<double>(static_cast<std::size_t>(nested_blocks), stream);
    outputs.nested_codes = result.nested_codes.data();
    outputs.nested_absmax = result.nested_absmax.data();
    outputs.nested_offset = result.nested_offset.data();
    outputs.run_sums = run_sums.data();
  }
  quantize_4bit_async<Q, T>(input.data(), state.numel(), state.blocksize, options.double_quant, outputs, lut, stream);
  check_quantize_status(status.data(), input.data(), stream);
  if (!options.double_quant) result.absmax = std::move(absmax);
  return result;
}

/// Host data in, host data out, quantized on the GPU: the device twin of
/// quantize_4bit_ref / quantize_4bit (same arguments, same result bits, same
/// errors). Synchronizes `stream`.
template <FourBitCodebook Q, FloatStorage T>
Quantized4bit quantize_4bit_host(std::span<const T> input, std::vector<std::int64_t> shape,
                                 const Quantize4bitOptions& options = {}, cudaStream_t stream = nullptr) {
  // Check the shape before copying anything (same errors as the CPU path).
  (void)qlora::detail::new_quant_state<Q, T>(input.size(), shape, options.blocksize);
  const DeviceBuffer<T> device_input = to_device(input, stream);
  const DeviceQuantized4bit device =
      quantize_4bit<Q, T>(std::span<const T>(device_input.data(), device_input.size()), std::move(shape), options, stream);
  return download(device, stream);
}

}  // namespace qlora::cuda
