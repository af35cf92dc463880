// The whole library: `#include <qlora/qlora.hpp>`. Includes every CPU-side
// public header, and the CUDA ones too when nvcc compiles the translation unit.
#pragma once

#include <qlora/config.hpp>
#include <qlora/core.hpp>
#include <qlora/data.hpp>
#include <qlora/dist.hpp>
#include <qlora/io.hpp>
#include <qlora/lora.hpp>
#include <qlora/models.hpp>
#include <qlora/nn.hpp>
#include <qlora/optim.hpp>
#include <qlora/quant.hpp>
#include <qlora/train.hpp>
#include <qlora/version.hpp>

#if defined(__CUDACC__) && __has_include(<qlora/cuda.hpp>)
#include <qlora/cuda.hpp>
#endif
