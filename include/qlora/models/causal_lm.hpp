// CausalLm<Architecture, Quant, Compute>: a decoder-only causal language
// model as QLoRA trains it — embedding, N layers, a final norm, lm_head and
// the causal-LM loss — with the per-layer maths supplied by an Architecture
// policy (models/phi.hpp, models/internlm2.hpp), in the manner of CUTLASS's
// small policy structs. Everything the architectures share lives here once:
//
//   * loading: config, then every tensor from the checkpoint by the
//     architecture's names, then a check that nothing was left unexplained;
//   * generation: decode, token by token through a KvCache (each
//     architecture's layer_decode);
//   * training: forward through the layers keeping what backward needs (or,
//     with gradient checkpointing, only each layer's input, recomputing the
//     layer in backward), the chunked lm_head cross-entropy with transformers'
//     label shift, backward layer by layer (llm.c's explicit style);
//   * the trainable tensors (LoRA factors, modules_to_save embedding and
//     lm_head in fp32, as PEFT's copies are), their PEFT adapter form, and
//     transformers' resize_token_embeddings.
//
// Activations between layers are fp32; the linears take and give Compute.
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/lora/adapter_binding.hpp>
#include <qlora/lora/dropout.hpp>
#include <qlora/lora/lora_config.hpp>
#include <qlora/lora/peft_adapter.hpp>
#include <qlora/models/checkpoint_tensors.hpp>
#include <qlora/models/kv_cache.hpp>
#include <qlora/models/linear_module.hpp>
#include <qlora/models/token_batch.hpp>
#include <qlora/models/trainable_parameter.hpp>
#include <qlora/models/vocabulary_resize.hpp>
#include <qlora/nn/cross_entropy.hpp>
#include <qlora/nn/embedding.hpp>
#include <qlora/nn/layer_norm.hpp>
#include <qlora/nn/lm_head.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace qlora {

struct ModelOptions {
  LoraConfig lora;               ///< targets, rank, alpha, dropout, modules_to_save
  Quantize4bitOptions quantize;  ///< how float checkpoints are quantized on load (blocksize, double quant)
  bool gradient_checkpointing = false;
  std::uint64_t seed = 0;        ///< LoRA init and every dropout mask derive from it
  std::int64_t loss_chunk_tokens = 128;
  unsigned threads = default_thread_count();
};

/// Where a layer runs: which layer, which step (training) and how its dropout
/// masks are keyed — one Philox stream per (step, layer, site), so a
/// recomputation under gradient checkpointing draws the same masks.
struct LayerContext {
  std::size_t layer = 0;
  std::size_t layer_count = 1;
  std::optional<std::uint64_t> step;  ///< set when training
  std::uint64_t seed = 0;
  unsigned threads = 1;

  static constexpr std::uint64_t sites_per_layer = 16;
  /// The embedding output's dropout (Phi's embd_pdrop) draws from layer 0's last site.
  static constexpr std::uint64_t embedding_dropout_site = sites_per_layer - 1;
  /// The Philox stream that draws the LoRA A of `site` in layer `layer`. The
  /// top bit keeps it apart from every dropout stream (lora_key: step-major
  /// counts that stay far below 2^63), so that step 0's dropout masks are not
  /// the bits that drew A.
  static constexpr std::uint64_t init_stream(std::size_t layer, std::uint64_t site) {
    return (std::uint64_t{1} << 63) | (static_cast<std::uint64_t>(layer) * sites_per_layer + site);
  }
  [[nodiscard]] std::optional<DropoutKey> lora_key(std::uint64_t site) const {
    if (!step) return std::nullopt;
    return DropoutKey{seed, (*step * layer_count + layer) * sites_per_layer + site};
  }
  /// The mask of a dropout with probability p at `site` (inactive at inference or p = 0).
  [[nodiscard]] DropoutMask mask(std::uint64_t site, double p) const {
    if (!step || p == 0) return {};
    return {*lora_key(site), static_cast<float>(p)};
  }
};

/// The tensors around the layers: embedding, final norm and output head
/// (every one F32; bias tensors empty where the architecture has none).
struct CausalLmWeights {
  Tensor embed_tokens;          ///< [V, H]
  Tensor final_norm_weight;     ///< [H]
  Tensor final_norm_bias;       ///< [H] or empty
  Tensor lm_head_weight;        ///< [V, H]
  Tensor lm_head_bias;          ///< [V] or empty
};

