// QuantState: everything besides the packed nibbles that a 4-bit tensor needs
// to be dequantized — bitsandbytes' QuantState, as plain data. Layout is
// bitsandbytes' structure-of-arrays: one float32 absmax per block, or, with
// double quantization, one 8-bit code per block plus float32 absmax per 256
// codes, the 256-entry signed dynamic map and a float32 mean offset.
#pragma once

#include <cstdint>
#include <functional>
#include <numeric>
#include <optional>
#include <span>
#include <vector>

#include <qlora/config.hpp>
#include <qlora/core/detail/float_ops.hpp>
#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/quant/quant_policy.hpp>

namespace qlora {

/// bitsandbytes' block sizes: powers of two from 32 to 4096.
constexpr bool is_valid_4bit_blocksize(std::int64_t blocksize) noexcept {
  return blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0;
}

/// Block size of the nested (second-level) absmax quantization; fixed by bitsandbytes.
inline constexpr std::int64_t nested_blocksize = 256;

/// Rebuilds one block's absmax from its nested code exactly as bitsandbytes
/// does (dequantize_blockwise, then `absmax += offset` as a separate float32
/// op): fl32(fl32(map[code] * absmax2) + offset), two roundings, on every
/// compiler and in CUDA device code: detail::mul_rn / detail::add_rn are never
/// fused into an FMA (core/detail/float_ops.hpp says why plain or double
/// arithmetic is not enough).
QLORA_HOST_DEVICE float rebuild_nested_absmax(float map_value, float absmax2, float offset) noexcept {
  return detail::add_rn(detail::mul_rn(map_value, absmax2), offset);
}

/// The second level of double quantization (bitsandbytes' `state2` + `offset`).
struct NestedAbsmax {
  std::vector<std::uint8_t> codes;  ///< one 8-bit code per 4-bit block: (absmax - offset) quantized
  std::vector<float> absmax;        ///< one float32 scale per nested_blocksize codes
  std::vector<float> code_map;      ///< the 256-entry signed dynamic map the codes index
  float offset = 0.0f;              ///< float32 mean of the first-level absmax

  /// The absmax of 4-bit block `block`.
  [[nodiscard]] float block_absmax(std::int64_t block) const {
    return rebuild_nested_absmax(code_map[codes[static_cast<std::size_t>(block)]],
                                 absmax[static_cast<std::size_t>(block / nested_blocksize)], offset);
  }
};

struct QuantState {
  QuantType quant_type = QuantType::nf4;
  std::int64_t blocksize = 64;
  DType dtype = DType::BF16;           ///< dtype of the weight when it was quantized (F32, F16 or BF16)
  std::vector<std::int64_t> shape;     ///< original shape, e.g. [out_features, in_features]
  std::vector<float> absmax;           ///< one per block; empty when `nested` holds the scales
  std::optional<NestedAbsmax> nested;  ///< set when double quantization is on

  [[nodiscard]] std::int64_t numel() const {
    return std::accumulate(shape.begin(), shape.end(), std::int64_t{1}, std::multiplies<>());
  }
  [[nodiscard]] std::int64_t block_count() const { return (numel() + blocksize - 1) / blocksize; }
  /// Bytes of packed nibbles: two elements per byte, the first in the high nibble.
  [[nodiscard]] std::int64_t packed_bytes() const { return (numel() + 1) / 2; }

  /// The float32 absmax of block `block`, plain or rebuilt from the nested codes.
  [[nodiscard]] float block_absmax(std::int64_t block) const {
    return nested ? nested->block_absmax(block) : absmax[static_cast<std::size_t>(block)];
  }

  /// Throws a named Error unless every field is consistent with the others
  /// and with `packed_size` bytes of packed data. Called before any
  /// dequantization, so a mismatched state never reads out of bounds.
  void validate(std::size_t packed_size) const {
    check(!shape.empty(), "QuantStateMismatch", "quant state has an empty shape");
    for (const auto extent : shape) {
      check(extent > 0, "QuantStateMismatch", "quant state shape has a non-positive extent {}", extent);
    }
    check(is_valid_4bit_blocksize(blocksize), "InvalidBlocksize",
          "quant state blocksize {} is not a power of two in [32, 4096]", blocksize);
    check(dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16, "QuantStateMismatch",
          "quant state dtype {} is not F32, F16 or BF16", dtype_name(dtype));
    check(static_cast<std::int64_t>(packed_size) == packed_bytes(), "QuantStateMismatch",
          "packed data has {} bytes, shape needs {} ((numel + 1) / 2 with numel {})", packed_size,
          packed_bytes(), numel());
    const auto blocks = static_cast<std::size_t>(block_count());
    if (!nested) {
      check(absmax.size() == blocks, "QuantStateMismatch", "absmax has {} entries, expected {} blocks",
            absmax.size(), blocks);
      return;
    }
    check(absmax.empty(), "QuantStateMismatch", "a nested quant state must not also carry float absmax");
    check(nested->codes.size() == blocks, "QuantStateMismatch",
          "nested absmax codes have {} entries, expected {} blocks", nested->codes.size(), blocks);
    const auto nested_blocks = (blocks + nested_blocksize - 1) / nested_blocksize;
    check(nested->absmax.size() == nested_blocks, "QuantStateMismatch",
          "nested_absmax has {} entries, expected {} (one per {} blocks)", nested->absmax.size(),
          nested_blocks, nested_blocksize);
    check(nested->code_map.size() == 256, "QuantStateMismatch", "nested_quant_map has {} entries, expected 256",
          nested->code_map.size());
  }
};

/// Packed nibbles and the state that goes with them.
struct Quantized4bit {
  std::vector<std::uint8_t> packed;
  QuantState state;
};

}  // namespace qlora
