// Phi against transformers' PhiForCausalLM + PEFT: tests/reference/phi_model.py
// built a tiny random-weight Phi (2 layers, hidden 64, 4 heads, partial rotary
// 0.5), saved it sharded, NF4-quantized every Linear but lm_head with
// bitsandbytes (double quant, blocksize 64, compute fp32), wrapped it with
// PEFT's LoRA (r 4, alpha 8, q/k/v/dense/fc1/fc2, modules_to_save lm_head and
// embed_tokens) and recorded logits, loss and every trainable gradient for a
// padded batch and a packed row, and a 20-step training curve (bnb AdamW
// 32-bit, clip 1.0, accumulation 2).
//
// Tolerances: both sides compute the same fp32 maths on the same NF4 weights
// (our quantizer is bit-exact with bitsandbytes), so differences come only
// from summation order, and fp32 cos/sin/tanh/exp implementations. Those
// relative errors are ~1e-6 per op; through 2 layers, attention and a
// softmax they grow to ~1e-5 of the largest value, so we allow 1e-4 relative
// to each tensor's largest magnitude: a wrong term (a missing scale, a
// transposed operand, a mask off by one) moves values by O(1) relative.
#include <qlora/models/phi.hpp>
#include <qlora/optim.hpp>
#include <qlora/train/training_step.hpp>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <qlora/io/safetensors_reader.hpp>
#include <qlora/io/safetensors_writer.hpp>
#include <qlora/io/sharded_checkpoint.hpp>

#include "support/errors.hpp"

using namespace qlora;

namespace {

const std::string data_dir = QLORA_TEST_DATA_DIR "/models";
constexpr std::string_view peft_prefix = "base_model.model.";

const SafetensorsReader& reference() {
  static const SafetensorsReader reader = SafetensorsReader::open(data_dir + "/tiny_phi_reference.safetensors");
  return reader;
}

LoraConfig fixture_lora_config() {
  const auto meta = nlohmann::json::parse(*reference().metadata_value("lora_config"));
  LoraConfig config;
  config.r = meta["r"];
  config.lora_alpha = meta["lora_alpha"];
  config.target_modules = meta["target_modules"].get<std::vector<std::string>>();
  config.modules_to_save = meta["modules_to_save"].get<std::vector<std::string>>();
  return config;
}

ModelOptions fixture_options() {
  ModelOptions options;
  options.lora = fixture_lora_config();
  options.quantize = {.blocksize = 64, .double_quant = true};
  options.loss_chunk_tokens = 7;  // not a divisor of any batch: exercises partial chunks
  return options;
}

Tensor read_f32(std::string_view name) {
  const SafetensorsTensor& stored = reference().tensor(name);
  Tensor out(DType::F32, Shape(std::span<const std::int64_t>(stored.shape)));
  const std::vector<float> values = stored.read<float>();
  std::ranges::copy(values, out.span<float>().begin());
  return out;
}

/// The adapter the fixture's cases start from, as a PeftAdapter read from the `lora_init.` tensors.
PeftAdapter initial_adapter(Phi<NF4, float>& model) {
  PeftAdapter adapter = model.adapter();
  for (LoraModuleWeights& module : adapter.modules) {
    module.lora_A = read_f32(fmt::format("lora_init.{}{}.lora_A.weight", peft_prefix, module.path));
    module.lora_B = read_f32(fmt::format("lora_init.{}{}.lora_B.weight", peft_prefix, module.path));
  }
  for (auto& [key, tensor] : adapter.saved_tensors) tensor = read_f32(fmt::format("lora_init.{}{}", peft_prefix, key));
  return adapter;
}

/// The fixture's model: quantized on load from the fp32 folder, or (`tiny_phi_bnb4bit`) the
/// 4-bit weights bitsandbytes stored. The two differ only where our float32 mean of a
/// tensor's absmax (double quantization's offset) rounds its last bit differently from
/// torch's reduction order (see quant/double_quant.hpp) — well inside the tolerance.
Phi<NF4, float> fixture_model(const std::string& folder = "tiny_phi") {
  Phi<NF4, float> model = Phi<NF4, float>::load(data_dir + "/" + folder, fixture_options());
  model.load_adapter(initial_adapter(model));
  return model;
}

/// max |a - b| / max |b|.
double relative_error(std::span<const float> actual, std::span<const float> expected) {
  REQUIRE(actual.size() == expected.size());
  double worst = 0, scale = 0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    worst = std::max(worst, std::abs(double(actual[i]) - expected[i]));
    scale = std::max(scale, std::abs(double(expected[i])));
  }
  return scale == 0 ? worst : worst / scale;
}

