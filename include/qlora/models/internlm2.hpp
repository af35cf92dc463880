// InternLM2: InternLM2ForCausalLM (internlm/internlm2_5-7b-chat's remote
// code) as a CausalLm policy.
//
// One layer is a pre-norm Llama-style block with RMSNorm and SwiGLU:
//
//   q, k, v = split(wqkv(RMSNorm_attention(h)))       (one fused projection)
//   h1      = h + wo(Attention(rope(q), rope(k), v))   (GQA: kv_heads ≤ heads)
//   h'      = h1 + w2(silu(w1 u) · w3 u),  u = RMSNorm_ffn(h1)
//
// then the final RMSNorm (`model.norm`) and `output` (no bias).
//
// wqkv is kept fused, as the checkpoint stores it (and as bitsandbytes
// quantizes it: double quantization's offset is a mean over the whole
// tensor) and as PEFT adapts it (one lora_A [r, H], one lora_B whose rows
// follow wqkv's). Its rows are grouped per KV head (design note §5.3):
// for each group g, `group_size` query heads, then one key head, then one
// value head, each head_dim rows — split_wqkv / join_wqkv map between that
// layout and q [T, heads, d], k and v [T, kv_heads, d].
//
// Rotary covers the whole head, theta from the config, with dynamic NTK
// scaling (rope_scaling "dynamic") once max(position_ids) + 1 exceeds
// max_position_embeddings.
#pragma once

#include <qlora/models/causal_lm.hpp>
#include <qlora/models/internlm2_config.hpp>
#include <qlora/models/kv_cache.hpp>
#include <qlora/nn/activations.hpp>
#include <qlora/nn/attention.hpp>
#include <qlora/nn/rms_norm.hpp>
#include <qlora/nn/rotary.hpp>

#include <array>
#include <cmath>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <utility>

namespace qlora {

namespace detail {

/// Copies between wqkv's interleaved rows [T, kv_heads · (group + 2) · d] and
/// separate q [T, kv_heads · group · d], k and v [T, kv_heads · d]: `to_fused`
/// false splits, true joins (the backward direction).
inline void shuffle_wqkv(float* fused, float* q, float* k, float* v, std::int64_t tokens, int kv_heads, int group,
                         int head_dim, bool to_fused) {
  const std::size_t head_bytes = static_cast<std::size_t>(head_dim) * sizeof(float);
  const std::int64_t fused_width = std::int64_t{kv_heads} * (group + 2) * head_dim;
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (int g = 0; g < kv_heads; ++g) {
      float* block = fused + t * fused_width + std::int64_t{g} * (group + 2) * head_dim;
      float* parts[] = {q + (t * kv_heads + g) * std::int64_t{group} * head_dim, k + (t * kv_heads + g) * head_dim,
                        v + (t * kv_heads + g) * head_dim};
      for (int j = 0; j < group + 2; ++j) {
        float* separate = j < group ? parts[0] + std::int64_t{j} * head_dim : parts[j - group + 1];
        float* in_fused = block + std::int64_t{j} * head_dim;
        if (to_fused) {
          std::memcpy(in_fused, separate, head_bytes);
        } else {
          std::memcpy(separate, in_fused, head_bytes);
        }
      }
    }
  }
}

}  // namespace detail

struct InternLM2Architecture {
  using Config = InternLM2Config;
  static constexpr std::string_view name = "InternLM2";
  static constexpr std::string_view embed_path = "model.tok_embeddings";
  static constexpr std::string_view lm_head_path = "output";

  template <class Linear>
  struct Layer {
    std::string prefix;  ///< "model.layers.{i}"
    Tensor attention_norm, ffn_norm;
    std::optional<Linear> wqkv, wo, w1, w2, w3;
    std::optional<RotaryEmbedding> rotary;

    std::array<Linear*, 5> linears() { return {&*wqkv, &*wo, &*w1, &*w2, &*w3}; }
    [[nodiscard]] std::array<std::pair<std::string, const Linear*>, 5> named_linears() const {
      return {{{prefix + ".attention.wqkv", &*wqkv}, {prefix + ".attention.wo", &*wo},
               {prefix + ".feed_forward.w1", &*w1}, {prefix + ".feed_forward.w2", &*w2},
               {prefix + ".feed_forward.w3", &*w3}}};
    }
  };

