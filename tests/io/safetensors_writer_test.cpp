// SafetensorsWriter against the real Python safetensors package: for the same
// tensors and metadata it writes the very bytes save_file wrote (tensor order,
// JSON spelling and escapes, padding), and it refuses what the format cannot hold.
#include <qlora/io/safetensors_writer.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <qlora/io/safetensors_reader.hpp>

#include "io/test_support.hpp"

using qlora::bf16;
using qlora::DType;
using qlora::Error;
using qlora::fp16;
using qlora::SafetensorsReader;
using qlora::SafetensorsWriter;
using qlora::test::fixture;
using qlora::test::Json;

namespace {

std::string error_code_of(auto&& action) {
  try {
    action();
  } catch (const Error& e) {
    return std::string(e.code());
  }
  return "no error";
}

template <class T, class Convert>
std::vector<T> recorded_values(const Json& record, Convert convert) {
  std::vector<T> values;
  for (const Json& v : record["values"]) values.push_back(convert(v));
  return values;
}

}  // namespace

TEST_CASE("rewriting each file Python wrote, with the same metadata, gives the same bytes") {
  const Json manifest = qlora::test::load_json(fixture("manifest.json"));
  qlora::test::TempDir dir;
  for (const Json& file : manifest["files"]) {
    const std::string name = file["file"].get<std::string>();
    if (name == "unaligned.safetensors") continue;  // hand-assembled, not save_file's layout
    INFO("fixture " << name << " written by " << file["writer"].get<std::string>());
    const std::vector<std::byte> python_bytes = qlora::test::read_bytes(fixture(name));
    const auto python_file = SafetensorsReader::parse(python_bytes);
    SafetensorsWriter writer;
    // Added in reverse data order: the writer must do the sorting itself.
    const auto tensors = python_file.tensors();
    for (auto it = tensors.rbegin(); it != tensors.rend(); ++it) writer.add(*it);
    writer.set_metadata(python_file.metadata());
    CHECK(writer.serialize() == python_bytes);
    writer.write(dir / name);
    CHECK(qlora::test::read_bytes(dir / name) == python_bytes);
  }
}

TEST_CASE("tensors built from the recorded values give save_file's bytes") {
  const Json manifest = qlora::test::load_json(fixture("manifest.json"));
  const Json* shapes = nullptr;
  for (const Json& file : manifest["files"]) {
    if (file["file"] == "torch_shapes.safetensors") shapes = &file;
  }
  REQUIRE(shapes != nullptr);
  const auto record = [&](std::string_view name) -> const Json& {
    for (const Json& t : (*shapes)["tensors"]) {
      if (t["name"] == name) return t;
    }
    FAIL("no record " << name);
    return (*shapes)["tensors"][0];
  };
  const auto shape = [&](std::string_view name) { return record(name)["shape"].get<std::vector<std::int64_t>>(); };
  const auto to_float = [](const Json& v) { return v.get<float>(); };
  const auto to_bf16 = [](const Json& v) { return bf16::from_float(v.get<float>()); };
  const std::vector<float> scalar_f32 = recorded_values<float>(record("scalar_f32"), to_float);
  const std::vector<std::int64_t> scalar_i64 =
      recorded_values<std::int64_t>(record("scalar_i64"), [](const Json& v) { return v.get<std::int64_t>(); });
  const std::vector<float> empty_1d;
  const std::vector<bf16> empty_3d;
  const std::vector<std::int32_t> cube =
      recorded_values<std::int32_t>(record("cube"), [](const Json& v) { return v.get<std::int32_t>(); });
  const std::vector<bf16> ramp = recorded_values<bf16>(record("ramp"), to_bf16);
  const std::vector<std::uint8_t> one = {200};
  const std::vector<fp16> half =
      recorded_values<fp16>(record("half"), [](const Json& v) { return fp16::from_float(v.get<float>()); });

  SafetensorsWriter writer;
  writer.add("half", shape("half"), half)
      .add("one", shape("one"), one)
      .add("ramp", shape("ramp"), ramp)
      .add("cube", shape("cube"), cube)
      .add("empty_3d", shape("empty_3d"), empty_3d)
      .add("empty_1d", shape("empty_1d"), empty_1d)
      .add("scalar_i64", shape("scalar_i64"), scalar_i64)
      .add("scalar_f32", shape("scalar_f32"), scalar_f32);
  CHECK(writer.serialize() == qlora::test::read_bytes(fixture("torch_shapes.safetensors")));
}

