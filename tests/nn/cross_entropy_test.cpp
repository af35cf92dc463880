// lm_head_cross_entropy and shifted_targets against torch + transformers:
// tests/reference/nn_loss.py ran F.linear and transformers' ForCausalLMLoss
// (label shift inside the model, ignore_index -100, sum / num_items_in_batch)
// with autograd in float32 and recorded the float64 truth of the loss and the
// gradients. Cases: several rows with an all-masked and a padded row, one
// packed row whose shift crosses sample boundaries, fewer tokens than a
// chunk, logits near 150 (overflow without max subtraction).
#include <qlora/nn/cross_entropy.hpp>

#include <catch2/catch.hpp>

#include <qlora/core/tensor.hpp>

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "nn/loss_fixture.hpp"
#include "support/bits.hpp"
#include "support/errors.hpp"

using namespace qlora;
using test::require_error;

namespace {

/// One call's outputs: the sums and the three gradients (zero-initialised accumulators).
struct LossRun {
  CrossEntropySums sums;
  Tensor dhidden, dweight, dbias;
};

LossRun run_loss(const test::LossCase& c, std::int64_t chunk_tokens, unsigned threads) {
  const auto targets = shifted_targets(c.labels, c.row_length);
  LossRun run{{}, Tensor(DType::F32, {c.tokens, c.width}), Tensor(DType::F32, {c.vocab, c.width}), {}};
  if (c.has_bias()) run.dbias = Tensor(DType::F32, {c.vocab});
  const LmHeadLossOptions options{.chunk_tokens = chunk_tokens,
                                  .grad_scale = static_cast<float>(c.meta.at("grad_scale").get<double>()),
                                  .threads = threads};
  run.sums = lm_head_cross_entropy(c.hidden.view(), c.weight.view(), c.bias.view(), targets, options,
                                   run.dhidden.view(), run.dweight.view(), run.dbias.view());
  return run;
}

void check_against_fixture(const test::LossCase& c, const LossRun& run) {
  CHECK(run.sums.count == c.meta.at("count").get<std::int64_t>());
  // The loss: at most twice torch's error plus twice the floor (the loss of
  // the exact logits rounded once to fp32). We sum in double, so our error is
  // the fp32 logits' (their rounding: the floor, and the GEMM's sums), while
  // torch adds fp32 summation over the tokens on top.
  const double truth = c.fixture.read<double>("loss_sum_true").at(0);
  const nlohmann::json& torch = c.meta.at("torch");
  const double allowed =
      2 * (torch.at("loss_sum_abs_err").get<double>() + torch.at("loss_sum_floor_abs_err").get<double>());
  INFO(c.name << ": loss_sum error " << std::abs(run.sums.loss_sum - truth) << ", allowed " << allowed);
  CHECK(std::abs(run.sums.loss_sum - truth) <= allowed);
  test::check_against_torch(c, "dhidden", run.dhidden.span<const float>());
  test::check_against_torch(c, "dweight", run.dweight.span<const float>());
  if (c.has_bias()) test::check_against_torch(c, "dbias", run.dbias.span<const float>());
}

bool same_result(const LossRun& a, const LossRun& b) {
  return a.sums.loss_sum == b.sums.loss_sum && a.sums.count == b.sums.count &&
         test::same_bits(a.dhidden.span<const float>(), b.dhidden.span<const float>()) &&
         test::same_bits(a.dweight.span<const float>(), b.dweight.span<const float>()) &&
         (a.dbias.view().raw_data() == nullptr || test::same_bits(a.dbias.span<const float>(), b.dbias.span<const float>()));
}

}  // namespace

TEST_CASE("shifted_targets is transformers' label shift", "[cross_entropy][fixture]") {
  for (const char* name : test::loss_case_names) {
    const auto c = test::load_loss_case(name);
    INFO(name);
    CHECK(shifted_targets(c.labels, c.row_length) == c.fixture.read<std::int32_t>("targets"));
  }
  const std::vector<std::int32_t> labels{1, 2, 3, -100, 5, 6};
  CHECK(shifted_targets(labels, 3) == std::vector<std::int32_t>{2, 3, -100, 5, 6, -100});
  CHECK(shifted_targets(labels, 6) == std::vector<std::int32_t>{2, 3, -100, 5, 6, -100});
  CHECK(shifted_targets(labels, 2) == std::vector<std::int32_t>{2, -100, -100, -100, 6, -100});
  CHECK(shifted_targets({}, 4).empty());
  require_error([&] { (void)shifted_targets(labels, 4); }, "ShapeMismatch", "6 labels", "rows of 4 tokens");
  require_error([&] { (void)shifted_targets(labels, 0); }, "InvalidArgument", "row_length is 0");
}

