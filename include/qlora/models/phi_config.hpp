// PhiConfig: the hyper-parameters of a Phi model (microsoft/phi-2 and kin),
// read from its config.json.
//
// Two spellings exist and both load: transformers' own ("model_type": "phi",
// PhiForCausalLM: hidden_size, partial_rotary_factor, ...) and the
// remote-code one the Dec-2023 checkpoints and tutorials used ("model_type":
// "phi-msft": n_embd, n_layer, rotary_dim, ...). Missing fields take
// transformers' PhiConfig defaults, which are phi-1's — so always read the
// checkpoint's file, never assume phi-2's numbers.
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/models/detail/config_fields.hpp>

#include <cstdint>
#include <filesystem>
#include <string>

namespace qlora {

/// Which weight names a Phi checkpoint uses (design note §4.3 / §4.4).
enum class PhiNaming : std::uint8_t {
  transformers,  ///< model.layers.{i}.self_attn.{q,k,v}_proj, dense, mlp.fc1/fc2, final_layernorm, lm_head
  remote_code,   ///< transformer.h.{i}.mixer.Wqkv / out_proj, mlp.fc1/fc2, lm_head.ln / lm_head.linear
};

struct PhiConfig {
  int vocab_size = 51200;
  int hidden_size = 2048;
  int intermediate_size = 8192;
  int num_hidden_layers = 24;
  int num_attention_heads = 32;
  int num_key_value_heads = 32;
  double partial_rotary_factor = 0.5;
  double rope_theta = 10000.0;
  double layer_norm_eps = 1e-5;
  double resid_pdrop = 0.0;
  double embd_pdrop = 0.0;
  std::int64_t max_position_embeddings = 2048;
  std::int64_t bos_token_id = 1;
  std::int64_t eos_token_id = 2;
  PhiNaming naming = PhiNaming::transformers;

  [[nodiscard]] int head_dim() const noexcept { return hidden_size / num_attention_heads; }
  /// Rotated dims per head: int(head_dim · partial_rotary_factor), as transformers truncates.
  [[nodiscard]] int rotary_dim() const noexcept { return static_cast<int>(head_dim() * partial_rotary_factor); }

  /// Reads `<folder>/config.json`.
  static PhiConfig from_folder(const std::filesystem::path& folder) {
    return parse(detail::ConfigFields::open(folder / "config.json"));
  }

