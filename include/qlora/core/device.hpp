// Where tensor memory lives, and the backend policies that choose an
// implementation: `Cpu` (portable C++, multi-threaded) and `Cuda` (kernels in
// include/qlora/cuda/, compiled only by nvcc).
#pragma once

#include <cstdint>
#include <string_view>

namespace qlora {

enum class Device : std::uint8_t { cpu, cuda };

constexpr std::string_view device_name(Device device) noexcept { return device == Device::cpu ? "cpu" : "cuda"; }

/// Backend policy: run on the host.
struct Cpu {
  static constexpr Device device = Device::cpu;
};
/// Backend policy: run CUDA kernels on the caller's stream.
struct Cuda {
  static constexpr Device device = Device::cuda;
};

template <class B>
concept Backend = requires {
  { B::device } -> std::convertible_to<Device>;
};

}  // namespace qlora
