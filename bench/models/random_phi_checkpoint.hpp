// Random-weight Phi checkpoints for the model benchmarks: a Hugging Face
// folder (config.json in transformers' spelling + safetensors) of any Phi
// shape, with weights drawn from a Philox stream, so that qlora and
// transformers can load the same model without a download.
//
//   write_random_phi_fp16: one model.safetensors in fp16 (what the Hub's
//       microsoft/phi-2 stores); transformers loads it too. Holds every
//       tensor in memory until written: for mid-size models.
//   write_random_phi_nf4: bitsandbytes' pre-quantized 4-bit layout (NF4,
//       blocksize 64, double quant; embeddings, norms, biases and lm_head in
//       fp16), one shard per layer plus one for the rest. Only one layer is in
//       memory at a time and the folder is ~0.3 of the fp16 size: this is how
//       a Phi-2-shape model (2.7 B parameters) is built on a 24 GiB machine
//       without writing 5.5 GB.
//
// Values: linear weights and embeddings U(-a, a) with a = 0.02·√3 (std 0.02,
// transformers' initializer_range), biases U(-0.02, 0.02), LayerNorm weight 1
// and bias 0. The numbers do not matter to a benchmark; the shapes do.
#pragma once

#include <qlora/core/dtype.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/rng.hpp>
#include <qlora/io/atomic_file.hpp>
#include <qlora/io/safetensors_writer.hpp>
#include <qlora/quant/blockwise_4bit.hpp>
#include <qlora/quant/bnb_format.hpp>
#include <qlora/quant/nf4.hpp>

#include <fmt/format.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

namespace qlora::bench {

/// The hyper-parameters that make a Phi model's shape.
struct PhiShape {
  std::int64_t hidden = 2560;
  std::int64_t layers = 32;
  std::int64_t heads = 32;
  std::int64_t intermediate = 10240;
  std::int64_t vocab = 51200;
  double partial_rotary_factor = 0.4;
  std::int64_t max_positions = 2048;

  /// microsoft/phi-2's shape.
  static PhiShape phi2() { return {}; }
  /// Linear parameters of one layer: q, k, v, dense (H×H) and fc1, fc2 (H×I).
  [[nodiscard]] std::int64_t linear_parameters_per_layer() const { return 4 * hidden * hidden + 2 * hidden * intermediate; }
};

/// One tensor of a Phi checkpoint: its name, shape and how it is drawn.
struct PhiTensor {
  enum class Kind : std::uint8_t { linear_weight, bias, norm_weight, norm_bias, embedding };
  std::string name;
  std::vector<std::int64_t> shape;
  Kind kind;
};

/// The tensors of layer `layer` in transformers' names.
inline std::vector<PhiTensor> phi_layer_tensors(const PhiShape& shape, std::int64_t layer) {
  using Kind = PhiTensor::Kind;
  const std::string prefix = fmt::format("model.layers.{}", layer);
  const std::int64_t h = shape.hidden, inner = shape.intermediate;
  std::vector<PhiTensor> tensors{{prefix + ".input_layernorm.weight", {h}, Kind::norm_weight},
                                 {prefix + ".input_layernorm.bias", {h}, Kind::norm_bias}};
  const auto linear = [&](const std::string& name, std::int64_t out, std::int64_t in) {
    tensors.push_back({name + ".weight", {out, in}, Kind::linear_weight});
    tensors.push_back({name + ".bias", {out}, Kind::bias});
  };
  for (const char* projection : {"q_proj", "k_proj", "v_proj", "dense"}) {
    linear(fmt::format("{}.self_attn.{}", prefix, projection), h, h);
  }
  linear(prefix + ".mlp.fc1", inner, h);
  linear(prefix + ".mlp.fc2", h, inner);
  return tensors;
}

/// The tensors outside the layers: embedding, final LayerNorm, lm_head.
inline std::vector<PhiTensor> phi_outer_tensors(const PhiShape& shape) {
  using Kind = PhiTensor::Kind;
  return {{"model.embed_tokens.weight", {shape.vocab, shape.hidden}, Kind::embedding},
          {"model.final_layernorm.weight", {shape.hidden}, Kind::norm_weight},
          {"model.final_layernorm.bias", {shape.hidden}, Kind::norm_bias},
          {"lm_head.weight", {shape.vocab, shape.hidden}, Kind::linear_weight},
          {"lm_head.bias", {shape.vocab}, Kind::bias}};
}

/// The values of `tensor` as T, from Philox stream `stream` of `seed`.
template <class T>
std::vector<T> random_values(const PhiTensor& tensor, std::uint64_t seed, std::uint64_t stream) {
  std::int64_t count = 1;
  for (const std::int64_t extent : tensor.shape) count *= extent;
  std::vector<T> values(static_cast<std::size_t>(count));
  using Kind = PhiTensor::Kind;
  if (tensor.kind == Kind::norm_weight || tensor.kind == Kind::norm_bias) {
    std::ranges::fill(values, from_float<T>(tensor.kind == Kind::norm_weight ? 1.0f : 0.0f));
    return values;
  }
  const float limit = tensor.kind == Kind::bias ? 0.02f : 0.02f * std::sqrt(3.0f);
  // One Philox block gives four values; blocks are split over the threads.
  parallel_for((count + 3) / 4, 1 << 14, [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t block = first; block < last; ++block) {
      const PhiloxCounter bits = philox_random(seed, stream, static_cast<std::uint64_t>(block));
      for (std::int64_t j = 0; j < 4 && 4 * block + j < count; ++j) {
        values[static_cast<std::size_t>(4 * block + j)] =
            from_float<T>((2.0f * uniform_from_bits(bits[static_cast<std::size_t>(j)]) - 1.0f) * limit);
      }
    }
  });
  return values;
}

