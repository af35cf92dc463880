// LinearModule<Quant, Compute>: one Linear of a model, as QLoRA builds it —
// a LoraLinear when the LoRA config targets its path, otherwise a
// FrozenLinear (4-bit base, nothing trained). The model code calls both the
// same way; only a LoRA target saves activations in its training forward.
// Models keep fp32 activations between layers; forward_f32/backward_f32 are
// the crossings to and from the layer's Compute type.
#pragma once

#include <qlora/lora/frozen_linear.hpp>
#include <qlora/lora/lora_config.hpp>
#include <qlora/lora/lora_linear.hpp>
#include <qlora/models/detail/compute_cast.hpp>

#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace qlora {

template <QuantPolicy Quant, FloatStorage Compute>
class LinearModule {
 public:
  using Lora = LoraLinear<Quant, Compute, Cpu>;
  using Frozen = FrozenLinear<Quant, Compute>;
  using Base = FrozenWeight<Quant, Compute>;

  /// A LoRA layer when `config.targets(path)`, else a frozen one. `bias` [out] or empty.
  LinearModule(std::string path, Base base, const TensorView& bias, const LoraConfig& config,
               const LoraLinearOptions& options)
      : layer_(make(std::move(path), std::move(base), bias, config, options)) {}

  [[nodiscard]] Lora* lora() noexcept { return std::get_if<Lora>(&layer_); }
  [[nodiscard]] const Lora* lora() const noexcept { return std::get_if<Lora>(&layer_); }
  [[nodiscard]] std::int64_t in_features() const {
    return std::visit([](const auto& layer) { return layer.in_features(); }, layer_);
  }
  [[nodiscard]] std::int64_t out_features() const {
    return std::visit([](const auto& layer) { return layer.out_features(); }, layer_);
  }
  [[nodiscard]] bool has_bias() const {
    return std::visit([](const auto& layer) { return layer.has_bias(); }, layer_);
  }
  [[nodiscard]] std::size_t bytes() const {
    return std::visit([](const auto& layer) { return layer.bytes(); }, layer_);
  }

  void forward(const TensorView& x, const TensorView& y) const {
    std::visit([&](const auto& layer) { layer.forward(x, y); }, layer_);
  }
  /// The training forward: activations for backward() (none for a frozen layer).
  [[nodiscard]] std::optional<LoraActivations> forward_train(const TensorView& x, const TensorView& y,
                                                             std::optional<DropoutKey> key) const {
    if (const Lora* layer = lora()) return layer->forward_train(x, y, key);
    std::get<Frozen>(layer_).forward(x, y);
    return std::nullopt;
  }
  /// The model-side call: x and y in fp32 (the activations between layers),
  /// rounded to Compute for the layer. With `saved`, a training forward whose
  /// activations land there. Without `saved` but with a dropout `key`, a
  /// training forward whose activations are dropped at once: gradient
  /// checkpointing's first pass, which must draw the same LoRA dropout as its
  /// recompute (else the loss and the gradients belong to different masks).
  /// With neither, inference.
  [[nodiscard]] Tensor forward_f32(const TensorView& x, std::optional<LoraActivations>* saved,
                                   std::optional<DropoutKey> key) const {
    Tensor rounded;
    const TensorView x_compute = detail::compute_view<Compute>(x, rounded);
    Tensor y(dtype_of_v<Compute>, Shape{x.shape()[0], out_features()});
    if (saved != nullptr) {
      *saved = forward_train(x_compute, y.view(), key);
    } else if (key.has_value()) {
      (void)forward_train(x_compute, y.view(), key);
    } else {
      forward(x_compute, y.view());
    }
    return detail::to_f32<Compute>(std::move(y));
  }
  /// backward() with fp32 dy and dx.
  [[nodiscard]] Tensor backward_f32(const std::optional<LoraActivations>& saved, const TensorView& dy) {
    Tensor rounded;
    const TensorView dy_compute = detail::compute_view<Compute>(dy, rounded);
    Tensor dx(dtype_of_v<Compute>, Shape{dy.shape()[0], in_features()});
    backward(saved, dy_compute, dx.view());
    return detail::to_f32<Compute>(std::move(dx));
  }

  /// Accumulates the adapter's gradients (LoRA) and writes dx.
  void backward(const std::optional<LoraActivations>& saved, const TensorView& dy, const TensorView& dx) {
    if (Lora* layer = lora()) {
      check(saved.has_value(), "MissingActivations", "{}: backward without the activations of forward_train",
            layer->path());
      layer->backward(*saved, dy, dx);
      return;
    }
    std::get<Frozen>(layer_).backward_input(dy, dx);
  }

 private:
  static std::variant<Lora, Frozen> make(std::string path, Base base, const TensorView& bias, const LoraConfig& config,
                                         const LoraLinearOptions& options) {
    if (config.targets(path)) return Lora(std::move(path), std::move(base), bias, config, options);
    return Frozen(std::move(path), std::move(base), bias, options.threads);
  }

  std::variant<Lora, Frozen> layer_;
};

}  // namespace qlora
