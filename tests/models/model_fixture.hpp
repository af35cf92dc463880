// The model reference fixtures (tests/reference/phi_model.py,
// internlm2_model.py) and the checks every CausalLm architecture passes
// against them: logits, loss and every trainable gradient for a padded batch
// and a packed row, with and without gradient checkpointing, and a 20-step
// training curve (bitsandbytes AdamW 32-bit, clip 1.0, accumulation 2).
//
// Tolerances: both sides compute the same fp32 maths on the same NF4 weights
// (our quantizer is bit-exact with bitsandbytes), so differences come only
// from summation order and from fp32 cos/sin/tanh/exp implementations. Those
// relative errors are ~1e-6 per op; through 2 layers, attention and a softmax
// they grow to ~1e-5 of the largest value, so we allow 1e-4 relative to each
// tensor's largest magnitude: a wrong term (a missing scale, a transposed
// operand, a mask off by one) moves values by O(1) relative.
#pragma once

#include <qlora/models/causal_lm.hpp>
#include <qlora/optim/adamw.hpp>
#include <qlora/train/training_step.hpp>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <qlora/io/safetensors_reader.hpp>

namespace qlora::test {

inline const std::string models_dir = QLORA_TEST_DATA_DIR "/models";
inline constexpr std::string_view peft_prefix = "base_model.model.";
inline constexpr double model_tolerance = 1e-4;

/// max |a - b| / max |b|.
inline double relative_error(std::span<const float> actual, std::span<const float> expected) {
  REQUIRE(actual.size() == expected.size());
  double worst = 0, scale = 0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    worst = std::max(worst, std::abs(double(actual[i]) - expected[i]));
    scale = std::max(scale, std::abs(double(expected[i])));
  }
  return scale == 0 ? worst : worst / scale;
}

/// One `<name>_reference.safetensors` fixture of tests/data/models.
class ModelFixture {
 public:
  explicit ModelFixture(const std::string& name)
      : reader_(SafetensorsReader::open(fmt::format("{}/{}_reference.safetensors", models_dir, name))) {}

  [[nodiscard]] const SafetensorsReader& reader() const noexcept { return reader_; }

  [[nodiscard]] ModelOptions options() const {
    const auto meta = nlohmann::json::parse(*reader_.metadata_value("lora_config"));
    ModelOptions options;
    options.lora.r = meta["r"];
    options.lora.lora_alpha = meta["lora_alpha"];
    options.lora.target_modules = meta["target_modules"].get<std::vector<std::string>>();
    options.lora.modules_to_save = meta["modules_to_save"].get<std::vector<std::string>>();
    options.quantize = {.blocksize = 64, .double_quant = true};
    options.loss_chunk_tokens = 7;  // not a divisor of any batch: exercises partial chunks
    return options;
  }

  [[nodiscard]] Tensor read_f32(std::string_view name) const {
    const SafetensorsTensor& stored = reader_.tensor(name);
    Tensor out(DType::F32, Shape(std::span<const std::int64_t>(stored.shape)));
    const std::vector<float> values = stored.read<float>();
    std::ranges::copy(values, out.span<float>().begin());
    return out;
  }

  /// The adapter the cases start from (the `lora_init.` tensors), shaped as `model`'s.
  template <class Model>
  [[nodiscard]] PeftAdapter initial_adapter(Model& model) const {
    PeftAdapter adapter = model.adapter();
    for (LoraModuleWeights& module : adapter.modules) {
      module.lora_A = read_f32(fmt::format("lora_init.{}{}.lora_A.weight", peft_prefix, module.path));
      module.lora_B = read_f32(fmt::format("lora_init.{}{}.lora_B.weight", peft_prefix, module.path));
    }
    for (auto& [key, tensor] : adapter.saved_tensors) tensor = read_f32(fmt::format("lora_init.{}{}", peft_prefix, key));
    return adapter;
  }

  /// The model in `folder` (under tests/data/models) with the initial adapter.
  template <class Model>
  [[nodiscard]] Model model(const std::string& folder, ModelOptions options) const {
    Model model = Model::load(models_dir + "/" + folder, options);
    model.load_adapter(initial_adapter(model));
    return model;
  }

 private:
  SafetensorsReader reader_;
};

