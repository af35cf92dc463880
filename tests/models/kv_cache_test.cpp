// KvCache and CausalLm::decode: decoding a sequence through the cache — the
// prompt in one call, or in pieces, then token by token — gives the logits of
// the full forward over the whole sequence (CausalLm::logits, itself checked
// against transformers in phi_test.cpp), and those of transformers' own
// cached generate (tests/reference/generation.py).
//
// Tolerance: decode and the full forward compute the same fp32 maths on the
// same weights; only the summation order differs (attention over a cache of
// L rows vs the tiled causal kernel, GEMMs of 1 row vs T rows), ~1e-7 relative
// per op, ~1e-6 through 2 layers. 1e-5 of the largest logit leaves 10x margin,
// while a wrong position (rotary off by one) or a missing cached row moves
// logits by O(1) relative. Against transformers: 1e-4, phi_test.cpp's bound
// (fp32 cos/sin/tanh/exp implementations differ as well).
#include <qlora/models/kv_cache.hpp>
#include <qlora/models/phi.hpp>

#include <catch2/catch.hpp>

#include <numeric>
#include <span>
#include <vector>

#include "models/generation_fixture.hpp"
#include "support/errors.hpp"

using namespace qlora;
using qlora::test::generation_model;
using qlora::test::relative_error;

namespace {

constexpr double self_tolerance = 1e-5;
constexpr double reference_tolerance = 1e-4;

/// Logits F32 [T, V] of the whole sequence in one forward.
Tensor full_forward(std::span<const std::int32_t> ids) {
  std::vector<std::int32_t> positions(ids.size());
  std::iota(positions.begin(), positions.end(), 0);
  const std::vector<std::int32_t> cu_seqlens{0, static_cast<std::int32_t>(ids.size())};
  TokenBatch batch{.input_ids = ids, .labels = {}, .position_ids = positions, .cu_seqlens = cu_seqlens,
                   .row_length = static_cast<std::int64_t>(ids.size())};
  return generation_model().logits(batch);
}

std::span<const float> row(const Tensor& logits, std::int64_t r) {
  const auto v = static_cast<std::size_t>(logits.shape()[1]);
  return logits.span<const float>().subspan(static_cast<std::size_t>(r) * v, v);
}

/// Decodes `ids` in calls of `pieces[i]` tokens, then one token at a time; checks every row.
void check_against_full_forward(std::span<const std::int32_t> ids, const std::vector<std::size_t>& pieces,
                                KvCache& cache) {
  const Tensor expected = full_forward(ids);
  std::size_t done = 0;
  std::vector<std::size_t> calls = pieces;
  while (std::accumulate(calls.begin(), calls.end(), std::size_t{0}) < ids.size()) calls.push_back(1);
  for (const std::size_t n : calls) {
    const Tensor logits = generation_model().decode(ids.subspan(done, n), cache);
    REQUIRE(logits.shape() == Shape{static_cast<std::int64_t>(n), 200});
    for (std::size_t t = 0; t < n; ++t) {
      INFO("token " << done + t);
      CHECK(relative_error(row(logits, static_cast<std::int64_t>(t)), row(expected, static_cast<std::int64_t>(done + t))) <
            self_tolerance);
    }
    done += n;
    CHECK(cache.size() == static_cast<std::int64_t>(done));
  }
  CHECK(std::ranges::equal(cache.tokens(), ids));
}

std::vector<std::int32_t> sequence_of(int case_index) {
  std::vector<std::int32_t> ids = test::reference_ids(fmt::format("greedy{}.prompt", case_index));
  const std::vector<std::int32_t> tokens = test::reference_ids(fmt::format("greedy{}.tokens", case_index));
  ids.insert(ids.end(), tokens.begin(), tokens.end());
  return ids;
}

}  // namespace

