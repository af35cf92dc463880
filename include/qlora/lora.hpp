// Umbrella for lora/: LoraConfig, the frozen base weight, dropout and init
// rules, and the LoraLinear layer (CPU backend; CUDA in cuda/lora_linear.cuh).
#pragma once

#include <qlora/lora/dropout.hpp>
#include <qlora/lora/frozen_weight.hpp>
#include <qlora/lora/lora_config.hpp>
#include <qlora/lora/lora_init.hpp>
#include <qlora/lora/lora_linear.hpp>