constexpr double tolerance = 1e-4;

/// The arrays of fixture case `name`, as a TokenBatch needs them.
struct CaseBatch {
  std::vector<std::int32_t> input_ids, labels, position_ids, cu_seqlens;
  std::int64_t rows = 0, row_length = 0;

  explicit CaseBatch(const std::string& name) {
    const SafetensorsTensor& ids = reference().tensor(name + ".input_ids");
    rows = ids.shape[0];
    row_length = ids.shape[1];
    input_ids = ids.read<std::int32_t>();
    labels = reference().tensor(name + ".labels").read<std::int32_t>();
    position_ids = reference().tensor(name + ".position_ids").read<std::int32_t>();
    if (reference().find(name + ".cu_seqlens") != nullptr) {
      cu_seqlens = reference().tensor(name + ".cu_seqlens").read<std::int32_t>();
    } else {
      cu_seqlens = attention_segments(reference().tensor(name + ".attention_mask").read<std::int32_t>(), row_length);
    }
  }
  [[nodiscard]] TokenBatch batch() const { return {input_ids, labels, position_ids, cu_seqlens, row_length}; }
  /// Token positions whose logits transformers defines the same way (not padding).
  [[nodiscard]] std::vector<bool> real_tokens(const std::string& name) const {
    if (reference().find(name + ".attention_mask") == nullptr) return std::vector<bool>(input_ids.size(), true);
    const auto mask = reference().tensor(name + ".attention_mask").read<std::int32_t>();
    std::vector<bool> real(mask.size());
    for (std::size_t i = 0; i < mask.size(); ++i) real[i] = mask[i] != 0;
    return real;
  }
};

}  // namespace

TEST_CASE("Phi loads transformers' checkpoints and matches their logits", "[models][phi]") {
  // tiny_phi: fp32, sharded, quantized on load; tiny_phi_bnb4bit: one file, stored 4-bit by transformers.
  const std::string folder = GENERATE("tiny_phi", "tiny_phi_bnb4bit");
  INFO(folder);
  Phi<NF4, float> model = fixture_model(folder);
  CHECK(model.config().num_hidden_layers == 2);
  CHECK(model.config().rotary_dim() == 8);
  for (const std::string name : {"padded", "packed"}) {
    INFO("case " << name);
    const CaseBatch data(name);
    const Tensor logits = model.logits(data.batch());
    const std::vector<float> expected = reference().tensor(name + ".logits").read<float>();
    const std::vector<bool> real = data.real_tokens(name);
    const std::int64_t vocab = model.vocab_size();
    std::vector<float> ours, theirs;
    for (std::size_t t = 0; t < real.size(); ++t) {
      if (!real[t]) continue;  // transformers' pad queries see the real keys before them; ours see only pads
      for (std::int64_t v = 0; v < vocab; ++v) {
        ours.push_back(logits.span<const float>()[t * vocab + v]);
        theirs.push_back(expected[t * vocab + v]);
      }
    }
    CHECK(relative_error(ours, theirs) < tolerance);
  }
}

