// merge_adapter against peft's merge_and_unload + save_pretrained of the same
// adapters (tests/data/lora/merge/, made by tests/reference/merge_adapter.py):
// fp32, bf16, a bitsandbytes 4-bit base written as bf16, a resized
// vocabulary; the remote-code Phi conversion against the adapter peft saves
// under today's names; the folder qlora-merge writes; and bad input.
#include <qlora/lora/merge_adapter.hpp>

#include <catch2/catch.hpp>

#include <qlora/io/sharded_checkpoint.hpp>
#include <qlora/lora/peft_adapter.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "io/test_support.hpp"
#include "support/bits.hpp"
#include "support/errors.hpp"

namespace {

using namespace qlora;
using qlora::test::require_error;
using qlora::test::TempDir;

const std::filesystem::path merge_dir = std::filesystem::path(QLORA_TEST_DATA_DIR) / "lora" / "merge";
const std::filesystem::path tiny_phi = std::filesystem::path(QLORA_TEST_DATA_DIR) / "models" / "tiny_phi";
const std::filesystem::path tiny_phi_bnb = std::filesystem::path(QLORA_TEST_DATA_DIR) / "models" / "tiny_phi_bnb4bit";

std::string file_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// The tensors of a SafetensorsWriter by name.
std::map<std::string, const SafetensorsTensor*> by_name(const SafetensorsWriter& writer) {
  std::map<std::string, const SafetensorsTensor*> tensors;
  for (const SafetensorsTensor& t : writer.tensors()) tensors.emplace(t.name, &t);
  return tensors;
}

bool same_bytes(const SafetensorsTensor& a, const SafetensorsTensor& b) {
  return a.data.size() == b.data.size() && std::equal(a.data.begin(), a.data.end(), b.data.begin());
}

/// Requires our merged tensors to be peft's, bit for bit: same names, dtypes,
/// shapes and bytes. Exact, also in fp32: add_lora_delta reproduces torch's
/// CPU GEMM (an FMA chain over k) and peft's roundings (see its comment).
void require_peft_tensors(const MergedWeights& ours, const std::filesystem::path& peft_folder) {
  const ShardedCheckpoint peft = ShardedCheckpoint::open(peft_folder);
  const auto mine = by_name(ours.weights);
  REQUIRE(mine.size() == peft.size());
  for (const SafetensorsReader& shard : peft.shards()) {
    for (const SafetensorsTensor& expected : shard.tensors()) {
      INFO("tensor " << expected.name);
      const auto found = mine.find(expected.name);
      REQUIRE(found != mine.end());
      const SafetensorsTensor& actual = *found->second;
      CHECK(actual.dtype == expected.dtype);
      CHECK(actual.shape == expected.shape);
      CHECK(same_bytes(actual, expected));
    }
  }
}

/// Requires every tensor the adapter does not touch to be the base's, bit for bit.
void require_untouched_copied(const MergedWeights& ours, const std::filesystem::path& base_folder,
                              const PeftAdapter& adapter) {
  const ShardedCheckpoint base = ShardedCheckpoint::open(base_folder);
  std::set<std::string> touched;
  for (const LoraModuleWeights& m : adapter.modules) touched.insert(m.path + ".weight");
  for (const auto& [key, tensor] : adapter.saved_tensors) touched.insert(detail::base_name_of_saved(key));
  std::size_t untouched = 0;
  for (const auto& [name, tensor] : by_name(ours.weights)) {
    if (touched.contains(name)) continue;
    INFO("tensor " << name);
    CHECK(same_bytes(*tensor, base.tensor(name)));
    ++untouched;
  }
  CHECK(untouched > 0);
}

}  // namespace

TEST_CASE("an fp32 merge gives peft's merged tensors; untouched tensors are copied bit for bit", "[lora][merge]") {
  const ShardedCheckpoint base = ShardedCheckpoint::open(tiny_phi);
  const PeftAdapter adapter = read_peft_adapter(merge_dir / "adapter");
  for (const unsigned threads : {1u, 2u}) {
    const MergedWeights merged = merge_adapter_weights(base, adapter, std::nullopt, threads);
    require_peft_tensors(merged, merge_dir / "merged_f32");
    require_untouched_copied(merged, tiny_phi, adapter);
    CHECK(merged.report.lora_modules == 12);
    CHECK(merged.report.replaced_tensors == 3 + 12);  // lm_head weight/bias, embed_tokens, 12 LoRA-layer biases
    CHECK(merged.report.dequantized_tensors == 0);
    CHECK(!merged.report.resized_vocab);
  }
}

