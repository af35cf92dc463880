// Phi: transformers' PhiForCausalLM (microsoft/phi-2) as a CausalLm policy.
//
// One layer (design note §4.2) is a *parallel* block with one LayerNorm:
//
//   u  = LayerNorm(h)
//   a  = dense(Attention(rope(q_proj u), rope(k_proj u), v_proj u))
//   m  = fc2(gelu_new(fc1 u))
//   h' = h + drop(a) + drop(m)                    (resid_pdrop, two draws)
//
// then final_layernorm and lm_head (with bias). Rotary covers the first
// int(head_dim · partial_rotary_factor) dims of a head (NeoX rotate_half).
// Attention is causal within each segment of TokenBatch::cu_seqlens, so a
// packed row never attends across samples. Generation (layer_decode) runs
// the same pieces on the newest tokens, their attention reading the keys and
// values of the earlier ones from a KvCache.
//
// Checkpoints in transformers' names load, and so do the remote-code ones of
// the Dec-2023 tutorials (transformer.h.{i}.mixer.Wqkv …, design note §4.4):
// the fused Wqkv [Q; K; V] is split by rows into q/k/v_proj on load, so the
// model — and the adapters it writes — always use today's names.
#pragma once

#include <qlora/models/causal_lm.hpp>
#include <qlora/models/kv_cache.hpp>
#include <qlora/models/phi_config.hpp>
#include <qlora/nn/activations.hpp>
#include <qlora/nn/attention.hpp>
#include <qlora/nn/layer_norm.hpp>
#include <qlora/nn/rotary.hpp>

#include <array>
#include <cmath>
#include <optional>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace qlora {

struct PhiArchitecture {
  using Config = PhiConfig;
  static constexpr std::string_view name = "Phi";
  static constexpr std::string_view embed_path = "model.embed_tokens";
  static constexpr std::string_view lm_head_path = "lm_head";

  template <class Linear>
  struct Layer {
    std::string prefix;  ///< "model.layers.{i}"
    Tensor norm_weight, norm_bias;
    std::optional<Linear> q_proj, k_proj, v_proj, dense, fc1, fc2;
    std::optional<RotaryEmbedding> rotary;

    std::array<Linear*, 6> linears() { return {&*q_proj, &*k_proj, &*v_proj, &*dense, &*fc1, &*fc2}; }
    [[nodiscard]] std::array<std::pair<std::string, const Linear*>, 6> named_linears() const {
      return {{{prefix + ".self_attn.q_proj", &*q_proj}, {prefix + ".self_attn.k_proj", &*k_proj},
               {prefix + ".self_attn.v_proj", &*v_proj}, {prefix + ".self_attn.dense", &*dense},
               {prefix + ".mlp.fc1", &*fc1}, {prefix + ".mlp.fc2", &*fc2}}};
    }
  };

  /// What one layer's backward needs from its forward.
  template <class Linear>
  struct LayerState {
    Tensor input;  ///< h, F32 [T, H]: all that is kept under gradient checkpointing
    NormStatistics norm;
    std::optional<LoraActivations> q_proj, k_proj, v_proj, dense, fc1, fc2;
    Tensor query, key, value, context;  ///< F32 [T, heads · head_dim]; q and k after rotary
    AttentionSaved attention;
    Tensor fc1_out;  ///< F32 [T, intermediate], before gelu_new
  };

  static Config read_config(const std::filesystem::path& folder) { return PhiConfig::from_folder(folder); }
  static int layer_count(const Config& config) { return config.num_hidden_layers; }
  static void set_vocab_size(Config& config, std::int64_t size) { config.vocab_size = static_cast<int>(size); }

