// SafetensorsTensor: one tensor of a safetensors file (name, dtype, shape and a
// view of its little-endian bytes), the unit the reader hands out and the writer
// takes in, with dtype-checked typed access that never reads through an
// unaligned pointer.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>

namespace qlora {

/// The `__metadata__` map of a safetensors header: string keys and values, in file order.
using SafetensorsMetadata = std::vector<std::pair<std::string, std::string>>;

/// A tensor in a safetensors file. `data` is a view: into the reader's buffer or
/// mapping for tensors read, into the caller's memory for tensors being written.
///
///     const SafetensorsTensor& w = reader.tensor("lm_head.weight");
///     std::vector<bf16> values = w.read<bf16>();  // copy, any alignment
///     std::span<const bf16> view = w.view<bf16>(); // zero-copy, needs alignment
struct SafetensorsTensor {
  std::string name;
  DType dtype = DType::U8;
  /// Row-major dimensions; empty for a 0-rank (scalar) tensor.
  std::vector<std::int64_t> shape;
  /// The tensor's bytes, little-endian, C order.
  std::span<const std::byte> data;

  /// Number of elements: the product of `shape` (1 for a scalar).
  [[nodiscard]] std::int64_t numel() const noexcept {
    std::uint64_t count = 1;
    for (const std::int64_t dim : shape) count *= static_cast<std::uint64_t>(dim);
    return static_cast<std::int64_t>(count);
  }

  /// A copy of the elements as T (memcpy, so any alignment is fine). Throws
  /// Error("DTypeMismatch") unless `dtype` is T's dtype. For bool, any nonzero
  /// byte reads as true (a byte other than 0 or 1 is not a valid C++ bool).
  template <class T>
  [[nodiscard]] std::vector<T> read() const {
    check_dtype<T>();
    std::vector<T> values(data.size() / sizeof(T));
    if constexpr (std::is_same_v<T, bool>) {
      for (std::size_t i = 0; i < values.size(); ++i) values[i] = data[i] != std::byte{0};
    } else if (!data.empty()) {
      std::memcpy(values.data(), data.data(), data.size());
    }
    return values;
  }

  /// The elements in place, without a copy. Throws Error("DTypeMismatch") unless
  /// `dtype` is T's dtype, and Error("UnalignedTensor") when the bytes are not
  /// aligned for T (files written before safetensors aligned its data, or a
  /// buffer the caller parsed at an odd address): read<T>() works for those.
  template <class T>
  [[nodiscard]] std::span<const T> view() const {
    static_assert(!std::is_same_v<T, bool>, "a stored byte may be neither 0 nor 1: use read<bool>()");
    check_dtype<T>();
    if (data.empty()) return {};
    check(reinterpret_cast<std::uintptr_t>(data.data()) % alignof(T) == 0, "UnalignedTensor",
          "tensor `{}`: its {} data is not {}-byte aligned in memory; use read<T>() to copy it", name,
          dtype_name(dtype), alignof(T));
    return {reinterpret_cast<const T*>(data.data()), data.size() / sizeof(T)};
  }

 private:
  template <class T>
  void check_dtype() const {
    static_assert(std::is_trivially_copyable_v<T>);
    static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");
    check(dtype == dtype_of_v<T>, "DTypeMismatch", "tensor `{}` holds {} elements, not {}", name, dtype_name(dtype),
          dtype_name(dtype_of_v<T>));
  }
};

}  // namespace qlora
