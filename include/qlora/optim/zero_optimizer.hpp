// ZeroOptimizer: ZeRO-sharded data-parallel optimization (Rajbhandari et al.,
// "ZeRO", SC'20) over a Communicator, for the trainable parameters (LoRA
// adapters and modules_to_save). Every rank holds every parameter; the
// optimizer state is split:
//
//   flat layout  the parameters, in registration order, as one index space
//                of P elements padded to N·S (S = ceil(P / N)); rank r owns
//                [r·S, (r+1)·S) ∩ [0, P): its shard, which may cut a
//                parameter anywhere (the updates are element-wise).
//   stage 1      (ZeroStage1) gradients are all-reduced in full; each rank
//                keeps Adam's m and v of its shard only, updates its shard of
//                the parameters, and all-gathers the updated parameters.
//   stage 2      (ZeroStage2) gradients are reduce-scattered instead: a rank
//                receives only its shard of the summed gradient (half the
//                traffic of an all-reduce, and a reduced-gradient buffer of S
//                instead of P elements); the rest is as stage 1.
// Optimizer-state bytes per rank are 8·S (AdamW's two fp32 moments), 1/N of
// a single process's (checked by tests/optim/zero_optimizer_test.cpp).
//
// Maths: the update is AdamW's, element by element (detail::adamw_update), so
// with the same summed gradients the parameters are bit-identical to a single
// AdamW's. The gradient norm for clipping is Σ over ranks of each shard's
// Σ g² (in double), then torch's fp32 clip coefficient (clip_grad_norm).
// What differs from one process is only the order in which the transport
// sums the ranks' gradients (fp32).
//
// train_step (train/training_step.hpp) drives it: it sums the window's token
// counts and loss over the ranks, then calls reduce_gradients,
// gradient_norm, clip_gradients and step. All ranks must make the same calls
// with the same parameters registered in the same order.
//
// State files: save_state gathers the moments and rank 0 writes AdamW's state
// file (optim/detail/adamw_state_file.hpp) for the whole parameters, so a
// state saved by N ranks loads on any number of ranks, or into a plain AdamW;
// every rank learns whether the write succeeded. load_state reads that file
// on every rank (a shared file system) and keeps its shard.
//
// Stage 3 (sharding the frozen quantized base and modules_to_save weights,
// gathered per layer when used) is not here yet: it needs the model to fetch
// its weights per layer.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <qlora/core/error.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/core/tensor_view.hpp>
#include <qlora/dist/communicator.hpp>
#include <qlora/optim/adamw.hpp>
#include <qlora/optim/detail/adamw_state_file.hpp>
#include <qlora/optim/grad_clip.hpp>

namespace qlora {

/// ZeRO stage 1: optimizer states sharded; gradients all-reduced.
struct ZeroStage1 {
  static constexpr int number = 1;
  static constexpr bool reduce_scatter_gradients = false;
};

/// ZeRO stage 2: optimizer states and reduced gradients sharded; gradients reduce-scattered.
struct ZeroStage2 {
  static constexpr int number = 2;
  static constexpr bool reduce_scatter_gradients = true;
};

template <class Optimizer, class Stage, Communicator Comm>
class ZeroOptimizer {
  static_assert(std::is_same_v<Optimizer, AdamW>,
                "ZeroOptimizer shards element-wise optimizers with a known state layout; AdamW is the one so far");
  static_assert(std::is_same_v<Stage, ZeroStage1> || std::is_same_v<Stage, ZeroStage2>,
                "Stage is ZeroStage1 or ZeroStage2");

 public:
  using Options = AdamWOptions;

  /// `comm` must outlive the optimizer. Throws what AdamW's constructor throws for bad options.
  explicit ZeroOptimizer(Comm& comm, Options options = {}) : comm_(comm), options_(detail::checked(options)) {}

