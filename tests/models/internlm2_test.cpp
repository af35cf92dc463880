// InternLM2 against transformers + PEFT: tests/reference/internlm2_model.py
// wrote a tiny random-weight model in InternLM2's own checkpoint format
// (fused, per-KV-group interleaved wqkv; GQA 4:2; dynamic NTK rope with
// max_position_embeddings 16), computed the reference with the equivalent
// LlamaForCausalLM (convert2llama.py's mapping, NF4 on the fused wqkv) and
// PEFT LoRA on wqkv/wo/w1/w2/w3 (one shared A on q/k/v, as InternLM2's one
// lora_A) with `output` trained in full. Tolerances: model_fixture.hpp.
#include <qlora/models/internlm2.hpp>
#include <qlora/models/kv_cache.hpp>

#include <catch2/catch.hpp>

#include <numeric>
#include <string>
#include <vector>

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

TEST_CASE("InternLM2 with LoRA dropout gives the same gradients with gradient checkpointing on and off", "[models][internlm2]") {
  test::check_checkpointing_with_dropout<InternLM2<NF4, float>>(fixture(), "tiny_internlm2", "packed");
}

TEST_CASE("Twenty QLoRA steps of InternLM2 follow torch + peft's loss curve", "[models][internlm2][training]") {
  test::check_training_curve<InternLM2<NF4, float>>(fixture(), "tiny_internlm2");
}

TEST_CASE("InternLM2 decodes through the KV cache as its full forward computes", "[models][internlm2]") {
  // What qlora-chat runs: the prompt in one call, then token by token (GQA rows cached per KV head).
  // Against CausalLm::logits, which the first test checks against the reference. 12 positions stay
  // below max_position_embeddings (16): past it, dynamic NTK rescales by the length seen so far, and a
  // cached decode then differs from a full forward by design (in transformers as here).
  // Tolerance: kv_cache_test.cpp's 1e-5 of the largest logit (same fp32 maths, other summation order).
  const auto model = fixture().model<InternLM2<NF4, float>>("tiny_internlm2", fixture().options());
  const std::vector<std::int32_t> ids{5, 17, 42, 3, 99, 7, 11, 200, 64, 8, 150, 31};
  std::vector<std::int32_t> positions(ids.size());
  std::iota(positions.begin(), positions.end(), 0);
  const std::vector<std::int32_t> cu_seqlens{0, static_cast<std::int32_t>(ids.size())};
  const Tensor full = model.logits({ids, {}, positions, cu_seqlens, static_cast<std::int64_t>(ids.size())});
  const auto vocab = static_cast<std::size_t>(model.vocab_size());
  KvCache cache;
  std::size_t done = 0;
  for (const std::size_t n : {std::size_t{5}, std::size_t{1}, std::size_t{1}, std::size_t{2}, std::size_t{3}}) {
    const Tensor logits = model.decode(std::span(ids).subspan(done, n), cache);
    for (std::size_t t = 0; t < n; ++t) {
      INFO("token " << done + t);
      CHECK(test::relative_error(logits.span<const float>().subspan(t * vocab, vocab),
                                 full.span<const float>().subspan((done + t) * vocab, vocab)) < 1e-5);
    }
    done += n;
  }
  REQUIRE(done == ids.size());
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