TEST_CASE("Phi's loss and every adapter gradient match PEFT's", "[models][phi]") {
  for (const std::string name : {"padded", "packed"}) {
    INFO("case " << name);
    for (const bool checkpointing : {false, true}) {
      INFO("gradient checkpointing " << checkpointing);
      ModelOptions options = fixture_options();
      options.gradient_checkpointing = checkpointing;
      Phi<NF4, float> run = Phi<NF4, float>::load(data_dir + "/tiny_phi", options);
      run.load_adapter(initial_adapter(run));
      const CaseBatch data(name);
      const TokenBatch batch = data.batch();
      const std::int64_t count = supervised_targets(batch);
      const CrossEntropySums sums = run.forward_backward(batch, 1.0f / static_cast<float>(count), 0);
      CHECK(sums.count == count);
      const float expected_loss = reference().tensor(name + ".loss").read<float>()[0];
      CHECK(sums.loss_sum / static_cast<double>(sums.count) == Approx(expected_loss).epsilon(1e-5));
      const auto parameters = run.trainable_parameters();
      CHECK(parameters.size() == 2 * 6 * 2 + 3);  // A and B of 6 linears x 2 layers, embed, lm_head weight + bias
      for (const TrainableParameter& parameter : parameters) {
        INFO(parameter.name);
        const Tensor expected = read_f32(fmt::format("{}.grad.{}{}", name, peft_prefix, parameter.name));
        CHECK(relative_error(parameter.grad.span<const float>(), expected.span<const float>()) < tolerance);
      }
    }
  }
}

TEST_CASE("Twenty QLoRA steps follow torch + peft's loss curve", "[models][phi][training]") {
  Phi<NF4, float> model = fixture_model();
  AdamW optimizer(AdamWOptions{});
  for (const TrainableParameter& parameter : model.trainable_parameters()) {
    optimizer.add(parameter.name, parameter.value, parameter.grad, parameter.decay);
  }
  const std::vector<float> expected = reference().tensor("curve.losses").read<float>();
  for (std::size_t step = 0; step < expected.size(); ++step) {
    const CaseBatch first(fmt::format("curve.batch{}", 2 * step)), second(fmt::format("curve.batch{}", 2 * step + 1));
    const MicroBatch window[] = {{first.batch(), "first"}, {second.batch(), "second"}};
    const TrainStepResult result = train_step(model, optimizer, window, 1e-3, step, {.max_grad_norm = 1.0});
    INFO("step " << step);
    REQUIRE(!result.skipped);
    // The bar: the same curve within 1e-3 relative.
    CHECK(result.loss == Approx(expected[step]).epsilon(1e-3));
  }
  for (const TrainableParameter& parameter : model.trainable_parameters()) {
    INFO(parameter.name);
    const Tensor expected_final = read_f32(fmt::format("curve.final.{}{}", peft_prefix, parameter.name));
    // 20 Adam steps of lr 1e-3 amplify gradient differences by at most ~lr/eps-free
    // normalisation; the trained weights agree to 1e-3 of their range.
    CHECK(relative_error(parameter.value.span<const float>(), expected_final.span<const float>()) < 1e-3);
  }
}

TEST_CASE("Phi resizes its vocabulary as transformers does", "[models][phi]") {
  Phi<NF4, float> model = Phi<NF4, float>::load(data_dir + "/tiny_phi", fixture_options());
  CHECK(padded_vocab_size(203, 64) == 256);
  model.resize_token_embeddings(padded_vocab_size(203, 64));
  REQUIRE(model.vocab_size() == 256);
  PeftAdapter adapter = model.adapter();
  for (const auto& [key, tensor] : adapter.saved_tensors) {
    INFO(key);
    const std::string fixture = key == "model.embed_tokens.weight" ? "resize.embed_tokens" : "resize." + key;
    const Tensor expected = read_f32(fixture);
    // transformers draws the new rows from N(mean, 1e-9·Σ): ~3e-5 of a row's scale here.
    CHECK(relative_error(tensor.span<const float>(), expected.span<const float>()) < 1e-3);
  }
}