TEST_CASE("Decoding through the KV cache gives the full forward's logits", "[models][kv_cache]") {
  const std::vector<std::int32_t> ids = sequence_of(0);
  SECTION("the prompt in one call, then token by token") {
    KvCache cache;
    check_against_full_forward(ids, {5}, cache);
  }
  SECTION("every token alone, from an empty cache (and a cache that starts too small to hold them)") {
    KvCache cache(2);
    check_against_full_forward(ids, {}, cache);
    CHECK(cache.capacity() >= static_cast<std::int64_t>(ids.size()));
  }
  SECTION("a prompt in pieces of several tokens on top of a non-empty cache") {
    KvCache cache;
    check_against_full_forward(ids, {3, 4, 6}, cache);
  }
  SECTION("after truncate, decoding resumes from the kept prefix; after clear, from nothing") {
    KvCache cache;
    check_against_full_forward(ids, {static_cast<std::size_t>(ids.size())}, cache);
    cache.truncate(7);
    CHECK(cache.size() == 7);
    const Tensor expected = full_forward(ids);
    const Tensor resumed = generation_model().decode(std::span(ids).subspan(7, 3), cache);
    for (std::int64_t t = 0; t < 3; ++t) CHECK(relative_error(row(resumed, t), row(expected, 7 + t)) < self_tolerance);
    cache.clear();
    CHECK(cache.size() == 0);
    check_against_full_forward(ids, {4}, cache);
  }
}

TEST_CASE("Cached decoding matches the logits of transformers' cached generate", "[models][kv_cache]") {
  for (int c = 0; c < 3; ++c) {
    INFO("greedy case " << c);
    const std::vector<std::int32_t> ids = sequence_of(c);
    const std::vector<float> expected = test::reference_floats(fmt::format("greedy{}.logits", c));
    const std::size_t prompt = test::reference_ids(fmt::format("greedy{}.prompt", c)).size();
    const std::size_t steps = expected.size() / 200;
    KvCache cache;
    Tensor logits = generation_model().decode(std::span(ids).first(prompt), cache);
    for (std::size_t step = 0; step < steps; ++step) {
      INFO("step " << step);
      const std::span<const float> last = row(logits, logits.shape()[0] - 1);
      CHECK(relative_error(last, std::span(expected).subspan(step * 200, 200)) < reference_tolerance);
      if (step + 1 < steps) logits = generation_model().decode(std::span(ids).subspan(prompt + step, 1), cache);
    }
  }
}

TEST_CASE("Bad decode input is refused and leaves the cache as it was", "[models][kv_cache][errors]") {
  KvCache cache;
  const std::vector<std::int32_t> prompt{5, 6, 7};
  (void)generation_model().decode(prompt, cache);
  SECTION("no tokens") {
    test::require_error([&] { (void)generation_model().decode({}, cache); }, "InvalidArgument", "at least one");
  }
  SECTION("a token outside the vocabulary") {
    const std::vector<std::int32_t> bad{4, 200};
    test::require_error([&] { (void)generation_model().decode(bad, cache); }, "TokenOutOfRange", "200");
  }
  CHECK(cache.size() == 3);
  CHECK(std::ranges::equal(cache.tokens(), prompt));
  // Still usable: the next token's logits are those of the full forward.
  const std::vector<std::int32_t> next{8};
  const Tensor logits = generation_model().decode(next, cache);
  const std::vector<std::int32_t> all{5, 6, 7, 8};
  CHECK(relative_error(row(logits, 0), row(full_forward(all), 3)) < self_tolerance);
}

TEST_CASE("KvCache refuses rows of another shape and commits without rows", "[models][kv_cache][errors]") {
  KvCache cache;
  Tensor k(DType::F32, Shape{2, 4, 16}), v(DType::F32, Shape{2, 4, 16});
  const KvCache::Rows rows = cache.layer(0).append(k.view(), v.view());
  CHECK(rows.key.shape() == Shape{2, 4, 16});
  const std::vector<std::int32_t> two{1, 2};
  cache.commit(two);
  CHECK(cache.size() == 2);

  Tensor other(DType::F32, Shape{1, 2, 16});
  test::require_error([&] { (void)cache.layer(0).append(other.view(), other.view()); }, "ShapeMismatch", "[4, 16]",
                      "[1, 2, 16]");
  Tensor wrong_value(DType::F32, Shape{1, 4, 8});
  Tensor one(DType::F32, Shape{1, 4, 16});
  test::require_error([&] { (void)cache.layer(0).append(one.view(), wrong_value.view()); }, "ShapeMismatch", "value");
  test::require_error([&] { (void)cache.layer(1).append(one.view(), one.view()); }, "InvalidKvCache", "layer 1");
  test::require_error([&] { cache.commit(std::vector<std::int32_t>{3}); }, "InvalidKvCache", "3 tokens");
  test::require_error([&] { cache.truncate(-1); }, "InvalidArgument", "-1");
}