/// The arrays of fixture case `name`, as a TokenBatch needs them.
struct CaseBatch {
  std::vector<std::int32_t> input_ids, labels, position_ids, cu_seqlens;
  std::vector<bool> real;  ///< not padding: where transformers' logits mean the same as ours
  std::int64_t row_length = 0;

  CaseBatch(const ModelFixture& fixture, const std::string& name) {
    const SafetensorsReader& reader = fixture.reader();
    const SafetensorsTensor& ids = reader.tensor(name + ".input_ids");
    row_length = ids.shape[1];
    input_ids = ids.read<std::int32_t>();
    labels = reader.tensor(name + ".labels").read<std::int32_t>();
    position_ids = reader.tensor(name + ".position_ids").read<std::int32_t>();
    real.assign(input_ids.size(), true);
    if (reader.find(name + ".cu_seqlens") != nullptr) {
      cu_seqlens = reader.tensor(name + ".cu_seqlens").read<std::int32_t>();
    } else if (reader.find(name + ".attention_mask") != nullptr) {
      const auto mask = reader.tensor(name + ".attention_mask").read<std::int32_t>();
      cu_seqlens = attention_segments(mask, row_length);
      for (std::size_t i = 0; i < mask.size(); ++i) real[i] = mask[i] != 0;
    } else {
      cu_seqlens = attention_segments(std::vector<std::int32_t>(input_ids.size(), 1), row_length);
    }
  }
  [[nodiscard]] TokenBatch batch() const { return {input_ids, labels, position_ids, cu_seqlens, row_length}; }
};

/// Logits at real tokens and the loss of case `name` match the fixture.
template <class Model>
void check_logits_and_loss(const ModelFixture& fixture, const Model& model, const std::string& name) {
  INFO("case " << name);
  const CaseBatch data(fixture, name);
  const Tensor logits = model.logits(data.batch());
  const std::vector<float> expected = fixture.reader().tensor(name + ".logits").read<float>();
  const std::int64_t vocab = model.vocab_size();
  std::vector<float> ours, theirs;
  for (std::size_t t = 0; t < data.real.size(); ++t) {
    if (!data.real[t]) continue;  // transformers' pad queries see the real keys before them; ours see only pads
    for (std::int64_t v = 0; v < vocab; ++v) {
      ours.push_back(logits.span<const float>()[t * vocab + v]);
      theirs.push_back(expected[t * vocab + v]);
    }
  }
  CHECK(relative_error(ours, theirs) < model_tolerance);
  const CrossEntropySums sums = model.evaluate(data.batch());
  CHECK(sums.loss_sum / static_cast<double>(sums.count) ==
        Approx(fixture.reader().tensor(name + ".loss").read<float>()[0]).epsilon(1e-5));
}

/// forward_backward of case `name` gives PEFT's loss and every gradient, with
/// and without gradient checkpointing; `trainable` is how many tensors train.
template <class Model>
void check_gradients(const ModelFixture& fixture, const std::string& folder, const std::string& name,
                     std::size_t trainable) {
  for (const bool checkpointing : {false, true}) {
    INFO("case " << name << ", gradient checkpointing " << checkpointing);
    ModelOptions options = fixture.options();
    options.gradient_checkpointing = checkpointing;
    Model model = fixture.model<Model>(folder, options);
    const CaseBatch data(fixture, name);
    const TokenBatch batch = data.batch();
    const std::int64_t count = supervised_targets(batch);
    const CrossEntropySums sums = model.forward_backward(batch, 1.0f / static_cast<float>(count), 0);
    CHECK(sums.count == count);
    CHECK(sums.loss_sum / static_cast<double>(sums.count) ==
          Approx(fixture.reader().tensor(name + ".loss").read<float>()[0]).epsilon(1e-5));
    const auto parameters = model.trainable_parameters();
    CHECK(parameters.size() == trainable);
    for (const TrainableParameter& parameter : parameters) {
      INFO(parameter.name);
      const Tensor expected = fixture.read_f32(fmt::format("{}.grad.{}{}", name, peft_prefix, parameter.name));
      CHECK(relative_error(parameter.grad.span<const float>(), expected.span<const float>()) < model_tolerance);
    }
  }
}

