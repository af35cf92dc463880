// FrozenLinear<Quant, Compute>: a base linear layer with no adapter, y = x·W̃ᵀ + b.
//
// In a QLoRA model every Linear but the output head is 4-bit (transformers'
// bitsandbytes integration quantizes them all), and LoRA wraps only the
// target modules; the others are these. They train nothing, so their backward
// only carries the gradient through (dx = dy·W̃) and needs nothing saved from
// the forward. Numerics are LoraLinear's base path (lora/detail/frozen_gemm.hpp):
// W̃ in Compute, fp32 accumulation, y and dx rounded to Compute once.
#pragma once

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/lora/detail/frozen_gemm.hpp>
#include <qlora/lora/detail/layer_arguments.hpp>
#include <qlora/lora/frozen_weight.hpp>
#include <qlora/quant/nf4.hpp>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace qlora {

template <QuantPolicy Quant = NF4, FloatStorage Compute = bf16>
class FrozenLinear {
 public:
  using Base = FrozenWeight<Quant, Compute>;

  /// The layer at module `path` (named in errors). `bias` is [out] in any
  /// float dtype, or an empty view for none.
  FrozenLinear(std::string path, Base base, const TensorView& bias, unsigned threads = default_thread_count())
      : path_(std::move(path)), base_(std::move(base)), threads_(std::max(1u, threads)) {
    if (!detail::LayerArguments<Compute>::absent(bias)) {
      arguments().bias(bias, out_features());
      bias_ = Tensor(DType::F32, Shape{out_features()});
      detail::widen_into(bias, bias_->span<float>(), "bias");
    }
  }

  [[nodiscard]] const std::string& path() const noexcept { return path_; }
  [[nodiscard]] std::int64_t in_features() const noexcept { return base_.in_features(); }
  [[nodiscard]] std::int64_t out_features() const noexcept { return base_.out_features(); }
  [[nodiscard]] bool has_bias() const noexcept { return bias_.has_value(); }
  [[nodiscard]] const Base& base() const noexcept { return base_; }
  /// F32 [out], or an empty view when the layer has no bias.
  [[nodiscard]] TensorView bias() const noexcept { return bias_ ? bias_->view() : TensorView{}; }

  /// y = x·W̃ᵀ + b; x Compute [T, in], y Compute [T, out].
  void forward(const TensorView& x, const TensorView& y) const {
    const std::int64_t tokens = arguments().input_output(x, in_features(), y, out_features());
    const std::vector<float> x_float = detail::widened(x);
    const float* bias = bias_ ? bias_->view().data<const float>() : nullptr;
    detail::project_frozen<Compute>(base_, x_float.data(), tokens, bias, y, threads_, [](auto&, std::int64_t, std::int64_t) {});
  }

  /// dx = dy·W̃; dy Compute [T, out], dx Compute [T, in].
  void backward_input(const TensorView& dy, const TensorView& dx) const {
    check(dy.rank() == 2, "ShapeMismatch", "{}: dy is {}, expected [tokens, {}]", path_, dy.shape().to_string(),
          out_features());
    const std::int64_t tokens = dy.shape()[0];
    arguments().tensor(dy, {tokens, out_features()}, "dy");
    arguments().tensor(dx, {tokens, in_features()}, "dx");
    const std::vector<float> dy_float = detail::widened(dy);
    detail::backward_input_frozen<Compute>(base_, dy_float.data(), tokens, dx, threads_,
                                           [](auto& acc, std::int64_t, std::int64_t) { acc.setZero(); });
  }

  /// Bytes the layer holds: base and bias.
  [[nodiscard]] std::size_t bytes() const { return base_.bytes() + (bias_ ? bias_->byte_size() : 0); }

 private:
  [[nodiscard]] detail::LayerArguments<Compute> arguments() const noexcept { return {path_, Device::cpu}; }

  std::string path_;
  Base base_;
  unsigned threads_;
  std::optional<Tensor> bias_;
};

}  // namespace qlora
