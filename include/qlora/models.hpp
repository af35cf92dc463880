// Umbrella for models/: HF checkpoint loading (CheckpointTensors), configs,
// CausalLm (the model skeleton) with the Phi and InternLM2 architectures, built from nn/ ops
// and lora/ layers, vocabulary resizing.
#pragma once

#include <qlora/models/causal_lm.hpp>
#include <qlora/models/checkpoint_tensors.hpp>
#include <qlora/models/internlm2.hpp>
#include <qlora/models/internlm2_config.hpp>
#include <qlora/models/linear_module.hpp>
#include <qlora/models/phi.hpp>
#include <qlora/models/phi_config.hpp>
#include <qlora/models/token_batch.hpp>
#include <qlora/models/trainable_parameter.hpp>
#include <qlora/models/vocabulary_resize.hpp>
