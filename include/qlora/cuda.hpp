// Umbrella for the CUDA side of qlora: every cuda/*.cuh launcher header.
// Compiled only by nvcc; qlora/qlora.hpp includes it when __CUDACC__ is set.
// Link qlora::cuda (CMake) to get the CUDA runtime and nvcc's C++20 mode.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda.hpp is CUDA code: compile this file with nvcc (or include qlora/qlora.hpp, which includes it only under nvcc)"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <qlora/cuda/activations.cuh>
#include <qlora/cuda/attention.cuh>
#include <qlora/cuda/common.cuh>
#include <qlora/cuda/cross_entropy.cuh>
#include <qlora/cuda/cublas.cuh>
#include <qlora/cuda/dequantize_4bit.cuh>
#include <qlora/cuda/embedding.cuh>
#include <qlora/cuda/lora_linear.cuh>
#include <qlora/cuda/nccl.cuh>
#include <qlora/cuda/norms.cuh>
#include <qlora/cuda/quant_state.cuh>
#include <qlora/cuda/quantize_4bit.cuh>
#include <qlora/cuda/rotary.cuh>
