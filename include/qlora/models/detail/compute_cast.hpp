// IWYU pragma: private
// Models keep activations in fp32 between layers (norms, attention, the
// residual stream: what PEFT's prepare_model_for_kbit_training leaves in
// fp32) and hand the linears their Compute type. These helpers are the
// crossings; for Compute = float they copy nothing.
#pragma once

#include <qlora/core/dtype.hpp>
#include <qlora/core/tensor.hpp>

namespace qlora::detail {

/// F32 `x` rounded to Compute (round-to-nearest-even, as torch's .to()).
template <FloatStorage Compute>
Tensor to_compute(const TensorView& x) {
  Tensor out(dtype_of_v<Compute>, x.shape());
  const auto source = x.span<const float>();
  const auto destination = out.span<Compute>();
  for (std::size_t i = 0; i < source.size(); ++i) destination[i] = from_float<Compute>(source[i]);
  return out;
}

/// F32 `x` as Compute: `x` itself for Compute = float, else rounded into `storage`.
template <FloatStorage Compute>
TensorView compute_view(const TensorView& x, Tensor& storage) {
  if constexpr (std::is_same_v<Compute, float>) {
    return x;
  } else {
    storage = to_compute<Compute>(x);
    return storage.view();
  }
}

/// A Compute tensor widened to F32 (exact).
template <FloatStorage Compute>
Tensor to_f32(Tensor&& x) {
  if constexpr (std::is_same_v<Compute, float>) {
    return std::move(x);
  } else {
    Tensor out(DType::F32, x.shape());
    const auto source = x.span<const Compute>();
    const auto destination = out.span<float>();
    for (std::size_t i = 0; i < source.size(); ++i) destination[i] = to_float(source[i]);
    return out;
  }
}

}  // namespace qlora::detail
