// sample_next and the distribution it draws from, against transformers'
// logits processors (tests/reference/generation.py):
//   - warp<k>: hand-made logits with ties at the top-k boundary, zero and
//     negative scores for the penalty, through RepetitionPenalty, Temperature,
//     TopK and TopP in generate's order; probs = softmax of the result;
//   - sample<j>: every step of a real generate(do_sample=True) run — its raw
//     logits, the tokens before it, and softmax(output_scores), the scores
//     generate itself processed.
// torch's draws cannot be reproduced (its RNG), so the distribution is what is
// compared; our own draws are checked for determinism and frequencies.
//
// Tolerance: the processed scores are the same fp32 operations (the penalty's
// product or quotient, the division by T) on the same inputs, so the kept set
// is identical (checked exactly; the script keeps every top-p cumulative sum
// 1e-4 away from its threshold); the probabilities differ only in the softmax's
// summation (torch fp32, ours double): ~1e-7, so 1e-6 absolute.
#include <qlora/models/sampling.hpp>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "models/generation_fixture.hpp"
#include "support/errors.hpp"

using namespace qlora;

namespace {

constexpr double probability_tolerance = 1e-6;

/// The options of the script's SAMPLING or WARPS entry (metadata key `list`, entry `index`).
SamplingOptions options_of(std::string_view list, std::size_t index) {
  const auto meta = nlohmann::json::parse(*test::generation_reference().metadata_value(std::string(list)));
  const auto& entry = meta.at(index);
  return {.temperature = entry["temperature"].get<float>(), .top_k = entry["top_k"].get<int>(),
          .top_p = entry["top_p"].get<double>(), .repetition_penalty = entry["repetition_penalty"].get<float>(),
          .seed = 0};
}

void check_distribution(std::span<const float> logits, const SamplingOptions& options,
                        std::span<const std::int32_t> history, std::span<const float> expected) {
  const std::vector<double> actual = sampling_distribution(logits, options, history);
  REQUIRE(actual.size() == expected.size());
  for (std::size_t i = 0; i < actual.size(); ++i) {
    INFO("token " << i << ": " << actual[i] << " vs transformers' " << expected[i]);
    CHECK((actual[i] == 0) == (expected[i] == 0));  // the same tokens removed
    CHECK(std::abs(actual[i] - expected[i]) < probability_tolerance);
  }
}

}  // namespace

TEST_CASE("The warped distribution is transformers' (hand-made logits with ties)", "[models][sampling]") {
  for (std::size_t k = 0; k < 4; ++k) {
    INFO("warp" << k);
    const std::vector<float> logits = test::reference_floats(fmt::format("warp{}.logits", k));
    const std::vector<std::int32_t> history = test::reference_ids(fmt::format("warp{}.history", k));
    const std::vector<float> probs = test::reference_floats(fmt::format("warp{}.probs", k));
    check_distribution(logits, options_of("warps", k), history, probs);
  }
}

TEST_CASE("Every step of transformers' sampling generate has the same distribution", "[models][sampling]") {
  for (std::size_t j = 0; j < 3; ++j) {
    INFO("sample" << j);
    const SamplingOptions options = options_of("sampling", j);
    std::vector<std::int32_t> history = test::reference_ids(fmt::format("sample{}.prompt", j));
    const std::vector<std::int32_t> tokens = test::reference_ids(fmt::format("sample{}.tokens", j));
    const std::vector<float> logits = test::reference_floats(fmt::format("sample{}.logits", j));
    const std::vector<float> probs = test::reference_floats(fmt::format("sample{}.probs", j));
    const std::size_t vocab = logits.size() / tokens.size();
    for (std::size_t step = 0; step < tokens.size(); ++step) {
      INFO("step " << step);
      check_distribution(std::span(logits).subspan(step * vocab, vocab), options, history,
                         std::span(probs).subspan(step * vocab, vocab));
      history.push_back(tokens[step]);
    }
  }
}

