// PEFT adapter directories against the real peft (tests/reference/peft_adapter.py):
// we read what peft wrote bit for bit, we write the very bytes of the committed
// qlora_written (which peft loaded to identical logits: qlora_written_verdict.json),
// the adapter fits the tiny Phi's modules, and every kind of bad directory is
// refused with a named error, leaving a previous adapter intact.
#include <qlora/lora/peft_adapter.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include <qlora/io/safetensors_reader.hpp>
#include <qlora/io/safetensors_writer.hpp>

#include "io/test_support.hpp"
#include "lora/adapter_test_support.hpp"
#include "lora/tiny_phi_adapter.hpp"

using qlora::AdapterConfig;
using qlora::DType;
using qlora::ModuleShape;
using qlora::PeftAdapter;
using qlora::read_peft_adapter;
using qlora::SafetensorsReader;
using qlora::SafetensorsWriter;
using qlora::Tensor;
using qlora::write_peft_adapter;
using qlora::test::lora_fixture;
using qlora::test::read_bytes;
using qlora::test::require_error;
using qlora::test::same_bits;
using qlora::test::TempDir;
using qlora::test::tiny_phi_adapter;
using qlora::test::tiny_phi_modules;
using Names = std::vector<std::string>;

namespace {

/// Requires `actual` to hold what `expected` holds, every tensor bit for bit.
void require_same_adapter(const PeftAdapter& actual, const PeftAdapter& expected) {
  REQUIRE(actual.modules.size() == expected.modules.size());
  for (std::size_t i = 0; i < expected.modules.size(); ++i) {
    INFO("module " << expected.modules[i].path);
    CHECK(actual.modules[i].path == expected.modules[i].path);
    CHECK(same_bits(actual.modules[i].lora_A, expected.modules[i].lora_A));
    CHECK(same_bits(actual.modules[i].lora_B, expected.modules[i].lora_B));
  }
  REQUIRE(actual.saved_tensors.size() == expected.saved_tensors.size());
  for (std::size_t i = 0; i < expected.saved_tensors.size(); ++i) {
    INFO("saved tensor " << expected.saved_tensors[i].first);
    CHECK(actual.saved_tensors[i].first == expected.saved_tensors[i].first);
    CHECK(same_bits(actual.saved_tensors[i].second, expected.saved_tensors[i].second));
  }
}

/// The generator's adapter in the order read_peft_adapter returns: modules by path, saved tensors by key.
PeftAdapter sorted_tiny_phi_adapter() {
  PeftAdapter adapter = tiny_phi_adapter();
  std::sort(adapter.modules.begin(), adapter.modules.end(),
            [](const auto& a, const auto& b) { return a.path < b.path; });
  std::sort(adapter.saved_tensors.begin(), adapter.saved_tensors.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  return adapter;
}

/// The tensors of peft_written/adapter_model.safetensors, each passed through
/// `edit(name, tensor, writer)`, which adds what it wants written instead.
template <class Edit>
void rewrite_peft_weights(const std::filesystem::path& dir, Edit edit) {
  const auto peft_file = SafetensorsReader::open(lora_fixture("peft_written/adapter_model.safetensors"));
  SafetensorsWriter writer;
  for (const qlora::SafetensorsTensor& t : peft_file.tensors()) edit(t, writer);
  std::filesystem::create_directories(dir);
  writer.write(dir / qlora::peft_weights_file_name);
}

/// A copy of the peft-written adapter in `dir`, with tensors passed through `edit`
/// and `config_text` (if any) as adapter_config.json.
template <class Edit>
void make_adapter(const std::filesystem::path& dir, Edit edit, const std::string& config_text = {}) {
  rewrite_peft_weights(dir, edit);
  const std::string text =
      config_text.empty() ? qlora::test::read_text(lora_fixture("peft_written/adapter_config.json")) : config_text;
  qlora::test::write_bytes(dir / qlora::peft_config_file_name, text);
}

const auto keep_all = [](const qlora::SafetensorsTensor& t, SafetensorsWriter& w) { w.add(t); };

/// peft_written's config with `from` replaced by `to`.
std::string edited_peft_config(std::string_view from, std::string_view to) {
  std::string text = qlora::test::read_text(lora_fixture("peft_written/adapter_config.json"));
  const std::size_t at = text.find(from);
  REQUIRE(at != std::string::npos);
  return text.replace(at, from.size(), to);
}

constexpr std::string_view q_proj_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
constexpr std::string_view q_proj_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

}  // namespace

TEST_CASE("an adapter peft wrote reads back as the generator's values, bit for bit") {
  const PeftAdapter adapter = read_peft_adapter(lora_fixture("peft_written"));
  CHECK(adapter.source == lora_fixture("peft_written") / "adapter_model.safetensors");
  CHECK(adapter.config.lora.r == 4);
  CHECK(adapter.config.lora.modules_to_save == Names{"lm_head"});
  CHECK(adapter.modules.size() == 12);
  CHECK(adapter.saved_tensors.size() == 2);
  require_same_adapter(adapter, sorted_tiny_phi_adapter());
}

TEST_CASE("we write the committed qlora_written bytes, which peft loaded to identical logits") {
  const qlora::test::Json verdict = qlora::test::load_json(lora_fixture("qlora_written_verdict.json"));
  INFO(verdict["checks"].dump(2));
  CHECK(verdict["all_pass"].get<bool>());
  CHECK(verdict["max_logit_abs_diff"].get<double>() == 0.0);

  TempDir dir;
  write_peft_adapter(dir.path(), tiny_phi_adapter());
  CHECK(dir.listing() == Names{"adapter_config.json", "adapter_model.safetensors"});
  for (const std::string_view name : {"adapter_config.json", "adapter_model.safetensors"}) {
    INFO(name << ": if the writer changed on purpose, re-run tests/reference/peft_adapter.py");
    CHECK(read_bytes(dir / name) == read_bytes(lora_fixture("qlora_written") / name));
  }
  // The weights are also peft's own bytes (save_file of the same tensors).
  CHECK(read_bytes(dir / "adapter_model.safetensors") ==
        read_bytes(lora_fixture("peft_written/adapter_model.safetensors")));
  require_same_adapter(read_peft_adapter(dir.path()), sorted_tiny_phi_adapter());
}

TEST_CASE("the adapter fits the tiny Phi that transformers built") {
  const qlora::test::Json verdict = qlora::test::load_json(lora_fixture("qlora_written_verdict.json"));
  std::vector<ModuleShape> model;
  for (const auto& m : verdict["modules"]) {
    model.push_back({m["path"].get<std::string>(), m["in"].get<std::int64_t>(), m["out"].get<std::int64_t>(),
                     m["bias"].get<bool>()});
  }
  const std::vector<ModuleShape> ours = tiny_phi_modules();
  REQUIRE(model.size() == ours.size());
  for (const ModuleShape& m : ours) {
    INFO(m.path);
    CHECK(std::find_if(model.begin(), model.end(), [&](const ModuleShape& t) {
            return t.path == m.path && t.in_features == m.in_features && t.out_features == m.out_features &&
                   t.has_bias == m.has_bias;
          }) != model.end());
  }
  CHECK_NOTHROW(qlora::check_adapter_fits(read_peft_adapter(lora_fixture("peft_written")), model));
  CHECK_NOTHROW(qlora::check_adapter_fits(tiny_phi_adapter(), model));
}

TEST_CASE("an adapter that does not fit the model is refused with the key and the shapes") {
  const PeftAdapter adapter = read_peft_adapter(lora_fixture("peft_written"));
  const std::string file = adapter.source.string();
  std::vector<ModuleShape> model = tiny_phi_modules();

  SECTION("a module the model does not have") {
    std::erase_if(model, [](const ModuleShape& m) { return m.path == "model.layers.1.mlp.fc1"; });
    require_error([&] { qlora::check_adapter_fits(adapter, model); }, "AdapterMismatch", file,
                  "base_model.model.model.layers.1.mlp.fc1.lora_A.weight", "does not have");
  }
  SECTION("a module whose features differ") {
    for (ModuleShape& m : model) {
      if (m.path == "model.layers.0.mlp.fc1") m.in_features = 96;
    }
    require_error([&] { qlora::check_adapter_fits(adapter, model); }, "AdapterMismatch", file,
                  "base_model.model.model.layers.0.mlp.fc1.lora_A.weight", "[4, 64]", "[4, 96]");
  }
  SECTION("a targeted module missing from the file") {
    model.push_back({"model.layers.2.self_attn.q_proj", 64, 64, true});
    require_error([&] { qlora::check_adapter_fits(adapter, model); }, "AdapterMismatch", file,
                  "model.layers.2.self_attn.q_proj", "targets");
  }
  SECTION("a module the config does not target") {
    PeftAdapter narrowed = read_peft_adapter(lora_fixture("peft_written"));
    narrowed.config.lora.target_modules = {"q_proj", "k_proj", "v_proj", "dense", "fc1"};
    require_error([&] { qlora::check_adapter_fits(narrowed, model); }, "AdapterMismatch", file,
                  "model.layers.0.mlp.fc2", "does not target");
  }
  SECTION("a module_to_save missing a parameter peft's loader requires") {
    PeftAdapter no_bias = read_peft_adapter(lora_fixture("peft_written"));
    std::erase_if(no_bias.saved_tensors, [](const auto& t) { return t.first == "lm_head.bias"; });
    require_error([&] { qlora::check_adapter_fits(no_bias, model); }, "AdapterMismatch", file,
                  "base_model.model.lm_head.bias", "modules_to_save");
  }
  SECTION("a saved tensor of the wrong shape") {
    for (ModuleShape& m : model) {
      if (m.path == "lm_head") m.in_features = 96;
    }
    require_error([&] { qlora::check_adapter_fits(adapter, model); }, "AdapterMismatch", file,
                  "base_model.model.lm_head.weight", "[256, 64]", "[256, 96]");
  }
}

TEST_CASE("F16 and BF16 adapters are widened to F32") {
  TempDir dir;
  std::vector<std::vector<qlora::bf16>> keep;  // the writer holds views
  keep.reserve(32);
  make_adapter(dir.path(), [&](const qlora::SafetensorsTensor& t, SafetensorsWriter& w) {
    std::vector<qlora::bf16>& narrow = keep.emplace_back();
    for (const float v : t.read<float>()) narrow.push_back(qlora::bf16::from_float(v));
    w.add(t.name, t.shape, narrow);
  });
  const PeftAdapter adapter = read_peft_adapter(dir.path());
  const PeftAdapter expected = sorted_tiny_phi_adapter();
  REQUIRE(adapter.modules.size() == expected.modules.size());
  const auto rounded = [](const Tensor& t) {
    std::vector<float> values;
    for (const float v : t.span<const float>()) values.push_back(qlora::bf16::from_float(v).to_float());
    return values;
  };
  for (std::size_t i = 0; i < adapter.modules.size(); ++i) {
    CHECK(adapter.modules[i].lora_A.dtype() == DType::F32);
    const auto a = adapter.modules[i].lora_A.span<const float>();
    CHECK(std::vector<float>(a.begin(), a.end()) == rounded(expected.modules[i].lora_A));
  }
}

TEST_CASE("a directory that contradicts itself is refused, naming the file and the key") {
  TempDir dir;
  const std::string weights = (dir / "adapter_model.safetensors").string();
  const auto read = [&] { (void)read_peft_adapter(dir.path()); };

  SECTION("lora_A without lora_B") {
    make_adapter(dir.path(), [](const qlora::SafetensorsTensor& t, SafetensorsWriter& w) {
      if (t.name != q_proj_B) w.add(t);
    });
    require_error(read, "InvalidAdapter", weights, "model.layers.0.self_attn.q_proj", q_proj_A, q_proj_B);
  }
  SECTION("factors whose rank disagrees with r") {
    make_adapter(dir.path(), keep_all, edited_peft_config("\"r\": 4", "\"r\": 8"));
    require_error(read, "InvalidAdapter", weights, "[4, 64]", "[8, in_features]", "r = 8");
  }
  SECTION("factors whose rank disagrees with rank_pattern") {
    make_adapter(dir.path(), keep_all, edited_peft_config("\"rank_pattern\": {}", "\"rank_pattern\": {\"fc2\": 2}"));
    require_error(read, "InvalidAdapter", weights, "model.layers.0.mlp.fc2.lora_A.weight", "r = 2");
  }
  SECTION("lora_B of another rank than lora_A") {
    std::vector<float> wide(64 * 5, 0.5f);
    make_adapter(dir.path(), [&](const qlora::SafetensorsTensor& t, SafetensorsWriter& w) {
      if (t.name == q_proj_B) {
        w.add(t.name, {64, 5}, wide);
      } else {
        w.add(t);
      }
    });
    require_error(read, "InvalidAdapter", weights, q_proj_B, "[64, 5]", "[out_features, 4]");
  }
  SECTION("a key that is neither a LoRA factor nor saved whole") {
    std::vector<float> weight(64 * 64, 1.0f);
    make_adapter(dir.path(), [&](const qlora::SafetensorsTensor& t, SafetensorsWriter& w) {
      w.add(t);
      if (t.name == q_proj_A) w.add("base_model.model.model.layers.0.self_attn.q_proj.weight", {64, 64}, weight);
    });
    require_error(read, "InvalidAdapter", weights, "base_model.model.model.layers.0.self_attn.q_proj.weight");
  }
  SECTION("a key without peft's prefix") {
    make_adapter(dir.path(), [](const qlora::SafetensorsTensor& t, SafetensorsWriter& w) {
      if (t.name == q_proj_A) {
        w.add(t.name.substr(std::string_view("base_model.model.").size()), t.dtype, t.shape, t.data);
      } else {
        w.add(t);
      }
    });
    require_error(read, "InvalidAdapter", weights, "model.layers.0.self_attn.q_proj.lora_A.weight",
                  "base_model.model.");
  }
  SECTION("a DoRA magnitude vector") {
    std::vector<float> magnitude(64, 1.0f);
    make_adapter(dir.path(), [&](const qlora::SafetensorsTensor& t, SafetensorsWriter& w) {
      w.add(t);
      if (t.name == q_proj_A) {
        w.add("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", {64}, magnitude);
      }
    });
    require_error(read, "UnsupportedAdapter", weights, "lora_magnitude_vector", "DoRA");
  }
  SECTION("a tensor that is not floating point") {
    std::vector<std::int32_t> ints(4 * 64, 1);
    make_adapter(dir.path(), [&](const qlora::SafetensorsTensor& t, SafetensorsWriter& w) {
      if (t.name == q_proj_A) {
        w.add(t.name, {4, 64}, ints);
      } else {
        w.add(t);
      }
    });
    require_error(read, "InvalidAdapter", weights, q_proj_A, "I32");
  }
  SECTION("peft_type other than LORA") {
    make_adapter(dir.path(), keep_all, edited_peft_config("\"peft_type\": \"LORA\"", "\"peft_type\": \"IA3\""));
    require_error(read, "UnsupportedAdapter", "adapter_config.json", "IA3");
  }
  SECTION("use_dora") {
    make_adapter(dir.path(), keep_all, edited_peft_config("\"use_dora\": false", "\"use_dora\": true"));
    require_error(read, "UnsupportedAdapter", "adapter_config.json", "use_dora");
  }
  SECTION("malformed JSON") {
    make_adapter(dir.path(), keep_all, edited_peft_config("\"r\": 4,", "\"r\": 4,,"));
    require_error(read, "InvalidAdapterConfig", "adapter_config.json", "line");
  }
  SECTION("a config field of the wrong type") {
    make_adapter(dir.path(), keep_all, edited_peft_config("\"r\": 4", "\"r\": \"4\""));
    require_error(read, "InvalidAdapterConfig", "adapter_config.json", "\"r\"", "an integer");
  }
  SECTION("weights only as a pickle") {
    qlora::test::write_bytes(dir / "adapter_config.json",
                             qlora::test::read_text(lora_fixture("peft_written/adapter_config.json")));
    qlora::test::write_bytes(dir / "adapter_model.bin", "PK");
    require_error(read, "UnsupportedAdapter", "adapter_model.bin", "safe_serialization");
  }
}

TEST_CASE("trainable biases are read where the config's bias says they train") {
  TempDir dir;
  std::vector<float> bias(128, 0.25f);
  const auto with_fc1_bias = [&](const qlora::SafetensorsTensor& t, SafetensorsWriter& w) {
    w.add(t);
    if (t.name == q_proj_A) w.add("base_model.model.model.layers.0.mlp.fc1.base_layer.bias", {128}, bias);
  };
  make_adapter(dir.path(), with_fc1_bias, edited_peft_config("\"bias\": \"none\"", "\"bias\": \"lora_only\""));
  const PeftAdapter adapter = read_peft_adapter(dir.path());
  REQUIRE(adapter.saved_tensors.size() == 3);
  CHECK(adapter.saved_tensors[2].first == "model.layers.0.mlp.fc1.base_layer.bias");
  CHECK_NOTHROW(qlora::check_adapter_fits(adapter, tiny_phi_modules()));

  // Round trip: written back under the same key.
  TempDir copy;
  write_peft_adapter(copy.path(), adapter);
  CHECK(SafetensorsReader::open(copy / "adapter_model.safetensors")
            .find("base_model.model.model.layers.0.mlp.fc1.base_layer.bias") != nullptr);

  make_adapter(dir.path(), with_fc1_bias);  // bias "none": nothing but LoRA and lm_head trains
  require_error([&] { (void)read_peft_adapter(dir.path()); }, "InvalidAdapter",
                "base_model.model.model.layers.0.mlp.fc1.base_layer.bias");
}

TEST_CASE("a failed write leaves the previous adapter intact") {
  TempDir dir;
  const std::filesystem::path adapter_dir = dir / "adapter";
  write_peft_adapter(adapter_dir, tiny_phi_adapter());
  const auto weights_before = read_bytes(adapter_dir / "adapter_model.safetensors");
  const auto config_before = read_bytes(adapter_dir / "adapter_config.json");
  const auto check_intact = [&] {
    CHECK(read_bytes(adapter_dir / "adapter_model.safetensors") == weights_before);
    CHECK(read_bytes(adapter_dir / "adapter_config.json") == config_before);
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(adapter_dir)) names.push_back(entry.path().filename());
    std::sort(names.begin(), names.end());
    CHECK(names == Names{"adapter_config.json", "adapter_model.safetensors"});  // no temporary file left
  };

