// IWYU pragma: private
// Argument checks shared by the nn/ ops (and their CUDA launchers, with
// device = Device::cuda). Activations, gradients and parameters are
// contiguous F32 tensors of documented shapes; a bad one
// is refused with an error naming the op, the argument and what was expected
// ("layer_norm: dy is [4, 8], expected [4, 16]"), before anything is written.
#pragma once

#include <qlora/core/device.hpp>
#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/tensor_view.hpp>

#include <cstdint>
#include <string_view>

namespace qlora::detail {

/// Whether `t` stands for "not wanted" (a default-constructed view). A view
/// with a shape but no data is not "none": it is refused as a NullPointer.
[[nodiscard]] inline bool absent(const TensorView& t) noexcept { return t.raw_data() == nullptr && t.rank() == 0; }

struct F32Arguments {
  std::string_view op;  ///< the function name errors start with
  Device device = Device::cpu;  ///< where the tensors must be (the CUDA launchers check Device::cuda)

  /// A contiguous F32 tensor on `device` of exactly `expected` shape, with data.
  void tensor(const TensorView& t, const Shape& expected, std::string_view name) const {
    check(t.shape() == expected, "ShapeMismatch", "{}: {} is {}, expected {}", op, name, t.shape().to_string(),
          expected.to_string());
    storage(t, name);
  }

  /// An optional output: false when it is absent (not wanted), else checked as tensor().
  [[nodiscard]] bool optional(const TensorView& t, const Shape& expected, std::string_view name) const {
    if (absent(t)) return false;
    tensor(t, expected, name);
    return true;
  }

  /// A [rows, cols] tensor whose row count the caller does not know yet; returns it.
  std::int64_t rows(const TensorView& t, std::int64_t cols, std::string_view name) const {
    check(t.rank() == 2 && t.shape()[1] == cols, "ShapeMismatch", "{}: {} is {}, expected [tokens, {}]", op, name,
          t.shape().to_string(), cols);
    storage(t, name);
    return t.shape()[0];
  }

  /// An operand of an element-wise op: any shape with as many elements as `like`.
  void same_size(const TensorView& t, std::string_view name, const TensorView& like, std::string_view like_name) const {
    check(t.numel() == like.numel(), "ShapeMismatch", "{}: {} is {} ({} elements), {} is {} ({} elements)", op, name,
          t.shape().to_string(), t.numel(), like_name, like.shape().to_string(), like.numel());
    storage(t, name);
  }

 private:
  void storage(const TensorView& t, std::string_view name) const {
    check(t.dtype() == DType::F32, "DTypeMismatch", "{}: {} is {}, expected F32", op, name, dtype_name(t.dtype()));
    check(t.device() == device, "DeviceMismatch", "{}: {} is on {}, expected a {} tensor", op, name,
          device_name(t.device()), device_name(device));
    check(t.is_contiguous(), "NotContiguous", "{}: {} {} is not contiguous", op, name, t.shape().to_string());
    check(t.numel() == 0 || t.raw_data() != nullptr, "NullPointer", "{}: {} has no data", op, name);
  }
};

}  // namespace qlora::detail