  static CausalLmWeights load_weights(const Config& config, CheckpointTensors& tensors) {
    const std::int64_t h = config.hidden_size, v = config.vocab_size;
    const bool old_names = config.naming == PhiNaming::remote_code;
    const std::string final_norm = old_names ? "lm_head.ln" : "model.final_layernorm";
    const std::string head = old_names ? "lm_head.linear" : "lm_head";
    return {.embed_tokens = tensors.dense(old_names ? "transformer.embd.wte.weight" : "model.embed_tokens.weight", Shape{v, h}),
            .final_norm_weight = tensors.dense(final_norm + ".weight", Shape{h}),
            .final_norm_bias = tensors.dense(final_norm + ".bias", Shape{h}),
            .lm_head_weight = tensors.dense(head + ".weight", Shape{v, h}),
            .lm_head_bias = tensors.dense(head + ".bias", Shape{v})};
  }

  template <class Linear, QuantPolicy Quant, FloatStorage Compute>
  static Layer<Linear> load_layer(const Config& config, int index, CheckpointTensors& tensors,
                                  const ModelOptions& options) {
    const std::int64_t h = config.hidden_size, inner = config.intermediate_size;
    const std::int64_t kv = std::int64_t{config.num_key_value_heads} * config.head_dim();
    const bool old_names = config.naming == PhiNaming::remote_code;
    Layer<Linear> layer;
    layer.prefix = fmt::format("model.layers.{}", index);
    const std::string stored = old_names ? fmt::format("transformer.h.{}", index) : layer.prefix;
    const std::string norm = old_names ? stored + ".ln" : stored + ".input_layernorm";
    layer.norm_weight = tensors.dense(norm + ".weight", Shape{h});
    layer.norm_bias = tensors.dense(norm + ".bias", Shape{h});
    // Rows [row_begin, row_begin + out) of the stored linear `name` ([full_out, in]) become module `path`.
    const auto linear = [&](const std::string& path, const std::string& name, std::int64_t out, std::int64_t in,
                            std::int64_t row_begin, std::int64_t full_out, std::uint64_t site) {
      auto base = tensors.linear_rows<Quant, Compute>(name + ".weight", full_out, in, row_begin, row_begin + out,
                                                      options.quantize);
      const Tensor bias = tensors.dense_rows(name + ".bias", Shape{full_out}, row_begin, row_begin + out);
      return Linear(path, std::move(base), bias.view(), options.lora,
                    {.init_seed = options.seed,
                     .init_stream = LayerContext::init_stream(static_cast<std::size_t>(index), site),
                     .threads = options.threads});
    };
    const std::string attention = layer.prefix + ".self_attn";
    if (old_names) {
      const std::string wqkv = stored + ".mixer.Wqkv";
      const std::int64_t fused = h + 2 * kv;
      layer.q_proj.emplace(linear(attention + ".q_proj", wqkv, h, h, 0, fused, 0));
      layer.k_proj.emplace(linear(attention + ".k_proj", wqkv, kv, h, h, fused, 1));
      layer.v_proj.emplace(linear(attention + ".v_proj", wqkv, kv, h, h + kv, fused, 2));
      layer.dense.emplace(linear(attention + ".dense", stored + ".mixer.out_proj", h, h, 0, h, 3));
    } else {
      layer.q_proj.emplace(linear(attention + ".q_proj", attention + ".q_proj", h, h, 0, h, 0));
      layer.k_proj.emplace(linear(attention + ".k_proj", attention + ".k_proj", kv, h, 0, kv, 1));
      layer.v_proj.emplace(linear(attention + ".v_proj", attention + ".v_proj", kv, h, 0, kv, 2));
      layer.dense.emplace(linear(attention + ".dense", attention + ".dense", h, h, 0, h, 3));
    }
    layer.fc1.emplace(linear(layer.prefix + ".mlp.fc1", stored + ".mlp.fc1", inner, h, 0, inner, 4));
    layer.fc2.emplace(linear(layer.prefix + ".mlp.fc2", stored + ".mlp.fc2", h, inner, 0, h, 5));
    layer.rotary.emplace(RotaryConfig{.head_dim = config.head_dim(), .rotary_dim = config.rotary_dim(),
                                      .theta = config.rope_theta,
                                      .max_position_embeddings = config.max_position_embeddings});
    return layer;
  }

