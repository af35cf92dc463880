// Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2,
// 3", SC'11): a counter-based generator. Output is a pure function of
// (counter, key), so element i of a dropout mask or an init can be drawn on
// the CPU or by any GPU thread independently and still give the same bits.
// Checked against Random123's published known-answer vectors; the key is the
// seed and counter words 2-3 the subsequence, as in cuRAND's and PyTorch's
// Philox, so streams are laid out the way CUDA users expect.
#pragma once

#include <array>
#include <cstdint>

#include <qlora/config.hpp>

namespace qlora {

using PhiloxCounter = std::array<std::uint32_t, 4>;
using PhiloxKey = std::array<std::uint32_t, 2>;

namespace detail {

QLORA_HOST_DEVICE void mul_hi_lo(std::uint32_t a, std::uint32_t b, std::uint32_t& hi, std::uint32_t& lo) noexcept {
  const std::uint64_t product = static_cast<std::uint64_t>(a) * b;
  hi = static_cast<std::uint32_t>(product >> 32);
  lo = static_cast<std::uint32_t>(product);
}

}  // namespace detail

/// The Philox4x32 bijection with `Rounds` rounds (10 is the standard, crush-resistant choice).
template <int Rounds = 10>
QLORA_HOST_DEVICE PhiloxCounter philox4x32(PhiloxCounter counter, PhiloxKey key) noexcept {
  constexpr std::uint32_t multiplier0 = 0xD2511F53u, multiplier1 = 0xCD9E8D57u;
  constexpr std::uint32_t weyl0 = 0x9E3779B9u, weyl1 = 0xBB67AE85u;  // golden ratio, sqrt(3) - 1
  for (int round = 0; round < Rounds; ++round) {
    if (round > 0) {
      key[0] += weyl0;
      key[1] += weyl1;
    }
    std::uint32_t hi0, lo0, hi1, lo1;
    detail::mul_hi_lo(multiplier0, counter[0], hi0, lo0);
    detail::mul_hi_lo(multiplier1, counter[2], hi1, lo1);
    counter = {hi1 ^ counter[1] ^ key[0], lo1, hi0 ^ counter[3] ^ key[1], lo0};
  }
  return counter;
}

/// Four random words for block `offset` of stream `subsequence` under `seed`
/// (the cuRAND Philox4_32_10 layout: key = seed, counter = {offset, subsequence}).
QLORA_HOST_DEVICE PhiloxCounter philox_random(std::uint64_t seed, std::uint64_t subsequence,
                                              std::uint64_t offset) noexcept {
  return philox4x32<10>(
      {static_cast<std::uint32_t>(offset), static_cast<std::uint32_t>(offset >> 32),
       static_cast<std::uint32_t>(subsequence), static_cast<std::uint32_t>(subsequence >> 32)},
      {static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)});
}

/// A uniform float in [0, 1) from the top 24 bits of a random word (every
/// value a multiple of 2^-24, so the result is exact on any device).
QLORA_HOST_DEVICE float uniform_from_bits(std::uint32_t bits) noexcept {
  return static_cast<float>(bits >> 8) * 0x1p-24f;
}

/// Element `index` of the uniform [0, 1) stream (seed, subsequence): one
/// Philox block yields four consecutive elements.
QLORA_HOST_DEVICE float philox_uniform(std::uint64_t seed, std::uint64_t subsequence, std::uint64_t index) noexcept {
  return uniform_from_bits(philox_random(seed, subsequence, index / 4)[index % 4]);
}

}  // namespace qlora