TEST_CASE("a bf16 merge is bit-exact with peft's", "[lora][merge]") {
  // peft adds the fp32 delta to the bf16 weight in fp32 and rounds once (the reference script checks
  // it: bf16_merge_rounds_once), as we do, on the same fp32 delta.
  const ShardedCheckpoint base = ShardedCheckpoint::open(merge_dir / "base_bf16");
  const PeftAdapter adapter = read_peft_adapter(merge_dir / "adapter");
  const MergedWeights merged = merge_adapter_weights(base, adapter);
  require_peft_tensors(merged, merge_dir / "merged_bf16");
  require_untouched_copied(merged, merge_dir / "base_bf16", adapter);
}

TEST_CASE("a bitsandbytes 4-bit base is dequantized, merged and written in the dtype asked for", "[lora][merge]") {
  const ShardedCheckpoint base = ShardedCheckpoint::open(tiny_phi_bnb);
  const PeftAdapter adapter = read_peft_adapter(merge_dir / "adapter");
  const MergedWeights merged = merge_adapter_weights(base, adapter, DType::BF16);
  // Bit-exact: bitsandbytes' dequantize_4bit (fp32) + delta in fp32, rounded once to bf16 by .to(bfloat16).
  require_peft_tensors(merged, merge_dir / "merged_bnb_bf16");
  CHECK(merged.report.dequantized_tensors == 12);
  CHECK(merged.dequantized_4bit);
}

TEST_CASE("a resized vocabulary: the merged model takes the adapter's size", "[lora][merge]") {
  const ShardedCheckpoint base = ShardedCheckpoint::open(merge_dir / "base_bf16");
  const PeftAdapter adapter = read_peft_adapter(merge_dir / "adapter_resized");
  const MergedWeights merged = merge_adapter_weights(base, adapter);
  // peft's wrapper-internal copies (original_module, modules_to_save) are in the file and ignored.
  require_peft_tensors(merged, merge_dir / "merged_resized_bf16");
  REQUIRE(merged.report.resized_vocab);
  CHECK(*merged.report.resized_vocab == 128);
}

