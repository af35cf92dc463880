// merge_adapter: folds a PEFT LoRA adapter into its base checkpoint and writes
// a plain Hugging Face model folder, as the tutorials do before serving the
// fine-tuned model (XTuner's `xtuner convert merge`; the Phi-2 tutorial's
// base reloaded in bf16 + PeftModel.from_pretrained + merge_and_unload +
// save_pretrained).
//
// It works on tensors by name, so it needs no model class:
//   - LoRA module <path>: `<path>.weight` becomes W + scaling·(B·A), computed
//     in fp32 bit for bit as peft's merge on CPU computes it (torch's fp32
//     B·A, times the fp32 scaling, plus W; in-place `bf16 += fp32` also adds
//     in fp32) and rounded once to the output dtype;
//   - tensors saved whole (modules_to_save, trained biases saved as
//     `<module>.base_layer.bias`) replace the base's, cast to the output
//     dtype; an embedding / output layer with another row count means the
//     vocabulary was resized in training: the merged model takes the
//     adapter's size and config.json's vocab_size follows;
//   - every other tensor is copied bit for bit (or converted, when --dtype
//     asks for another dtype);
//   - a bitsandbytes 4-bit base is dequantized exactly as bitsandbytes does
//     (to the dtype it was quantized from), merged, and written in the output
//     dtype, without quantization_config; merging into 4-bit codes would
//     re-quantize and lose the adapter's small updates.
// An adapter of the old remote-code Phi (phi-msft: `transformer.h.{i}.mixer.Wqkv`)
// is converted to today's names first (convert_remote_code_phi_adapter).
//
// The output folder is written beside its final path and renamed into place
// at the end, so a failure never leaves a half-written model behind.
#pragma once

#include <algorithm>
#include <bit>
#include <cctype>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <unistd.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/io/atomic_file.hpp>
#include <qlora/io/detail/json.hpp>
#include <qlora/io/detail/python_json.hpp>
#include <qlora/io/mapped_file.hpp>
#include <qlora/io/safetensors_tensor.hpp>
#include <qlora/io/safetensors_writer.hpp>
#include <qlora/io/sharded_checkpoint.hpp>
#include <qlora/lora/peft_adapter.hpp>
#include <qlora/quant/blockwise_4bit.hpp>
#include <qlora/quant/bnb_format.hpp>

