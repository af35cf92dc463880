// Double quantization (QLoRA §2): the per-block float32 absmax of a 4-bit
// tensor is itself quantized to 8 bits — subtract the mean, then blockwise
// 8-bit quantization in blocks of 256 against the signed dynamic map — which
// saves about 0.37 bits per parameter at blocksize 64.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include <qlora/core/error.hpp>
#include <qlora/quant/blockwise_8bit.hpp>
#include <qlora/quant/dynamic_map.hpp>
#include <qlora/quant/quant_state.hpp>

namespace qlora {

/// The offset double quantization subtracts: the mean of `absmax`, summed in
/// double in a fixed order — each run of `nested_blocksize` values in turn,
/// then those partial sums in turn — and rounded once to float32. The fixed
/// order lets the CUDA kernel (one thread per run, then one thread over the
/// runs) produce the same bits. bitsandbytes takes torch's float32
/// `absmax.mean()`, whose last bit depends on torch's reduction order; the
/// offset is stored in the checkpoint, so readers are exact either way.
inline float mean_offset(std::span<const float> absmax) {
  check(!absmax.empty(), "EmptyTensor", "cannot take the mean of an empty absmax");
  double total = 0.0;
  for (std::size_t run = 0; run < absmax.size(); run += nested_blocksize) {
    const std::size_t run_end = std::min(absmax.size(), run + static_cast<std::size_t>(nested_blocksize));
    double partial = 0.0;
    for (std::size_t i = run; i < run_end; ++i) partial += absmax[i];
    total += partial;
  }
  return static_cast<float>(total / static_cast<double>(absmax.size()));
}

/// Quantizes `absmax - offset` (a float32 subtraction) in blocks of 256.
inline NestedAbsmax double_quantize(std::span<const float> absmax, float offset,
                                    std::span<const float, 256> code_map = signed_dynamic_map) {
  std::vector<float> centered(absmax.size());
  for (std::size_t i = 0; i < absmax.size(); ++i) centered[i] = absmax[i] - offset;
  Quantized8bit quantized = quantize_blockwise_8bit(centered, code_map, nested_blocksize);
  return NestedAbsmax{std::move(quantized.codes), std::move(quantized.absmax),
                      std::vector<float>(code_map.begin(), code_map.end()), offset};
}

}  // namespace qlora