TEST_CASE("merge_adapter writes a folder that reloads, with transformers' config and the tokenizer files",
          "[lora][merge]") {
  TempDir scratch;
  // The base and the adapter with tokenizer files: the adapter's copy wins, the base's fills the rest.
  const std::filesystem::path adapter = scratch / "adapter";
  std::filesystem::copy(merge_dir / "adapter", adapter);
  std::ofstream(adapter / "tokenizer_config.json") << "{\"from\": \"adapter\"}";
  const std::filesystem::path base = scratch / "base";
  std::filesystem::copy(tiny_phi, base);
  std::ofstream(base / "tokenizer_config.json") << "{\"from\": \"base\"}";
  std::ofstream(base / "tokenizer.json") << "{\"base\": true}";
  std::ofstream(base / "modeling_phi.py") << "# remote code\n";

  const std::filesystem::path out = scratch / "merged";
  MergeOptions options;
  options.max_shard_size = parse_shard_size("300KB");
  const AdapterMergeReport report = merge_adapter(base, adapter, out, options);
  CHECK(report.weight_files == std::vector<std::string>{"model-00001-of-00002.safetensors",
                                                        "model-00002-of-00002.safetensors",
                                                        "model.safetensors.index.json"});
  CHECK(file_text(out / "tokenizer_config.json") == "{\"from\": \"adapter\"}");
  CHECK(file_text(out / "tokenizer.json") == "{\"base\": true}");
  CHECK(file_text(out / "modeling_phi.py") == "# remote code\n");
  CHECK(file_text(out / "generation_config.json") == file_text(tiny_phi / "generation_config.json"));
  // transformers' own config.json of the merged model, byte for byte.
  CHECK(file_text(out / "config.json") == file_text(merge_dir / "merged_f32" / "config.json"));
  const ShardedCheckpoint written = ShardedCheckpoint::open(out);
  const PeftAdapter peft_adapter = read_peft_adapter(adapter);
  const ShardedCheckpoint base_checkpoint = ShardedCheckpoint::open(tiny_phi);  // `expected` views it
  const MergedWeights expected = merge_adapter_weights(base_checkpoint, peft_adapter);
  REQUIRE(written.size() == expected.weights.tensors().size());
  for (const SafetensorsTensor& t : expected.weights.tensors()) CHECK(same_bytes(written.tensor(t.name), t));
  // Nothing left beside it.
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(scratch.path())) names.push_back(entry.path().filename());
  std::ranges::sort(names);
  CHECK(names == std::vector<std::string>{"adapter", "base", "merged"});

  SECTION("an existing output is refused, then replaced with overwrite") {
    require_error([&] { merge_adapter(base, adapter, out, options); }, "OutputExists", out.string(), "--overwrite");
    options.overwrite = true;
    options.max_shard_size = default_merge_shard_size;
    const AdapterMergeReport again = merge_adapter(base, adapter, out, options);
    CHECK(again.weight_files == std::vector<std::string>{"model.safetensors"});
    CHECK(!std::filesystem::exists(out / "model.safetensors.index.json"));
  }
  SECTION("a failed merge leaves the old output as it was and nothing beside it") {
    // The Phi adapter on an InternLM2 base: its modules are not there.
    const std::filesystem::path internlm2 = std::filesystem::path(QLORA_TEST_DATA_DIR) / "models" / "tiny_internlm2";
    options.overwrite = true;
    require_error([&] { merge_adapter(internlm2, adapter, out, options); }, "AdapterMismatch", "model.layers.0.mlp.fc1");
    CHECK(std::filesystem::exists(out / "model.safetensors.index.json"));
    std::size_t entries = 0;
    for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator(scratch.path())) ++entries;
    CHECK(entries == 3);  // adapter, base, merged
  }
  SECTION("the output cannot be the base or the adapter folder") {
    options.overwrite = true;
    require_error([&] { merge_adapter(base, adapter, base, options); }, "InvalidArgument", base.string());
  }
}

TEST_CASE("the config of a merged 4-bit or resized model is transformers' own", "[lora][merge]") {
  TempDir scratch;
  MergeOptions bf16;
  bf16.dtype = DType::BF16;
  merge_adapter(tiny_phi_bnb, merge_dir / "adapter", scratch / "bnb", bf16);
  // quantization_config dropped, dtype bfloat16.
  CHECK(file_text(scratch / "bnb" / "config.json") == file_text(merge_dir / "merged_bnb_bf16" / "config.json"));
  const AdapterMergeReport resized = merge_adapter(merge_dir / "base_bf16", merge_dir / "adapter_resized", scratch / "resized");
  CHECK(resized.resized_vocab == 128);
  CHECK(file_text(scratch / "resized" / "config.json") ==
        file_text(merge_dir / "merged_resized_bf16" / "config.json"));
}