namespace qlora {

/// XTuner's `--max-shard-size` default ("2GB", decimal as huggingface_hub reads it).
inline constexpr std::uint64_t default_merge_shard_size = 2'000'000'000;

struct MergeOptions {
  /// dtype of every float tensor written; nullopt ("auto") keeps each stored
  /// dtype (a 4-bit weight: the dtype it was quantized from).
  std::optional<DType> dtype;
  std::uint64_t max_shard_size = default_merge_shard_size;
  /// Replace a non-empty output folder (otherwise OutputExists).
  bool overwrite = false;
  unsigned threads = default_thread_count();
};

/// What a merge did, for the user to read.
struct AdapterMergeReport {
  std::size_t lora_modules = 0;         ///< base weights that received W + scaling·B·A
  std::size_t replaced_tensors = 0;     ///< base tensors replaced by the adapter's (modules_to_save, biases)
  std::size_t dequantized_tensors = 0;  ///< bitsandbytes 4-bit weights written dense
  std::size_t copied_tensors = 0;       ///< tensors the adapter does not touch
  std::optional<std::int64_t> resized_vocab;  ///< the adapter's vocabulary size, when it differs from the base's
  bool converted_remote_code = false;   ///< the adapter used the old remote-code Phi names
  std::vector<std::string> weight_files;  ///< model*.safetensors (+ index) written
  std::vector<std::string> other_files;   ///< config, generation config, tokenizer and code files written
};

/// The merged weights in memory: `weights` views `storage` (merged, converted
/// and dequantized tensors) and the base checkpoint's mapped shards (tensors
/// copied as they are), so the checkpoint must outlive it.
struct MergedWeights {
  SafetensorsWriter weights;
  std::vector<std::vector<std::byte>> storage;
  AdapterMergeReport report;
  bool dequantized_4bit = false;
};

namespace detail {

/// Layers whose rows are the vocabulary: a resized vocabulary changes their row count.
inline constexpr std::string_view vocabulary_tensors[] = {"lm_head.weight", "lm_head.bias", "model.embed_tokens.weight",
                                                          "output.weight", "model.tok_embeddings.weight"};

inline bool is_vocabulary_tensor(std::string_view name) {
  return std::ranges::find(vocabulary_tensors, name) != std::end(vocabulary_tensors);
}

/// Files of a model folder besides the weights that a merged model needs:
/// configs, tokenizer files (any format transformers reads), chat templates
/// (qlora_chat.json: the prompt format qlora-train records for qlora-chat).
inline constexpr std::string_view model_side_files[] = {
    "generation_config.json", "tokenizer.json",      "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model",        "added_tokens.json",   "vocab.json",            "merges.txt",
    "vocab.txt",              "chat_template.jinja", "chat_template.json",    "qlora_chat.json"};
/// Of those, the ones training may change (added tokens, a chat template): the adapter folder's copy wins.
inline bool is_tokenizer_file(std::string_view name) { return name != "generation_config.json"; }

inline std::string shape_text(std::span<const std::int64_t> shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

/// The base tensor a saved adapter tensor replaces: peft saves the bias of a
/// LoRA-wrapped layer as `<module>.base_layer.bias`.
inline std::string base_name_of_saved(std::string_view key) {
  constexpr std::string_view wrapped = ".base_layer.";
  const std::size_t at = key.rfind(wrapped);
  if (at == std::string_view::npos || key.find('.', at + wrapped.size()) != std::string_view::npos) {
    return std::string(key);
  }
  return fmt::format("{}.{}", key.substr(0, at), key.substr(at + wrapped.size()));
}

/// peft's automatic embedding save (spec 2.4) also writes the wrapper's
/// internals when lm_head / embed_tokens is in modules_to_save: the frozen
/// `original_module` and a duplicate `modules_to_save` copy. peft's loader
/// ignores both (the plain key holds the trained copy); so do we.
inline bool is_wrapper_internal(std::string_view key) {
  return key.find(".original_module.") != std::string_view::npos ||
         key.find(".modules_to_save.") != std::string_view::npos;
}

/// F32 values of a float tensor (exact widening).
inline std::vector<float> float_values(const SafetensorsTensor& tensor, std::string_view what) {
  std::vector<float> values(static_cast<std::size_t>(tensor.numel()));
  visit_float_dtype(tensor.dtype, [&]<class T>(T) {
    const std::vector<T> stored = tensor.read<T>();
    std::ranges::transform(stored, values.begin(), [](T v) { return to_float(v); });
  }, what);
  return values;
}

/// `values` rounded once to `dtype` (F32, F16 or BF16), as bytes.
inline std::vector<std::byte> encode_floats(std::span<const float> values, DType dtype) {
  std::vector<std::byte> bytes(values.size() * dtype_bits(dtype) / 8);
  visit_float_dtype(dtype, [&]<class T>(T) {
    for (std::size_t i = 0; i < values.size(); ++i) {
      const T v = from_float<T>(values[i]);
      std::memcpy(bytes.data() + i * sizeof(T), &v, sizeof(T));
    }
  });
  return bytes;
}

/// fmaf(a, b, c), exactly, without an FMA instruction (the library is built
/// for baseline x86-64): a·b is exact in double; the rounding error of the
/// double sum (TwoSum) turns its rounding into round-to-odd, after which the
/// rounding to float is the correctly rounded fmaf (53 >= 24 + 2 bits).
inline float fused_multiply_add(float a, float b, float c) {
  const double product = static_cast<double>(a) * static_cast<double>(b);
  const double addend = c;
  const double sum = product + addend;
  const double addend_part = sum - product;
  const double error = (product - (sum - addend_part)) + (addend - addend_part);
  auto bits = std::bit_cast<std::uint64_t>(sum);
  if (error != 0 && (bits & 1) == 0) bits += (error > 0) == (sum > 0) ? 1 : std::uint64_t(-1);
  return static_cast<float>(std::bit_cast<double>(bits));
}

/// W += scaling·(B·A) in place, bit for bit as peft's Linear.merge computes it
/// on CPU in fp32: B·A as torch's CPU GEMM (MKL) computes each element (a
/// chain of FMAs over k = 0..r-1, checked against torch by the fixtures),
/// times the fp32 scaling (rounded), plus W (rounded). The same on any thread count.
inline void add_lora_delta(std::span<float> weight, const Tensor& lora_A, const Tensor& lora_B, float scaling,
                           unsigned threads) {
  const std::int64_t r = lora_A.shape()[0];
  const std::int64_t in = lora_A.shape()[1];
  const std::int64_t out = lora_B.shape()[0];
  const float* a = lora_A.span<const float>().data();
  const float* b = lora_B.span<const float>().data();
  parallel_for(out, std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(1, in * r)),
               [&](std::int64_t row_begin, std::int64_t row_end) {
                 std::vector<float> product(static_cast<std::size_t>(in));
                 for (std::int64_t row = row_begin; row < row_end; ++row) {
                   const float* b_row = b + row * r;
                   for (std::int64_t i = 0; i < in; ++i) product[static_cast<std::size_t>(i)] = b_row[0] * a[i];
                   for (std::int64_t k = 1; k < r; ++k) {
                     const float* a_k = a + k * in;
                     for (std::int64_t i = 0; i < in; ++i) {
                       float& sum = product[static_cast<std::size_t>(i)];
                       sum = fused_multiply_add(b_row[k], a_k[i], sum);
                     }
                   }
                   float* w = weight.data() + row * in;
                   for (std::int64_t i = 0; i < in; ++i) {
                     // Rounded through double so that no compiler contracts it with the add into an FMA.
                     const auto delta = static_cast<float>(static_cast<double>(product[static_cast<std::size_t>(i)]) *
                                                           static_cast<double>(scaling));
                     w[i] += delta;
                   }
                 }
               },
               threads);
}

/// A 4-bit weight of the base, dequantized as bitsandbytes' dequantize_4bit
/// does (to the dtype it was quantized from, then widened exactly to F32).
inline std::vector<float> dequantized_values(const ShardedCheckpoint& base, std::string_view name, DType& source_dtype,
                                             std::vector<std::int64_t>& shape, unsigned threads) {
  const Quantized4bit weight = read_bnb_4bit(base, name);
  source_dtype = weight.state.dtype;
  shape = weight.state.shape;
  std::vector<float> values(static_cast<std::size_t>(weight.state.numel()));
  visit_float_dtype(weight.state.dtype, [&]<class T>(T) {
    std::vector<T> stored(values.size());
    dequantize_4bit<T>(weight.packed, weight.state, stored, threads);
    std::ranges::transform(stored, values.begin(), [](T v) { return to_float(v); });
  });
  return values;
}

/// Names a 4-bit weight's companions (absmax, quant_map, ...): they are
/// consumed by dequantizing, not copied.
inline std::set<std::string, std::less<>> bnb_companions(const ShardedCheckpoint& base,
                                                         std::set<std::string, std::less<>>& quantized) {
  std::set<std::string, std::less<>> companions;
  for (const SafetensorsReader& shard : base.shards()) {
    for (const SafetensorsTensor& t : shard.tensors()) {
      check(!t.name.ends_with(".SCB") && !t.name.ends_with(".weight_format"), "UnsupportedCheckpoint",
            "{}: `{}` belongs to a bitsandbytes 8-bit weight; qlora-merge reads 4-bit and unquantized bases",
            base.folder().string(), t.name);
      const auto type = bnb_4bit_type(base, t.name);
      if (!type) continue;
      quantized.insert(t.name);
      const Bnb4bitKeys keys = Bnb4bitKeys::of(t.name, *type);
      for (const std::string* key :
           {&keys.absmax, &keys.quant_map, &keys.nested_absmax, &keys.nested_quant_map, &keys.quant_state}) {
        companions.insert(*key);
      }
    }
  }
  return companions;
}

}  // namespace detail

/// Whether `adapter` names its modules as the old remote-code Phi did
/// (`transformer.h.{i}.mixer.Wqkv`, `lm_head.linear`, ...).
inline bool is_remote_code_phi_adapter(const PeftAdapter& adapter) {
  const auto old_name = [](std::string_view path) {
    return path.starts_with("transformer.h.") || path.starts_with("transformer.embd.") ||
           path.starts_with("lm_head.linear") || path.starts_with("lm_head.ln");
  };
  return std::ranges::any_of(adapter.modules, [&](const LoraModuleWeights& m) { return old_name(m.path); }) ||
         std::ranges::any_of(adapter.saved_tensors, [&](const auto& saved) { return old_name(saved.first); });
}

namespace detail {

/// A remote-code Phi module in today's transformers names.
struct PhiModule {
  std::string path;        ///< the module's path; for a fused Wqkv, its attention block ("model.layers.0.self_attn")
  bool fused_qkv = false;  ///< `mixer.Wqkv`, which splits into <path>.q_proj, .k_proj, .v_proj
};

/// Today's name of a remote-code Phi module (spec 4.4, from transformers'
/// convert_phi_weights_to_hf.py PHI_MAPPING). Throws UnsupportedAdapter.
inline PhiModule phi_module(std::string_view old_path, std::string_view source) {
  constexpr std::pair<std::string_view, std::string_view> top_level[] = {
      {"transformer.embd.wte", "model.embed_tokens"}, {"lm_head.ln", "model.final_layernorm"}, {"lm_head.linear", "lm_head"}};
  constexpr std::pair<std::string_view, std::string_view> in_layer[] = {
      {"ln", "input_layernorm"}, {"mixer.out_proj", "self_attn.dense"}, {"mlp.fc1", "mlp.fc1"}, {"mlp.fc2", "mlp.fc2"},
      {"mixer.Wqkv", "self_attn"}};
  for (const auto& [old_name, new_name] : top_level) {
    if (old_path == old_name) return {std::string(new_name)};
  }
  constexpr std::string_view layers = "transformer.h.";
  if (old_path.starts_with(layers)) {
    const std::string_view rest = old_path.substr(layers.size());
    const std::size_t dot = rest.find('.');
    const std::string_view layer = rest.substr(0, dot);
    const bool numeric = !layer.empty() && std::ranges::all_of(layer, [](char c) { return c >= '0' && c <= '9'; });
    for (const auto& [old_name, new_name] : in_layer) {
      if (numeric && dot != std::string_view::npos && rest.substr(dot + 1) == old_name) {
        return {fmt::format("model.layers.{}.{}", layer, new_name), old_name == "mixer.Wqkv"};
      }
    }
  }
  throw Error("UnsupportedAdapter", fmt::format("{}: module {} has no counterpart in today's transformers Phi "
                                                "(remote-code names qlora converts: transformer.embd.wte, "
                                                "transformer.h.<i>.{{ln, mixer.Wqkv, mixer.out_proj, mlp.fc1, "
                                                "mlp.fc2}}, lm_head.ln, lm_head.linear)",
                                                source, old_path));
}

/// Rows [part·n/3, (part+1)·n/3) of a [n, ...] F32 tensor: the q (0), k (1) or
/// v (2) block of a Wqkv tensor, whose rows are `(three h d)`.
inline Tensor qkv_rows(const Tensor& fused, int part, std::string_view what) {
  const std::int64_t rows = fused.shape()[0];
  check(rows % 3 == 0, "InvalidAdapter", "{} has {} rows; a Wqkv tensor has 3 equal blocks (q, k, v)", what, rows);
  std::vector<std::int64_t> extents(fused.shape().extents().begin(), fused.shape().extents().end());
  extents[0] = rows / 3;
  Tensor block(DType::F32, Shape(std::span<const std::int64_t>(extents)));
  const std::span<const float> all = fused.span<const float>();
  const std::size_t size = block.span<float>().size();
  std::copy_n(all.begin() + static_cast<std::ptrdiff_t>(part * size), size, block.span<float>().begin());
  return block;
}

/// A copy of an F32 tensor (Tensor owns its buffer and is move-only).
inline Tensor copy_f32(const Tensor& tensor) {
  Tensor copy(DType::F32, tensor.shape());
  std::ranges::copy(tensor.span<const float>(), copy.span<float>().begin());
  return copy;
}

inline constexpr std::string_view qkv_names[] = {"q_proj", "k_proj", "v_proj"};

/// The last component of a module path (the name target_modules / modules_to_save list).
inline std::string leaf_name(std::string_view path) { return std::string(path.substr(path.rfind('.') + 1)); }

}  // namespace detail

/// The adapter of a remote-code Phi (the Dec-2023 tutorials' phi-msft naming)
/// in today's transformers names (spec 4.4): `mixer.Wqkv` becomes
/// q/k/v_proj, each with the same lora_A and its third of lora_B's rows
/// (exact: the rows of B·A split with the rows of B), and its bias split the
/// same way; out_proj becomes self_attn.dense, ln input_layernorm,
/// lm_head.ln model.final_layernorm, lm_head.linear lm_head, embd.wte
/// model.embed_tokens. target_modules and modules_to_save list the converted
/// modules' names. Throws UnsupportedAdapter for a module without a
/// counterpart and for rank/alpha patterns (their keys are regular
/// expressions over the old names), InvalidAdapter for a Wqkv whose rows do
/// not split in three.
inline PeftAdapter convert_remote_code_phi_adapter(const PeftAdapter& old) {
  const std::string_view source = detail::adapter_name(old);
  const LoraConfig& old_config = old.config.lora;
  check(old_config.rank_pattern.empty() && old_config.alpha_pattern.empty(), "UnsupportedAdapter",
        "{}: rank_pattern / alpha_pattern keys are patterns over the remote-code Phi names; qlora does not convert "
        "them",
        source);
  PeftAdapter converted;
  converted.config = old.config;
  converted.source = old.source;
  LoraConfig& config = converted.config.lora;
  std::set<std::string> targets, saved_modules;

  for (const LoraModuleWeights& m : old.modules) {
    const detail::PhiModule module = detail::phi_module(m.path, source);
    if (!module.fused_qkv) {
      converted.modules.push_back({module.path, detail::copy_f32(m.lora_A), detail::copy_f32(m.lora_B)});
      targets.insert(detail::leaf_name(module.path));
      continue;
    }
    const std::string what = fmt::format("{}: `{}{}.lora_B.weight`", source, detail::peft_key_prefix, m.path);
    for (int part = 0; part < 3; ++part) {
      converted.modules.push_back({fmt::format("{}.{}", module.path, detail::qkv_names[part]), detail::copy_f32(m.lora_A),
                                   detail::qkv_rows(m.lora_B, part, what)});
      targets.insert(std::string(detail::qkv_names[part]));
    }
  }

  for (const auto& [key, tensor] : old.saved_tensors) {
    const std::size_t dot = key.rfind('.');
    check(dot != std::string::npos, "InvalidAdapter", "{}: saved tensor `{}` names no module", source, key);
    std::string module = key.substr(0, dot);
    const std::string parameter = key.substr(dot);  // ".bias", ".weight"
    constexpr std::string_view wrapped = ".base_layer";
    const bool of_lora_layer = module.ends_with(wrapped);
    if (of_lora_layer) module.resize(module.size() - wrapped.size());
    const bool module_to_save = old_config.is_module_to_save(module);
    const std::string suffix = std::string(of_lora_layer ? wrapped : "") + parameter;
    const detail::PhiModule renamed = detail::phi_module(module, source);
    if (!renamed.fused_qkv) {
      converted.saved_tensors.emplace_back(renamed.path + suffix, detail::copy_f32(tensor));
      if (module_to_save) saved_modules.insert(detail::leaf_name(renamed.path));
      continue;
    }
    for (int part = 0; part < 3; ++part) {  // a Wqkv bias (or weight): split like lora_B
      converted.saved_tensors.emplace_back(fmt::format("{}.{}{}", renamed.path, detail::qkv_names[part], suffix),
                                           detail::qkv_rows(tensor, part, fmt::format("{}: `{}`", source, key)));
      if (module_to_save) saved_modules.insert(std::string(detail::qkv_names[part]));
    }
  }

  config.target_modules.assign(targets.begin(), targets.end());
  config.target_modules_regex.reset();
  config.modules_to_save.assign(saved_modules.begin(), saved_modules.end());
  std::ranges::sort(converted.modules, {}, &LoraModuleWeights::path);
  std::ranges::sort(converted.saved_tensors, {}, &std::pair<std::string, Tensor>::first);
  detail::check_adapter_consistent(converted);
  return converted;
}

/// Parses a shard size as huggingface_hub's parse_size_to_int does: bytes
/// ("2000000000"), or a number and a unit: KB, MB, GB, TB (powers of 1000) or
/// KiB, MiB, GiB, TiB (powers of 1024), e.g. "2GB", "500MB", "1.5GiB".
/// Throws InvalidArgument.
inline std::uint64_t parse_shard_size(std::string_view text) {
  constexpr std::pair<std::string_view, double> units[] = {
      {"", 1.0},         {"B", 1.0},          {"KB", 1e3},         {"MB", 1e6},         {"GB", 1e9},
      {"TB", 1e12},      {"KIB", 1024.0},     {"MIB", 1048576.0},  {"GIB", 1073741824.0}, {"TIB", 1099511627776.0}};
  const std::size_t unit_at = text.find_first_not_of("0123456789.");
  const std::string_view number = text.substr(0, unit_at);
  std::string unit(unit_at == std::string_view::npos ? std::string_view() : text.substr(unit_at));
  std::erase(unit, ' ');
  std::ranges::transform(unit, unit.begin(), [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  double value = 0;
  const auto [end, error] = std::from_chars(number.data(), number.data() + number.size(), value);
  const auto* factor = std::ranges::find(units, std::string_view(unit), &std::pair<std::string_view, double>::first);
  check(!number.empty() && error == std::errc() && end == number.data() + number.size() && factor != std::end(units),
        "InvalidArgument", "shard size \"{}\": expected bytes or a number with KB, MB, GB, TB, KiB, MiB, GiB or TiB",
        text);
  const double bytes = value * factor->second;
  check(bytes >= 1 && bytes < 1.8e19, "InvalidArgument", "shard size \"{}\" must be at least 1 byte", text);
  return static_cast<std::uint64_t>(bytes);
}

/// Parses a --dtype value: "auto" (nullopt), "float32", "float16" or "bfloat16". Throws InvalidArgument.
inline std::optional<DType> parse_merge_dtype(std::string_view name) {
  if (name == "auto") return std::nullopt;
  if (name == "float32") return DType::F32;
  if (name == "float16") return DType::F16;
  if (name == "bfloat16") return DType::BF16;
  throw Error("InvalidArgument", fmt::format("dtype \"{}\": expected auto, float32, float16 or bfloat16", name));
}

/// Merges `adapter` into the weights of `base` (see the header comment); an
/// old remote-code Phi adapter is converted first. Throws AdapterMismatch when
/// a LoRA module or saved tensor has no base tensor, or shapes disagree (both
/// named), or the vocabulary tensors end up with different row counts;
/// UnsupportedCheckpoint for an 8-bit base.
inline MergedWeights merge_adapter_weights(const ShardedCheckpoint& base, const PeftAdapter& adapter,
                                           std::optional<DType> dtype = std::nullopt,
                                           unsigned threads = default_thread_count()) {
  MergedWeights merged;
  const bool remote_code = is_remote_code_phi_adapter(adapter);
  const PeftAdapter converted = remote_code ? convert_remote_code_phi_adapter(adapter) : PeftAdapter();
  const PeftAdapter& lora = remote_code ? converted : adapter;
  merged.report.converted_remote_code = remote_code;
  const std::string_view source = detail::adapter_name(lora);
  const std::string base_name = base.folder().string();

  std::map<std::string, const LoraModuleWeights*, std::less<>> lora_of;  // base weight name -> factors
  for (const LoraModuleWeights& m : lora.modules) lora_of.emplace(m.path + ".weight", &m);
  std::map<std::string, const std::pair<std::string, Tensor>*, std::less<>> replacement_of;
  for (const auto& saved : lora.saved_tensors) {
    if (!detail::is_wrapper_internal(saved.first)) replacement_of.emplace(detail::base_name_of_saved(saved.first), &saved);
  }
  std::set<std::string, std::less<>> quantized;
  const std::set<std::string, std::less<>> companions = detail::bnb_companions(base, quantized);

  std::set<std::string, std::less<>> used;
  std::map<std::string, std::int64_t> vocabulary_rows;  // vocabulary tensor -> rows written
  std::optional<std::int64_t> base_vocabulary;
  for (const SafetensorsReader& shard : base.shards()) {
    for (const SafetensorsTensor& tensor : shard.tensors()) {
      if (companions.contains(tensor.name)) continue;
      const std::string& name = tensor.name;
      const bool is_4bit = quantized.contains(name);
      const bool is_float = is_4bit || tensor.dtype == DType::F32 || tensor.dtype == DType::F16 || tensor.dtype == DType::BF16;
      const auto factors = lora_of.find(name);
      const auto replacement = replacement_of.find(name);
      const bool touched = factors != lora_of.end() || replacement != replacement_of.end();
      check(!touched || is_float, "AdapterMismatch", "{}: base tensor `{}` is {}, not a float tensor", base_name, name,
            dtype_name(tensor.dtype));
      if (!is_float || (!touched && !is_4bit && dtype.value_or(tensor.dtype) == tensor.dtype)) {
        merged.weights.add(tensor);  // bit for bit, a view into the mapped shard
        ++merged.report.copied_tensors;
        if (detail::is_vocabulary_tensor(name)) vocabulary_rows[name] = tensor.shape.at(0);
        continue;
      }
      DType stored = tensor.dtype;
      std::vector<std::int64_t> shape = tensor.shape;
      std::vector<float> values = is_4bit ? detail::dequantized_values(base, name, stored, shape, threads)
                                          : detail::float_values(tensor, fmt::format("{}: `{}`", base_name, name));
      if (is_4bit) {
        ++merged.report.dequantized_tensors;
        merged.dequantized_4bit = true;
      }
      if (detail::is_vocabulary_tensor(name) && !shape.empty()) base_vocabulary = shape[0];
      if (factors != lora_of.end()) {
        const LoraModuleWeights& m = *factors->second;
        const std::vector<std::int64_t> expected = {m.lora_B.shape()[0], m.lora_A.shape()[1]};
        check(shape == expected, "AdapterMismatch",
              "{}: module {}: lora_B {} · lora_A {} makes a {} update, but the base's `{}` is {}", source, m.path,
              m.lora_B.shape().to_string(), m.lora_A.shape().to_string(), detail::shape_text(expected), name,
              detail::shape_text(shape));
        detail::add_lora_delta(values, m.lora_A, m.lora_B, lora.config.lora.scaling_for(m.path), threads);
        ++merged.report.lora_modules;
      } else if (replacement != replacement_of.end()) {
        const Tensor& saved = replacement->second->second;
        const std::vector<std::int64_t> saved_shape(saved.shape().extents().begin(), saved.shape().extents().end());
        const bool rows_differ = saved_shape.size() == shape.size() && !shape.empty() &&
                                 std::equal(shape.begin() + 1, shape.end(), saved_shape.begin() + 1);
        check(saved_shape == shape || (rows_differ && detail::is_vocabulary_tensor(name)), "AdapterMismatch",
              "{}: `{}{}` is {}, but the base's `{}` is {}{}", source, detail::peft_key_prefix,
              replacement->second->first, detail::shape_text(saved_shape), name, detail::shape_text(shape),
              rows_differ ? " (only embedding and output layers may change their row count: a resized vocabulary)"
                          : "");
        shape = saved_shape;
        const std::span<const float> saved_values = saved.span<const float>();
        values.assign(saved_values.begin(), saved_values.end());
        ++merged.report.replaced_tensors;
      } else {
        ++merged.report.copied_tensors;
      }
      if (touched) used.insert(name);
      if (detail::is_vocabulary_tensor(name)) vocabulary_rows[name] = shape.at(0);
      merged.storage.push_back(detail::encode_floats(values, dtype.value_or(stored)));
      merged.weights.add(name, dtype.value_or(stored), shape, std::as_bytes(std::span(merged.storage.back())));
    }
  }

  for (const auto& [name, m] : lora_of) {
    check(used.contains(name), "AdapterMismatch",
          "{}: module {} (lora_B {} · lora_A {}) has no weight `{}` in the base model {}", source, m->path,
          m->lora_B.shape().to_string(), m->lora_A.shape().to_string(), name, base_name);
  }
  for (const auto& [name, saved] : replacement_of) {
    check(used.contains(name), "AdapterMismatch", "{}: `{}{}` {} replaces `{}`, which the base model {} does not have",
          source, detail::peft_key_prefix, saved->first, saved->second.shape().to_string(), name, base_name);
  }
  std::set<std::int64_t> sizes;
  for (const auto& [name, rows] : vocabulary_rows) sizes.insert(rows);
  check(sizes.size() <= 1, "AdapterMismatch",
        "{}: the vocabulary tensors would disagree on the vocabulary size ({}): the adapter resized some of them "
        "but not all",
        source, fmt::join(vocabulary_rows, ", "));
  if (!sizes.empty() && base_vocabulary && *sizes.begin() != *base_vocabulary) {
    merged.report.resized_vocab = *sizes.begin();
  }
  return merged;
}

namespace detail {

inline std::string read_text_file(const std::filesystem::path& path) {
  const MappedFile file(path);
  return std::string(reinterpret_cast<const char*>(file.bytes().data()), file.size());
}

/// The merged model's config.json: the base's, written as transformers writes
/// it (json.dumps(indent=2, sort_keys=True) + "\n"), with the vocabulary size,
/// dtype and quantization changes of the merge.
inline std::string merged_config_json(const std::filesystem::path& base_config, const MergedWeights& merged,
                                      std::optional<DType> dtype) {
  const std::string text = read_text_file(base_config);
  OrderedJson config;
  try {
    config = OrderedJson::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error("InvalidConfig", fmt::format("{}: {}", base_config.string(), e.what()));
  }
  check(config.is_object(), "InvalidConfig", "{}: expected a JSON object", base_config.string());
  if (merged.report.resized_vocab) {
    config["vocab_size"] = *merged.report.resized_vocab;
    if (config.contains("text_config") && config["text_config"].is_object()) {
      config["text_config"]["vocab_size"] = *merged.report.resized_vocab;
    }
  }
  config.erase("quantization_config");
  if (dtype) {
    const std::string_view name = torch_dtype_name(*dtype);
    bool named = false;
    for (const char* key : {"dtype", "torch_dtype"}) {
      if (config.contains(key)) {
        config[key] = name;
        named = true;
      }
    }
    if (!named) config["torch_dtype"] = name;  // read by transformers 4 and 5
  }
  std::string out;
  append_python_json(out, config);
  out += '\n';
  return out;
}

/// Throws InvalidConfig when the base is quantized in a way qlora cannot dequantize.
inline void check_quantization_supported(const std::filesystem::path& base_config) {
  const Json config = parse_json_rejecting_duplicates(read_text_file(base_config), "InvalidConfig", base_config.string());
  if (!config.is_object() || !config.contains("quantization_config")) return;
  const Json& quantization = config["quantization_config"];
  const bool bnb_4bit = quantization.is_object() && quantization.value("quant_method", "") == "bitsandbytes" &&
                        !quantization.value("load_in_8bit", false);
  check(bnb_4bit, "UnsupportedCheckpoint",
        "{}: quantization_config is not bitsandbytes 4-bit; qlora-merge dequantizes only bitsandbytes NF4/FP4 bases",
        base_config.string());
}

inline bool is_non_empty_directory(const std::filesystem::path& path) {
  std::error_code error;
  return std::filesystem::exists(path, error) &&
         (!std::filesystem::is_directory(path, error) || !std::filesystem::is_empty(path, error));
}

/// Removes a folder when it goes out of scope, unless released.
class RemoveOnExit {
 public:
  explicit RemoveOnExit(std::filesystem::path path) : path_(std::move(path)) {}
  RemoveOnExit(const RemoveOnExit&) = delete;
  RemoveOnExit& operator=(const RemoveOnExit&) = delete;
  ~RemoveOnExit() {
    std::error_code ignored;
    if (!path_.empty()) std::filesystem::remove_all(path_, ignored);
  }
  void release() { path_.clear(); }

 private:
  std::filesystem::path path_;
};

inline bool same_folder(const std::filesystem::path& a, const std::filesystem::path& b) {
  std::error_code error;
  return std::filesystem::equivalent(a, b, error);
}

}  // namespace detail

/// Merges the PEFT adapter in `adapter_folder` into the Hugging Face model in
/// `base_folder` and writes the merged model to `out_folder`: the weights
/// (write_sharded_checkpoint, options.max_shard_size), config.json,
/// generation_config.json, the tokenizer files and any remote-code *.py
/// files of the base (tokenizer files from the adapter folder win: training
/// may have added tokens). Everything goes into a hidden sibling folder that
/// is renamed to `out_folder` at the end. Errors: OutputExists (non-empty
/// output without options.overwrite), InvalidArgument (output is the base or
/// adapter folder), CheckpointNotFound / MissingFile, every reader error, and
/// those of merge_adapter_weights.
inline AdapterMergeReport merge_adapter(const std::filesystem::path& base_folder, const std::filesystem::path& adapter_folder,
                                 const std::filesystem::path& out_folder, const MergeOptions& options = {}) {
  check(!detail::same_folder(out_folder, base_folder) && !detail::same_folder(out_folder, adapter_folder),
        "InvalidArgument", "the output folder {} is the base or the adapter folder; write the merged model elsewhere",
        out_folder.string());
  check(options.overwrite || !detail::is_non_empty_directory(out_folder), "OutputExists",
        "{} exists and is not empty; pass --overwrite to replace it", out_folder.string());
  const std::filesystem::path base_config = base_folder / "config.json";
  std::error_code error;
  check(std::filesystem::is_regular_file(base_config, error), "MissingFile",
        "{} has no config.json: not a Hugging Face model folder", base_folder.string());
  detail::check_quantization_supported(base_config);

  const ShardedCheckpoint base = ShardedCheckpoint::open(base_folder);
  const PeftAdapter adapter = read_peft_adapter(adapter_folder);
  MergedWeights merged = merge_adapter_weights(base, adapter, options.dtype, options.threads);
  const std::string config = detail::merged_config_json(base_config, merged, options.dtype);

  // A hidden sibling: same file system, so the final rename is atomic.
  const std::filesystem::path target = std::filesystem::absolute(out_folder).lexically_normal();
  const std::filesystem::path parent = target.parent_path();
  const std::string stem = target.filename().string();
  std::filesystem::create_directories(parent, error);
  check(!error, "IoError", "cannot create {}: {}", parent.string(), error.message());
  const std::filesystem::path staging = parent / fmt::format(".{}.merging-{}", stem, ::getpid());
  std::filesystem::remove_all(staging, error);
  detail::RemoveOnExit remove_staging(staging);

  write_sharded_checkpoint(staging, merged.weights, options.max_shard_size);
  write_file_atomically(staging / "config.json", [&](AtomicFile& file) { file.write(config); });
  merged.report.other_files.emplace_back("config.json");
  for (const std::string_view name : detail::model_side_files) {
    for (const std::filesystem::path& folder : {adapter_folder, base_folder}) {
      if (folder == adapter_folder && !detail::is_tokenizer_file(name)) continue;
      if (!std::filesystem::is_regular_file(folder / name, error)) continue;
      std::filesystem::copy_file(folder / name, staging / name, error);
      check(!error, "IoError", "cannot copy {} to {}: {}", (folder / name).string(), staging.string(), error.message());
      merged.report.other_files.push_back(fmt::format("{} (from {})", name, folder == adapter_folder ? "adapter" : "base"));
      break;
    }
  }
  // Remote-code models (InternLM2, phi-msft) load their classes from the folder.
  for (std::filesystem::directory_iterator it(base_folder, error), end; !error && it != end; it.increment(error)) {
    if (it->path().extension() != ".py" || !it->is_regular_file(error)) continue;
    std::filesystem::copy_file(it->path(), staging / it->path().filename(), error);
    check(!error, "IoError", "cannot copy {}: {}", it->path().string(), error.message());
    merged.report.other_files.push_back(it->path().filename().string() + " (from base)");
  }
  check(!error, "IoError", "cannot list {}: {}", base_folder.string(), error.message());
  for (std::filesystem::directory_iterator it(staging, error), end; !error && it != end; it.increment(error)) {
    const std::string name = it->path().filename().string();
    if (detail::is_weights_file_name(name)) merged.report.weight_files.push_back(name);
  }
  std::ranges::sort(merged.report.weight_files);

  // Into place: an old output is moved aside first and deleted only once the new one is there.
  const std::filesystem::path previous = parent / fmt::format(".{}.replaced-{}", stem, ::getpid());
  const bool had_output = std::filesystem::exists(target, error);
  if (had_output) {
    std::filesystem::rename(target, previous, error);
    check(!error, "IoError", "cannot move the old {} aside: {}", target.string(), error.message());
  }
  std::filesystem::rename(staging, target, error);
  if (error) {
    std::error_code ignored;
    if (had_output) std::filesystem::rename(previous, target, ignored);
    throw Error("IoError", fmt::format("cannot rename {} to {}: {}", staging.string(), target.string(), error.message()));
  }
  remove_staging.release();
  if (had_output) std::filesystem::remove_all(previous, error);
  return merged.report;
}

}  // namespace qlora
