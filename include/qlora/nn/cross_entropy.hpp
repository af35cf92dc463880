// The causal-LM loss through the output head, fused and chunked: the sum of
// −log softmax(hidden·Wᵀ + b)[target] over the supervised tokens, and its
// gradients, without ever holding fp32 logits for the whole batch (Phi-2:
// 51200 x 1024 tokens x 4 B = 210 MB, and as much again for their gradient).
//
// Maths (transformers' ForCausalLMLoss / F.cross_entropy with
// ignore_index = -100, reduction "sum"):
//   z = h·Wᵀ + b,  loss_t = logsumexp(z) − z[target_t]
//   ∂loss_t/∂z = softmax(z) − onehot(target_t)
//   dhidden = s·G·W,  dweight += s·Gᵀ·h,  dbias += s·Σ_t G_t      (s = grad_scale)
//
// How:
//   * only supervised tokens (target ≠ −100) are computed: they are gathered
//     chunk_tokens at a time, so masked prompts and padding cost nothing but a
//     zero row of dhidden;
//   * a chunk's logits are computed in fp32 (Eigen GEMM), one vocabulary
//     block (lm_head.hpp) per work item; each block keeps its row maxima and
//     its sums of exp(z − max) in double; the blocks' statistics are then
//     combined per row (log-softmax with max subtraction: no overflow
//     whatever the logits' size) and the loss summed in double;
//   * the same buffer then becomes s·G, from which dweight and dbias (per
//     vocabulary block: disjoint rows) and dhidden (per block of hidden
//     columns) follow.
// Every work item is a fixed block, not a share of the thread count, so the
// result is bit-identical for any number of threads. The chunk size changes
// only the grouping of fp32 sums (which tokens are summed into dweight
// together), i.e. results agree up to fp32 reordering.
//
// Memory: one chunk_tokens x (V + H) float workspace (plus per-block row
// statistics), shared by all threads, which split the vocabulary and not the
// tokens: 27 MB for Phi-2 at the default 128 tokens.
#pragma once

#include <qlora/core/detail/eigen_matrix.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/tensor_view.hpp>
#include <qlora/nn/lm_head.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace qlora {

/// The target of a position that takes no part in the loss: PyTorch's
/// ignore_index default, which transformers uses (the data layer's
/// qlora::ignore_index; nn/ depends on core/ only).
inline constexpr std::int32_t ignored_target = -100;

/// transformers' label shift inside the model, for a batch of rows of
/// `row_length` tokens each (labels.size() a multiple of it): target[t] =
/// labels[t + 1] within a row and ignored_target at each row's last position.
/// A packed row is one row: the shift crosses the boundary between packed
/// samples exactly as transformers' does (the first token of the next sample
/// is the target of the last token of the previous one, unless labelled -100).
inline std::vector<std::int32_t> shifted_targets(std::span<const std::int32_t> labels, std::int64_t row_length) {
  check(row_length > 0, "InvalidArgument", "shifted_targets: row_length is {}, expected > 0", row_length);
  const auto count = static_cast<std::int64_t>(labels.size());
  check(count % row_length == 0, "ShapeMismatch",
        "shifted_targets: {} labels are not a whole number of rows of {} tokens", count, row_length);
  std::vector<std::int32_t> targets(labels.size());
  for (std::int64_t t = 0; t < count; ++t) {
    const bool last_in_row = (t + 1) % row_length == 0;
    targets[static_cast<std::size_t>(t)] = last_in_row ? ignored_target : labels[static_cast<std::size_t>(t + 1)];
  }
  return targets;
}

/// What the trainer needs to form the mean: Σ −log p(target) over the
/// supervised tokens, and their number.
struct CrossEntropySums {
  double loss_sum = 0;
  std::int64_t count = 0;
};

struct LmHeadLossOptions {
  /// Supervised tokens whose logits are held at once (see the header comment for memory).
  std::int64_t chunk_tokens = 128;
  /// The gradients are grad_scale · ∂(loss_sum)/∂(·): 1/num_items_in_batch
  /// (transformers ≥ 4.46) or 1/count (a per-micro-batch mean).
  float grad_scale = 1.0f;
  unsigned threads = default_thread_count();
};

namespace detail {

/// Hidden columns per work item of dhidden = G·W: 40 items for Phi-2's 2560.
inline constexpr std::int64_t lm_head_width_block = 64;

/// Calls body(b) for b in [0, count) over up to `threads` threads.
template <class Body>
void for_each_block(std::int64_t count, unsigned threads, Body&& body) {
  parallel_for(
      count, 1,
      [&](std::int64_t b0, std::int64_t b1) {
        for (std::int64_t b = b0; b < b1; ++b) body(b);
      },
      threads);
}

/// lm_head_cross_entropy's work on one chunk of supervised tokens at a time:
/// forward() leaves exp(z − block max) and the rows' statistics in the
/// buffers, backward() turns them into s·G and the gradients. The buffers
/// are sized once, for `capacity` rows, and reused.
class ChunkedCrossEntropy {
 public:
  ChunkedCrossEntropy(const float* weight, const float* bias, LmHeadShape shape, std::int64_t capacity, float scale,
                      unsigned threads)
      : weight_(weight),
        bias_(bias),
        width_(shape.width),
        vocab_(shape.vocab),
        blocks_(vocab_block_count(shape.vocab)),
        scale_(scale),
        threads_(threads),
        hidden_(static_cast<std::size_t>(capacity * width_)),
        scores_(static_cast<std::size_t>(capacity * vocab_)),
        block_max_(static_cast<std::size_t>(capacity * blocks_)),
        block_sum_(block_max_.size()),
        target_logit_(static_cast<std::size_t>(capacity)),
        row_max_(target_logit_.size()),
        row_sum_(target_logit_.size()) {}