/// With LoRA dropout on, gradient checkpointing changes nothing: its first
/// forward draws the masks its recompute draws, so the loss and every gradient
/// are the same bits as without checkpointing (the same fp32 operations in the
/// same order, on the same thread count). The dropout must also be active: the
/// loss differs from the one without dropout.
template <class Model>
void check_checkpointing_with_dropout(const ModelFixture& fixture, const std::string& folder, const std::string& name) {
  const CaseBatch data(fixture, name);
  const TokenBatch batch = data.batch();
  const float scale = 1.0f / static_cast<float>(supervised_targets(batch));
  const auto run = [&](double dropout, bool checkpointing) {
    ModelOptions options = fixture.options();
    options.lora.lora_dropout = dropout;
    options.gradient_checkpointing = checkpointing;
    Model model = fixture.model<Model>(folder, options);
    const CrossEntropySums sums = model.forward_backward(batch, scale, 3);
    std::vector<std::vector<float>> gradients;
    for (const TrainableParameter& parameter : model.trainable_parameters()) {
      const auto grad = parameter.grad.template span<const float>();
      gradients.emplace_back(grad.begin(), grad.end());
    }
    return std::pair{sums.loss_sum, gradients};
  };
  const auto [plain_loss, plain_gradients] = run(0.1, false);
  const auto [checkpointed_loss, checkpointed_gradients] = run(0.1, true);
  CHECK(checkpointed_loss == plain_loss);
  REQUIRE(checkpointed_gradients.size() == plain_gradients.size());
  for (std::size_t i = 0; i < plain_gradients.size(); ++i) {
    INFO("trainable tensor " << i);
    CHECK(checkpointed_gradients[i] == plain_gradients[i]);
  }
  CHECK(run(0.0, false).first != plain_loss);
}

/// 20 optimizer steps from the initial adapter follow the fixture's loss
/// curve within 1e-3 relative (the bar) and end at its weights.
/// `optimizer` is empty; the model's trainable parameters are added here. Data
/// parallel: this is `rank` of `ranks` (which divides the window of 2
/// micro-batches) and runs micro-batches rank, rank + ranks, ... of each step.
/// Returns the trained values of the trainable parameters, in order.
template <class Model, class Optimizer>
std::vector<std::vector<float>> check_training_curve(const ModelFixture& fixture, const std::string& folder,
                                                     Optimizer& optimizer, int rank = 0, int ranks = 1) {
  constexpr int window_size = 2;
  REQUIRE(window_size % ranks == 0);
  Model model = fixture.model<Model>(folder, fixture.options());
  for (const TrainableParameter& parameter : model.trainable_parameters()) {
    optimizer.add(parameter.name, parameter.value, parameter.grad, parameter.decay);
  }
  const std::vector<float> expected = fixture.reader().tensor("curve.losses").read<float>();
  for (std::size_t step = 0; step < expected.size(); ++step) {
    std::vector<CaseBatch> batches;
    for (int i = rank; i < window_size; i += ranks) {
      batches.emplace_back(fixture, fmt::format("curve.batch{}", window_size * step + static_cast<std::size_t>(i)));
    }
    std::vector<MicroBatch> window;
    for (std::size_t i = 0; i < batches.size(); ++i) window.push_back({batches[i].batch(), fmt::format("part {}", i)});
    const TrainStepResult result = train_step(model, optimizer, window, 1e-3, step, {.max_grad_norm = 1.0});
    INFO("step " << step);
    REQUIRE(!result.skipped);
    CHECK(result.loss == Approx(expected[step]).epsilon(1e-3));
  }
  std::vector<std::vector<float>> trained;
  for (const TrainableParameter& parameter : model.trainable_parameters()) {
    INFO(parameter.name);
    const Tensor expected_final = fixture.read_f32(fmt::format("curve.final.{}{}", peft_prefix, parameter.name));
    // Adam normalises each update to ~lr, so weights drift by at most a few lr·(relative gradient
    // error) over 20 steps; 1e-3 of the range is far above that and far below a wrong update.
    CHECK(relative_error(parameter.value.span<const float>(), expected_final.span<const float>()) < 1e-3);
    const auto values = parameter.value.template span<const float>();
    trained.emplace_back(values.begin(), values.end());
  }
  return trained;
}

/// check_training_curve in one process with bitsandbytes' AdamW 32-bit (the Trainer's defaults).
template <class Model>
std::vector<std::vector<float>> check_training_curve(const ModelFixture& fixture, const std::string& folder) {
  AdamW optimizer(AdamWOptions{});
  return check_training_curve<Model>(fixture, folder, optimizer);
}

}  // namespace qlora::test