  template <class Linear>
  struct LayerState {
    Tensor input;  ///< h, F32 [T, H]: all that is kept under gradient checkpointing
    NormStatistics attention_norm, ffn_norm;
    std::optional<LoraActivations> wqkv, wo, w1, w2, w3;
    Tensor query, key, value, context;  ///< F32 [T, heads · d] (q, k after rotary; k, v [T, kv_heads · d])
    AttentionSaved attention;
    Tensor middle;     ///< h1 = h + attention output, the ffn_norm's input
    Tensor gate, up;   ///< w1 u and w3 u, F32 [T, intermediate]
  };

  static Config read_config(const std::filesystem::path& folder) { return InternLM2Config::from_folder(folder); }
  static int layer_count(const Config& config) { return config.num_hidden_layers; }
  static void set_vocab_size(Config& config, std::int64_t size) { config.vocab_size = static_cast<int>(size); }

  static CausalLmWeights load_weights(const Config& config, CheckpointTensors& tensors) {
    const std::int64_t h = config.hidden_size, v = config.vocab_size;
    return {.embed_tokens = tensors.dense("model.tok_embeddings.weight", Shape{v, h}),
            .final_norm_weight = tensors.dense("model.norm.weight", Shape{h}),
            .final_norm_bias = {},
            .lm_head_weight = tensors.dense("output.weight", Shape{v, h}),
            .lm_head_bias = {}};
  }

  template <class Linear, QuantPolicy Quant, FloatStorage Compute>
  static Layer<Linear> load_layer(const Config& config, int index, CheckpointTensors& tensors,
                                  const ModelOptions& options) {
    const std::int64_t h = config.hidden_size, inner = config.intermediate_size;
    const std::int64_t fused = std::int64_t{config.num_key_value_heads} * (config.group_size() + 2) * config.head_dim();
    Layer<Linear> layer;
    layer.prefix = fmt::format("model.layers.{}", index);
    layer.attention_norm = tensors.dense(layer.prefix + ".attention_norm.weight", Shape{h});
    layer.ffn_norm = tensors.dense(layer.prefix + ".ffn_norm.weight", Shape{h});
    const auto linear = [&](const std::string& path, std::int64_t out, std::int64_t in, std::uint64_t site) {
      auto base = tensors.linear<Quant, Compute>(path + ".weight", out, in, options.quantize);
      const Tensor bias = config.bias ? tensors.dense(path + ".bias", Shape{out}) : Tensor{};
      return Linear(path, std::move(base), config.bias ? bias.view() : TensorView{}, options.lora,
                    {.init_seed = options.seed,
                     .init_stream = LayerContext::init_stream(static_cast<std::size_t>(index), site),
                     .threads = options.threads});
    };
    layer.wqkv.emplace(linear(layer.prefix + ".attention.wqkv", fused, h, 0));
    layer.wo.emplace(linear(layer.prefix + ".attention.wo", h, h, 1));
    layer.w1.emplace(linear(layer.prefix + ".feed_forward.w1", inner, h, 2));
    layer.w2.emplace(linear(layer.prefix + ".feed_forward.w2", h, inner, 3));
    layer.w3.emplace(linear(layer.prefix + ".feed_forward.w3", inner, h, 4));
    layer.rotary.emplace(RotaryConfig{.head_dim = config.head_dim(), .rotary_dim = config.head_dim(),
                                      .theta = config.rope_theta, .dynamic_ntk_factor = config.dynamic_ntk_factor,
                                      .max_position_embeddings = config.max_position_embeddings});
    return layer;
  }

  /// InternLM2 has no dropout on the embedding output.
  static double embedding_dropout(const Config&) { return 0; }

  static NormStatistics final_norm_forward(const Config& config, const CausalLmWeights& weights, const TensorView& h,
                                           const TensorView& u, unsigned threads) {
    return rms_norm_forward(h, weights.final_norm_weight.view(), static_cast<float>(config.rms_norm_eps), u, threads);
  }
  static void final_norm_backward(const Config&, const CausalLmWeights& weights, const TensorView& h,
                                  const NormStatistics& stats, const TensorView& du, const TensorView& dh,
                                  unsigned threads) {
    rms_norm_backward(h, weights.final_norm_weight.view(), stats, du, dh, {}, threads);
  }