  /// Σ −log p(target) over the rows `positions` of hidden [T, H] (their
  /// targets in `targets`), summed in double in row order.
  double forward(const float* hidden, std::span<const std::int64_t> positions, std::span<const std::int32_t> targets) {
    positions_ = positions;
    targets_.resize(positions.size());
    for (std::size_t row = 0; row < positions.size(); ++row) {
      std::copy_n(hidden + positions[row] * width_, width_, hidden_.data() + static_cast<std::int64_t>(row) * width_);
      targets_[row] = targets[static_cast<std::size_t>(positions[row])];
    }
    // Logits per vocabulary block, turned into exp(z − block max) in place.
    for_each_block(blocks_, threads_, [&](std::int64_t b) {
      const std::int64_t v0 = block_begin(b), v1 = block_end(b);
      lm_head_logits_block(hidden_.data(), rows(), width_, weight_, bias_, v0, v1, scores_.data(), vocab_);
      for (std::int64_t row = 0; row < rows(); ++row) {
        auto z = matrix(scores_.data() + row * vocab_ + v0, 1, v1 - v0, vocab_).array();
        const std::int32_t target = target_of(row);
        if (target >= v0 && target < v1) target_logit_[row] = z(0, target - v0);
        const float max = z.maxCoeff();
        z = (z - max).exp();
        block_max_[row * blocks_ + b] = max;
        block_sum_[row * blocks_ + b] = z.cast<double>().sum();
      }
    });
    // Combine the blocks (in block order) into log-sum-exp per row.
    double loss_sum = 0;
    for (std::int64_t row = 0; row < rows(); ++row) {
      const float* maxima = block_max_.data() + row * blocks_;
      const double* sums = block_sum_.data() + row * blocks_;
      const float max = *std::max_element(maxima, maxima + blocks_);
      double sum = 0;
      for (std::int64_t b = 0; b < blocks_; ++b) sum += sums[b] * std::exp(double(maxima[b]) - double(max));
      row_max_[row] = max;
      row_sum_[row] = sum;
      loss_sum += double(max) + std::log(sum) - double(target_logit_[row]);
    }
    return loss_sum;
  }

  /// After forward(): s·G = s·(softmax − onehot), then dweight += s·Gᵀ·h and
  /// dbias += s·Σ G per vocabulary block (disjoint rows), and the chunk's rows
  /// of dhidden = s·G·W per block of hidden columns. Null outputs are skipped.
  void backward(float* dhidden, float* dweight, float* dbias) {
    auto gradient = matrix(scores_.data(), rows(), vocab_, vocab_);
    const auto chunk_hidden = matrix(hidden_.data(), rows(), width_, width_);
    for_each_block(blocks_, threads_, [&](std::int64_t b) {
      const std::int64_t v0 = block_begin(b), v1 = block_end(b);
      for (std::int64_t row = 0; row < rows(); ++row) {
        const double to_probability =
            std::exp(double(block_max_[row * blocks_ + b]) - double(row_max_[row])) / row_sum_[row];
        gradient.row(row).segment(v0, v1 - v0) *= static_cast<float>(scale_ * to_probability);
        const std::int32_t target = target_of(row);
        if (target >= v0 && target < v1) gradient(row, target) -= scale_;
      }
      const auto block = gradient.middleCols(v0, v1 - v0);
      if (dweight != nullptr) {
        matrix(dweight + v0 * width_, v1 - v0, width_, width_).noalias() += block.transpose() * chunk_hidden;
      }
      if (dbias != nullptr) matrix(dbias + v0, 1, v1 - v0, vocab_) += block.colwise().sum();
    });
    if (dhidden == nullptr) return;
    // The gathered hidden states are no longer needed: their buffer receives s·G·W.
    const std::int64_t width_blocks = (width_ + lm_head_width_block - 1) / lm_head_width_block;
    for_each_block(width_blocks, threads_, [&](std::int64_t b) {
      const std::int64_t c0 = b * lm_head_width_block, c1 = std::min(width_, c0 + lm_head_width_block);
      matrix(hidden_.data() + c0, rows(), c1 - c0, width_).noalias() =
          gradient * matrix(weight_ + c0, vocab_, c1 - c0, width_);
    });
    for (std::int64_t row = 0; row < rows(); ++row) {
      std::copy_n(hidden_.data() + row * width_, width_, dhidden + positions_[static_cast<std::size_t>(row)] * width_);
    }
  }