  /// PhiModel's embed_dropout on the embedding output (training only).
  static double embedding_dropout(const Config& config) { return config.embd_pdrop; }

  static NormStatistics final_norm_forward(const Config& config, const CausalLmWeights& weights, const TensorView& h,
                                           const TensorView& u, unsigned threads) {
    return layer_norm_forward(h, weights.final_norm_weight.view(), weights.final_norm_bias.view(),
                              static_cast<float>(config.layer_norm_eps), u, threads);
  }
  static void final_norm_backward(const Config&, const CausalLmWeights& weights, const TensorView& h,
                                  const NormStatistics& stats, const TensorView& du, const TensorView& dh,
                                  unsigned threads) {
    layer_norm_backward(h, weights.final_norm_weight.view(), stats, du, dh, {}, {}, threads);
  }

  /// Sites of a layer's dropout streams: 0-5 the linears' LoRA dropout, 6 and 7 the residual dropouts.
  static constexpr std::uint64_t attention_residual_site = 6, mlp_residual_site = 7;

  /// One layer's forward from state.input. Training (context.step set) with
  /// `keep` leaves in `state` what layer_backward needs.
  template <class Linear>
  static Tensor layer_forward(const Config& config, const Layer<Linear>& layer, const TokenBatch& batch,
                              const LayerContext& context, LayerState<Linear>& state, bool keep) {
    const bool training = context.step.has_value() && keep;
    LayerState<Linear>* saved = training ? &state : nullptr;
    const Tensor u = input_norm(config, layer, state.input, context, saved);
    QueryKeyValue qkv = query_key_value(config, layer, u, batch.position_ids, batch.rope_length(), context, saved);
    const Shape q_heads = heads(config, batch.tokens(), config.num_attention_heads);
    const Shape kv_heads = heads(config, batch.tokens(), config.num_key_value_heads);
    Tensor context_values(DType::F32, Shape{batch.tokens(), config.hidden_size});
    AttentionSaved attention =
        causal_attention_forward(detail::reshaped(qkv.query, q_heads), detail::reshaped(qkv.key, kv_heads),
                                 detail::reshaped(qkv.value, kv_heads), batch.cu_seqlens, attention_scale(config),
                                 detail::reshaped(context_values, q_heads), context.threads);
    Tensor out = block_output(config, layer, state.input, u, context_values, context, saved);
    if (training) {
      state.query = std::move(qkv.query);
      state.key = std::move(qkv.key);
      state.value = std::move(qkv.value);
      state.context = std::move(context_values);
      state.attention = std::move(attention);
    }
    return out;
  }

  /// One layer's generation step: h F32 [n, H] of the n newest tokens, at
  /// `positions` (consecutive, after the cached ones); their rotated keys and
  /// values join `cache`, and their queries attend to every cached row.
  template <class Linear>
  static Tensor layer_decode(const Config& config, const Layer<Linear>& layer, const Tensor& h,
                             std::span<const std::int32_t> positions, KvCache::Slot cache,
                             const LayerContext& context) {
    const std::int64_t tokens = h.shape()[0];
    const Tensor u = input_norm(config, layer, h, context, nullptr);
    // The row's length, for dynamic NTK, is max(position) + 1, as transformers takes it.
    const QueryKeyValue qkv =
        query_key_value(config, layer, u, positions, std::int64_t{positions.back()} + 1, context, nullptr);
    const Shape q_heads = heads(config, tokens, config.num_attention_heads);
    const Shape kv_heads = heads(config, tokens, config.num_key_value_heads);
    const KvCache::Rows cached = cache.append(detail::reshaped(qkv.key, kv_heads), detail::reshaped(qkv.value, kv_heads));
    Tensor context_values(DType::F32, Shape{tokens, config.hidden_size});
    cached_attention_forward(detail::reshaped(qkv.query, q_heads), cached.key, cached.value, attention_scale(config),
                             detail::reshaped(context_values, q_heads), context.threads);
    return block_output(config, layer, h, u, context_values, context, nullptr);
  }

