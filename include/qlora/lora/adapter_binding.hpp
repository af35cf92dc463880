// Moving adapters between PEFT files (lora/peft_adapter.hpp) and LoraLinear
// layers: load a module's A and B into the layer at its path, or take a
// layer's A and B out to be written. Loading checks that the file's rank and
// scaling for that module are the layer's: the shapes catch a wrong rank, but
// a different lora_alpha would otherwise change every output silently.
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/lora/peft_adapter.hpp>

#include <algorithm>
#include <string_view>

namespace qlora {

/// What these functions need of a layer (any LoraLinear backend).
template <class Layer>
concept AdapterLayer = requires(Layer& layer, const TensorView& view) {
  { layer.path() } -> std::convertible_to<std::string_view>;
  { layer.rank() } -> std::convertible_to<int>;
  { layer.scaling() } -> std::convertible_to<float>;
  { layer.lora_A() } -> std::convertible_to<TensorView>;
  { layer.lora_B() } -> std::convertible_to<TensorView>;
  layer.set_adapter_weights(view, view);
};

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
  layer.set_adapter_weights(module->lora_A.view(), module->lora_B.view());
}

/// A host copy of the layer's A [r, in] and B [out, r] under its path: what
/// write_peft_adapter saves. The layer's factors must be host tensors.
template <AdapterLayer Layer>
LoraModuleWeights adapter_weights_of(Layer& layer) {
  const auto copy = [](const TensorView& factor) {
    Tensor out(DType::F32, factor.shape());
    std::ranges::copy(factor.span<const float>(), out.span<float>().begin());
    return out;
  };
  return {std::string(layer.path()), copy(layer.lora_A()), copy(layer.lora_B())};
}

}  // namespace qlora