namespace {

/// A copy of tiny_phi in a fresh folder, as one model.safetensors holding the
/// tensors `edit` leaves (it may drop, add or reshape entries), and its
/// config.json passed through `edit_config`.
struct EditedCheckpoint {
  std::filesystem::path folder;

  template <class EditTensors, class EditConfig>
  EditedCheckpoint(const std::string& name, EditTensors&& edit, EditConfig&& edit_config)
      : folder(std::filesystem::temp_directory_path() / fmt::format("qlora_phi_test_{}", name)) {
    std::filesystem::remove_all(folder);
    std::filesystem::create_directories(folder);
    const ShardedCheckpoint source = ShardedCheckpoint::open(data_dir + "/tiny_phi");
    std::vector<SafetensorsTensor> tensors;
    for (const SafetensorsReader& shard : source.shards()) {
      for (const SafetensorsTensor& tensor : shard.tensors()) tensors.push_back(tensor);
    }
    edit(tensors);
    SafetensorsWriter writer;
    for (const SafetensorsTensor& tensor : tensors) writer.add(tensor);
    writer.write(folder / "model.safetensors");
    std::ifstream in(data_dir + "/tiny_phi/config.json");
    nlohmann::json config = nlohmann::json::parse(in);
    edit_config(config);
    std::ofstream(folder / "config.json") << config.dump(2);
  }
  ~EditedCheckpoint() { std::filesystem::remove_all(folder); }
};

void no_tensor_edit(std::vector<SafetensorsTensor>&) {}
void no_config_edit(nlohmann::json&) {}

void erase_tensor(std::vector<SafetensorsTensor>& tensors, std::string_view name) {
  std::erase_if(tensors, [&](const SafetensorsTensor& t) { return t.name == name; });
}

}  // namespace

TEST_CASE("Config and weights that disagree are refused with the tensor named", "[models][phi][errors]") {
  const auto load = [](const std::filesystem::path& folder) { (void)Phi<NF4, float>::load(folder, fixture_options()); };
  SECTION("a missing tensor") {
    const EditedCheckpoint edited("missing", [](auto& t) { erase_tensor(t, "model.layers.1.mlp.fc2.bias"); }, no_config_edit);
    test::require_error([&] { load(edited.folder); }, "MissingTensor", "model.layers.1.mlp.fc2.bias", "[64]");
  }
  SECTION("an extra tensor") {
    static const std::vector<float> extra(4, 1.0f);
    const EditedCheckpoint edited("extra", [](auto& t) {
      t.push_back({"model.layers.2.mlp.fc1.bias", DType::F32, {4}, std::as_bytes(std::span(extra))});
    }, no_config_edit);
    test::require_error([&] { load(edited.folder); }, "UnexpectedTensor", "model.layers.2.mlp.fc1.bias");
  }
  SECTION("a misshapen tensor (config says 3 heads of a wider model)") {
    const EditedCheckpoint edited("misshapen", no_tensor_edit, [](nlohmann::json& c) { c["intermediate_size"] = 128; });
    test::require_error([&] { load(edited.folder); }, "TensorShapeMismatch", "model.layers.0.mlp.fc1.weight", "[256, 64]",
                        "[128, 64]");
  }
  SECTION("an unsupported architecture") {
    const EditedCheckpoint edited("llama", no_tensor_edit, [](nlohmann::json& c) {
      c["model_type"] = "llama";
      c["architectures"] = {"LlamaForCausalLM"};
    });
    test::require_error([&] { load(edited.folder); }, "UnsupportedArchitecture", "llama", "LlamaForCausalLM");
  }
  SECTION("a Phi variant qlora does not implement") {
    const EditedCheckpoint edited("qk_norm", no_tensor_edit, [](nlohmann::json& c) { c["qk_layernorm"] = true; });
    test::require_error([&] { load(edited.folder); }, "UnsupportedArchitecture", "qk_layernorm");
  }
  SECTION("a config field of the wrong type") {
    const EditedCheckpoint edited("bad_field", no_tensor_edit, [](nlohmann::json& c) { c["num_attention_heads"] = "four"; });
    test::require_error([&] { load(edited.folder); }, "InvalidModelConfig", "num_attention_heads", "\"four\"");
  }
  SECTION("no checkpoint at all") {
    test::require_error([&] { load(data_dir + "/does_not_exist"); }, "IoError", "does_not_exist");
  }
}