  /// Registers a trainable parameter and its gradient, as AdamW::add (same checks, same errors);
  /// every rank must register the same parameters in the same order, before the first step.
  void add(std::string name, const TensorView& param, const TensorView& grad, bool decay = true) {
    check(!laid_out_, "InvalidArgument",
          "ZeroOptimizer: parameter `{}` added after the shards were laid out; add every parameter first", name);
    check(!names_.contains(name), "DuplicateParameter", "ZeroOptimizer: parameter `{}` was added twice", name);
    detail::check_trainable_tensor("ZeroOptimizer", name, "parameter", param);
    detail::check_trainable_tensor("ZeroOptimizer", name, "gradient", grad);
    check(param.shape() == grad.shape(), "ShapeMismatch", "ZeroOptimizer: parameter `{}` is {} but its gradient is {}",
          name, param.shape().to_string(), grad.shape().to_string());
    names_.insert(name);
    parameters_.push_back({std::move(name), param, grad, decay, total_});
    total_ += param.numel();
  }

  [[nodiscard]] Comm& communicator() noexcept { return comm_; }
  [[nodiscard]] const Options& options() const noexcept { return options_; }
  [[nodiscard]] std::int64_t steps() const noexcept { return steps_; }
  /// Elements of every registered parameter together (P).
  [[nodiscard]] std::int64_t total_elements() const noexcept { return total_; }
  /// This rank's share of the flat layout: [first, first + count).
  [[nodiscard]] std::int64_t shard_first() { return layout().first; }
  [[nodiscard]] std::int64_t shard_elements() { return layout().count; }
  /// Bytes of optimizer state on this rank: two fp32 moments per element of its shard.
  [[nodiscard]] std::size_t state_bytes() { return 2 * sizeof(float) * static_cast<std::size_t>(layout().count); }

  /// Sums every rank's gradients: all of them (stage 1) or this rank's shard (stage 2).
  void reduce_gradients() {
    gather_into_flat(flat_gradients_, [](const Parameter& p) { return p.grad; });
    if constexpr (Stage::reduce_scatter_gradients) {
      comm_.reduce_scatter(std::span<const float>(flat_gradients_), std::span<float>(shard_gradients_),
                           ReduceOp::sum);
    } else {
      comm_.all_reduce(std::span<float>(flat_gradients_), ReduceOp::sum);
    }
  }

  /// ‖summed gradient‖₂ over every parameter (after reduce_gradients), the same on every rank.
  double gradient_norm() {
    const std::span<const float> mine = owned_gradients();
    double squares[] = {detail::sum_of_squares(mine.data(), static_cast<std::int64_t>(mine.size()))};
    comm_.all_reduce(std::span<double>(squares), ReduceOp::sum);
    return std::sqrt(squares[0]);
  }

  /// Scales this rank's shard of the summed gradient as clip_grad_norm would scale the whole,
  /// given its norm (gradient_norm()); max_norm ≤ 0 clips nothing.
  void clip_gradients(double max_norm, double norm) {
    check(!std::isnan(max_norm), "InvalidArgument", "ZeroOptimizer::clip_gradients: max_norm is NaN");
    const float coefficient = detail::clip_coefficient(norm, max_norm);
    if (coefficient == 1.0f) return;
    for (float& g : owned_gradients()) g *= coefficient;
  }

  /// One AdamW step on this rank's shard at learning rate `lr`, then every rank's updated
  /// shard to every rank. Throws Error("InvalidArgument") for a negative or non-finite lr.
  void step(double lr) {
    check(std::isfinite(lr) && lr >= 0, "InvalidArgument", "ZeroOptimizer: learning rate {} is not a finite value ≥ 0",
          lr);
    const Layout& shard = layout();
    const detail::AdamWCoefficients coefficients(options_, steps_ + 1, lr);
    const std::span<float> gradients = owned_gradients();
    parallel_for(
        static_cast<std::int64_t>(chunks_.size()), 4,
        [&](std::int64_t begin, std::int64_t end) {
          for (auto c = static_cast<std::size_t>(begin); c < static_cast<std::size_t>(end); ++c) {
            const Chunk& chunk = chunks_[c];
            const Parameter& p = parameters_[chunk.parameter];
            const std::int64_t at = chunk.flat_begin - shard.first;  // index into the shard
            detail::adamw_update_for(p.decay, options_)(
                p.param.template data<float>() + (chunk.flat_begin - p.offset), gradients.data() + at,
                exp_avg_.data() + at, exp_avg_sq_.data() + at, chunk.size, coefficients);
          }
        },
        options_.threads);
    ++steps_;
    // Every rank's updated shard to every rank: own shard into place, all-gather in place, copy out.
    gather_into_flat(flat_parameters_, [](const Parameter& p) { return p.param; });
    all_gather_blocks(flat_parameters_);
    for (const Parameter& p : parameters_) {
      std::copy_n(flat_parameters_.begin() + p.offset, p.param.numel(), p.param.template data<float>());
    }
  }