  /// One layer's backward: dh_out → dh_in.
  template <class Linear>
  static Tensor layer_backward(const Config& config, Layer<Linear>& layer, const TokenBatch& batch,
                               const LayerContext& context, LayerState<Linear>& state, Tensor dh) {
    const std::int64_t tokens = batch.tokens();
    const unsigned threads = context.threads;
    // MLP branch: fc2 ← gelu_new ← fc1.
    const Tensor d_mlp = detail::masked(dh, context.mask(mlp_residual_site, config.resid_pdrop), threads);
    const Tensor d_activated = layer.fc2->backward_f32(state.fc2, d_mlp.view());
    Tensor d_fc1(DType::F32, state.fc1_out.shape());
    gelu_new_backward(state.fc1_out.view(), d_activated.view(), d_fc1.view(), threads);
    Tensor du = layer.fc1->backward_f32(state.fc1, d_fc1.view());

    // Attention branch: dense ← attention ← rotary ← q/k/v.
    const Tensor d_attention = detail::masked(dh, context.mask(attention_residual_site, config.resid_pdrop), threads);
    const Tensor d_context = layer.dense->backward_f32(state.dense, d_attention.view());
    const Shape q_heads = heads(config, tokens, config.num_attention_heads);
    const Shape kv_heads = heads(config, tokens, config.num_key_value_heads);
    Tensor dq(DType::F32, state.query.shape()), dk(DType::F32, state.key.shape()), dv(DType::F32, state.value.shape());
    causal_attention_backward(detail::reshaped(state.query, q_heads), detail::reshaped(state.key, kv_heads),
                              detail::reshaped(state.value, kv_heads), detail::reshaped(state.context, q_heads),
                              state.attention, batch.cu_seqlens, attention_scale(config),
                              detail::reshaped(d_context, q_heads), detail::reshaped(dq, q_heads),
                              detail::reshaped(dk, kv_heads), detail::reshaped(dv, kv_heads), threads);
    layer.rotary->apply_backward(detail::reshaped(dq, q_heads), batch.position_ids, batch.rope_length(), threads);
    layer.rotary->apply_backward(detail::reshaped(dk, kv_heads), batch.position_ids, batch.rope_length(), threads);
    detail::add_into(du, layer.q_proj->backward_f32(state.q_proj, dq.view()));
    detail::add_into(du, layer.k_proj->backward_f32(state.k_proj, dk.view()));
    detail::add_into(du, layer.v_proj->backward_f32(state.v_proj, dv.view()));

    // Through the LayerNorm, plus the residual path.
    Tensor dh_in(DType::F32, dh.shape());
    layer_norm_backward(state.input.view(), layer.norm_weight.view(), state.norm, du.view(), dh_in.view(), {}, {},
                        threads);
    detail::add_into(dh_in, dh);
    return dh_in;
  }

 private:
  /// A layer's saved state (LayerState), nullptr at inference; not deduced, so nullptr binds.
  template <class Linear>
  using Saved = std::type_identity_t<LayerState<Linear>>;

  /// q, k, v F32 [T, heads · head_dim], q and k rotated.
  struct QueryKeyValue {
    Tensor query, key, value;
  };

  /// The layer's LayerNorm of h (its statistics kept in `saved` when training).
  template <class Linear>
  static Tensor input_norm(const Config& config, const Layer<Linear>& layer, const Tensor& h,
                           const LayerContext& context, Saved<Linear>* saved) {
    Tensor u(DType::F32, h.shape());
    NormStatistics stats = layer_norm_forward(h.view(), layer.norm_weight.view(), layer.norm_bias.view(),
                                              static_cast<float>(config.layer_norm_eps), u.view(), context.threads);
    if (saved != nullptr) saved->norm = std::move(stats);
    return u;
  }