namespace detail {
/// sum += term, element-wise (F32 tensors of one shape).
inline void add_into(Tensor& sum, const Tensor& term) {
  const auto destination = sum.span<float>();
  const auto source = term.span<const float>();
  for (std::size_t i = 0; i < destination.size(); ++i) destination[i] += source[i];
}
/// A [tokens, heads, head_dim] view of the F32 [tokens, heads · head_dim] tensor `t` (or back).
inline TensorView reshaped(const Tensor& t, Shape shape) {
  check(shape.numel() == t.numel(), "ShapeMismatch", "reshape of {} to {}", t.shape().to_string(), shape.to_string());
  return TensorView(t.view().raw_data(), DType::F32, shape);
}
/// t · mask (a dropout's forward, or its backward on the gradient), F32.
/// Each element draws its own Philox block: worth spreading over threads.
inline Tensor masked(const Tensor& t, const DropoutMask& mask, unsigned threads) {
  Tensor out(DType::F32, t.shape());
  const auto source = t.span<const float>();
  const auto destination = out.span<float>();
  parallel_for(static_cast<std::int64_t>(source.size()), std::int64_t{1} << 14, [&](std::int64_t i0, std::int64_t i1) {
    for (std::int64_t i = i0; i < i1; ++i) {
      const auto e = static_cast<std::size_t>(i);
      destination[e] = source[e] * mask.factor(static_cast<std::uint64_t>(i));
    }
  }, threads);
  return out;
}
}  // namespace detail

template <class Architecture, QuantPolicy Quant = NF4, FloatStorage Compute = bf16>
class CausalLm {
 public:
  using Config = typename Architecture::Config;
  using Linear = LinearModule<Quant, Compute>;
  using Layer = typename Architecture::template Layer<Linear>;
  using LayerState = typename Architecture::template LayerState<Linear>;

  /// Loads a Hugging Face folder (config.json + safetensors, single or
  /// sharded; float weights quantized on load, or bitsandbytes 4-bit as
  /// stored). Errors name the folder and the tensor (CheckpointTensors).
  static CausalLm load(const std::filesystem::path& folder, const ModelOptions& options) {
    try {
      options.lora.validate();
      CausalLm model(Architecture::read_config(folder), options);
      CheckpointTensors tensors(folder);
      model.weights_ = Architecture::load_weights(model.config_, tensors);
      for (int i = 0; i < Architecture::layer_count(model.config_); ++i) {
        model.layers_.push_back(Architecture::template load_layer<Linear, Quant, Compute>(model.config_, i, tensors, options));
      }
      tensors.expect_all_used();
      model.check_lora_targets();
      model.allocate_gradients();
      return model;
    } catch (const Error& e) {
      throw e.with_context(fmt::format("while loading the {} model in {}", Architecture::name, folder.string()));
    }
  }

  [[nodiscard]] const Config& config() const noexcept { return config_; }
  [[nodiscard]] std::int64_t vocab_size() const noexcept { return weights_.embed_tokens.shape()[0]; }
  [[nodiscard]] std::int64_t hidden_size() const noexcept { return weights_.embed_tokens.shape()[1]; }

