// Quantization policies: what a frozen base weight is stored as. `NF4` and
// `FP4` are 4-bit codebooks (nf4.hpp, fp4.hpp); `NoQuant` keeps the base
// weight dense. Templates that take a policy are constrained by the concepts
// here, so passing anything else is a one-line error.
#pragma once

#include <array>
#include <concepts>
#include <cstdint>
#include <string_view>

#include <qlora/core/error.hpp>
#include <qlora/quant/fp4.hpp>
#include <qlora/quant/nf4.hpp>

namespace qlora {

/// The frozen base weight is kept dense in its own dtype.
struct NoQuant {
  static constexpr std::string_view name = "none";
};

/// A 4-bit codebook: 16 values in [-1, 1], an encoder from a normalized value
/// to a code, the code of zero (for padding) and the table it serializes.
template <class Q>
concept FourBitCodebook = requires(float x, std::uint8_t code) {
  { Q::name } -> std::convertible_to<std::string_view>;
  { Q::zero_code } -> std::convertible_to<std::uint8_t>;
  { Q::encode(x) } -> std::same_as<std::uint8_t>;
  { Q::decode(code) } -> std::same_as<float>;
  { Q::quant_map } -> std::convertible_to<std::array<float, 16>>;
};

/// Any quantization policy a layer can be templated on.
template <class Q>
concept QuantPolicy = FourBitCodebook<Q> || std::same_as<Q, NoQuant>;

static_assert(FourBitCodebook<NF4> && FourBitCodebook<FP4>);
static_assert(QuantPolicy<NoQuant> && !FourBitCodebook<NoQuant>);

/// The run-time name of a 4-bit codebook, as checkpoints store it.
enum class QuantType : std::uint8_t { nf4, fp4 };

/// The QuantType of a codebook policy.
template <FourBitCodebook Q>
inline constexpr QuantType quant_type_of = std::same_as<Q, NF4> ? QuantType::nf4 : QuantType::fp4;

constexpr std::string_view quant_type_name(QuantType type) noexcept {
  return type == QuantType::nf4 ? NF4::name : FP4::name;
}

/// Parses "nf4" / "fp4" (bitsandbytes' spelling); anything else is an error.
inline QuantType parse_quant_type(std::string_view name) {
  if (name == NF4::name) return QuantType::nf4;
  if (name == FP4::name) return QuantType::fp4;
  throw Error("UnknownQuantType", fmt::format("quant_type \"{}\" is not \"nf4\" or \"fp4\"", name));
}

/// Calls `f(NF4{})` or `f(FP4{})` for a run-time QuantType: the one place
/// where a checkpoint's string becomes a compile-time policy.
template <class F>
decltype(auto) visit_quant_type(QuantType type, F&& f) {
  if (type == QuantType::nf4) return f(NF4{});
  return f(FP4{});
}

}  // namespace qlora