  template <class Linear>
  static Tensor layer_forward(const Config& config, const Layer<Linear>& layer, const TokenBatch& batch,
                              const LayerContext& context, LayerState<Linear>& state, bool keep) {
    const std::int64_t tokens = batch.tokens();
    LayerState<Linear>* saved = context.step.has_value() && keep ? &state : nullptr;
    Tensor u(DType::F32, state.input.shape());
    state.attention_norm = rms_norm_forward(state.input.view(), layer.attention_norm.view(),
                                            static_cast<float>(config.rms_norm_eps), u.view(), context.threads);
    QueryKeyValue qkv = query_key_value(config, layer, u, batch.position_ids, batch.rope_length(), context, saved);
    Tensor context_values(DType::F32, heads(config, tokens, config.num_attention_heads));
    AttentionSaved attention = causal_attention_forward(qkv.query.view(), qkv.key.view(), qkv.value.view(),
                                                        batch.cu_seqlens, attention_scale(config),
                                                        context_values.view(), context.threads);
    Tensor out = block_output(config, layer, state.input, context_values, context, saved);
    if (saved != nullptr) {
      state.query = std::move(qkv.query);
      state.key = std::move(qkv.key);
      state.value = std::move(qkv.value);
      state.context = std::move(context_values);
      state.attention = std::move(attention);
    }
    return out;
  }

  /// Generation: one layer's forward for the newest tokens h [n, H] at
  /// `positions` (after the cached ones); their keys and values join `cache`.
  template <class Linear>
  static Tensor layer_decode(const Config& config, const Layer<Linear>& layer, const Tensor& h,
                             std::span<const std::int32_t> positions, KvCache::Slot cache,
                             const LayerContext& context) {
    const std::int64_t tokens = h.shape()[0];
    Tensor u(DType::F32, h.shape());
    (void)rms_norm_forward(h.view(), layer.attention_norm.view(), static_cast<float>(config.rms_norm_eps), u.view(),
                           context.threads);
    // The row's length, for dynamic NTK, is max(position) + 1, as InternLM2's code takes it.
    const QueryKeyValue qkv =
        query_key_value<Linear>(config, layer, u, positions, std::int64_t{positions.back()} + 1, context, nullptr);
    const KvCache::Rows cached = cache.append(qkv.key.view(), qkv.value.view());
    Tensor context_values(DType::F32, heads(config, tokens, config.num_attention_heads));
    cached_attention_forward(qkv.query.view(), cached.key, cached.value, attention_scale(config), context_values.view(),
                             context.threads);
    return block_output<Linear>(config, layer, h, context_values, context, nullptr);
  }

  template <class Linear>
  static Tensor layer_backward(const Config& config, Layer<Linear>& layer, const TokenBatch& batch,
                               const LayerContext& context, LayerState<Linear>& state, Tensor dh) {
    const std::int64_t tokens = batch.tokens();
    const unsigned threads = context.threads;
    // Feed-forward block: w2 ← swiglu ← w1, w3 ← ffn_norm; plus the residual.
    const Tensor d_activated = layer.w2->backward_f32(state.w2, dh.view());
    Tensor d_gate(DType::F32, state.gate.shape()), d_up(DType::F32, state.up.shape());
    swiglu_backward(state.gate.view(), state.up.view(), d_activated.view(), d_gate.view(), d_up.view(), threads);
    Tensor du2 = layer.w1->backward_f32(state.w1, d_gate.view());
    detail::add_into(du2, layer.w3->backward_f32(state.w3, d_up.view()));
    Tensor d_middle(DType::F32, dh.shape());
    rms_norm_backward(state.middle.view(), layer.ffn_norm.view(), state.ffn_norm, du2.view(), d_middle.view(), {},
                      threads);
    detail::add_into(d_middle, dh);

    // Attention block: wo ← attention ← rotary ← wqkv ← attention_norm; plus the residual.
    const Tensor d_context = layer.wo->backward_f32(state.wo, d_middle.view());
    const Shape q_heads = heads(config, tokens, config.num_attention_heads);
    const Shape kv_heads = heads(config, tokens, config.num_key_value_heads);
    Tensor dq(DType::F32, q_heads), dk(DType::F32, kv_heads), dv(DType::F32, kv_heads);
    causal_attention_backward(state.query.view(), state.key.view(), state.value.view(), state.context.view(),
                              state.attention, batch.cu_seqlens, attention_scale(config),
                              detail::reshaped(d_context, q_heads), dq.view(), dk.view(), dv.view(), threads);
    layer.rotary->apply_backward(dq.view(), batch.position_ids, batch.rope_length(), threads);
    layer.rotary->apply_backward(dk.view(), batch.position_ids, batch.rope_length(), threads);
    Tensor d_qkv(DType::F32, Shape{tokens, layer.wqkv->out_features()});
    detail::shuffle_wqkv(d_qkv.span<float>().data(), dq.span<float>().data(), dk.span<float>().data(),
                         dv.span<float>().data(), tokens, config.num_key_value_heads, config.group_size(),
                         config.head_dim(), /*to_fused=*/true);
    const Tensor du = layer.wqkv->backward_f32(state.wqkv, d_qkv.view());
    Tensor dh_in(DType::F32, dh.shape());
    rms_norm_backward(state.input.view(), layer.attention_norm.view(), state.attention_norm, du.view(), dh_in.view(),
                      {}, threads);
    detail::add_into(dh_in, d_middle);
    return dh_in;
  }