  /// q/k/v_proj of u, then rotary on q and k at `positions` of a row of `rope_length` tokens.
  template <class Linear>
  static QueryKeyValue query_key_value(const Config& config, const Layer<Linear>& layer, const Tensor& u,
                                       std::span<const std::int32_t> positions, std::int64_t rope_length,
                                       const LayerContext& context, Saved<Linear>* saved) {
    const std::int64_t tokens = u.shape()[0];
    QueryKeyValue qkv{layer.q_proj->forward_f32(u.view(), activations(saved, &LayerState<Linear>::q_proj), context.lora_key(0)),
                      layer.k_proj->forward_f32(u.view(), activations(saved, &LayerState<Linear>::k_proj), context.lora_key(1)),
                      layer.v_proj->forward_f32(u.view(), activations(saved, &LayerState<Linear>::v_proj), context.lora_key(2))};
    layer.rotary->apply(detail::reshaped(qkv.query, heads(config, tokens, config.num_attention_heads)), positions,
                        rope_length, context.threads);
    layer.rotary->apply(detail::reshaped(qkv.key, heads(config, tokens, config.num_key_value_heads)), positions,
                        rope_length, context.threads);
    return qkv;
  }

  /// h + drop(dense(attention context)) + drop(fc2(gelu_new(fc1 u))): the layer's output
  /// (fc1's output kept in `saved` when training).
  template <class Linear>
  static Tensor block_output(const Config& config, const Layer<Linear>& layer, const Tensor& h, const Tensor& u,
                             const Tensor& context_values, const LayerContext& context, Saved<Linear>* saved) {
    const unsigned threads = context.threads;
    const Tensor attention_out =
        layer.dense->forward_f32(context_values.view(), activations(saved, &LayerState<Linear>::dense), context.lora_key(3));
    Tensor fc1_out = layer.fc1->forward_f32(u.view(), activations(saved, &LayerState<Linear>::fc1), context.lora_key(4));
    Tensor activated(DType::F32, fc1_out.shape());
    gelu_new_forward(fc1_out.view(), activated.view(), threads);
    const Tensor mlp_out =
        layer.fc2->forward_f32(activated.view(), activations(saved, &LayerState<Linear>::fc2), context.lora_key(5));

    Tensor out(DType::F32, h.shape());
    const DropoutMask attention_drop = context.mask(attention_residual_site, config.resid_pdrop);
    const DropoutMask mlp_drop = context.mask(mlp_residual_site, config.resid_pdrop);
    const auto input = h.span<const float>();
    const auto a = attention_out.span<const float>(), m = mlp_out.span<const float>();
    const auto result = out.span<float>();
    parallel_for(static_cast<std::int64_t>(result.size()), 1 << 14, [&](std::int64_t i0, std::int64_t i1) {
      for (std::int64_t i = i0; i < i1; ++i) {
        const auto e = static_cast<std::uint64_t>(i);
        result[i] = input[i] + a[i] * attention_drop.factor(e) + m[i] * mlp_drop.factor(e);
      }
    }, threads);
    if (saved != nullptr) saved->fc1_out = std::move(fc1_out);
    return out;
  }

  /// Where a linear's training forward keeps its activations: `member` of `saved`, or nowhere at inference.
  template <class Linear>
  static std::optional<LoraActivations>* activations(LayerState<Linear>* saved,
                                                     std::optional<LoraActivations> LayerState<Linear>::*member) {
    return saved != nullptr ? &(saved->*member) : nullptr;
  }

  static Shape heads(const Config& config, std::int64_t tokens, int count) {
    return Shape{tokens, count, config.head_dim()};
  }
  static float attention_scale(const Config& config) {
    return static_cast<float>(1.0 / std::sqrt(static_cast<double>(config.head_dim())));
  }
};

template <QuantPolicy Quant = NF4, FloatStorage Compute = bf16>
using Phi = CausalLm<PhiArchitecture, Quant, Compute>;

}  // namespace qlora
