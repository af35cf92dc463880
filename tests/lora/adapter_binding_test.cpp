// PEFT adapter files <-> LoraLinear layers: the adapter peft wrote
// (tests/data/lora/peft_written, by tests/reference/peft_adapter.py) loads
// into one layer per module, drives their outputs, and taken back out of the
// layers it writes a weights file byte-identical to peft's.
#include <qlora/lora/adapter_binding.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <memory>
#include <vector>

#include <qlora/lora/lora_linear.hpp>

#include "io/test_support.hpp"
#include "lora/adapter_test_support.hpp"
#include "lora/tiny_phi_adapter.hpp"
#include "support/tensors.hpp"

using namespace qlora;
using test::as_double;
using test::filled;
using test::lora_fixture;
using test::require_error;
using test::same_bits;

namespace {

using Layer = LoraLinear<NoQuant, float>;

/// One layer per LoRA module of the tiny Phi, with a random base and the adapter's config.
std::vector<std::unique_ptr<Layer>> tiny_phi_layers(const LoraConfig& config) {
  std::vector<std::unique_ptr<Layer>> layers;
  std::uint64_t seed = 1;
  for (const ModuleShape& m : test::tiny_phi_modules()) {
    if (!config.targets(m.path)) continue;
    const Tensor w = filled<float>({m.out_features, m.in_features}, 1000 * seed++, 0.05);
    layers.push_back(std::make_unique<Layer>(m.path, FrozenWeight<NoQuant, float>(w.view()), TensorView{}, config));
  }
  return layers;
}

}  // namespace

TEST_CASE("peft's adapter loads into LoraLinear layers and comes back out byte-identical", "[adapter_binding]") {
  const PeftAdapter adapter = read_peft_adapter(lora_fixture("peft_written"));
  auto layers = tiny_phi_layers(adapter.config.lora);
  REQUIRE(layers.size() == adapter.modules.size());
  for (auto& layer : layers) load_adapter_weights(*layer, adapter);

  const PeftAdapter generated = test::tiny_phi_adapter();  // the values the script put into peft
  for (const auto& layer : layers) {
    const auto expected = std::ranges::find(generated.modules, layer->path(), &LoraModuleWeights::path);
    REQUIRE(expected != generated.modules.end());
    CHECK(as_double<float>(layer->lora_A()) == as_double<float>(expected->lora_A.view()));
    CHECK(as_double<float>(layer->lora_B()) == as_double<float>(expected->lora_B.view()));
  }

  // The loaded factors drive the output: y - y_base = s·(x·Aᵀ)·Bᵀ with the file's A, B and s = 8/4.
  Layer& fc1 = *layers[4];
  REQUIRE(fc1.path() == "model.layers.0.mlp.fc1");
  CHECK(fc1.scaling() == 2.0f);
  const Tensor x = filled<float>({3, fc1.in_features()}, 77, 1.0);
  Tensor y(DType::F32, {3, fc1.out_features()}), y_base(DType::F32, {3, fc1.out_features()});
  fc1.forward(x.view(), y.view());
  fc1.set_adapter_enabled(false);
  fc1.forward(x.view(), y_base.view());
  fc1.set_adapter_enabled(true);
  const auto a = as_double<float>(fc1.lora_A()), b = as_double<float>(fc1.lora_B()), xv = as_double<float>(x.view());
  const std::int64_t in = fc1.in_features(), out = fc1.out_features(), r = fc1.rank();
  for (std::int64_t t = 0; t < 3; ++t) {
    for (std::int64_t o = 0; o < out; ++o) {
      double delta = 0;
      for (std::int64_t k = 0; k < r; ++k) {
        double xa = 0;
        for (std::int64_t i = 0; i < in; ++i) xa += xv[t * in + i] * a[k * in + i];
        delta += 2.0 * xa * b[o * r + k];
      }
      // |y| ~ 1: two fp32 roundings of y and y_base, and fp32 sums of 64 terms.
      CHECK(y.span<const float>()[t * out + o] - y_base.span<const float>()[t * out + o] == Approx(delta).margin(1e-5));
    }
  }

  // Out of the layers and back to a file: byte for byte what peft wrote.
  PeftAdapter exported;
  exported.config = adapter.config;
  for (auto& layer : layers) exported.modules.push_back(adapter_weights_of(*layer));
  for (const auto& [key, tensor] : adapter.saved_tensors) {
    Tensor copy(tensor.dtype(), tensor.shape());
    std::memcpy(copy.view().raw_data(), tensor.view().raw_data(), tensor.byte_size());
    exported.saved_tensors.emplace_back(key, std::move(copy));
  }
  const test::TempDir dir;
  write_peft_adapter(dir.path(), exported);
  CHECK(test::read_bytes(dir / "adapter_model.safetensors") ==
        test::read_bytes(lora_fixture("peft_written") / "adapter_model.safetensors"));
  const PeftAdapter again = read_peft_adapter(dir.path());
  for (std::size_t i = 0; i < again.modules.size(); ++i) {
    CHECK(same_bits(again.modules[i].lora_A, adapter.modules[i].lora_A));
    CHECK(same_bits(again.modules[i].lora_B, adapter.modules[i].lora_B));
  }
}

