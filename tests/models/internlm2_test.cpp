// InternLM2 against transformers + PEFT: tests/reference/internlm2_model.py
// wrote a tiny random-weight model in InternLM2's own checkpoint format
// (fused, per-KV-group interleaved wqkv; GQA 4:2; dynamic NTK rope with
// max_position_embeddings 16), computed the reference with the equivalent
// LlamaForCausalLM (convert2llama.py's mapping, NF4 on the fused wqkv) and
// PEFT LoRA on wqkv/wo/w1/w2/w3 (one shared A on q/k/v, as InternLM2's one
// lora_A) with `output` trained in full. Tolerances: model_fixture.hpp.
#include <qlora/models/internlm2.hpp>

#include <catch2/catch.hpp>

#include <string>

#include "models/model_fixture.hpp"
#include "support/errors.hpp"

using namespace qlora;

namespace {

const test::ModelFixture& fixture() {
  static const test::ModelFixture internlm2("tiny_internlm2");
  return internlm2;
}

// 2 layers x 5 linears x (A, B), output.weight (no bias).
constexpr std::size_t internlm2_trainable = 2 * 5 * 2 + 1;

}  // namespace

TEST_CASE("InternLM2 loads its checkpoint and matches the reference logits and loss", "[models][internlm2]") {
  const auto model = fixture().model<InternLM2<NF4, float>>("tiny_internlm2", fixture().options());
  CHECK(model.config().num_key_value_heads == 2);
  CHECK(model.config().group_size() == 2);
  CHECK(model.config().dynamic_ntk_factor == 2.0);
  // packed: 20 tokens but positions only to 11, so NTK stays off; long: 24 positions > 16, NTK on.
  for (const std::string name : {"padded", "packed", "long"}) test::check_logits_and_loss(fixture(), model, name);
}

TEST_CASE("InternLM2's loss and every adapter gradient match PEFT's", "[models][internlm2]") {
  for (const std::string name : {"padded", "packed"}) {
    test::check_gradients<InternLM2<NF4, float>>(fixture(), "tiny_internlm2", name, internlm2_trainable);
  }
}

TEST_CASE("Twenty QLoRA steps of InternLM2 follow torch + peft's loss curve", "[models][internlm2][training]") {
  test::check_training_curve<InternLM2<NF4, float>>(fixture(), "tiny_internlm2");
}

TEST_CASE("An InternLM2 config qlora cannot honour is refused", "[models][internlm2][errors]") {
  const auto parse = [](const char* text) {
    (void)InternLM2Config::parse(detail::ConfigFields("config.json", detail::Json::parse(text)));
  };
  test::require_error([&] { parse(R"({"model_type": "llama"})"); }, "UnsupportedArchitecture", "llama");
  test::require_error([&] { parse(R"({"model_type": "internlm2", "rope_scaling": {"type": "linear", "factor": 2}})"); },
                      "UnsupportedArchitecture", "linear");
  test::require_error([&] { parse(R"({"model_type": "internlm2", "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 4})"); },
                      "InvalidModelConfig", "num_key_value_heads");
}