TEST_CASE("what the writer writes, the reader reads back") {
  const std::vector<double> wide = {1.0, -2.0};
  const std::vector<std::uint8_t> packed_f4 = {0x12, 0x34, 0x56};  // 6 F4 values
  const std::vector<bool> flags_source = {true, false};
  const std::uint8_t flag_bytes[2] = {1, 0};
  SafetensorsWriter writer;
  writer.add("z.wide", {2}, wide);
  writer.add("a.f4", DType::F4, {2, 3}, std::as_bytes(std::span(packed_f4)));
  writer.add("m.flags", DType::BOOL, {2}, std::as_bytes(std::span(flag_bytes)));
  writer.set_metadata(qlora::SafetensorsMetadata{{"format", "pt"}, {"note", "ü \"quoted\"\n"}});
  const std::vector<std::byte> bytes = writer.serialize();
  const auto reader = SafetensorsReader::parse(bytes);
  CHECK(reader.read<double>("z.wide") == wide);
  CHECK(reader.read<bool>("m.flags") == flags_source);
  CHECK(reader.tensor("a.f4").shape == std::vector<std::int64_t>{2, 3});
  CHECK(reader.tensor("a.f4").data.size() == 3);
  CHECK(reader.metadata_value("note") == "ü \"quoted\"\n");
  CHECK(reader.tensors()[0].name == "z.wide");  // F64, then F4, then BOOL (DType order, descending)
  CHECK(reader.tensors()[1].name == "a.f4");
  CHECK(reader.header_size() % 8 == 0);
}

TEST_CASE("the writer refuses what the format cannot hold, with named errors") {
  const std::vector<float> three = {1, 2, 3};
  const std::vector<std::uint8_t> byte = {1};
  SafetensorsWriter writer;
  writer.add("w", {3}, three);
  CHECK(error_code_of([&] { writer.add("w", {3}, three); }) == "DuplicateKey");
  CHECK(error_code_of([&] { writer.add("x", {2, 2}, three); }) == "InvalidTensorView");
  CHECK(error_code_of([&] { writer.add("x", {-3}, three); }) == "InvalidTensorView");
  CHECK(error_code_of([&] { writer.add("x", DType::F4, {3}, std::as_bytes(std::span(byte))); }) == "MisalignedSlice");
  CHECK(error_code_of([&] { writer.add("x", {1LL << 62, 8}, three); }) == "ValidationOverflow");
  CHECK(error_code_of([&] { writer.add("__metadata__", {3}, three); }) == "InvalidTensorName");
  CHECK(error_code_of([&] { writer.add("bad\xff", {3}, three); }) == "InvalidTensorName");
  CHECK(error_code_of([&] { writer.set_metadata(qlora::SafetensorsMetadata{{"k", "\xc0"}}); }) == "InvalidMetadata");
  CHECK(error_code_of([&] {
          writer.set_metadata(qlora::SafetensorsMetadata{{"k", "a"}, {"k", "b"}});
        }) == "DuplicateKey");
  CHECK(writer.tensors().size() == 1);  // nothing was added by the failures

  try {
    writer.add("x", {2, 2}, three);
  } catch (const Error& e) {
    CHECK(e.message() == "tensor `x`: a F32 tensor of shape [2, 2] has 16 bytes, not 12");
  }

  const std::string huge(100'000'000, 'v');
  writer.set_metadata(qlora::SafetensorsMetadata{{"format", "pt"}, {"huge", huge}});
  CHECK(error_code_of([&] { (void)writer.serialize(); }) == "HeaderTooLarge");
}

TEST_CASE("write() replaces a file in place and names the path when it cannot") {
  qlora::test::TempDir dir;
  qlora::test::write_bytes(dir / "model.safetensors", "previous");
  const std::vector<float> values = {1, 2};
  SafetensorsWriter writer;
  writer.add("w", {2}, values);
  writer.write(dir / "model.safetensors");
  CHECK(SafetensorsReader::open(dir / "model.safetensors").read<float>("w") == values);
  CHECK(dir.listing() == std::vector<std::string>{"model.safetensors"});
  try {
    writer.write(dir / "missing" / "model.safetensors");
    FAIL("writing into a missing directory succeeded");
  } catch (const Error& e) {
    CHECK(e.code() == "IoError");
    CHECK_THAT(e.what(), Catch::Contains((dir / "missing" / "model.safetensors").string()));
  }
}
