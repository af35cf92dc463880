// The raw bits of a float, bf16 or fp16, for bit-for-bit comparisons.
#pragma once

#include <bit>
#include <cstdint>
#include <type_traits>

#include <qlora/core/dtype.hpp>

namespace qlora::test {

template <class T>
std::uint32_t bits_of(T value) {
  if constexpr (std::is_same_v<T, float>) {
    return std::bit_cast<std::uint32_t>(value);
  } else {
    return value.bits;
  }
}

/// True when two float ranges hold the same bit patterns.
template <class A, class B>
bool same_bits(const A& a, const B& b) {
  if (std::size(a) != std::size(b)) return false;
  for (std::size_t i = 0; i < std::size(a); ++i) {
    if (bits_of(a[i]) != bits_of(b[i])) return false;
  }
  return true;
}

}  // namespace qlora::test
