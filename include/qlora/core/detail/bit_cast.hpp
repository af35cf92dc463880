// IWYU pragma: private, include <qlora/core/dtype.hpp>
// bit_cast usable in both host and device code (std::bit_cast is not marked
// __device__ under every nvcc; memcpy is, and compilers lower it to a move).
#pragma once

#include <cstring>
#include <type_traits>

#include <qlora/config.hpp>

namespace qlora::detail {

template <class To, class From>
QLORA_HOST_DEVICE To bit_cast(const From& from) noexcept {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  static_assert(std::is_trivially_copyable_v<To> && std::is_trivially_copyable_v<From>);
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

}  // namespace qlora::detail
