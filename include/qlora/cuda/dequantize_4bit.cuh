// Host launchers for blockwise 4-bit (NF4/FP4) dequantization on the GPU,
// bit-identical to dequantize_4bit_ref (quant/blockwise_4bit.hpp), with the
// nested (double-quantized) absmax rebuilt inside the same single launch
// (cuda/kernel/dequantize_4bit.cuh).
//
//  - dequantize_4bit(packed, DeviceQuantState, out, stream): device spans;
//    checks the arguments, enqueues one kernel on the caller's stream and
//    returns (asynchronous; nothing here synchronizes).
//  - dequantize_4bit(DeviceQuantized4bit, out, stream): the same, after
//    checking the owned buffers' sizes against the shape.
//  - dequantize_4bit_host(packed, QuantState, out, stream): host data in and
//    out (copies both ways, synchronizes); what the tests compare with
//    dequantize_4bit_ref.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/dequantize_4bit.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>

#include <cstdint>
#include <span>

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/cuda/common.cuh>
#include <qlora/cuda/kernel/dequantize_4bit.cuh>
#include <qlora/cuda/quant_state.cuh>
#include <qlora/quant/blockwise_4bit.hpp>
#include <qlora/quant/quant_policy.hpp>
#include <qlora/quant/quant_state.hpp>

namespace qlora::cuda {

/// Dequantizes the 4-bit tensor (`packed` and `state`, device memory) into
/// `out` (device memory, state.numel elements) on `stream`. Asynchronous.
/// Throws before launching: InvalidBlocksize, QuantStateMismatch (element
/// count, packed size), ShapeMismatch (output size), NullPointer.
template <FloatStorage Out>
void dequantize_4bit(std::span<const std::uint8_t> packed, const DeviceQuantState& state, std::span<Out> out,
                     cudaStream_t stream) {
  constexpr const char* function = "cuda::dequantize_4bit";
  check(is_valid_4bit_blocksize(state.blocksize), "InvalidBlocksize",
        "{}: quant state blocksize {} is not a power of two in [32, 4096]", function, state.blocksize);
  check(state.numel > 0, "QuantStateMismatch", "{}: quant state has {} elements", function, state.numel);
  check(static_cast<std::int64_t>(packed.size()) == state.packed_bytes(), "QuantStateMismatch",
        "{}: packed data has {} bytes, shape needs {} ((numel + 1) / 2 with numel {})", function, packed.size(),
        state.packed_bytes(), state.numel);
  check(static_cast<std::int64_t>(out.size()) == state.numel, "ShapeMismatch",
        "{}: output has {} elements, quant state has {}", function, out.size(), state.numel);
  check_not_null(packed.data(), function, "packed");
  check_not_null(out.data(), function, "out");
  if (state.nested) {
    check_not_null(state.nested_codes, function, "state.nested_codes");
    check_not_null(state.nested_absmax, function, "state.nested_absmax");
    check_not_null(state.nested_code_map, function, "state.nested_code_map");
    check_not_null(state.nested_offset, function, "state.nested_offset");
  } else {
    check_not_null(state.absmax, function, "state.absmax");
  }

  Dequantize4bitParams<Out> params{};
  params.packed = packed.data();
  params.out = out.data();
  params.n = state.numel;
  params.log2_blocksize = 0;
  while ((std::int64_t{1} << params.log2_blocksize) < state.blocksize) ++params.log2_blocksize;
  params.blocks = state.block_count();
  params.absmax = state.absmax;
  params.nested_codes = state.nested_codes;
  params.nested_absmax = state.nested_absmax;
  params.nested_code_map = state.nested_code_map;
  params.nested_offset = state.nested_offset;
  params.vector_io = is_aligned(packed.data(), sizeof(kernel::packed_chunk_t<Out>)) && is_aligned(out.data(), 16);

  const unsigned grid = grid_for(ceil_div(state.numel, kernel::dequantize_tile_elements));
  visit_quant_type(state.quant_type, [&]<class Q>(Q) {
    detail::dispatch_bool(state.nested, [&](auto nested) {
      constexpr bool Nested = decltype(nested)::value;
      kernel::dequantize_4bit_kernel<Q, Out, Nested><<<grid, kernel::dequantize_threads, 0, stream>>>(params);
      check_launch("dequantize_4bit_kernel");
    });
  });
}

/// Dequantizes an owned device tensor (its buffer sizes checked first).
template <FloatStorage Out>
void dequantize_4bit(const DeviceQuantized4bit& quantized, std::span<Out> out, cudaStream_t stream) {
  quantized.validate();
  dequantize_4bit<Out>(std::span<const std::uint8_t>(quantized.packed.data(), quantized.packed.size()),
                       quantized.view(), out, stream);
}

/// Host data in, host data out, dequantized on the GPU: the device twin of
/// dequantize_4bit_ref (same arguments, same bits, same errors).
/// Synchronizes `stream`.
template <FloatStorage Out>
void dequantize_4bit_host(std::span<const std::uint8_t> packed, const QuantState& state, std::span<Out> out,
                          cudaStream_t stream = nullptr) {
  qlora::detail::check_dequantize_arguments(packed, state, out);
  const DeviceQuantized4bit device = upload(packed, state, stream);
  DeviceBuffer<Out> device_out(out.size(), stream);
  dequantize_4bit<Out>(device, device_out.span(), stream);
  copy_to_host(out, device_out.data(), stream);
  synchronize(stream);
}

}  // namespace qlora::cuda
