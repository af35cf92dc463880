// IWYU pragma: private, include <qlora/lora/lora_linear.hpp>
// Argument checks shared by every LoraLinear backend, so a bad tensor gets the
// same error code and message on the CPU and on the GPU: the layer's module
// path, the tensor's name, what it is and what was expected.
#pragma once

#include <qlora/core/device.hpp>
#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/tensor_view.hpp>

#include <cstdint>
#include <initializer_list>
#include <string_view>

namespace qlora::detail {

/// What a layer's tensor arguments must be: `Compute` values on `device`.
template <FloatStorage Compute>
struct LayerArguments {
  std::string_view layer;  ///< the module path errors are prefixed with
  Device device;

  void shape(const TensorView& t, std::initializer_list<std::int64_t> expected, std::string_view name) const {
    const Shape wanted(std::span<const std::int64_t>(expected.begin(), expected.size()));
    check(t.shape() == wanted, "ShapeMismatch", "{}: {} is {}, expected {}", layer, name, t.shape().to_string(),
          wanted.to_string());
  }

  /// A contiguous Compute tensor on `device` of exactly `expected` shape.
  void tensor(const TensorView& t, std::initializer_list<std::int64_t> expected, std::string_view name) const {
    check(t.dtype() == dtype_of_v<Compute>, "DTypeMismatch", "{}: {} is {}, the layer computes in {}", layer, name,
          dtype_name(t.dtype()), dtype_name(dtype_of_v<Compute>));
    shape(t, expected, name);
    check(t.device() == device && t.is_contiguous(), "DeviceMismatch", "{}: {} must be a contiguous {} tensor", layer,
          name, device_name(device));
    check(t.numel() == 0 || t.raw_data() != nullptr, "NullPointer", "{}: {} has no data", layer, name);
  }

  /// Checks x [T, in] and y [T, out]; returns T.
  std::int64_t input_output(const TensorView& x, std::int64_t in, const TensorView& y, std::int64_t out) const {
    check(x.rank() == 2, "ShapeMismatch", "{}: x is {}, expected [tokens, {}]", layer, x.shape().to_string(), in);
    tensor(x, {x.shape()[0], in}, "x");
    tensor(y, {x.shape()[0], out}, "y");
    return x.shape()[0];
  }
};

}  // namespace qlora::detail
