// A permutation of 0..n-1 that is a pure function of (seed, stream): Fisher-Yates
// driven by the Philox stream (seed, stream) of core/rng.hpp. Epoch orders use the
// epoch as the stream, so epoch e's order can be recomputed on resume without
// replaying epochs 0..e-1 and is the same on every rank and every machine.
// shuffled_or_identity is the one place where packers and samplers choose
// between that order and the dataset's own.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include <qlora/core/error.hpp>
#include <qlora/core/rng.hpp>

namespace qlora::detail {

/// The stream of the shuffle before packing: far above any epoch number, so the
/// packing order and the epoch orders drawn from one seed are independent.
inline constexpr std::uint64_t pack_shuffle_stream = std::numeric_limits<std::uint64_t>::max();

/// Successive 32-bit words of the Philox stream (seed, stream).
class PhiloxWords {
 public:
  PhiloxWords(std::uint64_t seed, std::uint64_t stream) noexcept : seed_(seed), stream_(stream) {}

  std::uint32_t next() noexcept {
    if (used_ == block_.size()) {
      block_ = philox_random(seed_, stream_, offset_++);
      used_ = 0;
    }
    return block_[used_++];
  }

  /// Uniform in [0, bound), bound >= 1, without modulo bias: Lemire's multiply
  /// and reject (the rejected band is the 2^32 mod bound lowest products).
  std::uint32_t below(std::uint32_t bound) noexcept {
    std::uint64_t product = std::uint64_t{next()} * bound;
    if (static_cast<std::uint32_t>(product) < bound) {
      const std::uint32_t threshold = static_cast<std::uint32_t>(-bound) % bound;
      while (static_cast<std::uint32_t>(product) < threshold) product = std::uint64_t{next()} * bound;
    }
    return static_cast<std::uint32_t>(product >> 32);
  }

 private:
  std::uint64_t seed_;
  std::uint64_t stream_;
  std::uint64_t offset_ = 0;
  PhiloxCounter block_{};
  std::size_t used_ = block_.size();
};

/// 0..n-1 shuffled by Fisher-Yates (Durstenfeld: position i swaps with a uniform
/// j <= i, from the top down). Datasets are limited to 2^32 - 1 items, so that
/// every bound fits one Philox word.
inline std::vector<std::size_t> seeded_permutation(std::size_t n, std::uint64_t seed, std::uint64_t stream) {
  check(n <= std::numeric_limits<std::uint32_t>::max(), "DatasetTooLarge",
        "cannot shuffle {} items: at most 2^32 - 1 are supported", n);
  std::vector<std::size_t> order(n);
  std::iota(order.begin(), order.end(), std::size_t{0});
  PhiloxWords words(seed, stream);
  for (std::size_t i = n; i > 1; --i) {
    const std::size_t j = words.below(static_cast<std::uint32_t>(i));
    std::swap(order[i - 1], order[j]);
  }
  return order;
}

/// The order packers and samplers walk n items in: seeded_permutation(n, seed,
/// stream) when `shuffle`, 0..n-1 (which has no size limit) otherwise.
inline std::vector<std::size_t> shuffled_or_identity(std::size_t n, bool shuffle, std::uint64_t seed,
                                                     std::uint64_t stream) {
  if (shuffle) return seeded_permutation(n, seed, stream);
  std::vector<std::size_t> order(n);
  std::iota(order.begin(), order.end(), std::size_t{0});
  return order;
}

}  // namespace qlora::detail
