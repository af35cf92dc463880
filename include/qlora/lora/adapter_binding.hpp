// Moving adapters between PEFT files (lora/peft_adapter.hpp) and LoraLinear
// layers: load a module's A and B (and its bias, when the config trains
// biases) into the layer at its path, or take them out of a layer to be written. Loading checks that the file's rank and
// scaling for that module are the layer's: the shapes catch a wrong rank, but
// a different lora_alpha would otherwise change every output silently.
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/lora/peft_adapter.hpp>

#include <algorithm>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace qlora {

/// What these functions need of a layer (any LoraLinear backend).
template <class Layer>
concept AdapterLayer = requires(Layer& layer, const TensorView& view) {
  { layer.path() } -> std::convertible_to<std::string_view>;
  { layer.rank() } -> std::convertible_to<int>;
  { layer.scaling() } -> std::convertible_to<float>;
  { layer.lora_A() } -> std::convertible_to<TensorView>;
  { layer.lora_B() } -> std::convertible_to<TensorView>;
  { layer.bias() } -> std::convertible_to<TensorView>;
  { layer.has_bias() } -> std::convertible_to<bool>;
  { layer.bias_trainable() } -> std::convertible_to<bool>;
  layer.set_adapter_weights(view, view);
  layer.set_bias(view);
};

namespace detail {
/// Where PEFT saves the trained bias of the LoRA-wrapped module at `path`
/// (bias "all" or "lora_only"): the wrapped Linear is its `base_layer`.
inline std::string lora_bias_key(std::string_view path) { return fmt::format("{}.base_layer.bias", path); }

inline Tensor f32_copy(const TensorView& values) {
  Tensor out(DType::F32, values.shape());
  std::ranges::copy(values.span<const float>(), out.span<float>().begin());
  return out;
}
}  // namespace detail

/// Sets the layer's A and B from the adapter's module at layer.path().
/// Errors (AdapterMismatch) name the adapter file, the module and what differs.
template <AdapterLayer Layer>
void load_adapter_weights(Layer& layer, const PeftAdapter& adapter) {
  const std::string_view path = layer.path();
  const std::string_view source = detail::adapter_name(adapter);
  const auto module = std::ranges::find(adapter.modules, path, &LoraModuleWeights::path);
  check(module != adapter.modules.end(), "AdapterMismatch", "{}: has no LoRA weights for module {}", source, path);
  const LoraConfig& config = adapter.config.lora;
  check(config.rank_for(path) == layer.rank(), "AdapterMismatch", "{}: module {} has r = {}, the layer r = {}", source,
        path, config.rank_for(path), layer.rank());
  check(config.scaling_for(path) == layer.scaling(), "AdapterMismatch",
        "{}: module {} has scaling {} (lora_alpha {}, use_rslora {}), the layer {}", source, path,
        config.scaling_for(path), config.alpha_for(path), config.use_rslora, layer.scaling());
  if (config.bias != LoraBias::none && layer.has_bias()) {
    const std::string key = detail::lora_bias_key(path);
    const auto bias = std::ranges::find(adapter.saved_tensors, key, &std::pair<std::string, Tensor>::first);
    check(bias != adapter.saved_tensors.end(), "AdapterMismatch",
          "{}: bias is \"{}\" but there is no trained bias `{}{}` for module {}", source,
          lora_bias_name(config.bias), detail::peft_key_prefix, key, path);
    layer.set_bias(bias->second.view());
  }
  layer.set_adapter_weights(module->lora_A.view(), module->lora_B.view());
}

/// A host copy of the layer's A [r, in] and B [out, r] under its path: what
/// write_peft_adapter saves. The layer's factors must be host tensors.
template <AdapterLayer Layer>
LoraModuleWeights adapter_weights_of(Layer& layer) {
  return {std::string(layer.path()), detail::f32_copy(layer.lora_A()), detail::f32_copy(layer.lora_B())};
}

/// The layer's trained bias as PEFT saves it (key `<path>.base_layer.bias`,
/// for PeftAdapter::saved_tensors), or nothing when the layer trains no bias.
template <AdapterLayer Layer>
std::optional<std::pair<std::string, Tensor>> trained_bias_of(Layer& layer) {
  if (!layer.bias_trainable()) return std::nullopt;
  return std::pair{detail::lora_bias_key(layer.path()), detail::f32_copy(layer.bias())};
}

}  // namespace qlora