TEST_CASE("lm_head_cross_entropy matches torch + transformers for any chunk size", "[cross_entropy][fixture]") {
  for (const char* name : test::loss_case_names) {
    const auto c = test::load_loss_case(name);
    // 1: a GEMV per token; 3: several chunks and a partial last one; 128 (the default): one chunk.
    for (const std::int64_t chunk : {1, 3, 128}) {
      DYNAMIC_SECTION(name << ", chunk " << chunk) { check_against_fixture(c, run_loss(c, chunk, 3)); }
    }
  }
}

TEST_CASE("lm_head_cross_entropy gives the same bits for any thread count", "[cross_entropy]") {
  // batch_rows: 3 vocabulary blocks, 2 hidden-column blocks (H = 96).
  const auto c = test::load_loss_case("batch_rows");
  for (const std::int64_t chunk : {3, 128}) {
    const LossRun reference = run_loss(c, chunk, 1);
    for (unsigned threads : {2u, 3u, 8u}) {
      INFO("chunk " << chunk << ", " << threads << " threads");
      CHECK(same_result(run_loss(c, chunk, threads), reference));
    }
  }
}

TEST_CASE("lm_head_cross_entropy on a two-word vocabulary", "[cross_entropy]") {
  // hidden = 0, so the logits are the bias: p = softmax(0, ln 3) = (1/4, 3/4).
  const Tensor hidden(DType::F32, {3, 2}), weight = test::tensor_of<float>({1, 2, 3, 4}, {2, 2});
  const Tensor bias = test::tensor_of<float>({0.0f, static_cast<float>(std::log(3.0))}, {2});
  Tensor dhidden = test::tensor_of<float>(std::vector<float>(6, std::numeric_limits<float>::quiet_NaN()), {3, 2});
  Tensor dweight(DType::F32, {2, 2}), dbias = test::tensor_of<float>({1.0f, 1.0f}, {2});
  const std::vector<std::int32_t> targets{0, ignored_target, 1};
  const auto sums = lm_head_cross_entropy(hidden.view(), weight.view(), bias.view(), targets, {.grad_scale = 0.5f},
                                          dhidden.view(), dweight.view(), dbias.view());
  CHECK(sums.count == 2);
  CHECK(sums.loss_sum == Approx(std::log(4.0) + std::log(4.0 / 3.0)).epsilon(1e-7));
  // ∂/∂z = p − onehot: (−3/4, 3/4) and (1/4, −1/4), halved, summed into dbias on top of 1.
  CHECK(dbias.span<const float>()[0] == Approx(1.0 + 0.5 * (-0.75 + 0.25)).epsilon(1e-7));
  CHECK(dbias.span<const float>()[1] == Approx(1.0 + 0.5 * (0.75 - 0.25)).epsilon(1e-7));
  // dhidden row = s·(p − onehot)·W: row 0 = 0.5·(−3/4·(1,2) + 3/4·(3,4)); row 1 (ignored) = 0.
  const auto dh = dhidden.span<const float>();
  CHECK(dh[0] == Approx(0.5 * 0.75 * 2).epsilon(1e-7));
  CHECK(dh[1] == Approx(0.5 * 0.75 * 2).epsilon(1e-7));
  CHECK(dh[2] == 0.0f);
  CHECK(dh[3] == 0.0f);
  CHECK(dh[4] == Approx(0.5 * (0.25 * 1 - 0.25 * 3)).epsilon(1e-7));
  CHECK(dweight.span<const float>()[0] == 0.0f);  // hidden = 0: no weight gradient
}

