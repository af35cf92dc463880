// Initial adapter weights, drawn from Philox so that an init is a pure
// function of (seed, module index) on any machine and device.
//
//   kaiming_uniform (PEFT default): A[k, i] ~ U(-1/sqrt(in), 1/sqrt(in)). PEFT
//     calls kaiming_uniform_(a = sqrt(5)) on the [r, in] weight, whose bound is
//     gain * sqrt(3 / fan_in) with gain = sqrt(2 / (1 + 5)): exactly 1/sqrt(in).
//   gaussian: A[k, i] ~ N(0, (1/r)^2) (Box-Muller on two Philox uniforms).
//   B = 0 in both, so a fresh adapter leaves the layer's output unchanged.
//
// The values are not torch's (torch draws from its own Mersenne Twister); what
// matches is the distribution. PEFT's dtype quirk (A is created in fp32, cast
// to the base weight's dtype when that is a float type, then back to fp32, so
// over a bf16 nn.Linear the initial values are bf16 numbers; a bitsandbytes
// 4-bit weight is uint8, so there A stays fp32) is reproduced by `RoundTo`.
#pragma once

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/rng.hpp>
#include <qlora/lora/lora_config.hpp>

#include <cmath>
#include <cstdint>
#include <numbers>
#include <span>

namespace qlora {

/// Fills `a` ([r, in_features], row-major) with the initial A for the adapter
/// of one module; `stream` tells modules apart (e.g. their index in the model).
/// Values are rounded through `RoundTo` (float: no rounding) to mirror PEFT's
/// cast of the adapter to the base weight's float dtype and back.
template <FloatStorage RoundTo = float>
void init_lora_a(std::span<float> a, int r, std::int64_t in_features, LoraInit init, std::uint64_t seed,
                 std::uint64_t stream) {
  check(r > 0 && in_features > 0 && a.size() == static_cast<std::size_t>(r) * static_cast<std::size_t>(in_features),
        "ShapeMismatch", "init_lora_a: {} values for A of shape [{}, {}]", a.size(), r, in_features);
  const auto round = [](float v) { return to_float(from_float<RoundTo>(v)); };
  if (init == LoraInit::kaiming_uniform) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
    for (std::size_t i = 0; i < a.size(); ++i) {
      const double u = philox_uniform(seed, stream, i);
      a[i] = round(static_cast<float>((2.0 * u - 1.0) * bound));
    }
    return;
  }
  const double stddev = 1.0 / r;
  for (std::size_t i = 0; i < a.size(); ++i) {
    // Box-Muller: 1 - u1 is in (0, 1], so the log is finite.
    const double u1 = 1.0 - static_cast<double>(philox_uniform(seed, stream, 2 * i));
    const double u2 = philox_uniform(seed, stream, 2 * i + 1);
    const double normal = std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
    a[i] = round(static_cast<float>(normal * stddev));
  }
}

}  // namespace qlora