  /// Writes the whole optimizer's state (every rank's moments) as AdamW's state file, from
  /// rank 0, atomically. Collective: every rank calls it, and every rank throws if the write
  /// failed (Error("CheckpointWriteFailed") on the others, the cause on rank 0).
  void save_state(const std::filesystem::path& file) {
    std::vector<float> exp_avg = gathered(exp_avg_), exp_avg_sq = gathered(exp_avg_sq_);
    std::uint64_t written[] = {1};
    std::string failure;
    if (comm_.rank() == 0) {
      try {
        std::vector<detail::AdamWStateEntry> entries;
        for (const Parameter& p : parameters_) {
          const auto at = static_cast<std::size_t>(p.offset), n = static_cast<std::size_t>(p.param.numel());
          entries.push_back({p.name, p.param.shape(), p.decay, std::span<const float>(exp_avg).subspan(at, n),
                             std::span<const float>(exp_avg_sq).subspan(at, n)});
        }
        detail::write_adamw_state(file, options_, steps_, entries);
      } catch (const Error&) {
        written[0] = 0;
        comm_.broadcast(std::span<std::uint64_t>(written), 0);
        throw;
      }
    }
    comm_.broadcast(std::span<std::uint64_t>(written), 0);
    check(written[0] == 1, "CheckpointWriteFailed", "ZeroOptimizer rank {}: rank 0 could not write {}", comm_.rank(),
          file.string());
  }

  /// Reads a state file written by save_state (any number of ranks) or AdamW::save_state and
  /// keeps this rank's shard. Checks as AdamW::load_state does (OptimizerStateMismatch); on any
  /// error nothing changes. Every rank reads the file itself.
  void load_state(const std::filesystem::path& file) {
    const Layout& shard = layout();
    std::vector<detail::AdamWStateEntry> entries;
    for (const Parameter& p : parameters_) entries.push_back({p.name, p.param.shape(), p.decay, {}, {}});
    const detail::AdamWStateFile saved(file, options_, entries);
    std::vector<float> exp_avg(static_cast<std::size_t>(total_)), exp_avg_sq(static_cast<std::size_t>(total_));
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      const auto at = static_cast<std::size_t>(parameters_[i].offset);
      const auto n = static_cast<std::size_t>(parameters_[i].param.numel());
      saved.read_exp_avg(i, std::span<float>(exp_avg).subspan(at, n));
      saved.read_exp_avg_sq(i, std::span<float>(exp_avg_sq).subspan(at, n));
    }
    const auto first = exp_avg.begin() + shard.first;
    std::copy_n(first, shard.count, exp_avg_.begin());
    std::copy_n(exp_avg_sq.begin() + shard.first, shard.count, exp_avg_sq_.begin());
    steps_ = saved.steps();
  }

 private:
  struct Parameter {
    std::string name;
    TensorView param;
    TensorView grad;
    bool decay;
    std::int64_t offset;  ///< first element in the flat layout
  };
  /// A piece of the shard inside one parameter: the unit of work handed to a thread.
  struct Chunk {
    std::size_t parameter;
    std::int64_t flat_begin;
    std::int64_t size;
  };
  struct Layout {
    std::int64_t first = 0;  ///< the shard's first flat element
    std::int64_t count = 0;  ///< its elements (≤ S; fewer on the last ranks when P is not a multiple of N)
  };