  SECTION("an adapter whose factors disagree with its config") {
    PeftAdapter bad = tiny_phi_adapter();
    bad.config.lora.r = 8;
    require_error([&] { write_peft_adapter(adapter_dir, bad); }, "InvalidAdapter", "lora_A.weight", "r = 8");
    check_intact();
  }
  SECTION("a saved tensor the config does not explain") {
    PeftAdapter bad = tiny_phi_adapter();
    bad.saved_tensors.emplace_back("model.embed_tokens.weight", Tensor(DType::F32, {256, 64}));
    require_error([&] { write_peft_adapter(adapter_dir, bad); }, "InvalidAdapter", "model.embed_tokens.weight");
    check_intact();
  }
  SECTION("a config that cannot be written") {
    PeftAdapter bad = tiny_phi_adapter();
    bad.config.extra_fields = {{"brand_new", "{not json"}};
    require_error([&] { write_peft_adapter(adapter_dir, bad); }, "InvalidAdapterConfig", "brand_new");
    check_intact();
  }
  SECTION("a directory whose parent is a file") {
    qlora::test::write_bytes(dir / "file", "x");
    require_error([&] { write_peft_adapter(dir / "file" / "adapter", tiny_phi_adapter()); }, "IoError",
                  (dir / "file" / "adapter").string());
    CHECK(dir.listing() == Names{"adapter", "file"});
    check_intact();
  }
}
