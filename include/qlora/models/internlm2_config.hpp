// InternLM2Config: the hyper-parameters of an InternLM2 / InternLM2.5 model
// (internlm/internlm2_5-7b-chat and kin), read from its config.json — the
// remote-code format ("model_type": "internlm2", InternLM2ForCausalLM).
// Missing fields take the defaults of InternLM2's configuration class.
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/models/detail/config_fields.hpp>

#include <cstdint>
#include <filesystem>
#include <string>

namespace qlora {

struct InternLM2Config {
  int vocab_size = 103168;
  int hidden_size = 4096;
  int intermediate_size = 11008;
  int num_hidden_layers = 32;
  int num_attention_heads = 32;
  int num_key_value_heads = 32;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  double dynamic_ntk_factor = 0.0;  ///< rope_scaling {"type": "dynamic", "factor": f}; 0: none
  std::int64_t max_position_embeddings = 2048;
  bool bias = true;  ///< biases on wqkv, wo, w1, w2, w3 (InternLM2 and 2.5 ship false)
  std::int64_t bos_token_id = 1;
  std::int64_t eos_token_id = 2;

  [[nodiscard]] int head_dim() const noexcept { return hidden_size / num_attention_heads; }
  /// Query heads per KV head: the group size of the interleaved wqkv rows.
  [[nodiscard]] int group_size() const noexcept { return num_attention_heads / num_key_value_heads; }

  static InternLM2Config from_folder(const std::filesystem::path& folder) {
    return parse(detail::ConfigFields::open(folder / "config.json"));
  }

  /// Errors: InvalidModelConfig, UnsupportedArchitecture (not InternLM2, or
  /// a variant qlora does not implement: another activation, linear rope
  /// scaling, tied embeddings).
  static InternLM2Config parse(const detail::ConfigFields& fields) {
    const std::string model_type = fields.string("model_type", "");
    const std::string architecture = fields.architecture();
    check(model_type == "internlm2" || architecture == "InternLM2ForCausalLM", "UnsupportedArchitecture",
          "{}: model_type \"{}\" / architectures [\"{}\"] is not an InternLM2 model (expected model_type "
          "\"internlm2\", architecture InternLM2ForCausalLM)",
          fields.source(), model_type, architecture);
    InternLM2Config config;
    config.vocab_size = fields.positive("vocab_size", config.vocab_size);
    config.hidden_size = fields.positive("hidden_size", config.hidden_size);
    config.intermediate_size = fields.positive("intermediate_size", config.intermediate_size);
    config.num_hidden_layers = fields.positive("num_hidden_layers", config.num_hidden_layers);
    config.num_attention_heads = fields.positive("num_attention_heads", config.num_attention_heads);
    config.num_key_value_heads = fields.positive("num_key_value_heads", config.num_attention_heads);
    config.rms_norm_eps = fields.number("rms_norm_eps", config.rms_norm_eps);
    config.rope_theta = fields.number("rope_theta", config.rope_theta);
    config.max_position_embeddings = fields.positive("max_position_embeddings", config.max_position_embeddings);
    config.bias = fields.boolean("bias", config.bias);
    config.bos_token_id = fields.integer("bos_token_id", config.bos_token_id);
    config.eos_token_id = fields.integer("eos_token_id", config.eos_token_id);
    if (const auto scaling = fields.object("rope_scaling")) {
      const std::string type = scaling->string("type");
      check(type == "dynamic", "UnsupportedArchitecture",
            "{}: rope_scaling type \"{}\"; qlora's InternLM2 implements \"dynamic\" (NTK) scaling only",
            scaling->source(), type);
      config.dynamic_ntk_factor = scaling->number("factor");
      check(config.dynamic_ntk_factor >= 1.0, "InvalidModelConfig", "{}: factor {} is below 1", scaling->source(),
            config.dynamic_ntk_factor);
    }
    const std::string activation = fields.string("hidden_act", "silu");
    check(activation == "silu", "UnsupportedArchitecture",
          "{}: hidden_act is \"{}\"; InternLM2's feed-forward is SwiGLU with silu", fields.source(), activation);
    check(!fields.boolean("tie_word_embeddings", false), "UnsupportedArchitecture",
          "{}: tie_word_embeddings is true; InternLM2's output head is its own weight", fields.source());
    check(config.hidden_size % config.num_attention_heads == 0, "InvalidModelConfig",
          "{}: hidden_size {} is not a multiple of num_attention_heads {}", fields.source(), config.hidden_size,
          config.num_attention_heads);
    check(config.num_attention_heads % config.num_key_value_heads == 0, "InvalidModelConfig",
          "{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", fields.source(),
          config.num_attention_heads, config.num_key_value_heads);
    check(config.head_dim() % 2 == 0 && config.rms_norm_eps > 0 && config.rope_theta > 0, "InvalidModelConfig",
          "{}: head_dim {} must be even, rms_norm_eps ({}) and rope_theta ({}) positive", fields.source(),
          config.head_dim(), config.rms_norm_eps, config.rope_theta);
    return config;
  }
};

}  // namespace qlora