TEST_CASE("The remote-code Phi checkpoint (Wqkv, out_proj) loads to the same model", "[models][phi]") {
  // The Dec-2023 tutorials' names (design note §4.4): q/k/v fused as Wqkv [Q; K; V].
  std::vector<std::vector<std::byte>> fused_storage;
  const EditedCheckpoint edited("remote_code", [&](std::vector<SafetensorsTensor>& tensors) {
    std::vector<SafetensorsTensor> renamed;
    const auto find = [&](const std::string& name) {
      return *std::ranges::find(tensors, name, &SafetensorsTensor::name);
    };
    for (int layer = 0; layer < 2; ++layer) {
      const std::string from = fmt::format("model.layers.{}.", layer), to = fmt::format("transformer.h.{}.", layer);
      for (const char* part : {"weight", "bias"}) {
        auto& bytes = fused_storage.emplace_back();
        for (const char* proj : {"q_proj", "k_proj", "v_proj"}) {
          const auto data = find(fmt::format("{}self_attn.{}.{}", from, proj, part)).data;
          bytes.insert(bytes.end(), data.begin(), data.end());
        }
        std::vector<std::int64_t> shape = find(fmt::format("{}self_attn.q_proj.{}", from, part)).shape;
        shape[0] *= 3;
        renamed.push_back({fmt::format("{}mixer.Wqkv.{}", to, part), DType::F32, shape, bytes});
        renamed.push_back(find(fmt::format("{}self_attn.dense.{}", from, part)));
        renamed.back().name = fmt::format("{}mixer.out_proj.{}", to, part);
        renamed.push_back(find(fmt::format("{}input_layernorm.{}", from, part)));
        renamed.back().name = fmt::format("{}ln.{}", to, part);
        for (const char* fc : {"fc1", "fc2"}) {
          renamed.push_back(find(fmt::format("{}mlp.{}.{}", from, fc, part)));
          renamed.back().name = fmt::format("{}mlp.{}.{}", to, fc, part);
        }
      }
    }
    const std::pair<const char*, const char*> global[] = {{"model.embed_tokens.weight", "transformer.embd.wte.weight"},
                                                         {"model.final_layernorm.weight", "lm_head.ln.weight"},
                                                         {"model.final_layernorm.bias", "lm_head.ln.bias"},
                                                         {"lm_head.weight", "lm_head.linear.weight"},
                                                         {"lm_head.bias", "lm_head.linear.bias"}};
    for (const auto& [from, to] : global) {
      renamed.push_back(find(from));
      renamed.back().name = to;
    }
    tensors = std::move(renamed);
  }, [](nlohmann::json& c) {
    c = {{"model_type", "phi-msft"}, {"architectures", {"PhiForCausalLM"}}, {"n_embd", 64}, {"n_layer", 2},
         {"n_head", 4}, {"n_inner", 256}, {"rotary_dim", 8}, {"vocab_size", 200}, {"n_positions", 128},
         {"layer_norm_epsilon", 1e-5}, {"activation_function", "gelu_new"}, {"resid_pdrop", 0.0}};
  });
  Phi<NF4, float> modern = fixture_model();
  Phi<NF4, float> remote = Phi<NF4, float>::load(edited.folder, fixture_options());
  remote.load_adapter(initial_adapter(remote));
  const CaseBatch data("packed");
  const Tensor a = modern.logits(data.batch()), b = remote.logits(data.batch());
  // The same tensors under other names, quantized the same way: identical logits.
  CHECK(std::ranges::equal(a.span<const float>(), b.span<const float>()));
}
