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
#include <qlora/dist/communicator.hpp>
#include <qlora/models/token_batch.hpp>
#include <qlora/models/trainable_parameter.hpp>
#include <qlora/nn/cross_entropy.hpp>
#include <qlora/optim/grad_clip.hpp>

#include <cmath>
#include <concepts>
#include <cstdint>
#include <optional>
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
  /// Its place in the step's whole window, which picks its dropout stream. Data parallel, a rank
  /// holds part of the window: micro-batch i of the step goes to rank i mod ranks, and must keep
  /// the stream it would have in one process. Unset: its index in `window`.
  std::optional<std::uint32_t> position = std::nullopt;
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

/// An optimizer that spans ranks (ZeroOptimizer): train_step sums the window's counts and loss
/// over them and lets the optimizer reduce, measure and clip the gradients.
template <class Optimizer>
concept DataParallelOptimizer = requires(Optimizer& optimizer, double value) {
  optimizer.communicator();
  optimizer.reduce_gradients();
  { optimizer.gradient_norm() } -> std::convertible_to<double>;
  optimizer.clip_gradients(value, value);
};

namespace detail {

/// Σ over the ranks of `values` (in place); nothing to do for a single-process optimizer.
template <class Optimizer>
void sum_over_ranks(Optimizer& optimizer, std::span<double> values) {
  if constexpr (DataParallelOptimizer<Optimizer>) optimizer.communicator().all_reduce(values, ReduceOp::sum);
}

}  // namespace detail

/// `model` has forward_backward(TokenBatch, grad_scale, step) -> CrossEntropySums,
/// zero_grad() and trainable_parameters(); `optimizer` has step(lr).
///
/// Data parallel (a DataParallelOptimizer): `window` is this rank's micro-batches; N_window,
/// the token counts and the loss are summed over the ranks, so the step equals one process
/// running every rank's window (design note: transformers' average_tokens_across_devices). The
/// ranks make the same collectives whatever happens: a non-finite loss on one rank is seen by all
/// (skipped or stopped everywhere alike).
template <class Model, class Optimizer>
TrainStepResult train_step(Model& model, Optimizer& optimizer, std::span<const MicroBatch> window, double lr,
                           std::uint64_t step, const TrainStepOptions& options = {}) {
  // Data parallel, a rank may hold none of a short window (an epoch's last one), and still joins in.
  check(!window.empty() || DataParallelOptimizer<Optimizer>, "InvalidArgument",
        "train_step {}: an empty accumulation window", step);
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
  double counts[] = {static_cast<double>(result.supervised_tokens), static_cast<double>(result.input_tokens)};
  detail::sum_over_ranks(optimizer, std::span<double>(counts));
  result.supervised_tokens = static_cast<std::int64_t>(counts[0]);
  result.input_tokens = static_cast<std::int64_t>(counts[1]);
  model.zero_grad();
  if (result.supervised_tokens == 0) {  // nothing to learn from: a zero gradient, no step (no Adam state drift)
    result.loss = std::nan("");          // 0/0: no loss was measured (a logged 0 would read as a perfect step)
    result.skipped = true;
    return result;
  }
  const float grad_scale = 1.0f / static_cast<float>(result.supervised_tokens);
  double loss_sum[] = {0.0};
  std::string non_finite_at = "another rank's micro-batch";
  for (std::size_t i = 0; i < window.size(); ++i) {
    // The micro-batch's dropout key: unique however window sizes vary (an epoch's last window may be short).
    const std::uint64_t micro_step = (step << micro_batch_bits) + window[i].position.value_or(static_cast<std::uint32_t>(i));
    const CrossEntropySums sums = model.forward_backward(window[i].batch, grad_scale, micro_step);
    loss_sum[0] += sums.loss_sum;
    if (!std::isfinite(sums.loss_sum)) {
      non_finite_at = window[i].name;
      break;
    }
  }
  detail::sum_over_ranks(optimizer, std::span<double>(loss_sum));
  if (!std::isfinite(loss_sum[0])) {
    check(options.on_non_finite == NonFinitePolicy::skip_step, "NonFiniteLoss", "step {}: the loss of {} is {}", step,
          non_finite_at, loss_sum[0]);
    model.zero_grad();
    result.loss = loss_sum[0];
    result.skipped = true;
    return result;
  }
  result.loss = loss_sum[0] / static_cast<double>(result.supervised_tokens);
  std::vector<TensorView> grads;
  for (const TrainableParameter& parameter : model.trainable_parameters()) grads.push_back(parameter.grad);
  if constexpr (DataParallelOptimizer<Optimizer>) {
    optimizer.reduce_gradients();
    result.grad_norm = optimizer.gradient_norm();
  } else {
    result.grad_norm = global_grad_norm(grads);
  }
  if (!std::isfinite(result.grad_norm)) {
    check(options.on_non_finite == NonFinitePolicy::skip_step, "NonFiniteLoss",
          "step {}: the gradient norm is {} (loss {}) after {}", step, result.grad_norm, result.loss,
          window.empty() ? std::string("the window") : window.back().name);
    model.zero_grad();
    result.skipped = true;
    return result;
  }
  if constexpr (DataParallelOptimizer<Optimizer>) {
    optimizer.clip_gradients(options.max_grad_norm, result.grad_norm);
  } else {
    (void)clip_grad_norm(grads, options.max_grad_norm);
  }
  optimizer.step(lr);
  return result;
}

}  // namespace qlora
