// The portable test-data generator of nf4_spec.md §10 (also used by the
// tests/reference scripts): splitmix64 and a sum-of-four-uniforms value in
// [-2, 2) * scale, computed in double and rounded to float once.
#pragma once

#include <cstdint>
#include <vector>

namespace qlora::test {

inline std::uint64_t splitmix64(std::uint64_t index) {
  std::uint64_t z = (index + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// Value `index` of stream `seed`: Σ_k splitmix64(4 * index + k + seed) >> 40, scaled.
inline float normalish_value(std::uint64_t index, std::uint64_t seed, double scale) {
  double sum = 0.0;
  for (std::uint64_t k = 0; k < 4; ++k) sum += static_cast<double>(splitmix64(4 * index + k + seed) >> 40);
  return static_cast<float>((sum / 16777216.0 - 2.0) * scale);
}

inline float splitmix_value(std::uint64_t index, double scale) { return normalish_value(index, 0, scale); }

inline std::vector<float> splitmix_values(std::size_t count, double scale, std::uint64_t first_index = 0) {
  std::vector<float> values(count);
  for (std::size_t i = 0; i < count; ++i) values[i] = splitmix_value(first_index + i, scale);
  return values;
}

/// tests/reference/_refcommon.py's normalish(count, seed, scale, start): the
/// same sum-of-four-uniforms value, on stream `seed` (splitmix64 counter
/// 4 * (start + i) + k + seed), so C++ regenerates a reference script's inputs
/// instead of reading them from a fixture.
inline std::vector<float> normalish(std::size_t count, std::uint64_t seed, double scale, std::uint64_t start = 0) {
  std::vector<float> values(count);
  for (std::size_t i = 0; i < count; ++i) values[i] = normalish_value(start + i, seed, scale);
  return values;
}

}  // namespace qlora::test
