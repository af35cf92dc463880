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
#include <string_view>
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

namespace detail {

/// The element count of `shape`, refusing empty shapes, non-positive extents
/// and products that overflow int64 (a hostile checkpoint's shape must not
/// turn into undefined behaviour or a wrapped size).
inline std::int64_t checked_element_count(std::span<const std::int64_t> shape, std::string_view what) {
  check(!shape.empty(), "QuantStateMismatch", "{}: empty shape", what);
  std::int64_t count = 1;
  for (const auto extent : shape) {
    check(extent > 0, "QuantStateMismatch", "{}: shape extent {} is not positive", what, extent);
    check(!__builtin_mul_overflow(count, extent, &count), "QuantStateMismatch", "{}: shape overflows 64-bit element counts",
          what);
  }
  return count;
}

/// The sizes that must agree for a 4-bit tensor, wherever its buffers live
/// (QuantState on the host, cuda::DeviceQuantized4bit on a GPU).
struct QuantLayout {
  std::span<const std::int64_t> shape;
  std::int64_t blocksize;
  std::size_t packed_bytes;
  bool nested;
  std::size_t absmax_count, nested_codes_count, nested_absmax_count, code_map_count;
};

/// Throws a named Error (QuantStateMismatch, InvalidBlocksize) unless the
/// sizes of `layout` agree with its shape and blocksize; `what` names the state.
inline void validate_quant_layout(const QuantLayout& layout, std::string_view what) {
  const std::int64_t n = checked_element_count(layout.shape, what);
  check(is_valid_4bit_blocksize(layout.blocksize), "InvalidBlocksize",
        "{}: blocksize {} is not a power of two in [32, 4096]", what, layout.blocksize);
  check(layout.packed_bytes == static_cast<std::size_t>((n + 1) / 2), "QuantStateMismatch",
        "{}: packed data has {} bytes, shape needs {} ((numel + 1) / 2 with numel {})", what, layout.packed_bytes,
        (n + 1) / 2, n);
  const auto blocks = static_cast<std::size_t>((n + layout.blocksize - 1) / layout.blocksize);
  if (!layout.nested) {
    check(layout.absmax_count == blocks, "QuantStateMismatch", "{}: absmax has {} entries, expected {} blocks", what,
          layout.absmax_count, blocks);
    return;
  }
  check(layout.absmax_count == 0, "QuantStateMismatch", "{}: a nested state must not also carry float absmax", what);
  check(layout.nested_codes_count == blocks, "QuantStateMismatch",
        "{}: nested absmax codes have {} entries, expected {} blocks", what, layout.nested_codes_count, blocks);
  const auto nested_blocks = (blocks + nested_blocksize - 1) / nested_blocksize;
  check(layout.nested_absmax_count == nested_blocks, "QuantStateMismatch",
        "{}: nested_absmax has {} entries, expected {} (one per {} blocks)", what, layout.nested_absmax_count,
        nested_blocks, nested_blocksize);
  check(layout.code_map_count == 256, "QuantStateMismatch", "{}: nested_quant_map has {} entries, expected 256", what,
        layout.code_map_count);
}

}  // namespace detail

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
    check(dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16, "QuantStateMismatch",
          "quant state dtype {} is not F32, F16 or BF16", dtype_name(dtype));
    detail::validate_quant_layout({shape, blocksize, packed_size, nested.has_value(), absmax.size(),
                                   nested ? nested->codes.size() : 0, nested ? nested->absmax.size() : 0,
                                   nested ? nested->code_map.size() : 0},
                                  "quant state");
  }
};

/// Packed nibbles and the state that goes with them.
struct Quantized4bit {
  std::vector<std::uint8_t> packed;
  QuantState state;
};

}  // namespace qlora
