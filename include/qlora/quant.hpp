// Umbrella for quant/: NF4/FP4 policies, blockwise 4-bit and 8-bit
// quantization, double quantization and bitsandbytes' checkpoint layout.
#pragma once

#include <qlora/quant/blockwise_4bit.hpp>
#include <qlora/quant/blockwise_8bit.hpp>
#include <qlora/quant/bnb_format.hpp>
#include <qlora/quant/double_quant.hpp>
#include <qlora/quant/dynamic_map.hpp>
#include <qlora/quant/fp4.hpp>
#include <qlora/quant/nf4.hpp>
#include <qlora/quant/quant_policy.hpp>
#include <qlora/quant/quant_state.hpp>
