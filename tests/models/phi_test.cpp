// Phi against transformers' PhiForCausalLM + PEFT: tests/reference/phi_model.py
// built a tiny random-weight Phi (2 layers, hidden 64, 4 heads, partial rotary
// 0.5), saved it sharded (and, through bitsandbytes, as a 4-bit checkpoint),
// NF4-quantized every Linear but lm_head with bitsandbytes (double quant,
// blocksize 64, compute fp32), wrapped it with PEFT's LoRA (r 4, alpha 8,
// q/k/v/dense/fc1/fc2, modules_to_save lm_head and embed_tokens) and recorded
// logits, loss and every trainable gradient for a padded batch and a packed
// row, and a 20-step training curve. Tolerances: tests/models/model_fixture.hpp.
#include <qlora/models/phi.hpp>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <qlora/io/safetensors_writer.hpp>
#include <qlora/io/sharded_checkpoint.hpp>

#include "models/model_fixture.hpp"
#include "support/errors.hpp"

using namespace qlora;
using test::CaseBatch;
using test::models_dir;

namespace {

const test::ModelFixture& fixture() {
  static const test::ModelFixture phi("tiny_phi");
  return phi;
}
ModelOptions fixture_options() { return fixture().options(); }

/// The fixture's model: quantized on load from the fp32 folder, or (`tiny_phi_bnb4bit`) the
/// 4-bit weights bitsandbytes stored. The two differ only where our float32 mean of a
/// tensor's absmax (double quantization's offset) rounds its last bit differently from
/// torch's reduction order (see quant/double_quant.hpp) — well inside the tolerance.
Phi<NF4, float> fixture_model(const std::string& folder = "tiny_phi") {
  return fixture().model<Phi<NF4, float>>(folder, fixture_options());
}

// 2 layers x 6 linears x (A, B), embed_tokens, lm_head weight and bias.
constexpr std::size_t phi_trainable = 2 * 6 * 2 + 3;

}  // namespace

TEST_CASE("Phi loads transformers' checkpoints and matches their logits and loss", "[models][phi]") {
  // tiny_phi: fp32, sharded, quantized on load; tiny_phi_bnb4bit: one file, stored 4-bit by transformers.
  const std::string folder = GENERATE("tiny_phi", "tiny_phi_bnb4bit");
  INFO(folder);
  const Phi<NF4, float> model = fixture_model(folder);
  CHECK(model.config().num_hidden_layers == 2);
  CHECK(model.config().rotary_dim() == 8);
  for (const std::string name : {"padded", "packed"}) test::check_logits_and_loss(fixture(), model, name);
}

TEST_CASE("Phi's loss and every adapter gradient match PEFT's", "[models][phi]") {
  for (const std::string name : {"padded", "packed"}) {
    test::check_gradients<Phi<NF4, float>>(fixture(), "tiny_phi", name, phi_trainable);
  }
}

TEST_CASE("Phi with LoRA dropout gives the same gradients with gradient checkpointing on and off", "[models][phi]") {
  test::check_checkpointing_with_dropout<Phi<NF4, float>>(fixture(), "tiny_phi", "packed");
}

TEST_CASE("Twenty QLoRA steps of Phi follow torch + peft's loss curve", "[models][phi][training]") {
  test::check_training_curve<Phi<NF4, float>>(fixture(), "tiny_phi");
}

