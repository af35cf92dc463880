// bitsandbytes' checkpoint layout against a real checkpoint: a tiny Llama
// that transformers 5.23 quantized with bitsandbytes 0.50.2 (NF4, double
// quantization) and saved (tests/reference/bnb_4bit_model.py).
//  - Reading: every 4-bit weight loads, and dequantizes to exactly the bf16
//    values bitsandbytes' dequantize_4bit gives for it.
//  - Writing: quantizing the original bf16 weights ourselves and writing them
//    with the same other tensors reproduces transformers' file byte for byte,
//    so what we write loads in transformers as its own output does.
#include <qlora/quant/bnb_format.hpp>

#include <catch2/catch.hpp>

#include <qlora/io/safetensors_reader.hpp>
#include <qlora/quant/blockwise_4bit.hpp>

using namespace qlora;

namespace {

const std::string data_dir = QLORA_TEST_DATA_DIR "/quant/";

std::vector<std::string> four_bit_weights(const SafetensorsReader& reader) {
  std::vector<std::string> names;
  for (const auto& tensor : reader.tensors()) {
    if (bnb_4bit_type(reader, tensor.name)) names.push_back(tensor.name);
  }
  return names;
}

}  // namespace

TEST_CASE("a transformers bnb-4bit checkpoint loads and dequantizes like bitsandbytes") {
  const auto model = SafetensorsReader::open(data_dir + "tiny_bnb4bit/model.safetensors");
  const auto expected = SafetensorsReader::open(data_dir + "tiny_bnb4bit_dequant.safetensors");
  const auto names = four_bit_weights(model);
  REQUIRE(names.size() == 14);  // 2 layers x (q, k, v, o, gate, up, down)
  for (const auto& name : names) {
    INFO(name);
    const Quantized4bit q = read_bnb_4bit(model, name);
    CHECK(q.state.quant_type == QuantType::nf4);
    CHECK(q.state.nested.has_value());
    CHECK(q.state.dtype == DType::BF16);
    const auto& stored_json = model.tensor(Bnb4bitKeys::of(name, QuantType::nf4).quant_state);
    CHECK(bnb_quant_state_json(q.state) ==
          std::string_view(reinterpret_cast<const char*>(stored_json.data.data()), stored_json.data.size()));
    std::vector<bf16> out(static_cast<std::size_t>(q.state.numel()));
    dequantize_4bit<bf16>(q.packed, q.state, std::span<bf16>(out));
    CHECK(out == expected.read<bf16>(name));
  }
}

TEST_CASE("quantizing the bf16 model ourselves reproduces transformers' bnb-4bit file byte for byte") {
  const auto original = SafetensorsReader::open(data_dir + "tiny_bf16/model.safetensors");
  const auto bnb_file = SafetensorsReader::open(data_dir + "tiny_bnb4bit/model.safetensors");
  const auto names = four_bit_weights(bnb_file);
  std::vector<Quantized4bit> quantized;
  quantized.reserve(names.size());
  for (const auto& name : names) {
    const auto& weight = original.tensor(name);
    const auto values = weight.read<bf16>();
    quantized.push_back(quantize_4bit<NF4, bf16>(values, weight.shape, {.blocksize = 64, .double_quant = true}));
  }
  SafetensorsWriter writer;
  std::vector<Bnb4bitTensors> entries;
  for (std::size_t i = 0; i < names.size(); ++i) entries.emplace_back(names[i], quantized[i]);
  for (const auto& entry : entries) entry.add_to(writer);
  for (const auto& tensor : bnb_file.tensors()) {
    const bool part_of_4bit_weight = std::ranges::any_of(names, [&](const std::string& name) {
      return tensor.name == name || tensor.name.starts_with(name + ".");
    });
    if (!part_of_4bit_weight) writer.add(tensor);  // embeddings and norms stay bf16
  }
  const auto ours = writer.serialize();
  const auto theirs = MappedFile(data_dir + "tiny_bnb4bit/model.safetensors");
  CHECK(std::ranges::equal(ours, theirs.bytes()));
}

