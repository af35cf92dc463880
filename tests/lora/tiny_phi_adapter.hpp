// The adapter of tests/reference/peft_adapter.py, regenerated in C++: a LoRA
// adapter (r 4, alpha 8, q/k/v_proj, dense, fc1, fc2, modules_to_save lm_head)
// for a tiny transformers PhiForCausalLM (hidden 64, 2 layers, intermediate
// 128, vocab 256), with every value from _refcommon.normalish:
//   layer l, module m (index in tiny_phi_targets):
//     lora_A  seed 1000 + 100 l + 10 m, scale 1 / sqrt(in_features)
//     lora_B  seed 1000 + 100 l + 10 m + 1, scale 0.05
//   lm_head.weight seed 2000, scale 0.05; lm_head.bias seed 2001, scale 0.1.
// Used by make_peft_fixture.cpp (the file peft loads) and the lora tests.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <qlora/lora/peft_adapter.hpp>

#include "support/splitmix.hpp"
#include "support/tensors.hpp"

namespace qlora::test {

inline constexpr int tiny_phi_layers = 2;
inline constexpr std::int64_t tiny_phi_hidden = 64;
inline constexpr std::int64_t tiny_phi_intermediate = 128;
inline constexpr std::int64_t tiny_phi_vocab = 256;

/// The LoRA targets, in the order the seeds number them.
inline constexpr std::array<std::string_view, 6> tiny_phi_targets = {"q_proj", "k_proj", "v_proj",
                                                                     "dense",  "fc1",    "fc2"};

/// Every nn.Linear of the tiny Phi (all have a bias), as transformers names them.
inline std::vector<ModuleShape> tiny_phi_modules() {
  std::vector<ModuleShape> modules;
  for (int layer = 0; layer < tiny_phi_layers; ++layer) {
    const std::string prefix = "model.layers." + std::to_string(layer) + ".";
    for (const std::string_view name : tiny_phi_targets) {
      const bool mlp = name.starts_with("fc");
      const std::int64_t in = name == "fc2" ? tiny_phi_intermediate : tiny_phi_hidden;
      const std::int64_t out = name == "fc1" ? tiny_phi_intermediate : tiny_phi_hidden;
      modules.push_back({prefix + (mlp ? "mlp." : "self_attn.") + std::string(name), in, out, true});
    }
  }
  modules.push_back({"lm_head", tiny_phi_hidden, tiny_phi_vocab, true});
  return modules;
}

inline AdapterConfig tiny_phi_adapter_config() {
  AdapterConfig config;
  config.lora.r = 4;
  config.lora.lora_alpha = 8;
  config.lora.target_modules.assign(tiny_phi_targets.begin(), tiny_phi_targets.end());
  config.lora.modules_to_save = {"lm_head"};
  // base_model_name_or_path stays "" (null): peft writes null for a model built from a config.
  return config;
}

/// An F32 tensor of `shape` holding normalish(numel, seed, scale).
inline Tensor normalish_tensor(Shape shape, std::uint64_t seed, double scale) {
  return tensor_of<float>(normalish(static_cast<std::size_t>(shape.numel()), seed, scale), shape);
}

inline PeftAdapter tiny_phi_adapter() {
  PeftAdapter adapter;
  adapter.config = tiny_phi_adapter_config();
  const std::int64_t r = adapter.config.lora.r;
  std::uint64_t index = 0;
  for (const ModuleShape& m : tiny_phi_modules()) {
    if (m.path == "lm_head") continue;
    const std::uint64_t layer = index / tiny_phi_targets.size();
    const std::uint64_t seed = 1000 + 100 * layer + 10 * (index % tiny_phi_targets.size());
    ++index;
    const double a_scale = 1.0 / std::sqrt(static_cast<double>(m.in_features));  // as Python's 1.0 / math.sqrt(in)
    adapter.modules.push_back({m.path, normalish_tensor({r, m.in_features}, seed, a_scale),
                               normalish_tensor({m.out_features, r}, seed + 1, 0.05)});
  }
  adapter.saved_tensors.emplace_back("lm_head.weight", normalish_tensor({tiny_phi_vocab, tiny_phi_hidden}, 2000, 0.05));
  adapter.saved_tensors.emplace_back("lm_head.bias", normalish_tensor({tiny_phi_vocab}, 2001, 0.1));
  return adapter;
}

}  // namespace qlora::test
