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

  /// Whether `t` stands for "none" (a default-constructed view). A view with a
  /// shape but no data is not "none": it is refused as a NullPointer.
  [[nodiscard]] static bool absent(const TensorView& t) noexcept { return t.raw_data() == nullptr && t.rank() == 0; }

  /// A bias [out] in any float dtype, with data.
  void bias(const TensorView& t, std::int64_t out) const {
    shape(t, {out}, "bias");
    float_values(t, "bias");
  }

  /// A [r, in] and B [out, r] in float dtypes: both checked before either is used,
  /// so a bad B never leaves a half-replaced adapter.
  void adapter_factors(const TensorView& a, const TensorView& b, std::int64_t r, std::int64_t in,
                       std::int64_t out) const {
    shape(a, {r, in}, "lora_A");
    shape(b, {out, r}, "lora_B");
    float_values(a, "lora_A");
    float_values(b, "lora_B");
  }

  /// What forward_train needs besides its tensors: an unmerged layer with its
  /// adapter on, and a dropout key whenever dropout is active (a default key
  /// would repeat one mask at every step).
  void training_forward(bool merged, bool adapter_enabled, bool has_key, float dropout) const {
    check(!merged, "AdapterMerged", "{}: forward_train on a merged layer; unmerge() first", layer);
    check(adapter_enabled, "AdapterDisabled", "{}: forward_train with the adapter disabled", layer);
    check(has_key || dropout == 0.0f, "DropoutKeyRequired",
          "{}: lora_dropout is {}: forward_train needs a DropoutKey unique to this step and layer", layer, dropout);
  }

  /// Checks x [T, in] and y [T, out]; returns T.
  std::int64_t input_output(const TensorView& x, std::int64_t in, const TensorView& y, std::int64_t out) const {
    check(x.rank() == 2, "ShapeMismatch", "{}: x is {}, expected [tokens, {}]", layer, x.shape().to_string(), in);
    tensor(x, {x.shape()[0], in}, "x");
    tensor(y, {x.shape()[0], out}, "y");
    return x.shape()[0];
  }

 private:
  void float_values(const TensorView& t, std::string_view name) const {
    visit_float_dtype(t.dtype(), [](auto) {}, fmt::format("{}: {}", layer, name));
    check(t.numel() == 0 || t.raw_data() != nullptr, "NullPointer", "{}: {} has no data", layer, name);
  }
};

}  // namespace qlora::detail