 private:
  [[nodiscard]] std::int64_t rows() const { return static_cast<std::int64_t>(targets_.size()); }
  [[nodiscard]] std::int32_t target_of(std::int64_t row) const { return targets_[static_cast<std::size_t>(row)]; }
  [[nodiscard]] std::int64_t block_begin(std::int64_t b) const { return b * lm_head_vocab_block; }
  [[nodiscard]] std::int64_t block_end(std::int64_t b) const { return std::min(vocab_, block_begin(b) + lm_head_vocab_block); }

  const float* weight_;
  const float* bias_;  ///< null: no bias
  std::int64_t width_, vocab_, blocks_;
  float scale_;
  unsigned threads_;
  std::span<const std::int64_t> positions_;  ///< the chunk's rows of hidden / dhidden
  std::vector<std::int32_t> targets_;        ///< their targets
  std::vector<float> hidden_;                ///< [rows, H]: the gathered hidden states, later s·G·W
  std::vector<float> scores_;                ///< [rows, V]: exp(z − block max), later s·G
  std::vector<float> block_max_;             ///< [rows, blocks]: max of z over each vocabulary block
  std::vector<double> block_sum_;            ///< [rows, blocks]: Σ exp(z − block max) over the block
  std::vector<float> target_logit_;          ///< [rows]: z[target]
  std::vector<float> row_max_;               ///< [rows]: max of z over the vocabulary
  std::vector<double> row_sum_;              ///< [rows]: Σ exp(z − row max)
};

}  // namespace detail

/// The summed cross-entropy of the head's predictions against `targets` [T]
/// (already shifted: shifted_targets; ignored_target = not supervised) and,
/// when wanted, its gradients scaled by options.grad_scale:
///   dhidden [T, H] is written (zero rows for ignored targets), empty = forward only;
///   dweight [V, H] and dbias [V] are accumulated (+=), empty = frozen.
/// hidden [T, H], weight [V, H], bias [V] (or empty: no bias), all F32 contiguous.
inline CrossEntropySums lm_head_cross_entropy(const TensorView& hidden, const TensorView& weight,
                                              const TensorView& bias, std::span<const std::int32_t> targets,
                                              const LmHeadLossOptions& options, const TensorView& dhidden,
                                              const TensorView& dweight, const TensorView& dbias) {
  constexpr std::string_view function = "lm_head_cross_entropy";
  const auto shape = detail::lm_head_arguments(function, hidden, weight, bias);
  const auto wanted = [](const TensorView& view) { return view.raw_data() != nullptr; };
  check(static_cast<std::int64_t>(targets.size()) == shape.tokens, "ShapeMismatch",
        "{}: {} targets for {} hidden rows", function, targets.size(), shape.tokens);
  check(options.chunk_tokens > 0, "InvalidArgument", "{}: chunk_tokens is {}, expected > 0", function,
        options.chunk_tokens);
  if (wanted(dhidden)) detail::check_f32_argument(function, "dhidden", dhidden, Shape{shape.tokens, shape.width});
  if (wanted(dweight)) detail::check_f32_argument(function, "dweight", dweight, Shape{shape.vocab, shape.width});
  if (wanted(dbias)) {
    check(wanted(bias), "ShapeMismatch", "{}: dbias given for a head without a bias", function);
    detail::check_f32_argument(function, "dbias", dbias, Shape{shape.vocab});
  }

  std::vector<std::int64_t> supervised;  // positions whose target counts, in order
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    const std::int32_t target = targets[static_cast<std::size_t>(t)];
    if (target == ignored_target) continue;
    check(target >= 0 && target < shape.vocab, "TokenOutOfRange",
          "{}: targets[{}] is {}, outside the vocabulary [0, {}) and not the ignore index {}", function, t, target,
          shape.vocab, ignored_target);
    supervised.push_back(t);
  }
  if (wanted(dhidden)) std::fill_n(dhidden.data<float>(), dhidden.numel(), 0.0f);
  CrossEntropySums sums{0.0, static_cast<std::int64_t>(supervised.size())};
  if (supervised.empty()) return sums;

  const auto data_or_null = [&](const TensorView& view) { return wanted(view) ? view.data<float>() : nullptr; };
  const bool backward = wanted(dhidden) || wanted(dweight) || wanted(dbias);
  detail::ChunkedCrossEntropy chunk(weight.data<const float>(), wanted(bias) ? bias.data<const float>() : nullptr,
                                    shape, std::min(options.chunk_tokens, sums.count), options.grad_scale,
                                    options.threads);
  for (std::int64_t first = 0; first < sums.count; first += options.chunk_tokens) {
    const auto positions = std::span<const std::int64_t>(supervised).subspan(
        static_cast<std::size_t>(first), static_cast<std::size_t>(std::min(options.chunk_tokens, sums.count - first)));
    sums.loss_sum += chunk.forward(hidden.data<const float>(), positions, targets);
    if (backward) chunk.backward(data_or_null(dhidden), data_or_null(dweight), data_or_null(dbias));
  }
  return sums;
}

}  // namespace qlora
