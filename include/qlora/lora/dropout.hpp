// The LoRA branch's dropout as a pure function of (seed, call, element): the
// mask is never stored. Forward and backward regenerate the same mask, and the
// CPU and CUDA paths draw identical masks for one seed because both use the
// counter-based Philox4x32-10 of core/rng.hpp.
//
// Element (t, i) of call `call` is kept when philox_uniform(seed, call, t * in + i) >= p,
// and kept values are scaled by 1 / (1 - p) (inverted dropout, as torch.nn.Dropout).
#pragma once

#include <qlora/config.hpp>
#include <qlora/core/rng.hpp>

#include <cstdint>

namespace qlora {

/// Which random stream a forward call draws its mask from. The trainer gives
/// each (step, layer) its own `call` so masks never repeat, and replays the
/// same keys after a resume.
struct DropoutKey {
  std::uint64_t seed = 0;
  std::uint64_t call = 0;
};

/// The mask of one call: drop probability p, each element kept with probability
/// 1 - p, evaluated per element without any state.
struct DropoutMask {
  DropoutKey key;
  float probability = 0.0f;  ///< p, in [0, 1)

  [[nodiscard]] QLORA_HOST_DEVICE bool active() const noexcept { return probability > 0.0f; }
  /// The factor element `index` of the branch input is multiplied by: 0 or 1 / (1 - p).
  [[nodiscard]] QLORA_HOST_DEVICE float factor(std::uint64_t index) const noexcept {
    if (!active()) return 1.0f;
    return philox_uniform(key.seed, key.call, index) >= probability ? 1.0f / (1.0f - probability) : 0.0f;
  }
};

}  // namespace qlora
