// AdamW's hyper-parameters (optim/adamw.hpp has the maths), shared by AdamW,
// its state file (optim/detail/adamw_state_file.hpp) and ZeroOptimizer.
#pragma once

#include <string_view>

#include <qlora/core/parallel.hpp>

namespace qlora {

struct AdamWOptions {
  /// Where decoupled weight decay p ← p·(1 − lr·wd) happens relative to the Adam step.
  enum class DecayOrder {
    after_step,   ///< bitsandbytes' CUDA kernel: what paged_adamw_32bit runs on a GPU
    before_step,  ///< torch.optim.AdamW (and bitsandbytes 0.50's CPU backend)
  };

  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;  ///< the Trainer's default; bitsandbytes' own default (1e-2) is never used by it
  DecayOrder decay_order = DecayOrder::after_step;
  unsigned threads = default_thread_count();
};

namespace detail {

inline constexpr std::string_view decay_order_name(AdamWOptions::DecayOrder order) noexcept {
  return order == AdamWOptions::DecayOrder::after_step ? "after_step" : "before_step";
}

}  // namespace detail

}  // namespace qlora
