// Choosing the next token from a model's logits, as transformers' generate
// does: its logits processors in its order, then argmax or a draw.
//
//   1. repetition penalty (RepetitionPenaltyLogitsProcessor; greedy too): the
//      score s of every token that occurs in the history becomes s·penalty
//      when s < 0, else s / penalty (once per token, however often it occurs);
//   2. sampling only (temperature > 0): TemperatureLogitsWarper s / T,
//      TopKLogitsWarper (scores below the k-th largest removed: a tie with the
//      k-th is kept), TopPLogitsWarper (tokens sorted ascending by score,
//      stably; those whose cumulative softmax probability is <= 1 - top_p
//      removed, the best token always kept);
//   3. greedy: the argmax, lowest id on ties (torch.argmax); sampling: a draw
//      from the softmax of what is left.
// Removed tokens get -inf, as the warpers' filter_value. Each step is computed
// in fp32 as torch does (the penalty's product or quotient, the division by T,
// the top-p cumulative sums rounded to fp32 and compared with the fp32 of
// 1 - top_p, which Python evaluates in double: hence top_p is a double here).
//
// The draw is a pure function of (seed, draw index): the inverse CDF of the
// distribution at a 53-bit uniform from Philox (core/rng.hpp), so a run is
// reproducible on any machine; generate() uses the position of the token it
// draws as the index. torch's multinomial draws differ (its RNG is not
// reproduced); what matches transformers is the distribution.
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/core/rng.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <span>
#include <vector>

namespace qlora {

struct SamplingOptions {
  float temperature = 0;          ///< 0: greedy; > 0: sample from softmax(scores / temperature)
  int top_k = 0;                  ///< keep the top_k best scores (0: off); sampling only
  double top_p = 1;               ///< nucleus sampling threshold in [0, 1] (1: off); sampling only
  float repetition_penalty = 1;   ///< > 0; 1: off. Applies to greedy decoding too, as in transformers
  std::uint64_t seed = 0;         ///< the draws' Philox key

  [[nodiscard]] bool greedy() const noexcept { return temperature == 0; }

  /// Error("InvalidSamplingOptions") naming the option and its value.
  void validate() const {
    check(std::isfinite(temperature) && temperature >= 0, "InvalidSamplingOptions",
          "temperature = {}: expected a finite value >= 0 (0 = greedy)", temperature);
    check(top_k >= 0, "InvalidSamplingOptions", "top_k = {}: expected >= 0 (0 = off)", top_k);
    check(top_p >= 0 && top_p <= 1, "InvalidSamplingOptions", "top_p = {}: expected a value in [0, 1] (1 = off)", top_p);
    check(std::isfinite(repetition_penalty) && repetition_penalty > 0, "InvalidSamplingOptions",
          "repetition_penalty = {}: expected a finite value > 0 (1 = off)", repetition_penalty);
  }
};

namespace detail {

inline constexpr float removed_score = -std::numeric_limits<float>::infinity();

inline void check_logits(std::span<const float> logits, std::span<const std::int32_t> history) {
  check(!logits.empty(), "InvalidArgument", "sampling: the logits are empty");
  for (std::size_t i = 0; i < logits.size(); ++i) {
    check(std::isfinite(logits[i]), "InvalidLogits", "sampling: logits[{}] is {}", i, logits[i]);
  }
  for (std::size_t i = 0; i < history.size(); ++i) {
    check(history[i] >= 0 && static_cast<std::size_t>(history[i]) < logits.size(), "TokenOutOfRange",
          "sampling: history[{}] = {} is outside the vocabulary [0, {})", i, history[i], logits.size());
  }
}

inline void apply_repetition_penalty(std::vector<float>& scores, float penalty, std::span<const std::int32_t> history) {
  if (penalty == 1.0f) return;
  std::vector<bool> seen(scores.size(), false);
  for (const std::int32_t id : history) {
    const auto index = static_cast<std::size_t>(id);
    if (seen[index]) continue;
    seen[index] = true;
    scores[index] = scores[index] < 0 ? scores[index] * penalty : scores[index] / penalty;
  }
}

inline void apply_top_k(std::vector<float>& scores, int top_k) {
  if (top_k == 0 || static_cast<std::size_t>(top_k) >= scores.size()) return;
  std::vector<float> sorted = scores;
  std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(), std::greater<>());
  const float kth = sorted[static_cast<std::size_t>(top_k - 1)];
  for (float& score : scores) {
    if (score < kth) score = removed_score;
  }
}

inline void apply_top_p(std::vector<float>& scores, double top_p) {
  if (top_p == 1.0) return;
  std::vector<std::size_t> order(scores.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return scores[a] < scores[b]; });
  // torch: softmax in fp32, cumsum (accumulated in double on the CPU) rounded to fp32.
  const float largest = scores[order.back()];
  double total = 0;
  std::vector<float> exps(scores.size());
  for (std::size_t i = 0; i < scores.size(); ++i) {
    exps[i] = std::exp(scores[i] - largest);
    total += exps[i];
  }
  const auto threshold = static_cast<float>(1.0 - top_p);
  double cumulative = 0;
  for (std::size_t rank = 0; rank + 1 < order.size(); ++rank) {  // the best token is always kept
    const std::size_t id = order[rank];
    cumulative += static_cast<float>(exps[id] / total);
    if (static_cast<float>(cumulative) > threshold) break;
    scores[id] = removed_score;
  }
}

}  // namespace detail