  static constexpr std::int64_t chunk_elements = std::int64_t{1} << 14;

  /// The shards, laid out on first use (after every add).
  const Layout& layout() {
    if (laid_out_) return layout_;
    const auto ranks = static_cast<std::int64_t>(comm_.size());
    shard_size_ = std::max<std::int64_t>(1, (total_ + ranks - 1) / ranks);
    const std::int64_t padded = shard_size_ * ranks;
    layout_.first = std::min(total_, comm_.rank() * shard_size_);
    layout_.count = std::min(total_, layout_.first + shard_size_) - layout_.first;
    flat_gradients_.assign(static_cast<std::size_t>(padded), 0.0f);
    flat_parameters_.assign(static_cast<std::size_t>(padded), 0.0f);
    if constexpr (Stage::reduce_scatter_gradients) shard_gradients_.assign(static_cast<std::size_t>(shard_size_), 0.0f);
    exp_avg_.assign(static_cast<std::size_t>(layout_.count), 0.0f);
    exp_avg_sq_.assign(static_cast<std::size_t>(layout_.count), 0.0f);
    const std::int64_t shard_end = layout_.first + layout_.count;
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      const Parameter& p = parameters_[i];
      const std::int64_t begin = std::max(p.offset, layout_.first);
      const std::int64_t end = std::min(p.offset + p.param.numel(), shard_end);
      for (std::int64_t at = begin; at < end; at += chunk_elements) {
        chunks_.push_back({i, at, std::min(chunk_elements, end - at)});
      }
    }
    laid_out_ = true;
    return layout_;
  }

  /// This rank's shard of the summed gradient (after reduce_gradients).
  std::span<float> owned_gradients() {
    const Layout& shard = layout();
    if constexpr (Stage::reduce_scatter_gradients) {
      return std::span<float>(shard_gradients_).first(static_cast<std::size_t>(shard.count));
    } else {
      return std::span<float>(flat_gradients_)
          .subspan(static_cast<std::size_t>(shard.first), static_cast<std::size_t>(shard.count));
    }
  }

  /// Copies every parameter's tensor `of(p)` into `flat` at its offset (the padding stays 0).
  template <class Of>
  void gather_into_flat(std::vector<float>& flat, Of of) {
    (void)layout();
    for (const Parameter& p : parameters_) {
      const TensorView source = of(p);
      std::copy_n(source.template data<const float>(), source.numel(), flat.begin() + p.offset);
    }
  }

  /// Every rank's block r·S.. of `flat` (N·S elements) to every rank, in place.
  void all_gather_blocks(std::vector<float>& flat) {
    const std::span<float> all(flat);
    const auto block = static_cast<std::size_t>(shard_size_);
    comm_.all_gather(std::span<const float>(all.subspan(static_cast<std::size_t>(comm_.rank()) * block, block)), all);
  }

  /// Every rank's shard of a per-shard state vector, as one flat vector of P elements.
  std::vector<float> gathered(const std::vector<float>& state) {
    (void)layout();
    std::vector<float> all(static_cast<std::size_t>(shard_size_ * comm_.size()), 0.0f);
    std::copy(state.begin(), state.end(), all.begin() + comm_.rank() * shard_size_);
    all_gather_blocks(all);
    all.resize(static_cast<std::size_t>(total_));
    return all;
  }

  Comm& comm_;
  Options options_;
  std::vector<Parameter> parameters_;
  std::set<std::string, std::less<>> names_;
  std::int64_t total_ = 0;
  bool laid_out_ = false;
  Layout layout_;
  std::int64_t shard_size_ = 0;  ///< S
  std::vector<Chunk> chunks_;
  std::vector<float> flat_gradients_;   ///< N·S: gradients in, summed gradients out (stage 1)
  std::vector<float> shard_gradients_;  ///< S: this rank's summed gradients (stage 2)
  std::vector<float> flat_parameters_;  ///< N·S: the all-gather of the updated parameters
  std::vector<float> exp_avg_, exp_avg_sq_;  ///< this rank's shard of m and v
  std::int64_t steps_ = 0;
};

}  // namespace qlora
