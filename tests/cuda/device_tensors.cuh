// Host tensors on the device and back, for the GPU tests that compare a CUDA
// op with the CPU op it mirrors: OnDevice (a device copy of an F32 tensor),
// random inputs, and the comparisons (a relative tolerance with a floor,
// bit-identity).
#pragma once

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <qlora/core/tensor.hpp>
#include <qlora/cuda/common.cuh>

#include "support/splitmix.hpp"

namespace qlora::test {

/// A device copy of a host F32 tensor (or zeros of a shape), and its way back.
struct OnDevice {
  cuda::DeviceBuffer<float> buffer;
  TensorView view;

  explicit OnDevice(const Tensor& host) : buffer(static_cast<std::size_t>(host.numel()), nullptr) {
    view = TensorView(buffer.data(), DType::F32, host.shape(), Device::cuda);
    cuda::copy_to_device(buffer.data(), host.span<const float>(), nullptr);
  }
  [[nodiscard]] Tensor to_host() const {
    Tensor host(DType::F32, view.shape());
    cuda::copy_to_host(host.span<float>(), buffer.data(), nullptr);
    cuda::synchronize(nullptr);
    return host;
  }
};

/// An F32 tensor of tests/reference/_refcommon.py's normalish values.
inline Tensor random_tensor(Shape shape, std::uint64_t seed, double scale = 1.0) {
  Tensor t(DType::F32, shape);
  const std::vector<float> values = normalish(static_cast<std::size_t>(t.numel()), seed, scale);
  std::ranges::copy(values, t.span<float>().begin());
  return t;
}

/// |gpu - cpu| <= relative · max(|cpu|, floor · max|cpu|) everywhere; reports the worst element.
inline void check_close(const std::string& what, const Tensor& gpu, const Tensor& cpu, double relative, double floor) {
  REQUIRE(gpu.shape() == cpu.shape());
  const auto a = gpu.span<const float>(), b = cpu.span<const float>();
  double largest = 0;
  for (const float v : b) largest = std::max(largest, std::abs(double(v)));
  double worst = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double allowed = relative * std::max(std::abs(double(b[i])), floor * largest);
    const double ratio = allowed > 0 ? std::abs(double(a[i]) - b[i]) / allowed : (a[i] == b[i] ? 0.0 : INFINITY);
    if (!(ratio <= worst)) {  // NaN lands here too
      worst = ratio;
      at = i;
    }
  }
  INFO(what << ": worst element " << at << ": gpu " << a[at] << ", cpu " << b[at] << ", error/allowed " << worst);
  CHECK(worst <= 1.0);
}

inline bool same_bits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && std::memcmp(a.view().raw_data(), b.view().raw_data(), a.byte_size()) == 0;
}

}  // namespace qlora::test