TEST_CASE("malformed bnb-4bit tensors give named errors") {
  const std::vector<float> weight(64 * 3, 0.25f);
  const Quantized4bit q = quantize_4bit<NF4, float>(weight, {3, 64}, {.double_quant = true});
  const auto error_code = [&](auto&& mutate) -> std::string {
    SafetensorsWriter writer;
    Quantized4bit copy = q;
    std::string json = bnb_quant_state_json(copy.state);
    mutate(copy, json);
    const Bnb4bitKeys keys = Bnb4bitKeys::of("w", QuantType::nf4);
    writer.add(keys.weight, {static_cast<std::int64_t>(copy.packed.size()), 1}, copy.packed);
    writer.add(keys.absmax, {static_cast<std::int64_t>(copy.state.nested->codes.size())}, copy.state.nested->codes);
    writer.add(keys.nested_absmax, {static_cast<std::int64_t>(copy.state.nested->absmax.size())}, copy.state.nested->absmax);
    writer.add(keys.nested_quant_map, {static_cast<std::int64_t>(copy.state.nested->code_map.size())}, copy.state.nested->code_map);
    writer.add(keys.quant_state, DType::U8, {static_cast<std::int64_t>(json.size())}, std::as_bytes(std::span(json)));
    const auto bytes = writer.serialize();
    try {
      (void)read_bnb_4bit(SafetensorsReader::parse(bytes), "w");
    } catch (const Error& e) {
      return std::string(e.code());
    }
    return "no error";
  };
  CHECK(error_code([](Quantized4bit&, std::string&) {}) == "no error");
  CHECK(error_code([](Quantized4bit& c, std::string&) { c.packed.pop_back(); }) == "QuantStateMismatch");
  CHECK(error_code([](Quantized4bit& c, std::string&) { c.state.nested->codes.pop_back(); }) == "BnbFormat");
  CHECK(error_code([](Quantized4bit& c, std::string&) { c.state.nested->code_map.resize(255); }) == "BnbFormat");
  CHECK(error_code([](Quantized4bit&, std::string& j) { j = "{\"quant_type\": \"nf4\""; }) == "BnbFormat");
  CHECK(error_code([](Quantized4bit&, std::string& j) { j.replace(j.find("64"), 2, "48"); }) == "InvalidBlocksize");
  CHECK(error_code([](Quantized4bit&, std::string& j) { j.replace(j.find("[3, 64]"), 7, "[3, 65]"); }) == "BnbFormat");
  CHECK(error_code([](Quantized4bit&, std::string& j) { j.replace(j.find("[3, 64]"), 7, "[-3, 64]"); }) == "BnbFormat");
  CHECK(error_code([](Quantized4bit&, std::string& j) { j.replace(j.find("float32"), 7, "float64"); }) == "BnbFormat");
  CHECK(error_code([](Quantized4bit&, std::string& j) {
          j.replace(j.find("[3, 64]"), 7, "[4294967296, 4294967296]");
        }) == "BnbFormat");
  CHECK(error_code([](Quantized4bit&, std::string& j) { j.replace(j.find("\"nf4\""), 5, "\"fp4\""); }) == "BnbFormat");
}

TEST_CASE("the quant-state JSON is Python's json.dumps text") {
  QuantState state{QuantType::fp4, 128, DType::F16, {7, 9}, {}, std::nullopt};
  CHECK(bnb_quant_state_json(state) == R"({"quant_type": "fp4", "blocksize": 128, "dtype": "float16", "shape": [7, 9]})");
  state.nested = NestedAbsmax{};
  // Python's repr of these float32 values widened to double:
  for (const auto& [offset, repr] : std::vector<std::pair<float, std::string>>{
           {0.07020378112792969f, "0.07020378112792969"}, {1e-05f, "9.999999747378752e-06"}, {3.0f, "3.0"},
           {1.5e17f, "1.499999976460124e+17"}, {0.0001f, "9.999999747378752e-05"},
           {1e15f, "999999986991104.0"}, {1e16f, "1.0000000272564224e+16"}, {0.0f, "0.0"}}) {
    state.nested->offset = offset;
    CHECK_THAT(bnb_quant_state_json(state), Catch::EndsWith(R"("nested_offset": )" + repr + "}"));
  }
}
