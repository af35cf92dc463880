// PeftAdapter: a LoRA adapter directory as Hugging Face peft writes and reads
// it (PeftModel.save_pretrained / from_pretrained):
//
//   adapter_config.json         AdapterConfig (lora/adapter_config.hpp)
//   adapter_model.safetensors   metadata {"format": "pt"}; for each LoRA module
//       base_model.model.<path>.lora_A.weight  [r, in_features]
//       base_model.model.<path>.lora_B.weight  [out_features, r]
//     and, whole, the parameters that train besides LoRA:
//       base_model.model.<module_to_save>.<param>   e.g. lm_head.weight, lm_head.bias
//       base_model.model.<path>.bias                bias "all" (non-LoRA modules)
//       base_model.model.<path>.base_layer.bias     bias "all" / "lora_only" (LoRA modules)
//
// <path> is the module's path in the transformers model ("model.layers.0.mlp.fc1");
// peft drops the adapter name ("default") from the keys. We write F32 and the
// bytes safetensors.torch.save_file writes; we read F32, F16 and BF16.
//
// Unlike peft, which loads with strict=False and silently ignores a key it does
// not expect, every key must be understood. Error codes:
//   InvalidAdapter      the directory contradicts itself: a key we cannot
//                       place, lora_A without lora_B, a factor whose shape
//                       disagrees with the config's rank, a non-float tensor;
//   UnsupportedAdapter  a valid peft adapter using a feature qlora lacks
//                       (DoRA magnitudes, LoRA on embeddings, .bin weights);
//   AdapterMismatch     check_adapter_fits: the adapter does not fit the model.
// Every message names the file and the key.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/io/atomic_file.hpp>
#include <qlora/io/safetensors_reader.hpp>
#include <qlora/io/safetensors_writer.hpp>
#include <qlora/lora/adapter_config.hpp>

