// Element types: the 16-bit float storage types bf16 and fp16 with float
// conversions bit-exact with PyTorch (round-to-nearest-even, NaN, Inf,
// subnormals), and the DType tag that names an element type at run time, with
// the names safetensors uses.
//
// The conversions are integer-only so that they give the same bits under
// -ffast-math, flush-to-zero or a device compiler: tests/core/dtype_test.cpp
// checks all 65,536 patterns and a float sweep against tensors PyTorch wrote.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <optional>
#include <type_traits>
#include <string_view>

#include <qlora/config.hpp>
#include <qlora/core/detail/bit_cast.hpp>
#include <qlora/core/error.hpp>

namespace qlora {

/// bfloat16 storage: the upper 16 bits of an IEEE float32.
struct bf16 {
  std::uint16_t bits;

  /// PyTorch's rounding for float32 tensors converted to bfloat16
  /// (`tensor.to(torch.bfloat16)`, the vectorised ATen path):
  /// round-to-nearest-even, subnormals kept, overflow to Inf, and every NaN
  /// becomes 0xFFFF. (PyTorch's scalar c10::BFloat16 writes 0x7FC0 for NaN
  /// instead; the two differ only there — tests/reference/dtype_conversions.py
  /// records both.)
  static QLORA_HOST_DEVICE bf16 from_float(float value) noexcept {
    const std::uint32_t u = detail::bit_cast<std::uint32_t>(value);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bf16{0xFFFF};
    const std::uint32_t rounding_bias = 0x7FFFu + ((u >> 16) & 1u);
    return bf16{static_cast<std::uint16_t>((u + rounding_bias) >> 16)};
  }
  /// Exact: bf16 is a prefix of float32.
  QLORA_HOST_DEVICE float to_float() const noexcept {
    return detail::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
  }
  friend constexpr bool operator==(bf16, bf16) = default;
};

/// IEEE binary16 storage.
struct fp16 {
  std::uint16_t bits;

  /// Round-to-nearest-even as PyTorch's vectorised float->half (x86 F16C
  /// vcvtps2ph): overflow to ±Inf, float subnormals to ±0, gradual underflow
  /// into half subnormals, NaN kept quiet with its sign and top payload bits.
  static QLORA_HOST_DEVICE fp16 from_float(float value) noexcept {
    const std::uint32_t u = detail::bit_cast<std::uint32_t>(value);
    const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
    const std::uint32_t magnitude = u & 0x7FFFFFFFu;
    if (magnitude > 0x7F800000u) {  // NaN: quiet it, keep the top 9 payload bits
      return fp16{static_cast<std::uint16_t>(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu))};
    }
    if (magnitude >= 0x477FF000u) return fp16{static_cast<std::uint16_t>(sign | 0x7C00u)};  // >= 65520
    if (magnitude >= 0x38800000u) {  // a normal half (>= 2^-14)
      // Rebias the exponent (127 -> 15) and round the 13 dropped bits to
      // nearest-even in one add; a carry rolls into the exponent correctly.
      const std::uint32_t odd = (magnitude >> 13) & 1u;
      return fp16{static_cast<std::uint16_t>(sign | ((magnitude + 0xC8000FFFu + odd) >> 13))};
    }
    if (magnitude < 0x33000000u) return fp16{sign};  // <= 2^-25 (a tie) rounds to zero
    // Half subnormal: units of 2^-24.
    const std::uint32_t exponent = magnitude >> 23;                   // 102..112
    const std::uint32_t mantissa = (magnitude & 0x7FFFFFu) | 0x800000u;
    const std::uint32_t shift = 126u - exponent;                       // 14..24
    std::uint32_t result = mantissa >> shift;
    const std::uint32_t remainder = mantissa & ((1u << shift) - 1u);
    const std::uint32_t half_unit = 1u << (shift - 1u);
    if (remainder > half_unit || (remainder == half_unit && (result & 1u))) ++result;
    return fp16{static_cast<std::uint16_t>(sign | result)};
  }
  /// Exact for every number; a NaN is widened with its sign and payload and
  /// the quiet bit set, as x86 F16C (PyTorch's path) does.
  QLORA_HOST_DEVICE float to_float() const noexcept {
    const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
    const std::uint32_t exponent = (bits >> 10) & 0x1Fu;
    std::uint32_t mantissa = bits & 0x3FFu;
    std::uint32_t out;
    if (exponent == 0x1Fu) {
      out = sign | 0x7F800000u | (mantissa << 13) | (mantissa != 0 ? 0x400000u : 0u);
    } else if (exponent != 0) {
      out = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
      out = sign;
    } else {  // subnormal: normalise
      std::uint32_t biased = 113u;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        --biased;
      }
      out = sign | (biased << 23) | ((mantissa & 0x3FFu) << 13);
    }
    return detail::bit_cast<float>(out);
  }
  friend constexpr bool operator==(fp16, fp16) = default;
};

