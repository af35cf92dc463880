// What the generation tests share: tests/reference/generation.py's fixture
// (tests/data/models/generation_reference.safetensors) and the model it was
// recorded with — tiny_phi_bnb4bit (NF4 as bitsandbytes stored it, compute
// fp32) with the PEFT adapter lora_init.* of tiny_phi_reference.safetensors.
#pragma once

#include <qlora/io/safetensors_reader.hpp>
#include <qlora/models/phi.hpp>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace qlora::test {

inline const std::string models_data_dir = QLORA_TEST_DATA_DIR "/models";

inline const SafetensorsReader& generation_reference() {
  static const SafetensorsReader reader =
      SafetensorsReader::open(models_data_dir + "/generation_reference.safetensors");
  return reader;
}

inline std::vector<std::int32_t> reference_ids(std::string_view name) {
  return generation_reference().tensor(name).read<std::int32_t>();
}
inline std::vector<float> reference_floats(std::string_view name) {
  return generation_reference().tensor(name).read<float>();
}

using GenerationModel = Phi<NF4, float>;

/// tiny_phi_bnb4bit with the adapter the fixture's transformers model had.
inline const GenerationModel& generation_model() {
  static const GenerationModel model = [] {
    const SafetensorsReader adapter_file =
        SafetensorsReader::open(models_data_dir + "/tiny_phi_reference.safetensors");
    const auto meta = nlohmann::json::parse(*adapter_file.metadata_value("lora_config"));
    ModelOptions options;
    options.lora.r = meta["r"];
    options.lora.lora_alpha = meta["lora_alpha"];
    options.lora.target_modules = meta["target_modules"].get<std::vector<std::string>>();
    options.lora.modules_to_save = meta["modules_to_save"].get<std::vector<std::string>>();
    GenerationModel loaded = GenerationModel::load(models_data_dir + "/tiny_phi_bnb4bit", options);
    PeftAdapter adapter = loaded.adapter();
    const auto read = [&](const std::string& key) {
      const SafetensorsTensor& stored = adapter_file.tensor("lora_init.base_model.model." + key);
      Tensor out(DType::F32, Shape(std::span<const std::int64_t>(stored.shape)));
      std::ranges::copy(stored.read<float>(), out.span<float>().begin());
      return out;
    };
    for (LoraModuleWeights& module : adapter.modules) {
      module.lora_A = read(module.path + ".lora_A.weight");
      module.lora_B = read(module.path + ".lora_B.weight");
    }
    for (auto& [key, tensor] : adapter.saved_tensors) tensor = read(key);
    loaded.load_adapter(adapter);
    return loaded;
  }();
  return model;
}

/// max |a - b| / max |b|.
inline double relative_error(std::span<const float> actual, std::span<const float> expected) {
  REQUIRE(actual.size() == expected.size());
  double worst = 0, scale = 0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    worst = std::max(worst, std::abs(double(actual[i]) - expected[i]));
    scale = std::max(scale, std::abs(double(expected[i])));
  }
  return scale == 0 ? worst : worst / scale;
}

}  // namespace qlora::test