namespace qlora {

inline constexpr std::string_view peft_config_file_name = "adapter_config.json";
inline constexpr std::string_view peft_weights_file_name = "adapter_model.safetensors";

/// The two factors of the LoRA adapter on one module.
struct LoraModuleWeights {
  std::string path;  ///< the module's path in the model, e.g. "model.layers.0.self_attn.q_proj"
  Tensor lora_A;     ///< F32 [r, in_features]
  Tensor lora_B;     ///< F32 [out_features, r]
};

/// A whole adapter: config, LoRA factors, and the tensors saved whole.
struct PeftAdapter {
  AdapterConfig config;
  /// One per LoRA module, by path (read_peft_adapter sorts them).
  std::vector<LoraModuleWeights> modules;
  /// F32 tensors of modules_to_save and trainable biases, key = module path +
  /// "." + parameter name as peft saves it: "lm_head.weight", "lm_head.bias",
  /// "model.layers.0.mlp.fc1.base_layer.bias". Sorted by key when read.
  std::vector<std::pair<std::string, Tensor>> saved_tensors;
  /// The weights file it was read from; names it in errors (empty: built in memory).
  std::filesystem::path source;
};

/// A module of the model an adapter is meant for. Its weight is [out_features,
/// in_features] (a Linear; for an Embedding, out = num_embeddings and in = dim).
struct ModuleShape {
  std::string path;
  std::int64_t in_features = 0;
  std::int64_t out_features = 0;
  bool has_bias = false;  ///< peft saves (and on load requires) the bias of a module_to_save that has one
};

namespace detail {

inline constexpr std::string_view peft_key_prefix = "base_model.model.";
inline constexpr std::string_view lora_A_suffix = ".lora_A.weight";
inline constexpr std::string_view lora_B_suffix = ".lora_B.weight";

/// Keys of peft features qlora does not implement.
struct UnsupportedKey {
  std::string_view suffix;
  std::string_view feature;
};
inline constexpr UnsupportedKey unsupported_peft_keys[] = {
    {".lora_embedding_A", "LoRA on an embedding layer"},
    {".lora_embedding_B", "LoRA on an embedding layer"},
    {".lora_magnitude_vector", "DoRA (weight-decomposed LoRA)"},
    {".lora_A.bias", "a bias on lora_A"},
    {".lora_B.bias", "a trainable bias on lora_B (lora_bias)"},
    {".trainable_tokens_delta", "trainable token embeddings"},
};

/// What a key (without the prefix) of adapter_model.safetensors holds.
struct PeftKey {
  enum Kind { lora_A, lora_B, saved } kind;
  std::string module;  ///< the LoRA module (lora_A/lora_B) or the module owning the saved tensor
};

inline constexpr std::pair<std::string_view, PeftKey::Kind> factor_suffixes[] = {{lora_A_suffix, PeftKey::lora_A},
                                                                                {lora_B_suffix, PeftKey::lora_B}};

inline std::string_view adapter_name(const PeftAdapter& adapter) {
  return adapter.source.empty() ? std::string_view("adapter") : std::string_view(adapter.source.native());
}

inline std::string full_key(std::string_view key) { return fmt::format("{}{}", peft_key_prefix, key); }

/// Places `key` (prefix stripped), or throws naming it. A saved tensor must be
/// explained by the config: a modules_to_save module's, or a bias that
/// `bias` makes trainable.
inline PeftKey classify_peft_key(std::string_view key, const LoraConfig& config, std::string_view source) {
  for (const auto& [suffix, kind] : factor_suffixes) {
    if (key.size() > suffix.size() && key.ends_with(suffix)) {
      return {kind, std::string(key.substr(0, key.size() - suffix.size()))};
    }
  }
  for (const UnsupportedKey& unsupported : unsupported_peft_keys) {
    check(!key.ends_with(unsupported.suffix), "UnsupportedAdapter",
          "{}: `{}` is a tensor of {}, which qlora does not implement", source, full_key(key), unsupported.feature);
  }
  const std::size_t dot = key.rfind('.');
  const std::string_view module = dot == std::string_view::npos ? std::string_view() : key.substr(0, dot);
  if (!module.empty()) {
    if (config.is_module_to_save(module)) return {PeftKey::saved, std::string(module)};
    // A trainable bias: "all" saves every bias, "lora_only" those of LoRA
    // layers, which hold the base Linear as `base_layer`.
    constexpr std::string_view wrapped = ".base_layer";
    const bool of_lora_layer = module.ends_with(wrapped);
    if (key.ends_with(".bias") &&
        (config.bias == LoraBias::all || (config.bias == LoraBias::lora_only && of_lora_layer))) {
      return {PeftKey::saved, std::string(of_lora_layer ? module.substr(0, module.size() - wrapped.size()) : module)};
    }
  }
  throw Error("InvalidAdapter",
              fmt::format("{}: key `{}` is neither a LoRA factor (<module>{} / {}) nor a tensor that the config "
                          "saves whole (modules_to_save [{}], bias \"{}\")",
                          source, full_key(key), lora_A_suffix, lora_B_suffix,
                          fmt::join(config.modules_to_save, ", "), lora_bias_name(config.bias)));
}

/// Checks A [r, in] and B [out, r] against the rank the config gives `path`.
inline void check_factor_shapes(const LoraConfig& config, std::string_view path, const Shape& a, const Shape& b,
                                std::string_view source) {
  const int r = config.rank_for(path);
  const auto expected = [&](std::string_view suffix, const Shape& found, std::string_view want) {
    return fmt::format("{}: `{}{}{}` has shape {}; expected {} (r = {} for this module)", source, peft_key_prefix,
                       path, suffix, found.to_string(), want, r);
  };
  check(a.rank() == 2 && a[0] == r && a[1] > 0, "InvalidAdapter", "{}",
        expected(lora_A_suffix, a, fmt::format("[{}, in_features]", r)));
  check(b.rank() == 2 && b[1] == r && b[0] > 0, "InvalidAdapter", "{}",
        expected(lora_B_suffix, b, fmt::format("[out_features, {}]", r)));
}

/// What the writer checks before touching a file and the reader after reading:
/// every key placeable and back to the same module, factors F32 of the config's
/// rank, "lora_only" biases belonging to LoRA modules.
inline void check_adapter_consistent(const PeftAdapter& adapter) {
  const LoraConfig& config = adapter.config.lora;
  const std::string_view source = adapter_name(adapter);
  std::set<std::string_view> lora_modules;
  for (const LoraModuleWeights& m : adapter.modules) {
    for (const auto& [suffix, kind] : factor_suffixes) {
      const PeftKey placed = classify_peft_key(m.path + std::string(suffix), config, source);
      check(placed.kind == kind && placed.module == m.path, "InvalidAdapter",
            "{}: module path \"{}\" does not survive a round trip through the key `{}{}{}`", source, m.path,
            peft_key_prefix, m.path, suffix);
    }
    check(m.lora_A.dtype() == DType::F32 && m.lora_B.dtype() == DType::F32, "InvalidAdapter",
          "{}: module {}: lora_A is {} and lora_B {}; expected F32", source, m.path, dtype_name(m.lora_A.dtype()),
          dtype_name(m.lora_B.dtype()));
    check_factor_shapes(config, m.path, m.lora_A.shape(), m.lora_B.shape(), source);
    lora_modules.insert(m.path);
  }
  for (const auto& [key, tensor] : adapter.saved_tensors) {
    const PeftKey placed = classify_peft_key(key, config, source);
    check(placed.kind == PeftKey::saved, "InvalidAdapter", "{}: saved tensor `{}` is named like a LoRA factor", source,
          full_key(key));
    check(tensor.dtype() == DType::F32, "InvalidAdapter", "{}: `{}` is {}; expected F32", source, full_key(key),
          dtype_name(tensor.dtype()));
    check(config.bias != LoraBias::lora_only || config.is_module_to_save(placed.module) ||
              lora_modules.contains(placed.module),
          "InvalidAdapter", "{}: `{}` is the bias of {}, which has no LoRA factors (bias \"lora_only\")", source,
          full_key(key), placed.module);
  }
}

/// A copy of `tensor` widened to F32 (F32, F16 and BF16 are accepted).
inline Tensor to_f32_tensor(const SafetensorsTensor& tensor, std::string_view source) {
  check(tensor.dtype == DType::F32 || tensor.dtype == DType::F16 || tensor.dtype == DType::BF16, "InvalidAdapter",
        "{}: `{}` is {}; adapter tensors are F32, F16 or BF16", source, tensor.name, dtype_name(tensor.dtype));
  Tensor out(DType::F32, Shape(std::span<const std::int64_t>(tensor.shape)));
  const std::span<float> values = out.span<float>();
  visit_float_dtype(tensor.dtype, [&](auto element) {
    using T = decltype(element);
    const std::vector<T> stored = tensor.read<T>();
    std::transform(stored.begin(), stored.end(), values.begin(), [](T v) { return to_float(v); });
  });
  return out;
}

inline std::vector<std::int64_t> extents_of(const Tensor& tensor) {
  const auto extents = tensor.shape().extents();
  return {extents.begin(), extents.end()};
}

}  // namespace detail

/// Reads the adapter in `dir` (adapter_config.json + adapter_model.safetensors).
/// Factors and saved tensors come back as F32, sorted by module path / key.
inline PeftAdapter read_peft_adapter(const std::filesystem::path& dir) {
  const std::filesystem::path weights_path = dir / peft_weights_file_name;
  std::error_code ignored;
  check(std::filesystem::exists(weights_path, ignored) || !std::filesystem::exists(dir / "adapter_model.bin", ignored),
        "UnsupportedAdapter",
        "{}: the weights are in adapter_model.bin (a pickle), which qlora does not read; re-save the adapter with "
        "peft's save_pretrained(safe_serialization=True)",
        dir.string());
  PeftAdapter adapter;
  adapter.config = read_adapter_config(dir / peft_config_file_name);
  adapter.source = weights_path;
  const std::string_view source = detail::adapter_name(adapter);
  const LoraConfig& config = adapter.config.lora;

  const SafetensorsReader file = SafetensorsReader::open(weights_path);
  struct Factors {
    const SafetensorsTensor* a = nullptr;
    const SafetensorsTensor* b = nullptr;
  };
  std::map<std::string, Factors, std::less<>> factors;
  std::map<std::string, const SafetensorsTensor*, std::less<>> saved;
  for (const SafetensorsTensor& tensor : file.tensors()) {
    check(tensor.name.starts_with(detail::peft_key_prefix), "InvalidAdapter",
          "{}: key `{}` does not start with \"{}\", as every key peft saves for a LoRA adapter does", source,
          tensor.name, detail::peft_key_prefix);
    const std::string_view key = std::string_view(tensor.name).substr(detail::peft_key_prefix.size());
    const detail::PeftKey placed = detail::classify_peft_key(key, config, source);
    switch (placed.kind) {
      case detail::PeftKey::lora_A: factors[placed.module].a = &tensor; break;
      case detail::PeftKey::lora_B: factors[placed.module].b = &tensor; break;
      case detail::PeftKey::saved: saved.emplace(key, &tensor); break;
    }
  }

  for (const auto& [path, pair] : factors) {
    check(pair.a != nullptr && pair.b != nullptr, "InvalidAdapter", "{}: module {} has `{}` but no `{}`", source, path,
          detail::full_key(path + std::string(pair.a ? detail::lora_A_suffix : detail::lora_B_suffix)),
          detail::full_key(path + std::string(pair.a ? detail::lora_B_suffix : detail::lora_A_suffix)));
    const auto shape_of = [](const SafetensorsTensor& t) { return Shape(std::span<const std::int64_t>(t.shape)); };
    detail::check_factor_shapes(config, path, shape_of(*pair.a), shape_of(*pair.b), source);
    adapter.modules.push_back({path, detail::to_f32_tensor(*pair.a, source), detail::to_f32_tensor(*pair.b, source)});
  }
  for (const auto& [key, tensor] : saved) {
    adapter.saved_tensors.emplace_back(key, detail::to_f32_tensor(*tensor, source));
  }
  detail::check_adapter_consistent(adapter);
  return adapter;
}

/// Writes `adapter` into `dir` (created if needed) as peft's save_pretrained
/// does: adapter_model.safetensors (F32, byte-identical to
/// safetensors.torch.save_file of the same tensors) then adapter_config.json.
/// Everything is checked and serialised before the first file is touched; both
/// files are then written in full beside their final names and only then
/// renamed over them, so a failure while writing (a full disk, a kill) leaves
/// the previous adapter intact. Only a crash between the two renames (the
/// config's fsync) can leave new weights beside the old config.
inline void write_peft_adapter(const std::filesystem::path& dir, const PeftAdapter& adapter) {
  detail::check_adapter_consistent(adapter);
  const std::string config_text = adapter_config_json(adapter.config);
  SafetensorsWriter weights;  // metadata {"format": "pt"}, as peft passes to save_file
  const auto add = [&](std::string key, const Tensor& tensor) {
    weights.add(detail::full_key(key), DType::F32, detail::extents_of(tensor),
                std::as_bytes(tensor.span<const float>()));
  };
  for (const LoraModuleWeights& m : adapter.modules) {
    add(m.path + std::string(detail::lora_A_suffix), m.lora_A);
    add(m.path + std::string(detail::lora_B_suffix), m.lora_B);
  }
  for (const auto& [key, tensor] : adapter.saved_tensors) add(key, tensor);

  std::error_code error;
  std::filesystem::create_directories(dir, error);
  check(!error && std::filesystem::is_directory(dir), "IoError", "cannot create the adapter directory {}: {}",
        dir.string(), error ? error.message() : "a file of that name exists");
  AtomicFile weights_file(dir / peft_weights_file_name);
  weights.write_to(weights_file);
  AtomicFile config_file(dir / peft_config_file_name);
  config_file.write(config_text);
  weights_file.commit();
  config_file.commit();
}

/// Throws Error("AdapterMismatch") unless `adapter` fits the model whose
/// modules are `model`: each LoRA module exists, is targeted by the config and
/// has A [r, in_features] and B [out_features, r]; each module the config
/// targets has factors; each saved tensor belongs to a module of the model
/// (weight [out, in], bias [out]); each module_to_save of the model has its
/// weight saved, and its bias when it has one (peft's loader requires them).
inline void check_adapter_fits(const PeftAdapter& adapter, std::span<const ModuleShape> model) {
  detail::check_adapter_consistent(adapter);
  const LoraConfig& config = adapter.config.lora;
  const std::string_view source = detail::adapter_name(adapter);
  std::map<std::string_view, const ModuleShape*> by_path;
  for (const ModuleShape& m : model) by_path.emplace(m.path, &m);
  const auto shape_text = [](std::initializer_list<std::int64_t> extents) {
    return fmt::format("[{}]", fmt::join(extents, ", "));
  };

  std::set<std::string_view> adapted;
  for (const LoraModuleWeights& m : adapter.modules) {
    adapted.insert(m.path);
    const std::string key_A = detail::full_key(m.path + std::string(detail::lora_A_suffix));
    const auto found = by_path.find(m.path);
    check(found != by_path.end(), "AdapterMismatch", "{}: `{}` adapts module {}, which the model does not have",
          source, key_A, m.path);
    check(config.targets(m.path), "AdapterMismatch",
          "{}: `{}` adapts module {}, which the config does not target (peft would ignore these weights)", source,
          key_A, m.path);
    const ModuleShape& shape = *found->second;
    const std::int64_t r = config.rank_for(m.path);
    const auto check_factor = [&](std::string_view suffix, const Tensor& tensor, std::int64_t rows, std::int64_t cols) {
      check(tensor.shape() == Shape{rows, cols}, "AdapterMismatch",
            "{}: `{}{}{}` has shape {}; module {} ({} -> {} features) needs {}", source, detail::peft_key_prefix,
            m.path, suffix, tensor.shape().to_string(), m.path, shape.in_features, shape.out_features,
            shape_text({rows, cols}));
    };
    check_factor(detail::lora_A_suffix, m.lora_A, r, shape.in_features);
    check_factor(detail::lora_B_suffix, m.lora_B, shape.out_features, r);
  }
  for (const ModuleShape& m : model) {
    check(!config.targets(m.path) || adapted.contains(m.path), "AdapterMismatch",
          "{}: the config targets module {} ({} -> {} features), but there is no `{}` / `{}`", source, m.path,
          m.in_features, m.out_features, detail::full_key(m.path + std::string(detail::lora_A_suffix)),
          detail::full_key(m.path + std::string(detail::lora_B_suffix)));
  }

  std::set<std::string_view> saved_keys;
  for (const auto& [key, tensor] : adapter.saved_tensors) {
    saved_keys.insert(key);
    const detail::PeftKey placed = detail::classify_peft_key(key, config, source);
    const auto found = by_path.find(placed.module);
    check(found != by_path.end(), "AdapterMismatch", "{}: `{}` belongs to module {}, which the model does not have",
          source, detail::full_key(key), placed.module);
    const ModuleShape& shape = *found->second;
    const bool is_weight = key.ends_with(".weight");
    if (!is_weight && !key.ends_with(".bias")) continue;  // another parameter: nothing known to check against
    const Shape expected = is_weight ? Shape{shape.out_features, shape.in_features} : Shape{shape.out_features};
    check(tensor.shape() == expected, "AdapterMismatch", "{}: `{}` has shape {}; module {} needs {}", source,
          detail::full_key(key), tensor.shape().to_string(), placed.module, expected.to_string());
  }
  for (const ModuleShape& m : model) {
    if (!config.is_module_to_save(m.path)) continue;
    for (const std::string_view param : {std::string_view("weight"), std::string_view("bias")}) {
      if (param == "bias" && !m.has_bias) continue;
      const std::string key = fmt::format("{}.{}", m.path, param);
      check(saved_keys.contains(key), "AdapterMismatch",
            "{}: module {} is in modules_to_save, but `{}` is missing (peft's loader requires every parameter of it)",
            source, m.path, detail::full_key(key));
    }
  }
}

}  // namespace qlora