TEST_CASE("a remote-code Phi adapter converts to the adapter peft saves under today's names", "[lora][merge]") {
  const PeftAdapter old = read_peft_adapter(merge_dir / "adapter_remote_code");
  REQUIRE(is_remote_code_phi_adapter(old));
  const PeftAdapter expected = read_peft_adapter(merge_dir / "adapter_remote");
  CHECK(!is_remote_code_phi_adapter(expected));
  const PeftAdapter converted = convert_remote_code_phi_adapter(old);

  REQUIRE(converted.modules.size() == expected.modules.size());
  for (std::size_t i = 0; i < expected.modules.size(); ++i) {
    INFO("module " << expected.modules[i].path);
    CHECK(converted.modules[i].path == expected.modules[i].path);
    CHECK(test::same_bits(converted.modules[i].lora_A.span<const float>(), expected.modules[i].lora_A.span<const float>()));
    CHECK(test::same_bits(converted.modules[i].lora_B.span<const float>(), expected.modules[i].lora_B.span<const float>()));
  }
  REQUIRE(converted.saved_tensors.size() == expected.saved_tensors.size());
  for (std::size_t i = 0; i < expected.saved_tensors.size(); ++i) {
    INFO("saved " << expected.saved_tensors[i].first);
    CHECK(converted.saved_tensors[i].first == expected.saved_tensors[i].first);
    CHECK(test::same_bits(converted.saved_tensors[i].second.span<const float>(),
                          expected.saved_tensors[i].second.span<const float>()));
  }
  const auto as_set = [](const std::vector<std::string>& v) { return std::set<std::string>(v.begin(), v.end()); };
  CHECK(as_set(converted.config.lora.target_modules) == as_set(expected.config.lora.target_modules));
  CHECK(converted.config.lora.bias == LoraBias::all);
  CHECK(converted.config.lora.scaling_for("model.layers.0.self_attn.q_proj") == 4.0f);

  // And merging the old adapter is merging the new one.
  const ShardedCheckpoint base = ShardedCheckpoint::open(tiny_phi);
  const MergedWeights from_old = merge_adapter_weights(base, old);
  const MergedWeights from_new = merge_adapter_weights(base, expected);
  CHECK(from_old.report.converted_remote_code);
  const auto new_tensors = by_name(from_new.weights);
  for (const SafetensorsTensor& t : from_old.weights.tensors()) CHECK(same_bytes(t, *new_tensors.at(t.name)));

  SECTION("a module without a counterpart is named") {
    PeftAdapter odd = read_peft_adapter(merge_dir / "adapter_remote_code");
    odd.modules[0].path = "transformer.h.0.mixer.rotary_emb";
    require_error([&] { convert_remote_code_phi_adapter(odd); }, "UnsupportedAdapter", "transformer.h.0.mixer.rotary_emb");
  }
}

TEST_CASE("an adapter that does not fit the base is refused with the module and shapes named", "[lora][merge]") {
  const ShardedCheckpoint base = ShardedCheckpoint::open(tiny_phi);
  PeftAdapter adapter = read_peft_adapter(merge_dir / "adapter");

  SECTION("a module the base does not have") {
    adapter.modules[0].path = "model.layers.7.mlp.fc1";
    require_error([&] { merge_adapter_weights(base, adapter); }, "AdapterMismatch", "model.layers.7.mlp.fc1",
                  "model.layers.7.mlp.fc1.weight");
  }
  SECTION("factors whose product has another shape than the weight") {
    LoraModuleWeights& m = adapter.modules[0];  // model.layers.0.mlp.fc1: [256, 64]
    m.lora_A = Tensor(DType::F32, Shape{4, 32});
    require_error([&] { merge_adapter_weights(base, adapter); }, "AdapterMismatch", m.path, "[256, 32]", "[256, 64]");
  }
  SECTION("a saved tensor of another shape") {
    auto& saved = adapter.saved_tensors[0];  // lm_head.bias [200]
    REQUIRE(saved.first == "lm_head.bias");
    saved.second = Tensor(DType::F32, Shape{200, 2});
    require_error([&] { merge_adapter_weights(base, adapter); }, "AdapterMismatch", "lm_head.bias", "[200, 2]", "[200]");
  }
  SECTION("a vocabulary resized in one layer only") {
    for (auto& [key, tensor] : adapter.saved_tensors) {
      if (key == "model.embed_tokens.weight") tensor = Tensor(DType::F32, Shape{256, 64});
    }
    require_error([&] { merge_adapter_weights(base, adapter); }, "AdapterMismatch", "vocabulary",
                  "model.embed_tokens.weight");
  }
}

TEST_CASE("shard sizes are read as huggingface_hub reads them", "[lora][merge]") {
  CHECK(parse_shard_size("2GB") == 2'000'000'000);
  CHECK(parse_shard_size("500MB") == 500'000'000);
  CHECK(parse_shard_size("300kb") == 300'000);
  CHECK(parse_shard_size("1.5GiB") == 1'610'612'736);
  CHECK(parse_shard_size("123456") == 123456);
  require_error([] { (void)parse_shard_size("2XB"); }, "InvalidArgument", "2XB");
  require_error([] { (void)parse_shard_size("GB"); }, "InvalidArgument", "\"GB\"");
  require_error([] { (void)parse_shard_size("0"); }, "InvalidArgument", "at least 1 byte");
  CHECK(parse_merge_dtype("auto") == std::nullopt);
  CHECK(parse_merge_dtype("bfloat16") == DType::BF16);
  require_error([] { (void)parse_merge_dtype("int8"); }, "InvalidArgument", "int8");
}
