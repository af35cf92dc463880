// IWYU pragma: private
// Constants and size arithmetic of the safetensors format shared by the reader
// and the writer, with the reference implementation's overflow rules
// (safetensors/src/tensor.rs, `Metadata::validate`).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>

namespace qlora::detail {

/// Bytes of the little-endian u64 header length that opens every file.
inline constexpr std::size_t safetensors_prefix_size = 8;
/// The reference's MAX_HEADER_SIZE (decimal 100 MB), enforced by reader and writer.
inline constexpr std::uint64_t safetensors_max_header_size = 100'000'000;

/// a * b, or false when it overflows u64 (the reference's `checked_mul` on a 64-bit usize).
inline bool checked_multiply(std::uint64_t a, std::uint64_t b, std::uint64_t& product) noexcept {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return false;
  product = a * b;
  return true;
}

/// "[2, 3]": a shape for messages, each dimension read as u64 (see tensor_byte_size).
inline std::string shape_string(std::span<const std::int64_t> shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    out += fmt::format("{}{}", i == 0 ? "" : ", ", static_cast<std::uint64_t>(shape[i]));
  }
  return out + "]";
}

/// The byte size of a `dtype` tensor of `shape`, checked as the reference does
/// and in its order: the element count and the bit count must fit u64
/// (ValidationOverflow) and the bits must fill whole bytes (MisalignedSlice, for
/// the 4- and 6-bit types). Dimensions are taken as u64 (the reader stores
/// header values above INT64_MAX as negative int64).
inline std::uint64_t tensor_byte_size(DType dtype, std::span<const std::int64_t> shape, std::string_view name) {
  std::uint64_t elements = 1;
  std::uint64_t bits = 0;
  bool fits = true;
  for (const std::int64_t dim : shape) {
    fits = fits && checked_multiply(elements, static_cast<std::uint64_t>(dim), elements);
  }
  fits = fits && checked_multiply(elements, dtype_bits(dtype), bits);
  check(fits, "ValidationOverflow", "tensor `{}`: the size of a {} tensor of shape {} overflows 64 bits", name,
        dtype_name(dtype), shape_string(shape));
  check(bits % 8 == 0, "MisalignedSlice", "tensor `{}`: {} elements of {} ({} bits each) do not fill whole bytes", name,
        elements, dtype_name(dtype), dtype_bits(dtype));
  return bits / 8;
}

}  // namespace qlora::detail
