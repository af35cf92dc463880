// train_step: one optimizer step over a gradient-accumulation window, with
// the HF Trainer's semantics (design note §7.4–7.6):
//
//   loss = Σ_window CE(token) / N_window      N_window = supervised targets
//                                              (after the shift) in the window
//
// i.e. transformers ≥ 4.46 (`num_items_in_batch`): every supervised token of
// the window weighs the same, however the tokens fall into micro-batches.
// Each micro-batch's backward runs with grad_scale = 1 / N_window, so the
// accumulated gradient is that of `loss`. Then the global gradient norm is
// clipped to max_grad_norm (torch clip_grad_norm_; ≤ 0 disables) and the
// optimizer steps with the schedule's learning rate.
//
// A non-finite loss or gradient norm never reaches the weights: by option the
// step is skipped (gradients dropped, counted in the result) or the run stops
// with Error("NonFiniteLoss") naming the step and the micro-batch.
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/models/token_batch.hpp>
#include <qlora/models/trainable_parameter.hpp>
#include <qlora/nn/cross_entropy.hpp>
#include <qlora/optim/grad_clip.hpp>

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace qlora {

enum class NonFinitePolicy : std::uint8_t { stop, skip_step };

struct TrainStepOptions {
  double max_grad_norm = 1.0;  ///< the Trainer's default; ≤ 0 disables clipping
  NonFinitePolicy on_non_finite = NonFinitePolicy::stop;
};

/// One micro-batch of a window, and the name errors give it (e.g. "epoch 1, batch 17").
struct MicroBatch {
  TokenBatch batch;
  std::string name;
};

struct TrainStepResult {
  double loss = 0;                   ///< Σ CE / N_window (NaN or Inf when skipped for it; NaN when N_window = 0)
  std::int64_t supervised_tokens = 0;  ///< N_window
  std::int64_t input_tokens = 0;     ///< every token the window ran, padding included
  double grad_norm = 0;              ///< before clipping
  bool skipped = false;
};

/// The supervised targets of `batch` after transformers' label shift.
inline std::int64_t supervised_targets(const TokenBatch& batch) {
  std::int64_t count = 0;
  for (const std::int32_t target : shifted_targets(batch.labels, batch.row_length)) count += target != ignored_target;
  return count;
}

/// Micro-batch i of optimizer step s runs forward_backward with dropout step (s << micro_batch_bits) + i.
inline constexpr unsigned micro_batch_bits = 16;

/// `model` has forward_backward(TokenBatch, grad_scale, step) -> CrossEntropySums,
/// zero_grad() and trainable_parameters(); `optimizer` has step(lr).
template <class Model, class Optimizer>
TrainStepResult train_step(Model& model, Optimizer& optimizer, std::span<const MicroBatch> window, double lr,
                           std::uint64_t step, const TrainStepOptions& options = {}) {
  check(!window.empty(), "InvalidArgument", "train_step {}: an empty accumulation window", step);
  // Bounds that keep every dropout stream (LayerContext::lora_key: micro step x layers x 16 sites, for up
  // to 1024 layers) below 2^63, apart from the LoRA-init streams.
  check(window.size() < (std::size_t{1} << micro_batch_bits) && step < (std::uint64_t{1} << 32), "InvalidArgument",
        "train_step {}: {} micro-batches; at most 2^{} per window and 2^32 steps", step, window.size(),
        micro_batch_bits);
  TrainStepResult result;
  for (const MicroBatch& micro : window) {
    result.supervised_tokens += supervised_targets(micro.batch);
    result.input_tokens += micro.batch.tokens();
  }
  model.zero_grad();
  if (result.supervised_tokens == 0) {  // nothing to learn from: a zero gradient, no step (no Adam state drift)
    result.loss = std::nan("");          // 0/0: no loss was measured (a logged 0 would read as a perfect step)
    result.skipped = true;
    return result;
  }
  const float grad_scale = 1.0f / static_cast<float>(result.supervised_tokens);
  double loss_sum = 0;
  for (std::size_t i = 0; i < window.size(); ++i) {
    // The micro-batch's dropout key: unique however window sizes vary (an epoch's last window may be short).
    const std::uint64_t micro_step = (step << micro_batch_bits) + i;
    const CrossEntropySums sums = model.forward_backward(window[i].batch, grad_scale, micro_step);
    loss_sum += sums.loss_sum;
    if (!std::isfinite(sums.loss_sum)) {
      check(options.on_non_finite == NonFinitePolicy::skip_step, "NonFiniteLoss",
            "step {}: the loss of {} is {}", step, window[i].name, sums.loss_sum);
      model.zero_grad();
      result.loss = loss_sum;
      result.skipped = true;
      return result;
    }
  }
  result.loss = loss_sum / static_cast<double>(result.supervised_tokens);
  std::vector<TensorView> grads;
  for (const TrainableParameter& parameter : model.trainable_parameters()) grads.push_back(parameter.grad);
  result.grad_norm = global_grad_norm(grads);
  if (!std::isfinite(result.grad_norm)) {
    check(options.on_non_finite == NonFinitePolicy::skip_step, "NonFiniteLoss",
          "step {}: the gradient norm is {} (loss {}) after {}", step, result.grad_norm, result.loss,
          window.back().name);
    model.zero_grad();
    result.skipped = true;
    return result;
  }
  (void)clip_grad_norm(grads, options.max_grad_norm);
  optimizer.step(lr);
  return result;
}

}  // namespace qlora
