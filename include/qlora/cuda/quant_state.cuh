// A 4-bit tensor in device memory: DeviceQuantState (a non-owning view the
// dequantize launcher takes) and DeviceQuantized4bit (owning buffers, the
// device twin of Quantized4bit), with upload/download to and from the host
// Quantized4bit. Same structure-of-arrays layout as QuantState
// (quant/quant_state.hpp); the nested offset lives in device memory so that a
// state produced by the GPU quantizer is usable without a host round trip.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/quant_state.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/cuda/common.cuh>
#include <qlora/quant/quant_policy.hpp>
#include <qlora/quant/quant_state.hpp>

namespace qlora::cuda {

/// Non-owning view of a 4-bit tensor's state in device memory.
struct DeviceQuantState {
  QuantType quant_type = QuantType::nf4;
  std::int64_t blocksize = 64;
  std::int64_t numel = 0;
  const float* absmax = nullptr;  ///< [blocks]; unused when `nested`
  bool nested = false;
  const std::uint8_t* nested_codes = nullptr;  ///< [blocks]
  const float* nested_absmax = nullptr;        ///< [ceil(blocks / 256)]
  const float* nested_code_map = nullptr;      ///< [256]
  const float* nested_offset = nullptr;        ///< [1]

  [[nodiscard]] std::int64_t block_count() const noexcept { return (numel + blocksize - 1) / blocksize; }
  [[nodiscard]] std::int64_t packed_bytes() const noexcept { return (numel + 1) / 2; }
};

/// Owning device copy of a 4-bit tensor: packed codes and state. Buffers are
/// stream-ordered (see DeviceBuffer): the stream they were made on must
/// outlive them.
struct DeviceQuantized4bit {
  QuantType quant_type = QuantType::nf4;
  std::int64_t blocksize = 64;
  DType dtype = DType::BF16;
  std::vector<std::int64_t> shape;
  DeviceBuffer<std::uint8_t> packed;  ///< [(numel + 1) / 2]
  DeviceBuffer<float> absmax;         ///< [blocks]; empty when nested
  bool nested = false;
  DeviceBuffer<std::uint8_t> nested_codes;  ///< [blocks]
  DeviceBuffer<float> nested_absmax;        ///< [ceil(blocks / 256)]
  DeviceBuffer<float> nested_code_map;      ///< [256]
  DeviceBuffer<float> nested_offset;        ///< [1]

  [[nodiscard]] std::int64_t numel() const {
    std::int64_t count = 1;
    for (const auto extent : shape) count *= extent;
    return count;
  }
  [[nodiscard]] std::int64_t block_count() const { return (numel() + blocksize - 1) / blocksize; }
  [[nodiscard]] std::int64_t packed_bytes() const { return (numel() + 1) / 2; }

  /// Throws a named Error unless the buffers' sizes agree with the shape and
  /// blocksize (QuantState::validate's checks, for device buffers).
  void validate() const {
    qlora::detail::validate_quant_layout({shape, blocksize, packed.size(), nested, absmax.size(), nested_codes.size(),
                                   nested_absmax.size(), nested_code_map.size()},
                                  "device quant state");
    check(!nested || nested_offset.size() == 1, "QuantStateMismatch", "device nested_offset has {} entries, expected 1",
          nested_offset.size());
  }

  /// The view the launchers take.
  [[nodiscard]] DeviceQuantState view() const {
    return DeviceQuantState{quant_type,         blocksize,           numel(),
                            absmax.data(),      nested,              nested_codes.data(),
                            nested_absmax.data(), nested_code_map.data(), nested_offset.data()};
  }
};

/// Copies packed codes and their state from the host to the device
/// (validated first, so a mismatched state is refused before any copy).
inline DeviceQuantized4bit upload(std::span<const std::uint8_t> packed, const QuantState& state,
                                  cudaStream_t stream) {
  state.validate(packed.size());
  DeviceQuantized4bit device;
  device.quant_type = state.quant_type;
  device.blocksize = state.blocksize;
  device.dtype = state.dtype;
  device.shape = state.shape;
  device.packed = to_device(packed, stream);
  device.absmax = to_device(std::span<const float>(state.absmax), stream);
  device.nested = state.nested.has_value();
  if (state.nested) {
    device.nested_codes = to_device(std::span<const std::uint8_t>(state.nested->codes), stream);
    device.nested_absmax = to_device(std::span<const float>(state.nested->absmax), stream);
    device.nested_code_map = to_device(std::span<const float>(state.nested->code_map), stream);
    device.nested_offset = to_device(std::span<const float>(&state.nested->offset, 1), stream);
  }
  return device;
}

/// Copies a host Quantized4bit to the device (validated first).
inline DeviceQuantized4bit upload(const Quantized4bit& host, cudaStream_t stream) {
  return upload(std::span<const std::uint8_t>(host.packed), host.state, stream);
}

/// Copies a device 4-bit tensor back into a host Quantized4bit; synchronizes `stream`.
inline Quantized4bit download(const DeviceQuantized4bit& device, cudaStream_t stream) {
  device.validate();
  Quantized4bit host;
  host.packed.resize(device.packed.size());
  copy_to_host(std::span<std::uint8_t>(host.packed), device.packed.data(), stream);
  QuantState& state = host.state;
  state.quant_type = device.quant_type;
  state.blocksize = device.blocksize;
  state.dtype = device.dtype;
  state.shape = device.shape;
  state.absmax.resize(device.absmax.size());
  copy_to_host(std::span<float>(state.absmax), device.absmax.data(), stream);
  if (device.nested) {
    NestedAbsmax nested;
    nested.codes.resize(device.nested_codes.size());
    nested.absmax.resize(device.nested_absmax.size());
    nested.code_map.resize(device.nested_code_map.size());
    copy_to_host(std::span<std::uint8_t>(nested.codes), device.nested_codes.data(), stream);
    copy_to_host(std::span<float>(nested.absmax), device.nested_absmax.data(), stream);
    copy_to_host(std::span<float>(nested.code_map), device.nested_code_map.data(), stream);
    copy_to_host(std::span<float>(&nested.offset, 1), device.nested_offset.data(), stream);
    synchronize(stream);
    state.nested = std::move(nested);
  }
  synchronize(stream);
  return host;
}

}  // namespace qlora::cuda