TEST_CASE("Phi resizes its vocabulary as transformers does", "[models][phi]") {
  Phi<NF4, float> model = Phi<NF4, float>::load(models_dir + "/tiny_phi", fixture_options());
  CHECK(padded_vocab_size(203, 64) == 256);
  model.resize_token_embeddings(padded_vocab_size(203, 64));
  REQUIRE(model.vocab_size() == 256);
  PeftAdapter adapter = model.adapter();
  for (const auto& [key, tensor] : adapter.saved_tensors) {
    INFO(key);
    const std::string name = key == "model.embed_tokens.weight" ? "resize.embed_tokens" : "resize." + key;
    // transformers draws the new rows from N(mean, 1e-9·Σ): ~1e-4 of a row's scale here at most.
    CHECK(test::relative_error(tensor.span<const float>(), fixture().read_f32(name).span<const float>()) < 1e-3);
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
    const ShardedCheckpoint source = ShardedCheckpoint::open(models_dir + "/tiny_phi");
    std::vector<SafetensorsTensor> tensors;
    for (const SafetensorsReader& shard : source.shards()) {
      for (const SafetensorsTensor& tensor : shard.tensors()) tensors.push_back(tensor);
    }
    edit(tensors);
    SafetensorsWriter writer;
    for (const SafetensorsTensor& tensor : tensors) writer.add(tensor);
    writer.write(folder / "model.safetensors");
    std::ifstream in(models_dir + "/tiny_phi/config.json");
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
  SECTION("dropout on the attention probabilities, which qlora does not implement") {
    const EditedCheckpoint edited("attention_dropout", no_tensor_edit, [](nlohmann::json& c) { c["attention_dropout"] = 0.1; });
    test::require_error([&] { load(edited.folder); }, "UnsupportedArchitecture", "attention_dropout is 0.1");
  }
  SECTION("a config field of the wrong type") {
    const EditedCheckpoint edited("bad_field", no_tensor_edit, [](nlohmann::json& c) { c["num_attention_heads"] = "four"; });
    test::require_error([&] { load(edited.folder); }, "InvalidModelConfig", "num_attention_heads", "\"four\"");
  }
  SECTION("no checkpoint at all") {
    test::require_error([&] { load(models_dir + "/does_not_exist"); }, "IoError", "does_not_exist");
  }
  SECTION("InternLM2's LoRA targets, which match no Phi linear") {
    ModelOptions options = fixture_options();
    options.lora.target_modules = {"wqkv", "wo", "w1", "w2", "w3"};
    test::require_error([&] { (void)Phi<NF4, float>::load(models_dir + "/tiny_phi", options); },
                        "NoMatchingTargetModules", "wqkv, wo, w1, w2, w3", "model.layers.0.self_attn.q_proj");
  }
  SECTION("InternLM2's output head in modules_to_save") {
    ModelOptions options = fixture_options();
    options.lora.modules_to_save = {"output"};
    test::require_error([&] { (void)Phi<NF4, float>::load(models_dir + "/tiny_phi", options); },
                        "NoMatchingModulesToSave", "\"output\"", "lm_head");
  }
}

TEST_CASE("Phi's embedding dropout (embd_pdrop) acts in training only, alike with checkpointing", "[models][phi]") {
  const EditedCheckpoint edited("embd_pdrop", no_tensor_edit, [](nlohmann::json& c) { c["embd_pdrop"] = 0.5; });
  const test::CaseBatch data(fixture(), "packed");
  const TokenBatch batch = data.batch();
  struct Run {
    double eval_loss, train_loss;
    std::vector<std::vector<float>> gradients;
  };
  const auto run = [&](const std::filesystem::path& folder, bool checkpointing) {
    ModelOptions options = fixture_options();
    options.gradient_checkpointing = checkpointing;
    Phi<NF4, float> model = Phi<NF4, float>::load(folder, options);
    model.load_adapter(fixture().initial_adapter(model));
    Run result{model.evaluate(batch).loss_sum, model.forward_backward(batch, 1.0f, 0).loss_sum, {}};
    for (const TrainableParameter& parameter : model.trainable_parameters()) {
      const auto grad = parameter.grad.span<const float>();
      result.gradients.emplace_back(grad.begin(), grad.end());
    }
    return result;
  };
  const Run plain = run(models_dir + "/tiny_phi", false);
  const Run dropped = run(edited.folder, false);
  const Run checkpointed = run(edited.folder, true);
  CHECK(dropped.eval_loss == plain.eval_loss);    // inference: no dropout, the same bits
  CHECK(dropped.train_loss != plain.train_loss);  // training: half the embedding output dropped
  CHECK(checkpointed.train_loss == dropped.train_loss);
  CHECK(checkpointed.gradients == dropped.gradients);  // embed_tokens' gradient goes through the same mask
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
  remote.load_adapter(fixture().initial_adapter(remote));
  const CaseBatch data(fixture(), "packed");
  const Tensor a = modern.logits(data.batch()), b = remote.logits(data.batch());
  // The same tensors under other names, quantized the same way: identical logits.
  CHECK(std::ranges::equal(a.span<const float>(), b.span<const float>()));
}
