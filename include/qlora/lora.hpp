// Umbrella for lora/: LoraConfig, the frozen base weight, dropout and init
// rules, FrozenLinear (a base layer without adapter), the LoraLinear layer (CPU backend; CUDA in cuda/lora_linear.cuh) and
// PEFT adapter files.
#pragma once

#include <qlora/lora/adapter_binding.hpp>
#include <qlora/lora/adapter_config.hpp>
#include <qlora/lora/dropout.hpp>
#include <qlora/lora/frozen_linear.hpp>
#include <qlora/lora/frozen_weight.hpp>
#include <qlora/lora/lora_config.hpp>
#include <qlora/lora/lora_init.hpp>
#include <qlora/lora/lora_linear.hpp>
#include <qlora/lora/merge_adapter.hpp>
#include <qlora/lora/peft_adapter.hpp>