/// Writes `text` to `path` (atomically).
inline void write_text(const std::filesystem::path& path, const std::string& text) {
  write_file_atomically(path, [&](AtomicFile& file) { file.write(std::as_bytes(std::span(text))); });
}

/// config.json in transformers 5's spelling (as examples/assets/tiny-phi has it).
inline void write_phi_config(const std::filesystem::path& folder, const PhiShape& shape) {
  std::filesystem::create_directories(folder);
  const std::string json = fmt::format(
      R"({{
  "architectures": ["PhiForCausalLM"],
  "model_type": "phi",
  "hidden_act": "gelu_new",
  "hidden_size": {},
  "intermediate_size": {},
  "num_hidden_layers": {},
  "num_attention_heads": {},
  "num_key_value_heads": {},
  "vocab_size": {},
  "max_position_embeddings": {},
  "layer_norm_eps": 1e-05,
  "rope_parameters": {{"partial_rotary_factor": {}, "rope_theta": 10000.0, "rope_type": "default"}},
  "resid_pdrop": 0.0,
  "embd_pdrop": 0.0,
  "attention_dropout": 0.0,
  "qk_layernorm": false,
  "tie_word_embeddings": false,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "dtype": "float16"
}}
)",
      shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.heads, shape.vocab, shape.max_positions,
      shape.partial_rotary_factor);
  write_text(folder / "config.json", json);
}

/// config.json + model.safetensors (fp16) of a random Phi of `shape`.
inline void write_random_phi_fp16(const std::filesystem::path& folder, const PhiShape& shape, std::uint64_t seed = 0) {
  write_phi_config(folder, shape);
  std::vector<PhiTensor> tensors = phi_outer_tensors(shape);
  for (std::int64_t layer = 0; layer < shape.layers; ++layer) {
    for (PhiTensor& tensor : phi_layer_tensors(shape, layer)) tensors.push_back(std::move(tensor));
  }
  std::vector<std::vector<fp16>> values;  // the writer keeps views: every tensor lives until write()
  values.reserve(tensors.size());
  SafetensorsWriter writer;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    values.push_back(random_values<fp16>(tensors[i], seed, i));
    writer.add(tensors[i].name, tensors[i].shape, values.back());
  }
  writer.write(folder / "model.safetensors");
}

/// config.json + a sharded bitsandbytes 4-bit checkpoint of a random Phi of `shape`.
inline void write_random_phi_nf4(const std::filesystem::path& folder, const PhiShape& shape, std::uint64_t seed = 0) {
  write_phi_config(folder, shape);
  const std::int64_t shards = shape.layers + 1;
  std::string weight_map;
  std::uint64_t total_size = 0;
  std::uint64_t stream = 0;
  for (std::int64_t shard = 0; shard < shards; ++shard) {
    const std::string file = fmt::format("model-{:05d}-of-{:05d}.safetensors", shard + 1, shards);
    const std::vector<PhiTensor> tensors = shard == 0 ? phi_outer_tensors(shape) : phi_layer_tensors(shape, shard - 1);
    std::vector<std::vector<fp16>> dense;
    std::vector<Quantized4bit> quantized;
    std::vector<Bnb4bitTensors> packed;
    dense.reserve(tensors.size());
    quantized.reserve(tensors.size());
    packed.reserve(tensors.size());
    SafetensorsWriter writer;
    for (const PhiTensor& tensor : tensors) {
      std::vector<fp16> values = random_values<fp16>(tensor, seed, stream++);
      // transformers' bnb integration quantizes every nn.Linear but lm_head.
      if (tensor.kind == PhiTensor::Kind::linear_weight && tensor.name != "lm_head.weight") {
        quantized.push_back(quantize_4bit<NF4, fp16>(values, tensor.shape, {.blocksize = 64, .double_quant = true}));
        packed.emplace_back(tensor.name, quantized.back());
        packed.back().add_to(writer);
      } else {
        dense.push_back(std::move(values));
        writer.add(tensor.name, tensor.shape, dense.back());
      }
    }
    for (const SafetensorsTensor& tensor : writer.tensors()) {
      weight_map += fmt::format("{}\n    \"{}\": \"{}\"", weight_map.empty() ? "" : ",", tensor.name, file);
      total_size += tensor.data.size();
    }
    writer.write(folder / file);
  }
  const std::string index = fmt::format("{{\n  \"metadata\": {{\n    \"total_size\": {}\n  }},\n  \"weight_map\": {{{}\n  }}\n}}\n",
                                        total_size, weight_map);
  write_text(folder / "model.safetensors.index.json", index);
}

}  // namespace qlora::bench
