// What the generation tests share: tests/reference/generation.py's fixture
// (tests/data/models/generation_reference.safetensors) and the model it was
// recorded with — tiny_phi_bnb4bit (NF4 as bitsandbytes stored it, compute
// fp32) with the PEFT adapter lora_init.* of tiny_phi_reference.safetensors.
#pragma once

#include <qlora/io/safetensors_reader.hpp>
#include <qlora/models/phi.hpp>

#include "models/model_fixture.hpp"

#include <catch2/catch.hpp>
#include <cstdint>
#include <string_view>
#include <vector>

namespace qlora::test {

inline const SafetensorsReader& generation_reference() {
  static const SafetensorsReader reader =
      SafetensorsReader::open(models_dir + "/generation_reference.safetensors");
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
  static const ModelFixture phi("tiny_phi");
  static const GenerationModel model = phi.model<GenerationModel>("tiny_phi_bnb4bit", phi.options());
  return model;
}

}  // namespace qlora::test
