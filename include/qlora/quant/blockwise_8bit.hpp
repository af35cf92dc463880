// Blockwise 8-bit quantization against a 256-entry code map: the second level
// of double quantization (absmax - offset, blocks of 256). Matches
// bitsandbytes 0.50's native CPU quantizer (csrc/cpu_ops.cpp
// quantize_cpu_impl), which looks codes up in a 65,536-bin table over
// [-1, 1] instead of searching the map; tests/quant/blockwise_8bit_test.cpp
// holds it to bitsandbytes' output byte for byte.
//
// bitsandbytes' CUDA kernel instead searches the map directly (nearest code,
// exact midpoint ties to the even index), which differs from this table on
// about 0.1% of values (nf4_spec.md §4 step 7); either way the codes are
// serialized, so a reader never needs to know which rule wrote them.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include <qlora/config.hpp>
#include <qlora/core/detail/float_ops.hpp>
#include <qlora/core/error.hpp>

namespace qlora {

/// Codes and per-block scales of an 8-bit blockwise quantization.
struct Quantized8bit {
  std::vector<std::uint8_t> codes;
  std::vector<float> absmax;
};

namespace detail {

inline constexpr int lut_bins = 65536;

/// bitsandbytes' bin table: for bin i at value -1 + 2i/65535, the index of
/// the first code whose upper midpoint is not below it.
inline std::vector<std::uint8_t> build_code_lut(std::span<const float, 256> code_map) {
  std::array<float, 255> midpoints{};
  for (std::size_t i = 0; i < midpoints.size(); ++i) midpoints[i] = 0.5f * (code_map[i] + code_map[i + 1]);
  std::vector<std::uint8_t> lut(lut_bins);
  std::size_t code = 0;
  for (int bin = 0; bin < lut_bins; ++bin) {
    const float value = -1.0f + (2.0f * static_cast<float>(bin)) / static_cast<float>(lut_bins - 1);
    while (code < midpoints.size() && midpoints[code] < value) ++code;
    lut[static_cast<std::size_t>(bin)] = static_cast<std::uint8_t>(code);
  }
  return lut;
}

/// The bin of a normalized value: (clamp(v) + 1) * 0.5 * 65535 + 0.5,
/// truncated, each operation rounded to float32 on its own, whatever FMA
/// contraction the compiler does (detail::mul_rn / detail::add_rn).
/// Host-device: the CUDA double-quantization kernel calls it too
/// (cuda/kernel/quantize_4bit.cuh), so it uses no std:: algorithm; the
/// clamp is std::clamp's exact rule (a NaN passes through).
QLORA_HOST_DEVICE std::uint16_t lut_bin(float normalized) noexcept {
  const float v = normalized < -1.0f ? -1.0f : (1.0f < normalized ? 1.0f : normalized);
  const float half = (v + 1.0f) * 0.5f;  // halving is exact: fused or not, the same bits
  const float scaled = detail::mul_rn(half, static_cast<float>(lut_bins - 1));
  return static_cast<std::uint16_t>(detail::add_rn(scaled, 0.5f));
}

}  // namespace detail

/// Quantizes `input` in blocks of `blocksize` against `code_map` (sorted
/// ascending). Per block: absmax = max |x| (0 for an all-zero block, whose
/// codes are then 0); x is normalized by a multiply with fl32(1/absmax).
inline Quantized8bit quantize_blockwise_8bit(std::span<const float> input, std::span<const float, 256> code_map,
                                             std::int64_t blocksize) {
  check(blocksize > 0, "InvalidBlocksize", "8-bit blocksize {} must be positive", blocksize);
  check(std::is_sorted(code_map.begin(), code_map.end()), "InvalidCodeMap", "the 8-bit code map is not sorted ascending");
  const auto n = static_cast<std::int64_t>(input.size());
  const std::int64_t blocks = (n + blocksize - 1) / blocksize;
  const std::vector<std::uint8_t> lut = detail::build_code_lut(code_map);
  Quantized8bit result{std::vector<std::uint8_t>(input.size()), std::vector<float>(static_cast<std::size_t>(blocks))};
  for (std::int64_t block = 0; block < blocks; ++block) {
    const std::int64_t begin = block * blocksize;
    const std::int64_t end = std::min(begin + blocksize, n);
    float absmax = 0.0f;
    for (std::int64_t i = begin; i < end; ++i) absmax = std::max(absmax, std::fabs(input[static_cast<std::size_t>(i)]));
    result.absmax[static_cast<std::size_t>(block)] = absmax;
    if (absmax == 0.0f) continue;  // codes stay 0, as bitsandbytes writes them
    const float inverse = 1.0f / absmax;
    for (std::int64_t i = begin; i < end; ++i) {
      // Rounded on its own, as bitsandbytes does, before lut_bin adds 1.
      const float normalized = detail::mul_rn(input[static_cast<std::size_t>(i)], inverse);
      result.codes[static_cast<std::size_t>(i)] = lut[detail::lut_bin(normalized)];
    }
  }
  return result;
}

/// out[i] = fl32(code_map[codes[i]] * absmax[i / blocksize]).
inline void dequantize_blockwise_8bit(std::span<const std::uint8_t> codes, std::span<const float> absmax,
                                      std::span<const float, 256> code_map, std::int64_t blocksize,
                                      std::span<float> out) {
  check(blocksize > 0, "InvalidBlocksize", "8-bit blocksize {} must be positive", blocksize);
  check(out.size() == codes.size(), "ShapeMismatch", "output has {} elements, codes {}", out.size(), codes.size());
  const auto blocks = (static_cast<std::int64_t>(codes.size()) + blocksize - 1) / blocksize;
  check(static_cast<std::int64_t>(absmax.size()) == blocks, "QuantStateMismatch",
        "8-bit absmax has {} entries, expected {}", absmax.size(), blocks);
  for (std::size_t i = 0; i < codes.size(); ++i) {
    out[i] = code_map[codes[i]] * absmax[i / static_cast<std::size_t>(blocksize)];
  }
}

}  // namespace qlora