  /// Errors: InvalidModelConfig (a field of the wrong type or out of range),
  /// UnsupportedArchitecture (not a Phi, or a Phi variant whose maths qlora
  /// does not implement: qk_layernorm, another activation, rope scaling, tied embeddings).
  static PhiConfig parse(const detail::ConfigFields& fields) {
    const std::string model_type = fields.string("model_type", "");
    const std::string architecture = fields.architecture();
    PhiConfig config;
    if (model_type == "phi-msft" || fields.has("n_embd")) {
      config.naming = PhiNaming::remote_code;
      config.vocab_size = fields.positive("vocab_size", 50304);
      config.hidden_size = fields.positive("n_embd", 1024);
      config.num_hidden_layers = fields.positive("n_layer", 20);
      config.num_attention_heads = fields.positive("n_head", 16);
      config.num_key_value_heads = fields.has("n_head_kv") ? fields.positive("n_head_kv") : config.num_attention_heads;
      config.intermediate_size = fields.has("n_inner") ? fields.positive("n_inner") : 4 * config.hidden_size;
      config.partial_rotary_factor = static_cast<double>(fields.positive("rotary_dim", 32)) / config.head_dim();
      config.layer_norm_eps = fields.number("layer_norm_epsilon", 1e-5);
      config.max_position_embeddings = fields.positive("n_positions", 2048);
      check_activation(fields, "activation_function");
    } else {
      check(model_type == "phi" || architecture == "PhiForCausalLM", "UnsupportedArchitecture",
            "{}: model_type \"{}\" / architectures [\"{}\"] is not a Phi model (expected model_type \"phi\" or "
            "\"phi-msft\", architecture PhiForCausalLM)",
            fields.source(), model_type, architecture);
      config.vocab_size = fields.positive("vocab_size", config.vocab_size);
      config.hidden_size = fields.positive("hidden_size", config.hidden_size);
      config.intermediate_size = fields.positive("intermediate_size", config.intermediate_size);
      config.num_hidden_layers = fields.positive("num_hidden_layers", config.num_hidden_layers);
      config.num_attention_heads = fields.positive("num_attention_heads", config.num_attention_heads);
      config.num_key_value_heads = fields.positive("num_key_value_heads", config.num_attention_heads);
      config.partial_rotary_factor = fields.number("partial_rotary_factor", config.partial_rotary_factor);
      config.rope_theta = fields.number("rope_theta", config.rope_theta);
      // transformers 5 writes the rotary fields into one "rope_parameters" object instead.
      if (const auto rope = fields.object("rope_parameters")) {
        config.partial_rotary_factor = rope->number("partial_rotary_factor", config.partial_rotary_factor);
        config.rope_theta = rope->number("rope_theta", config.rope_theta);
        const std::string type = rope->string("rope_type", "default");
        check(type == "default", "UnsupportedArchitecture",
              "{}: rope_type is \"{}\"; qlora's Phi implements the default rotary embedding only", rope->source(), type);
      }
      config.layer_norm_eps = fields.number("layer_norm_eps", config.layer_norm_eps);
      config.max_position_embeddings = fields.positive("max_position_embeddings", config.max_position_embeddings);
      check_activation(fields, "hidden_act");
      check(!fields.boolean("qk_layernorm", false), "UnsupportedArchitecture",
            "{}: qk_layernorm is true; qlora's Phi has no q/k LayerNorms", fields.source());
      check(!fields.has("rope_scaling"), "UnsupportedArchitecture",
            "{}: rope_scaling is set; qlora's Phi implements plain rotary embeddings only", fields.source());
    }
    config.resid_pdrop = fields.number("resid_pdrop", 0.0);
    config.embd_pdrop = fields.number("embd_pdrop", 0.0);
    // Dropout on the attention probabilities is not implemented (Phi-1, 1.5 and 2 ship 0.0): refused
    // rather than silently trained without.
    check(fields.number("attention_dropout", 0.0) == 0.0, "UnsupportedArchitecture",
          "{}: attention_dropout is {}; qlora's attention has no dropout on its probabilities (set it to 0.0)",
          fields.source(), fields.number("attention_dropout", 0.0));
    config.bos_token_id = fields.integer("bos_token_id", config.bos_token_id);
    config.eos_token_id = fields.integer("eos_token_id", config.eos_token_id);
    check(!fields.boolean("tie_word_embeddings", false), "UnsupportedArchitecture",
          "{}: tie_word_embeddings is true; Phi's lm_head is its own weight", fields.source());
    config.validate(fields.source());
    return config;
  }

  void validate(std::string_view source) const {
    check(hidden_size % num_attention_heads == 0, "InvalidModelConfig",
          "{}: hidden_size {} is not a multiple of num_attention_heads {}", source, hidden_size, num_attention_heads);
    check(num_attention_heads % num_key_value_heads == 0, "InvalidModelConfig",
          "{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", source, num_attention_heads,
          num_key_value_heads);
    check(partial_rotary_factor > 0 && partial_rotary_factor <= 1 && rotary_dim() % 2 == 0, "InvalidModelConfig",
          "{}: partial_rotary_factor {} gives {} rotary dims of head_dim {}; expected an even number in (0, head_dim]",
          source, partial_rotary_factor, rotary_dim(), head_dim());
    check(layer_norm_eps > 0 && rope_theta > 0, "InvalidModelConfig",
          "{}: layer_norm_eps ({}) and rope_theta ({}) must be positive", source, layer_norm_eps, rope_theta);
    for (const double p : {resid_pdrop, embd_pdrop}) {
      check(p >= 0 && p < 1, "InvalidModelConfig", "{}: dropout probability {} is outside [0, 1)", source, p);
    }
  }

 private:
  static void check_activation(const detail::ConfigFields& fields, std::string_view key) {
    const std::string activation = fields.string(key, "gelu_new");
    check(activation == "gelu_new", "UnsupportedArchitecture",
          "{}: {} is \"{}\"; qlora's Phi implements gelu_new (phi-1, phi-1.5 and phi-2 use it)", fields.source(), key,
          activation);
  }
};

}  // namespace qlora