static_assert(sizeof(bf16) == 2 && sizeof(fp16) == 2);

/// Converts a float to T, for T in {float, bf16, fp16}.
template <class T>
QLORA_HOST_DEVICE T from_float(float value) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    return value;
  } else {
    return T::from_float(value);
  }
}

/// Converts T in {float, bf16, fp16} to float (exact).
template <class T>
QLORA_HOST_DEVICE float to_float(T value) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    return value;
  } else {
    return value.to_float();
  }
}

/// The floating types the compute and quantization paths accept.
template <class T>
concept FloatStorage = std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

/// Run-time element type. The enumerators are in safetensors' `Dtype` order
/// ("increasing alignment order"), which its writer sorts by.
enum class DType : std::uint8_t {
  BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ,
  I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64,
};

namespace detail {
struct DTypeInfo {
  DType dtype;
  std::string_view name;
  std::size_t bits;
};
inline constexpr DTypeInfo dtype_table[] = {
    {DType::BOOL, "BOOL", 8},       {DType::F4, "F4", 4},         {DType::F6_E2M3, "F6_E2M3", 6},
    {DType::F6_E3M2, "F6_E3M2", 6}, {DType::U8, "U8", 8},         {DType::I8, "I8", 8},
    {DType::F8_E5M2, "F8_E5M2", 8}, {DType::F8_E4M3, "F8_E4M3", 8}, {DType::F8_E8M0, "F8_E8M0", 8},
    {DType::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8}, {DType::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8},
    {DType::I16, "I16", 16},        {DType::U16, "U16", 16},      {DType::F16, "F16", 16},
    {DType::BF16, "BF16", 16},      {DType::I32, "I32", 32},      {DType::U32, "U32", 32},
    {DType::F32, "F32", 32},        {DType::C64, "C64", 64},      {DType::F64, "F64", 64},
    {DType::I64, "I64", 64},        {DType::U64, "U64", 64},
};
}  // namespace detail

/// The safetensors name of `dtype` ("F32", "BF16", ...).
constexpr std::string_view dtype_name(DType dtype) noexcept {
  return detail::dtype_table[static_cast<std::size_t>(dtype)].name;
}
/// Bits per element (4 and 6 for the sub-byte float formats).
constexpr std::size_t dtype_bits(DType dtype) noexcept {
  return detail::dtype_table[static_cast<std::size_t>(dtype)].bits;
}
/// The DType with safetensors name `name`, if any.
constexpr std::optional<DType> dtype_from_name(std::string_view name) noexcept {
  for (const auto& info : detail::dtype_table) {
    if (info.name == name) return info.dtype;
  }
  return std::nullopt;
}

/// The DType tag of a C++ element type.
template <class T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::F32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::F64; };
template <> struct dtype_of<bf16> { static constexpr DType value = DType::BF16; };
template <> struct dtype_of<fp16> { static constexpr DType value = DType::F16; };
template <> struct dtype_of<std::uint8_t> { static constexpr DType value = DType::U8; };
template <> struct dtype_of<std::int8_t> { static constexpr DType value = DType::I8; };
template <> struct dtype_of<std::int32_t> { static constexpr DType value = DType::I32; };
template <> struct dtype_of<std::int64_t> { static constexpr DType value = DType::I64; };
template <> struct dtype_of<std::uint16_t> { static constexpr DType value = DType::U16; };
template <> struct dtype_of<std::uint32_t> { static constexpr DType value = DType::U32; };
template <> struct dtype_of<std::uint64_t> { static constexpr DType value = DType::U64; };
template <> struct dtype_of<std::int16_t> { static constexpr DType value = DType::I16; };
template <> struct dtype_of<bool> { static constexpr DType value = DType::BOOL; };
template <class T>
inline constexpr DType dtype_of_v = dtype_of<T>::value;

/// Calls f(T{}) with T the FloatStorage type of `dtype` (F32, F16 or BF16);
/// any other dtype is a DTypeMismatch naming `what`.
template <class F>
decltype(auto) visit_float_dtype(DType dtype, F&& f, std::string_view what = "tensor") {
  switch (dtype) {
    case DType::F32: return f(float{});
    case DType::F16: return f(fp16{});
    case DType::BF16: return f(bf16{});
    default: break;
  }
  throw Error("DTypeMismatch", fmt::format("{} is {}; expected F32, F16 or BF16", what, dtype_name(dtype)));
}

namespace detail {
constexpr bool dtype_table_matches_enum() {
  for (std::size_t i = 0; i < std::size(dtype_table); ++i) {
    if (static_cast<std::size_t>(dtype_table[i].dtype) != i) return false;
  }
  return std::size(dtype_table) == static_cast<std::size_t>(DType::U64) + 1;
}
static_assert(dtype_table_matches_enum(), "dtype_table must list every DType in enum order");
}  // namespace detail

}  // namespace qlora