TEST_CASE("Greedy is the argmax after the repetition penalty, lowest id on ties", "[models][sampling]") {
  const std::vector<float> logits{1.0f, 3.0f, -1.0f, 3.0f, 2.9f};
  CHECK(sample_next(logits, {}, 0, {}) == 1);  // torch.argmax: the first of the tied maxima
  // Penalty 2 on tokens 1 and 3 (3 → 1.5); token 4 (2.9) now leads. A negative score is multiplied.
  const std::vector<std::int32_t> history{1, 3, 3, 2};
  const SamplingOptions penalised{.repetition_penalty = 2.0f};
  CHECK(sample_next(logits, penalised, 0, history) == 4);
  const std::vector<float> scores = processed_scores(logits, penalised, history);
  CHECK(scores == std::vector<float>{1.0f, 1.5f, -2.0f, 1.5f, 2.9f});
  // Greedy ignores the sampling warpers, as generate(do_sample=False) does.
  CHECK(processed_scores(logits, {.temperature = 0, .top_k = 1, .top_p = 0.1}, {}) == logits);
}

TEST_CASE("Draws are reproducible, follow the distribution and never pick a removed token", "[models][sampling]") {
  const std::vector<float> logits = test::reference_floats("warp2.logits");
  const std::vector<std::int32_t> history = test::reference_ids("warp2.history");
  const SamplingOptions options = options_of("warps", 2);
  const std::vector<double> distribution = sampling_distribution(logits, options, history);

  SamplingOptions other_seed = options;
  other_seed.seed = 1;
  int differ = 0;
  for (std::uint64_t draw = 0; draw < 64; ++draw) {
    CHECK(sample_next(logits, options, draw, history) == sample_next(logits, options, draw, history));
    differ += sample_next(logits, options, draw, history) != sample_next(logits, other_seed, draw, history);
  }
  CHECK(differ > 0);

  constexpr int draws = 40000;
  std::vector<int> counts(logits.size(), 0);
  for (std::uint64_t draw = 0; draw < draws; ++draw) ++counts[static_cast<std::size_t>(sample_next(logits, options, draw, history))];
  for (std::size_t i = 0; i < counts.size(); ++i) {
    INFO("token " << i << " drawn " << counts[i] << " times, p = " << distribution[i]);
    if (distribution[i] == 0) {
      CHECK(counts[i] == 0);
    } else {
      // Binomial: 5 standard deviations (a false alarm about once in 3 million tokens).
      const double mean = draws * distribution[i];
      CHECK(std::abs(counts[i] - mean) <= 5 * std::sqrt(mean * (1 - distribution[i])) + 1);
    }
  }
}

TEST_CASE("Bad sampling options and logits are refused by name", "[models][sampling][errors]") {
  const std::vector<float> logits{0.5f, 1.5f, -0.5f};
  const auto refused = [&](SamplingOptions options, std::string_view part) {
    test::require_error([&] { (void)sample_next(logits, options, 0, {}); }, "InvalidSamplingOptions", part);
  };
  refused({.temperature = -1}, "temperature = -1");
  refused({.temperature = std::numeric_limits<float>::quiet_NaN()}, "temperature");
  refused({.temperature = 1, .top_k = -2}, "top_k = -2");
  refused({.temperature = 1, .top_p = 1.5}, "top_p = 1.5");
  refused({.repetition_penalty = 0}, "repetition_penalty = 0");
  const std::vector<float> with_nan{0.5f, std::numeric_limits<float>::quiet_NaN()};
  test::require_error([&] { (void)sample_next(with_nan, {}, 0, {}); }, "InvalidLogits", "logits[1]");
  const std::vector<std::int32_t> outside{0, 3};
  test::require_error([&] { (void)sample_next(logits, {}, 0, outside); }, "TokenOutOfRange", "history[1] = 3");
  test::require_error([&] { (void)sample_next({}, {}, 0, {}); }, "InvalidArgument", "empty");
}