/// The scores after transformers' processors for `options` (-inf where removed);
/// `history` is every token so far, prompt included.
[[nodiscard]] inline std::vector<float> processed_scores(std::span<const float> logits, const SamplingOptions& options,
                                                         std::span<const std::int32_t> history) {
  options.validate();
  detail::check_logits(logits, history);
  std::vector<float> scores(logits.begin(), logits.end());
  detail::apply_repetition_penalty(scores, options.repetition_penalty, history);
  if (options.greedy()) return scores;
  if (options.temperature != 1.0f) {
    for (float& score : scores) score /= options.temperature;
  }
  detail::apply_top_k(scores, options.top_k);
  detail::apply_top_p(scores, options.top_p);
  return scores;
}

/// The distribution a sampling step draws from: softmax of processed_scores (0 where removed).
[[nodiscard]] inline std::vector<double> sampling_distribution(std::span<const float> logits,
                                                               const SamplingOptions& options,
                                                               std::span<const std::int32_t> history) {
  const std::vector<float> scores = processed_scores(logits, options, history);
  const float largest = *std::max_element(scores.begin(), scores.end());
  std::vector<double> probabilities(scores.size());
  double total = 0;
  for (std::size_t i = 0; i < scores.size(); ++i) {
    probabilities[i] = std::exp(static_cast<double>(scores[i]) - largest);
    total += probabilities[i];
  }
  for (double& p : probabilities) p /= total;
  return probabilities;
}

/// The next token: the argmax (greedy) or draw number `draw` of the sampling distribution.
[[nodiscard]] inline std::int32_t sample_next(std::span<const float> logits, const SamplingOptions& options,
                                              std::uint64_t draw, std::span<const std::int32_t> history) {
  if (options.greedy()) {
    const std::vector<float> scores = processed_scores(logits, options, history);
    return static_cast<std::int32_t>(std::max_element(scores.begin(), scores.end()) - scores.begin());
  }
  const std::vector<double> probabilities = sampling_distribution(logits, options, history);
  const PhiloxCounter bits = philox_random(options.seed, draw, 0);
  // 53 random bits: 27 from one word, 26 from another.
  const double uniform = static_cast<double>((std::uint64_t{bits[0] >> 5} << 26) | (bits[1] >> 6)) * 0x1p-53;
  double cumulative = 0;
  std::size_t last_possible = 0;
  for (std::size_t i = 0; i < probabilities.size(); ++i) {
    if (probabilities[i] == 0) continue;
    last_possible = i;
    cumulative += probabilities[i];
    if (uniform < cumulative) return static_cast<std::int32_t>(i);
  }
  return static_cast<std::int32_t>(last_possible);  // the sum rounded below the uniform
}

}  // namespace qlora