TEST_CASE("loading refuses an adapter that does not fit the layer", "[adapter_binding]") {
  const PeftAdapter adapter = read_peft_adapter(lora_fixture("peft_written"));
  const Tensor w = filled<float>({64, 64}, 5, 0.05);
  const auto layer_with = [&](std::string path, int r, double alpha) {
    LoraConfig config = adapter.config.lora;
    config.r = r;
    config.lora_alpha = alpha;
    return Layer(std::move(path), FrozenWeight<NoQuant, float>(w.view()), TensorView{}, config);
  };
  auto wrong_alpha = layer_with("model.layers.1.self_attn.q_proj", 4, 16.0);
  require_error([&] { load_adapter_weights(wrong_alpha, adapter); }, "AdapterMismatch", "adapter_model.safetensors",
                "model.layers.1.self_attn.q_proj", "scaling 2", "the layer 4");
  auto wrong_rank = layer_with("model.layers.1.self_attn.q_proj", 8, 16.0);
  require_error([&] { load_adapter_weights(wrong_rank, adapter); }, "AdapterMismatch", "r = 4, the layer r = 8");
  auto absent = layer_with("model.layers.7.self_attn.q_proj", 4, 8.0);
  require_error([&] { load_adapter_weights(absent, adapter); }, "AdapterMismatch",
                "no LoRA weights for module model.layers.7.self_attn.q_proj");

  // The factors load into a 4-bit layer just the same (they are fp32 whatever the base).
  const Tensor wb = filled<bf16>({64, 64}, 6, 0.05);
  LoraLinear<NF4, bf16> nf4("model.layers.1.self_attn.q_proj", FrozenWeight<NF4, bf16>::quantize(wb.view()),
                            TensorView{}, adapter.config.lora);
  load_adapter_weights(nf4, adapter);
  CHECK(as_double<float>(nf4.lora_B()) != std::vector<double>(nf4.lora_B().numel(), 0.0));
}

TEST_CASE("a trained bias travels with the adapter (bias = \"lora_only\")", "[adapter_binding]") {
  LoraConfig config;
  config.r = 2;
  config.lora_alpha = 4;
  config.bias = LoraBias::lora_only;
  config.target_modules = {"fc1"};
  const Tensor w = filled<float>({8, 6}, 11, 0.05), bias = filled<float>({8}, 12, 0.1);
  Layer trained("model.layers.0.mlp.fc1", FrozenWeight<NoQuant, float>(w.view()), bias.view(), config);
  for (float& v : trained.bias().span<float>()) v += 0.25f;  // as an optimizer step would

  PeftAdapter adapter;
  adapter.config.lora = config;
  adapter.modules.push_back(adapter_weights_of(trained));
  auto saved_bias = trained_bias_of(trained);
  REQUIRE(saved_bias.has_value());
  CHECK(saved_bias->first == "model.layers.0.mlp.fc1.base_layer.bias");
  adapter.saved_tensors.push_back(std::move(*saved_bias));
  const test::TempDir dir;
  write_peft_adapter(dir.path(), adapter);

  const PeftAdapter read = read_peft_adapter(dir.path());
  Layer fresh("model.layers.0.mlp.fc1", FrozenWeight<NoQuant, float>(w.view()), bias.view(), config);
  load_adapter_weights(fresh, read);
  CHECK(as_double<float>(fresh.bias()) == as_double<float>(trained.bias()));

  PeftAdapter without_bias;
  without_bias.config.lora = config;
  without_bias.modules.push_back(adapter_weights_of(trained));
  require_error([&] { load_adapter_weights(fresh, without_bias); }, "AdapterMismatch",
                "no trained bias `base_model.model.model.layers.0.mlp.fc1.base_layer.bias`");
}
