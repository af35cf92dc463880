// generate against transformers' generate (tests/reference/generation.py):
// greedy decoding of tiny Phi QLoRA + adapter with use_cache=True, two prompts
// plain and one with repetition_penalty 1.3, 12 new tokens, eos 199.
//
// Exact token equality is expected: our logits equal transformers' to ~1e-5 of
// the largest logit (kv_cache_test.cpp checks 1e-4), and the script chose
// prompts whose every step has a top-2 gap of at least 0.02 (recorded in the
// fixture's metadata, checked below), so no argmax can flip; any real error
// (a wrong position, a stale cache row, the penalty applied twice) changes the
// tokens within a step or two.
//
// Sampling with a seed cannot match torch's RNG; what is checked is that it
// is reproducible, only ever draws tokens the warped distribution allows
// (sampling_test.cpp checks that distribution against transformers), and
// stops where it should.
#include <qlora/models/generation.hpp>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <vector>

#include "models/generation_fixture.hpp"
#include "support/errors.hpp"

using namespace qlora;
using qlora::test::generation_model;

namespace {

constexpr std::int32_t eos = 199;
const std::vector<std::int32_t> stop_at_eos{eos};

struct GreedyCase {
  std::vector<std::int32_t> prompt, tokens;
  float penalty;
};

GreedyCase greedy_case(int c) {
  const auto penalties =
      nlohmann::json::parse(*test::generation_reference().metadata_value("greedy_repetition_penalties"));
  return {test::reference_ids(fmt::format("greedy{}.prompt", c)), test::reference_ids(fmt::format("greedy{}.tokens", c)),
          penalties.at(static_cast<std::size_t>(c)).get<float>()};
}

}  // namespace

TEST_CASE("Greedy generation gives transformers' tokens", "[models][generation]") {
  const auto gaps = nlohmann::json::parse(*test::generation_reference().metadata_value("greedy_min_top2_gaps"));
  for (int c = 0; c < 3; ++c) {
    INFO("greedy case " << c);
    REQUIRE(gaps.at(static_cast<std::size_t>(c)).get<double>() >= 0.02);  // the fixture's guard against near-ties
    const GreedyCase greedy = greedy_case(c);
    std::vector<std::int32_t> streamed;
    const std::vector<std::int32_t> tokens =
        generate(generation_model(), greedy.prompt, 12, stop_at_eos, {.repetition_penalty = greedy.penalty},
                 [&](std::int32_t id) { streamed.push_back(id); });
    CHECK(tokens == greedy.tokens);
    CHECK(streamed == tokens);
  }
}

TEST_CASE("A conversation's cache serves the next turn from where it differs", "[models][generation]") {
  // Turn 1 generates 3 tokens; turn 2's context is the prompt, those tokens and 3 more of transformers'
  // continuation: the cache keeps the common prefix and the rest must still be transformers' tokens.
  const GreedyCase greedy = greedy_case(0);
  KvCache cache;
  const std::vector<std::int32_t> first = generate(generation_model(), cache, greedy.prompt, 3, stop_at_eos, {});
  CHECK(first == std::vector<std::int32_t>(greedy.tokens.begin(), greedy.tokens.begin() + 3));
  CHECK(cache.size() == static_cast<std::int64_t>(greedy.prompt.size() + 2));  // the last token is not run yet

  std::vector<std::int32_t> context = greedy.prompt;
  context.insert(context.end(), greedy.tokens.begin(), greedy.tokens.begin() + 6);
  const std::vector<std::int32_t> rest = generate(generation_model(), cache, context, 6, stop_at_eos, {});
  CHECK(rest == std::vector<std::int32_t>(greedy.tokens.begin() + 6, greedy.tokens.end()));

  // A context that departs from the cache early: the cache is cut back to the common prefix.
  const std::vector<std::int32_t> again = generate(generation_model(), cache, greedy.prompt, 12, stop_at_eos, {});
  CHECK(again == greedy.tokens);
}

TEST_CASE("Generation stops at a stop id, at max_new_tokens, or when on_token says so", "[models][generation]") {
  const GreedyCase greedy = greedy_case(1);
  SECTION("the first stop id generated ends the output, included") {
    const std::int32_t stop = greedy.tokens[4];
    const auto first = std::ranges::find(greedy.tokens, stop) - greedy.tokens.begin();
    const std::vector<std::int32_t> stops{eos, stop};
    const std::vector<std::int32_t> tokens = generate(generation_model(), greedy.prompt, 12, stops, {});
    CHECK(tokens == std::vector<std::int32_t>(greedy.tokens.begin(), greedy.tokens.begin() + first + 1));
  }
  SECTION("max_new_tokens") {
    CHECK(generate(generation_model(), greedy.prompt, 2, stop_at_eos, {}) ==
          std::vector<std::int32_t>(greedy.tokens.begin(), greedy.tokens.begin() + 2));
    CHECK(generate(generation_model(), greedy.prompt, 0, stop_at_eos, {}).empty());
  }
  SECTION("on_token returning false") {
    int calls = 0;
    const std::vector<std::int32_t> tokens =
        generate(generation_model(), greedy.prompt, 12, stop_at_eos, {}, [&](std::int32_t) { return ++calls < 5; });
    CHECK(tokens == std::vector<std::int32_t>(greedy.tokens.begin(), greedy.tokens.begin() + 5));
  }
}

TEST_CASE("Sampling is reproducible per seed and draws only allowed tokens", "[models][generation]") {
  const GreedyCase greedy = greedy_case(0);
  const SamplingOptions options{.temperature = 0.7f, .top_k = 5, .top_p = 0.9, .repetition_penalty = 1.1f, .seed = 42};
  const std::vector<std::int32_t> tokens = generate(generation_model(), greedy.prompt, 10, {}, options);
  CHECK(tokens.size() == 10);
  CHECK(generate(generation_model(), greedy.prompt, 10, {}, options) == tokens);
  SamplingOptions other = options;
  other.seed = 43;
  CHECK(generate(generation_model(), greedy.prompt, 10, {}, other) != tokens);

  // Each token has non-zero probability under the distribution of its own step.
  KvCache cache;
  std::vector<std::int32_t> history = greedy.prompt;
  Tensor logits = generation_model().decode(history, cache);
  for (const std::int32_t token : tokens) {
    const auto vocab = static_cast<std::size_t>(logits.shape()[1]);
    const auto last = logits.span<const float>().subspan(static_cast<std::size_t>(logits.shape()[0] - 1) * vocab, vocab);
    CHECK(sampling_distribution(last, options, history)[static_cast<std::size_t>(token)] > 0);
    history.push_back(token);
    logits = generation_model().decode(std::span(&token, 1), cache);
  }
}

TEST_CASE("generate refuses bad arguments", "[models][generation][errors]") {
  const std::vector<std::int32_t> prompt{3, 4};
  test::require_error([&] { (void)generate(generation_model(), std::vector<std::int32_t>{}, 4, stop_at_eos, {}); },
                      "InvalidArgument", "at least one token");
  test::require_error([&] { (void)generate(generation_model(), prompt, -1, stop_at_eos, {}); }, "InvalidArgument",
                      "max_new_tokens = -1");
  test::require_error([&] { (void)generate(generation_model(), prompt, 4, stop_at_eos, {.top_p = 2}); },
                      "InvalidSamplingOptions", "top_p");
  const std::vector<std::int32_t> outside{3, 250};
  test::require_error([&] { (void)generate(generation_model(), outside, 4, stop_at_eos, {}); }, "TokenOutOfRange", "250");
}
