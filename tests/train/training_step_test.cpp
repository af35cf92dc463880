// train_step's bookkeeping around a model, with a stand-in model whose losses
// and gradients are set by the test: the window's loss normalisation
// (transformers >= 4.46: Σ CE over the window / supervised targets of the
// window), the grad_scale every micro-batch gets, distinct dropout keys for
// every micro-batch of every step, clipping, and the skip/stop paths. The
// numbers against torch + peft are tests/models' 20-step curves.
#include <qlora/train/training_step.hpp>

#include <qlora/core/tensor.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <set>
#include <vector>

#include "support/errors.hpp"

using namespace qlora;

namespace {

/// forward_backward adds loss_of[call] to the loss and grad_scale · gradient_of[call] to its one gradient.
struct StandInModel {
  std::vector<double> loss_of;
  std::vector<float> gradient_of;
  Tensor value{DType::F32, Shape{1}}, grad{DType::F32, Shape{1}};
  std::vector<float> scales{};
  std::vector<std::uint64_t> steps{};

  CrossEntropySums forward_backward(const TokenBatch& batch, float grad_scale, std::uint64_t step) {
    const std::size_t call = scales.size();
    scales.push_back(grad_scale);
    steps.push_back(step);
    grad.span<float>()[0] += grad_scale * gradient_of.at(call);
    return {.loss_sum = loss_of.at(call), .count = supervised_targets(batch)};
  }
  void zero_grad() { grad.span<float>()[0] = 0; }
  std::vector<TrainableParameter> trainable_parameters() { return {{"w", value.view(), grad.view(), true}}; }
};

struct CountingOptimizer {
  int steps = 0;
  double last_lr = 0;
  float gradient_seen = 0;
  Tensor* grad = nullptr;
  void step(double lr) {
    ++steps;
    last_lr = lr;
    gradient_seen = grad->span<float>()[0];
  }
};

/// One row of `labels` (the first label is never a target: the shift).
struct Row {
  std::vector<std::int32_t> ids, labels, positions, segments;
  explicit Row(std::vector<std::int32_t> row_labels) : labels(std::move(row_labels)) {
    ids.assign(labels.size(), 1);
    for (std::size_t i = 0; i < labels.size(); ++i) positions.push_back(static_cast<std::int32_t>(i));
    segments = {0, static_cast<std::int32_t>(labels.size())};
  }
  [[nodiscard]] MicroBatch micro(std::string name) const {
    return {{ids, labels, positions, segments, static_cast<std::int64_t>(labels.size())}, std::move(name)};
  }
};

}  // namespace

TEST_CASE("train_step weighs every supervised token of the window alike", "[train][training_step]") {
  // 3 targets in the first micro-batch, 1 in the second: N_window = 4.
  const Row first({-100, 5, 6, 7}), second({-100, -100, 9});
  const MicroBatch window[] = {first.micro("a"), second.micro("b")};
  StandInModel model{.loss_of = {6.0, 2.0}, .gradient_of = {1.0f, 1.0f}};
  CountingOptimizer optimizer{.grad = &model.grad};
  const TrainStepResult result = train_step(model, optimizer, window, 0.5, 7, {.max_grad_norm = 0});
  CHECK(result.supervised_tokens == 4);
  CHECK(result.input_tokens == 7);
  CHECK(result.loss == Approx(8.0 / 4));  // not the mean of the micro-batch means (6/3 + 2/1) / 2 = 2
  CHECK(model.scales == std::vector<float>{0.25f, 0.25f});
  CHECK(optimizer.steps == 1);
  CHECK(optimizer.last_lr == 0.5);
  CHECK(optimizer.gradient_seen == 0.5f);  // 0.25 + 0.25, unclipped
  CHECK(!result.skipped);
}

TEST_CASE("train_step clips the accumulated gradient to max_grad_norm", "[train][training_step]") {
  const Row row({-100, 1});
  const MicroBatch window[] = {row.micro("a")};
  StandInModel model{.loss_of = {1.0}, .gradient_of = {3.0f}};
  CountingOptimizer optimizer{.grad = &model.grad};
  const TrainStepResult result = train_step(model, optimizer, window, 1e-3, 0, {.max_grad_norm = 1.0});
  CHECK(result.grad_norm == Approx(3.0));            // reported before clipping
  CHECK(optimizer.gradient_seen == Approx(1.0).epsilon(1e-6));  // torch's clip: · max_norm / (norm + 1e-6)
}

TEST_CASE("every micro-batch of every step gets its own dropout key", "[train][training_step]") {
  // Windows of 2, then a short one of 1 (an epoch's end), then 2 again: no key repeats.
  const Row row({-100, 1});
  StandInModel model{.loss_of = std::vector<double>(5, 1.0), .gradient_of = std::vector<float>(5, 0.0f)};
  CountingOptimizer optimizer{.grad = &model.grad};
  const MicroBatch two[] = {row.micro("a"), row.micro("b")}, one[] = {row.micro("c")};
  (void)train_step(model, optimizer, two, 1e-3, 0);
  (void)train_step(model, optimizer, one, 1e-3, 1);
  (void)train_step(model, optimizer, two, 1e-3, 2);
  CHECK(std::set<std::uint64_t>(model.steps.begin(), model.steps.end()).size() == model.steps.size());
}

TEST_CASE("a window without a supervised token is skipped with a NaN loss", "[train][training_step]") {
  const Row row({-100, -100, -100});
  const MicroBatch window[] = {row.micro("a")};
  StandInModel model{.loss_of = {0.0}, .gradient_of = {0.0f}};
  CountingOptimizer optimizer{.grad = &model.grad};
  const TrainStepResult result = train_step(model, optimizer, window, 1e-3, 0);
  CHECK(result.skipped);
  CHECK(std::isnan(result.loss));
  CHECK(optimizer.steps == 0);
  CHECK(model.scales.empty());  // no forward ran
}

TEST_CASE("a non-finite loss stops the run naming the micro-batch, or skips the step", "[train][training_step]") {
  const Row row({-100, 1});
  const MicroBatch window[] = {row.micro("epoch 1, batch 3"), row.micro("epoch 1, batch 4")};
  const double nan = std::numeric_limits<double>::quiet_NaN();
  SECTION("stop") {
    StandInModel model{.loss_of = {1.0, nan}, .gradient_of = {1.0f, 1.0f}};
    CountingOptimizer optimizer{.grad = &model.grad};
    test::require_error([&] { (void)train_step(model, optimizer, window, 1e-3, 12); }, "NonFiniteLoss", "step 12",
                        "epoch 1, batch 4");
    CHECK(optimizer.steps == 0);
  }
  SECTION("skip") {
    StandInModel model{.loss_of = {1.0, nan}, .gradient_of = {1.0f, 1.0f}};
    CountingOptimizer optimizer{.grad = &model.grad};
    const TrainStepResult result =
        train_step(model, optimizer, window, 1e-3, 12, {.on_non_finite = NonFinitePolicy::skip_step});
    CHECK(result.skipped);
    CHECK(optimizer.steps == 0);
    CHECK(model.grad.span<float>()[0] == 0.0f);  // the half-accumulated gradient is dropped
  }
  SECTION("an infinite gradient with a finite loss") {
    StandInModel model{.loss_of = {1.0, 1.0}, .gradient_of = {std::numeric_limits<float>::infinity(), 1.0f}};
    CountingOptimizer optimizer{.grad = &model.grad};
    test::require_error([&] { (void)train_step(model, optimizer, window, 1e-3, 5); }, "NonFiniteLoss",
                        "gradient norm is inf");
  }
}