  /// Forward and backward of one micro-batch: accumulates into the gradients
  /// grad_scale · ∂(Σ token losses)/∂θ and returns the loss sums. `step`
  /// keys the dropout masks (give each micro-batch its own).
  CrossEntropySums forward_backward(const TokenBatch& batch, float grad_scale, std::uint64_t step) {
    batch.validate();
    check(!batch.labels.empty(), "InvalidBatch", "forward_backward needs labels");
    const bool keep = !options_.gradient_checkpointing;
    const DropoutMask embedding_drop =
        context(0, step).mask(LayerContext::embedding_dropout_site, Architecture::embedding_dropout(config_));
    Tensor h = embed(batch.input_ids);
    if (embedding_drop.active()) h = detail::masked(h, embedding_drop, threads());
    std::vector<LayerState> states(layers_.size());
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      states[i].input = std::move(h);
      h = Architecture::layer_forward(config_, layers_[i], batch, context(i, step), states[i], keep);
    }
    Tensor u(DType::F32, h.shape());
    const NormStatistics final_stats = Architecture::final_norm_forward(config_, weights_, h.view(), u.view(), threads());
    Tensor du(DType::F32, u.shape());
    const CrossEntropySums sums = lm_head_cross_entropy(
        u.view(), weights_.lm_head_weight.view(), weights_.lm_head_bias.view(),
        shifted_targets(batch.labels, batch.row_length),
        {.chunk_tokens = options_.loss_chunk_tokens, .grad_scale = grad_scale, .threads = threads()}, du.view(),
        train_lm_head_ ? grad_lm_head_weight_.view() : TensorView{},
        train_lm_head_ ? grad_lm_head_bias_.view() : TensorView{});
    Tensor dh(DType::F32, h.shape());
    Architecture::final_norm_backward(config_, weights_, h.view(), final_stats, du.view(), dh.view(), threads());
    for (std::size_t i = layers_.size(); i-- > 0;) {
      if (!keep) (void)Architecture::layer_forward(config_, layers_[i], batch, context(i, step), states[i], true);
      dh = Architecture::layer_backward(config_, layers_[i], batch, context(i, step), states[i], std::move(dh));
      states[i] = {};
    }
    if (train_embed_tokens_) {
      if (embedding_drop.active()) dh = detail::masked(dh, embedding_drop, threads());
      embedding_backward(batch.input_ids, dh.view(), grad_embed_tokens_.view(), threads());
    }
    return sums;
  }

  /// The loss sums of a batch, without gradients (eval).
  [[nodiscard]] CrossEntropySums evaluate(const TokenBatch& batch) const {
    batch.validate();
    check(!batch.labels.empty(), "InvalidBatch", "evaluate needs labels");
    const Tensor u = final_hidden(batch);
    return lm_head_cross_entropy(u.view(), weights_.lm_head_weight.view(), weights_.lm_head_bias.view(),
                                 shifted_targets(batch.labels, batch.row_length),
                                 {.chunk_tokens = options_.loss_chunk_tokens, .threads = threads()}, {}, {}, {});
  }

  /// Logits F32 [tokens, vocab] of every token (inference: no dropout).
  [[nodiscard]] Tensor logits(const TokenBatch& batch) const {
    batch.validate();
    const Tensor u = final_hidden(batch);
    Tensor out(DType::F32, Shape{batch.tokens(), vocab_size()});
    lm_head_logits(u.view(), weights_.lm_head_weight.view(), weights_.lm_head_bias.view(), out.view(), threads());
    return out;
  }

  /// Generation: logits F32 [n, vocab] of the n ≥ 1 `new_tokens`, which follow
  /// the cache's tokens (positions cache.size(), ...; a prompt is one call with
  /// all its tokens, then one call per generated token). Appends their keys and
  /// values to `cache` through Architecture::layer_decode; a call that throws
  /// leaves the cache as it was.
  [[nodiscard]] Tensor decode(std::span<const std::int32_t> new_tokens, KvCache& cache) const {
    check(!new_tokens.empty(), "InvalidArgument", "decode needs at least one new token");
    const auto n = static_cast<std::int64_t>(new_tokens.size());
    std::vector<std::int32_t> positions(new_tokens.size());
    std::iota(positions.begin(), positions.end(), static_cast<std::int32_t>(cache.size()));
    Tensor h = embed(new_tokens);
    try {
      for (std::size_t i = 0; i < layers_.size(); ++i) {
        h = Architecture::layer_decode(config_, layers_[i], h, positions, cache.layer(i), context(i, std::nullopt));
      }
      cache.commit(new_tokens);
    } catch (...) {
      cache.truncate(cache.size());  // drops the rows the failed step wrote
      throw;
    }
    Tensor u(DType::F32, h.shape());
    (void)Architecture::final_norm_forward(config_, weights_, h.view(), u.view(), threads());
    Tensor out(DType::F32, Shape{n, vocab_size()});
    lm_head_logits(u.view(), weights_.lm_head_weight.view(), weights_.lm_head_bias.view(), out.view(), threads());
    return out;
  }

  /// Every tensor the optimizer updates, with its gradient, named by its PEFT
  /// file key after "base_model.model.".
  [[nodiscard]] std::vector<TrainableParameter> trainable_parameters() {
    std::vector<TrainableParameter> parameters;
    for_each_lora([&](auto& lora) {
      parameters.push_back({lora.path() + ".lora_A.weight", lora.lora_A(), lora.grad_A(), true});
      parameters.push_back({lora.path() + ".lora_B.weight", lora.lora_B(), lora.grad_B(), true});
      if (lora.bias_trainable()) {
        parameters.push_back({detail::lora_bias_key(lora.path()), lora.bias(), lora.grad_bias(), false});
      }
    });
    if (train_embed_tokens_) {
      parameters.push_back({embed_key(), weights_.embed_tokens.view(), grad_embed_tokens_.view(), true});
    }
    if (train_lm_head_) {
      parameters.push_back({lm_head_key(".weight"), weights_.lm_head_weight.view(), grad_lm_head_weight_.view(), true});
      if (has_lm_head_bias()) {
        parameters.push_back({lm_head_key(".bias"), weights_.lm_head_bias.view(), grad_lm_head_bias_.view(), false});
      }
    }
    return parameters;
  }

  void zero_grad() {
    for (const TrainableParameter& parameter : trainable_parameters()) {
      std::ranges::fill(parameter.grad.span<float>(), 0.0f);
    }
  }

  /// The adapter as PEFT saves it: LoRA factors plus every modules_to_save tensor.
  [[nodiscard]] PeftAdapter adapter(std::string base_model_name_or_path = {}) {
    PeftAdapter adapter;
    adapter.config.lora = options_.lora;
    adapter.config.base_model_name_or_path = std::move(base_model_name_or_path);
    for_each_lora([&](auto& lora) {
      adapter.modules.push_back(adapter_weights_of(lora));
      if (auto bias = trained_bias_of(lora)) adapter.saved_tensors.push_back(std::move(*bias));
    });
    for (const auto& [key, tensor] : saved_modules()) adapter.saved_tensors.emplace_back(key, detail::f32_copy(tensor->view()));
    return adapter;
  }

  /// Sets LoRA factors and modules_to_save tensors from a PEFT adapter
  /// (AdapterMismatch naming the file and module when it does not fit).
  void load_adapter(const PeftAdapter& adapter) {
    check_adapter_fits(adapter, module_shapes());
    for_each_lora([&](auto& lora) { load_adapter_weights(lora, adapter); });
    for (const auto& [key, tensor] : adapter.saved_tensors) {
      for (const auto& [own_key, own] : saved_modules()) {
        if (key != own_key) continue;
        check(tensor.shape() == own->shape(), "AdapterMismatch", "{}: `{}` is {}, the model's is {}",
              detail::adapter_name(adapter), key, tensor.shape().to_string(), own->shape().to_string());
        std::ranges::copy(tensor.template span<const float>(), own->template span<float>().begin());
      }
    }
  }

  /// transformers' resize_token_embeddings(new_size) with mean_resizing (see
  /// vocabulary_resize.hpp): embedding, lm_head and its bias.
  void resize_token_embeddings(std::int64_t new_size) {
    for (Tensor* table : {&weights_.embed_tokens, &weights_.lm_head_weight}) resize_rows(*table, new_size);
    if (has_lm_head_bias()) resize_rows(weights_.lm_head_bias, new_size);
    Architecture::set_vocab_size(config_, new_size);
    allocate_gradients();
  }

  /// Shapes of every module a PEFT adapter may name (for check_adapter_fits).
  [[nodiscard]] std::vector<ModuleShape> module_shapes() const {
    std::vector<ModuleShape> shapes;
    for (const Layer& layer : layers_) {
      for (const auto& [path, linear] : layer.named_linears()) {
        shapes.push_back({path, linear->in_features(), linear->out_features(), linear->has_bias()});
      }
    }
    shapes.push_back({std::string(Architecture::embed_path), hidden_size(), vocab_size(), false});
    shapes.push_back({std::string(Architecture::lm_head_path), hidden_size(), vocab_size(), has_lm_head_bias()});
    return shapes;
  }

  [[nodiscard]] std::vector<Layer>& layers() noexcept { return layers_; }
  [[nodiscard]] const CausalLmWeights& weights() const noexcept { return weights_; }

 private:
  CausalLm(Config config, const ModelOptions& options) : config_(std::move(config)), options_(options) {}

  [[nodiscard]] unsigned threads() const noexcept { return options_.threads; }
  [[nodiscard]] bool has_lm_head_bias() const noexcept { return weights_.lm_head_bias.view().raw_data() != nullptr; }
  [[nodiscard]] static std::string embed_key() { return std::string(Architecture::embed_path) + ".weight"; }
  [[nodiscard]] static std::string lm_head_key(std::string_view suffix) {
    return std::string(Architecture::lm_head_path) + std::string(suffix);
  }
  [[nodiscard]] LayerContext context(std::size_t layer, std::optional<std::uint64_t> step) const {
    return {.layer = layer, .layer_count = layers_.size(), .step = step, .seed = options_.seed, .threads = threads()};
  }

  /// The modules_to_save tensors the model trains, by PEFT key.
  [[nodiscard]] std::vector<std::pair<std::string, Tensor*>> saved_modules() {
    std::vector<std::pair<std::string, Tensor*>> saved;
    if (train_embed_tokens_) saved.emplace_back(embed_key(), &weights_.embed_tokens);
    if (train_lm_head_) {
      saved.emplace_back(lm_head_key(".weight"), &weights_.lm_head_weight);
      if (has_lm_head_bias()) saved.emplace_back(lm_head_key(".bias"), &weights_.lm_head_bias);
    }
    return saved;
  }

  template <class Visit>
  void for_each_lora(Visit&& visit) {
    for (Layer& layer : layers_) {
      for (Linear* linear : layer.linears()) {
        if (auto* lora = linear->lora()) visit(*lora);
      }
    }
  }

  /// As PEFT refuses a target list that matches no module (a LoRA that would
  /// train nothing), and, stricter than PEFT, a modules_to_save entry that
  /// names neither the embedding nor the output head (the only modules qlora
  /// trains in full): a typo, or the other architecture's names, must not
  /// start a run that silently trains less than asked.
  void check_lora_targets() const {
    std::vector<std::string> paths;
    bool any_lora = false;
    for (const Layer& layer : layers_) {
      for (const auto& [path, linear] : layer.named_linears()) {
        paths.push_back(path);
        any_lora = any_lora || linear->lora() != nullptr;
      }
    }
    const LoraConfig& lora = options_.lora;
    const bool asked = lora.target_modules_regex.has_value() || !lora.target_modules.empty();
    const std::string wanted = lora.target_modules_regex ? *lora.target_modules_regex
                                                         : fmt::format("{}", fmt::join(lora.target_modules, ", "));
    check(!asked || any_lora, "NoMatchingTargetModules",
          "target modules [{}] match none of the model's linear layers (the first layer's: {})", wanted,
          fmt::join(std::span(paths).first(paths.size() / std::max<std::size_t>(layers_.size(), 1)), ", "));
    for (const std::string& name : lora.modules_to_save) {
      LoraConfig single;
      single.modules_to_save = {name};
      check(single.is_module_to_save(Architecture::embed_path) || single.is_module_to_save(Architecture::lm_head_path),
            "NoMatchingModulesToSave",
            "modules_to_save \"{}\" is neither the embedding ({}) nor the output head ({}), the modules {} trains in full",
            name, Architecture::embed_path, Architecture::lm_head_path, Architecture::name);
    }
  }

  void allocate_gradients() {
    train_embed_tokens_ = options_.lora.is_module_to_save(Architecture::embed_path);
    train_lm_head_ = options_.lora.is_module_to_save(Architecture::lm_head_path);
    if (train_embed_tokens_) grad_embed_tokens_ = Tensor(DType::F32, weights_.embed_tokens.shape());
    if (train_lm_head_) {
      grad_lm_head_weight_ = Tensor(DType::F32, weights_.lm_head_weight.shape());
      if (has_lm_head_bias()) grad_lm_head_bias_ = Tensor(DType::F32, weights_.lm_head_bias.shape());
    }
  }

  [[nodiscard]] Tensor embed(std::span<const std::int32_t> ids) const {
    Tensor h(DType::F32, Shape{static_cast<std::int64_t>(ids.size()), hidden_size()});
    embedding_forward(weights_.embed_tokens.view(), ids, h.view(), threads());
    return h;
  }

  /// The final norm's output for every token (inference path).
  [[nodiscard]] Tensor final_hidden(const TokenBatch& batch) const {
    Tensor h = embed(batch.input_ids);
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      LayerState state;
      state.input = std::move(h);
      h = Architecture::layer_forward(config_, layers_[i], batch, context(i, std::nullopt), state, false);
    }
    Tensor u(DType::F32, h.shape());
    (void)Architecture::final_norm_forward(config_, weights_, h.view(), u.view(), threads());
    return u;
  }

  Config config_;
  ModelOptions options_;
  CausalLmWeights weights_;
  std::vector<Layer> layers_;
  bool train_embed_tokens_ = false, train_lm_head_ = false;
  Tensor grad_embed_tokens_, grad_lm_head_weight_, grad_lm_head_bias_;
};

}  // namespace qlora
