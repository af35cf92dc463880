// TrainableParameter: one tensor a model trains and its gradient, as the
// optimizer, gradient clipping and checkpoints see it — named by its PEFT
// file key (after "base_model.model."), so names are stable across runs.
#pragma once

#include <qlora/core/tensor_view.hpp>

#include <string>

namespace qlora {

struct TrainableParameter {
  std::string name;   ///< e.g. "model.layers.0.self_attn.q_proj.lora_A.weight", "lm_head.weight"
  TensorView value;   ///< F32, updated in place
  TensorView grad;    ///< F32, same shape
  bool decay = true;  ///< in the Trainer's weight-decay group (biases are not)
};

}  // namespace qlora