 private:
  struct QueryKeyValue {
    Tensor query, key, value;  ///< F32 [T, heads, d] / [T, kv_heads, d]; q and k rotated
  };

  /// wqkv of the normed input u, split into heads and rotated. With `saved`, a
  /// training forward keeping wqkv's activations.
  template <class Linear>
  static QueryKeyValue query_key_value(const Config& config, const Layer<Linear>& layer, const Tensor& u,
                                       std::span<const std::int32_t> positions, std::int64_t rope_length,
                                       const LayerContext& context, LayerState<Linear>* saved) {
    const std::int64_t tokens = u.shape()[0];
    Tensor qkv = layer.wqkv->forward_f32(u.view(), saved ? &saved->wqkv : nullptr, context.lora_key(0));
    QueryKeyValue out{Tensor(DType::F32, heads(config, tokens, config.num_attention_heads)),
                      Tensor(DType::F32, heads(config, tokens, config.num_key_value_heads)),
                      Tensor(DType::F32, heads(config, tokens, config.num_key_value_heads))};
    detail::shuffle_wqkv(qkv.span<float>().data(), out.query.span<float>().data(),
                         out.key.span<float>().data(), out.value.span<float>().data(), tokens,
                         config.num_key_value_heads, config.group_size(), config.head_dim(), /*to_fused=*/false);
    layer.rotary->apply(out.query.view(), positions, rope_length, context.threads);
    layer.rotary->apply(out.key.view(), positions, rope_length, context.threads);
    return out;
  }

  /// h + wo(attention context), then the feed-forward block with its residual.
  template <class Linear>
  static Tensor block_output(const Config& config, const Layer<Linear>& layer, const Tensor& h,
                             const Tensor& context_values, const LayerContext& context, LayerState<Linear>* saved) {
    const std::int64_t tokens = h.shape()[0];
    const Tensor attention_out = layer.wo->forward_f32(detail::reshaped(context_values, Shape{tokens, config.hidden_size}),
                                                       saved ? &saved->wo : nullptr, context.lora_key(1));
    Tensor middle(DType::F32, h.shape());
    add(h, attention_out, middle);
    Tensor u2(DType::F32, middle.shape());
    NormStatistics ffn_norm = rms_norm_forward(middle.view(), layer.ffn_norm.view(),
                                                     static_cast<float>(config.rms_norm_eps), u2.view(), context.threads);
    Tensor gate = layer.w1->forward_f32(u2.view(), saved ? &saved->w1 : nullptr, context.lora_key(2));
    Tensor up = layer.w3->forward_f32(u2.view(), saved ? &saved->w3 : nullptr, context.lora_key(4));
    Tensor activated(DType::F32, gate.shape());
    swiglu_forward(gate.view(), up.view(), activated.view(), context.threads);
    const Tensor ffn_out = layer.w2->forward_f32(activated.view(), saved ? &saved->w2 : nullptr, context.lora_key(3));
    Tensor out(DType::F32, middle.shape());
    add(middle, ffn_out, out);
    if (saved != nullptr) {
      saved->ffn_norm = std::move(ffn_norm);
      saved->middle = std::move(middle);
      saved->gate = std::move(gate);
      saved->up = std::move(up);
    }
    return out;
  }

  static Shape heads(const Config& config, std::int64_t tokens, int count) {
    return Shape{tokens, count, config.head_dim()};
  }
  static float attention_scale(const Config& config) {
    return static_cast<float>(1.0 / std::sqrt(static_cast<double>(config.head_dim())));
  }
  static void add(const Tensor& a, const Tensor& b, Tensor& sum) {
    const auto x = a.span<const float>(), y = b.span<const float>();
    const auto out = sum.span<float>();
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = x[i] + y[i];
  }
};

template <QuantPolicy Quant = NF4, FloatStorage Compute = bf16>
using InternLM2 = CausalLm<InternLM2Architecture, Quant, Compute>;

}  // namespace qlora