TEST_CASE("lm_head_cross_entropy: forward only, accumulation, masked rows", "[cross_entropy]") {
  const auto c = test::load_loss_case("batch_rows");
  const auto targets = shifted_targets(c.labels, c.row_length);
  const LossRun full = run_loss(c, 4, 2);

  SECTION("the loss without gradients is the same sum") {
    const auto sums = lm_head_cross_entropy(c.hidden.view(), c.weight.view(), c.bias.view(), targets,
                                            {.chunk_tokens = 4, .threads = 2}, {}, {}, {});
    CHECK(sums.loss_sum == full.sums.loss_sum);
    CHECK(sums.count == full.sums.count);
  }
  SECTION("dweight and dbias accumulate; dhidden is written, zero where the target is ignored") {
    Tensor dhidden = test::tensor_of<float>(
        std::vector<float>(static_cast<std::size_t>(c.tokens * c.width), std::numeric_limits<float>::quiet_NaN()),
        {c.tokens, c.width});
    Tensor dweight = test::tensor_of<float>(std::vector<float>(static_cast<std::size_t>(c.vocab * c.width), 1.0f),
                                            {c.vocab, c.width});
    Tensor dbias = test::tensor_of<float>(std::vector<float>(static_cast<std::size_t>(c.vocab), 1.0f), {c.vocab});
    (void)lm_head_cross_entropy(c.hidden.view(), c.weight.view(), c.bias.view(), targets,
                                {.chunk_tokens = 4, .grad_scale = static_cast<float>(c.meta.at("grad_scale").get<double>()),
                                 .threads = 2},
                                dhidden.view(), dweight.view(), dbias.view());
    CHECK(test::same_bits(dhidden.span<const float>(), full.dhidden.span<const float>()));
    // 1 + g, up to the rounding of each chunk's addition to a value near 1
    // (half an ulp of 1 per chunk: 20 supervised tokens in chunks of 4).
    const double tolerance = 5 * std::ldexp(1.0, -24);
    for (const auto& [accumulated, fresh] : {std::pair{&dweight, &full.dweight}, std::pair{&dbias, &full.dbias}}) {
      const auto a = accumulated->span<const float>(), f = fresh->span<const float>();
      double worst = 0;
      for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(double(a[i]) - (1.0 + f[i])));
      CHECK(worst <= tolerance);
    }
    for (std::int64_t t = 0; t < c.tokens; ++t) {
      if (targets[static_cast<std::size_t>(t)] != ignored_target) continue;
      for (std::int64_t k = 0; k < c.width; ++k) REQUIRE(dhidden.span<const float>()[static_cast<std::size_t>(t * c.width + k)] == 0.0f);
    }
  }
  SECTION("all targets ignored: zero loss, zero dhidden, untouched dweight") {
    const std::vector<std::int32_t> none(targets.size(), ignored_target);
    Tensor dhidden = test::tensor_of<float>(std::vector<float>(static_cast<std::size_t>(c.tokens * c.width), 7.0f),
                                            {c.tokens, c.width});
    Tensor dweight(DType::F32, {c.vocab, c.width});
    const auto sums = lm_head_cross_entropy(c.hidden.view(), c.weight.view(), c.bias.view(), none, {},
                                            dhidden.view(), dweight.view(), {});
    CHECK(sums.count == 0);
    CHECK(sums.loss_sum == 0.0);
    for (const float v : dhidden.span<const float>()) REQUIRE(v == 0.0f);
    for (const float v : dweight.span<const float>()) REQUIRE(v == 0.0f);
  }
}

TEST_CASE("lm_head_cross_entropy refuses bad arguments", "[cross_entropy][errors]") {
  const Tensor hidden(DType::F32, {3, 4}), weight(DType::F32, {5, 4}), bias(DType::F32, {5});
  const Tensor dhidden(DType::F32, {3, 4}), dweight(DType::F32, {5, 4}), dbias(DType::F32, {5});
  const std::vector<std::int32_t> targets{1, ignored_target, 4};
  const auto call = [&](std::vector<std::int32_t> t, const TensorView& h, const TensorView& b, const TensorView& dh,
                        const TensorView& dw, const TensorView& db, LmHeadLossOptions options = {}) {
    return [=, &weight] { (void)lm_head_cross_entropy(h, weight.view(), b, t, options, dh, dw, db); };
  };
  require_error(call({1, ignored_target, 5}, hidden.view(), bias.view(), {}, {}, {}), "TokenOutOfRange",
                "targets[2] is 5", "[0, 5)");
  require_error(call({-1, 0, 0}, hidden.view(), bias.view(), {}, {}, {}), "TokenOutOfRange", "targets[0] is -1");
  require_error(call({1, 2}, hidden.view(), bias.view(), {}, {}, {}), "ShapeMismatch", "2 targets for 3 hidden rows");
  require_error(call(targets, hidden.view(), bias.view(), {}, {}, {}, {.chunk_tokens = 0}), "InvalidArgument",
                "chunk_tokens is 0");
  require_error(call(targets, hidden.view(), {}, {}, {}, dbias.view()), "ShapeMismatch", "dbias given",
                "without a bias");
  const Tensor short_dhidden(DType::F32, {2, 4}), wide_dweight(DType::F32, {5, 5}), long_dbias(DType::F32, {6});
  require_error(call(targets, hidden.view(), bias.view(), short_dhidden.view(), {}, {}), "ShapeMismatch",
                "dhidden is [2, 4], expected [3, 4]");
  require_error(call(targets, hidden.view(), bias.view(), {}, wide_dweight.view(), {}), "ShapeMismatch",
                "dweight is [5, 5], expected [5, 4]");
  require_error(call(targets, hidden.view(), bias.view(), {}, {}, long_dbias.view()), "ShapeMismatch",
                "dbias is [6], expected [5]");
  const Tensor half_hidden(DType::BF16, {3, 4}), half_dweight(DType::F16, {5, 4});
  require_error(call(targets, half_hidden.view(), bias.view(), {}, {}, {}), "DTypeMismatch", "hidden is BF16");
  require_error(call(targets, hidden.view(), bias.view(), {}, half_dweight.view(), {}), "DTypeMismatch",
                "dweight is F16");
  const Tensor square(DType::F32, {4, 4});
  require_error(call({0, 0, 0, 0}, square.view().transposed(0, 1), bias.view(), {}, {}, {}), "NotContiguous",
                "hidden");
}
