// IWYU pragma: private, include <qlora/quant/blockwise_4bit.hpp>
// How one 4-bit block is normalized before encoding, shared by the CPU paths
// and the CUDA kernels so that both produce the same codes. This is
// bitsandbytes 0.50's CPU rule (backends/default/ops.py quantize_4bit):
//  - a full block: x * fl32(1 / max(absmax, 1e-38)); its stored absmax is
//    the unclamped max |x| (0 for an all-zero block);
//  - the partial last block: x / max(absmax, 1e-38), a true division; its
//    stored absmax is the clamped value.
// An all-zero block therefore encodes every element as the code of 0 and
// dequantizes to +0. bitsandbytes' CUDA kernel differs here (reciprocal by
// rcp.approx, zero blocks as code 0 / NaN scale): see docs/quantization.md.
#pragma once

#include <cstdint>

#include <qlora/config.hpp>

namespace qlora::detail {

/// float32(1e-38): the clamp bitsandbytes applies before dividing (a subnormal).
inline constexpr float min_block_absmax = 1e-38f;

struct BlockScale {
  float stored_absmax;  ///< what the checkpoint records for this block
  float factor;         ///< multiplier (full block) or divisor (partial block)
  bool divide;          ///< true for the partial last block
};

QLORA_HOST_DEVICE BlockScale block_scale(float absmax, bool partial_block) noexcept {
  const float clamped = absmax > min_block_absmax ? absmax : min_block_absmax;
  if (partial_block) return BlockScale{clamped, clamped, true};
  return BlockScale{absmax, 1.0f / clamped, false};
}

QLORA_HOST_DEVICE float normalize(float x, const BlockScale& scale) noexcept {
  return scale.divide ? x / scale.factor : x * scale.factor;
}

/// Packs two codes into one byte, the first (even-index) element in the high nibble.
QLORA_HOST_DEVICE std::uint8_t pack_nibbles(std::uint8_t first, std::uint8_t second) noexcept {
  return static_cast<std::uint8_t>((first << 4) | second);
}

}  // namespace qlora::detail
