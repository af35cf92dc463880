// SafetensorsReader against the real Python safetensors package: files written
// by save_file read back to the recorded values, and every malformed or edge
// case in cases.json is accepted or rejected exactly as safetensors.deserialize
// and safe_open do, with the reference's error variant as the code.
#include <qlora/io/safetensors_reader.hpp>

#include <cstddef>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "io/test_support.hpp"

using qlora::DType;
using qlora::Error;
using qlora::SafetensorsReader;
using qlora::test::fixture;
using qlora::test::Json;

namespace {

/// The reader's error code for `bytes`, or "ok".
std::string outcome(std::span<const std::byte> bytes) {
  try {
    (void)SafetensorsReader::parse(bytes);
    return "ok";
  } catch (const Error& e) {
    return std::string(e.code());
  }
}

/// A safetensors file: the length prefix, `header`, then `data_bytes` zero bytes.
std::vector<std::byte> file_with_header(std::string_view header, std::size_t data_bytes = 0) {
  std::vector<std::byte> bytes(8 + header.size() + data_bytes);
  for (std::size_t i = 0; i < 8; ++i) bytes[i] = static_cast<std::byte>(header.size() >> (8 * i));
  std::memcpy(bytes.data() + 8, header.data(), header.size());
  return bytes;
}

}  // namespace

TEST_CASE("every file Python's save_file wrote reads back with the recorded dtypes, shapes and values") {
  const Json manifest = qlora::test::load_json(fixture("manifest.json"));
  for (const Json& file : manifest["files"]) {
    const std::string name = file["file"].get<std::string>();
    INFO("fixture " << name << " written by " << file["writer"].get<std::string>());
    const auto reader = SafetensorsReader::open(fixture(name));
    CHECK(reader.source() == fixture(name).string());
    CHECK(reader.tensors().size() == file["tensors"].size());
    for (const Json& record : file["tensors"]) {
      const qlora::SafetensorsTensor* tensor = reader.find(record["name"].get<std::string>());
      REQUIRE(tensor != nullptr);
      qlora::test::check_recorded_tensor(*tensor, record);
    }
    if (file["metadata"].is_null()) {
      CHECK_FALSE(reader.metadata().has_value());
    } else {
      REQUIRE(reader.metadata().has_value());
      CHECK(reader.metadata()->size() == file["metadata"].size());
      for (const auto& [key, value] : file["metadata"].items()) {
        CHECK(reader.metadata_value(key) == value.get<std::string>());
      }
    }
  }
}

TEST_CASE("tensors are listed in data order and their bytes tile the data section") {
  const auto reader = SafetensorsReader::open(fixture("torch_dtypes.safetensors"));
  const auto tensors = reader.tensors();
  REQUIRE(!tensors.empty());
  const std::byte* expected = tensors.front().data.data();
  for (const auto& t : tensors) {
    CHECK(t.data.data() == expected);
    expected += t.data.size();
  }
  // save_file puts the widest dtypes first, so every tensor is aligned for its type.
  CHECK(reader.view<double>("f64").size() == 10);
  CHECK(reader.view<float>("f32").size() == 10);
  CHECK(reader.header_size() % 8 == 0);
}

TEST_CASE("a file with unaligned data reads by copy, and a zero-copy view says why it cannot") {
  const auto reader = SafetensorsReader::open(fixture("unaligned.safetensors"));
  CHECK(reader.read<float>("x") == std::vector<float>{1.0f, -2.5f, 1e-3f});
  try {
    (void)reader.view<float>("x");
    FAIL("view of unaligned data did not throw");
  } catch (const Error& e) {
    CHECK(e.code() == "UnalignedTensor");
    CHECK_THAT(e.what(),
               Catch::Contains("unaligned.safetensors") && Catch::Contains("`x`") && Catch::Contains("read<T>()"));
  }
}

TEST_CASE("lookups: missing tensors, wrong dtypes, and errors that name the file and the tensor") {
  const auto reader = SafetensorsReader::open(fixture("torch_shapes.safetensors"));
  CHECK(reader.find("nope") == nullptr);
  try {
    (void)reader.tensor("nope");
    FAIL("tensor() of a missing name did not throw");
  } catch (const Error& e) {
    CHECK(e.code() == "TensorNotFound");
    CHECK_THAT(e.what(), Catch::Contains("torch_shapes.safetensors") && Catch::Contains("`nope`"));
  }
  try {
    (void)reader.read<float>("cube");
    FAIL("read<float> of an I32 tensor did not throw");
  } catch (const Error& e) {
    CHECK(e.code() == "DTypeMismatch");
    CHECK_THAT(e.what(), Catch::Contains("`cube`") && Catch::Contains("I32") && Catch::Contains("F32"));
  }
  CHECK(reader.tensor("scalar_f32").shape.empty());
  CHECK(reader.tensor("scalar_f32").numel() == 1);
  CHECK(reader.tensor("empty_3d").numel() == 0);
  CHECK(reader.read<float>("empty_1d").empty());
  CHECK(reader.view<qlora::bf16>("empty_3d").empty());
}

TEST_CASE("every case of cases.json gets the outcome of the real safetensors reader") {
  const Json cases = qlora::test::load_json(fixture("cases.json"));
  REQUIRE(cases["cases"].size() > 150);
  for (const Json& c : cases["cases"]) {
    const std::string name = c["name"].get<std::string>();
    const Json& reference = c["reference"];
    const std::string expected = c.contains("qlora_code")      ? c["qlora_code"].get<std::string>()
                                 : reference["ok"].get<bool>() ? std::string("ok")
                                                               : reference["variant"].get<std::string>();
    INFO("case " << name
                 << (reference["ok"].get<bool>() ? std::string(": the reference accepts it")
                                                 : ": the reference says " + reference["message"].get<std::string>()));
    const std::vector<std::byte> bytes = qlora::test::from_hex(c["hex"].get<std::string>());
    CHECK(outcome(bytes) == expected);
    if (expected != "ok") continue;
    // Same tensors, with the same bytes, as deserialize() listed (sorted by name).
    const auto reader = SafetensorsReader::parse(bytes);
    const Json& listing = reference["tensors"];
    REQUIRE(reader.tensors().size() == listing.size());
    for (const Json& row : listing) {
      const qlora::SafetensorsTensor* t = reader.find(row[0].get<std::string>());
      REQUIRE(t != nullptr);
      CHECK(qlora::dtype_name(t->dtype) == row[1].get<std::string>());
      CHECK(t->shape == row[2].get<std::vector<std::int64_t>>());
      CHECK(t->data.size() * 2 == row[3].get<std::string>().size());
      CHECK(std::vector<std::byte>(t->data.begin(), t->data.end()) == qlora::test::from_hex(row[3].get<std::string>()));
    }
  }
}

TEST_CASE("messages say what was expected") {
  const auto message = [](const std::vector<std::byte>& bytes) {
    try {
      (void)SafetensorsReader::parse(bytes);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const auto raw = [](std::string_view text) {
    const auto bytes = std::as_bytes(std::span(text.data(), text.size()));
    return std::vector<std::byte>(bytes.begin(), bytes.end());
  };
  CHECK_THAT(
      message(raw("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n")),
      Catch::StartsWith("[HeaderTooLarge]") && Catch::Contains("Git LFS pointer") && Catch::Contains("git lfs pull"));
  CHECK_THAT(message(raw("PK\x03\x04zipzipzip")), Catch::Contains("zip archive"));
  CHECK_THAT(message(file_with_header(R"({"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,4]}})", 4)),
             Catch::StartsWith("[TensorInvalidInfo]") && Catch::Contains("`test`") && Catch::Contains("16 bytes") &&
                 Catch::Contains("span 4"));
  CHECK_THAT(message(file_with_header(R"({"w":{"dtype":"I32","shape":[1],"data_offsets":[4,8]}})", 8)),
             Catch::StartsWith("[InvalidOffset]") && Catch::Contains("`w`") && Catch::Contains("starting at 0"));
  CHECK_THAT(message(file_with_header(R"({"w":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}})", 4)),
             Catch::StartsWith("[InvalidHeaderDeserialization]") && Catch::Contains("`w`") &&
                 Catch::Contains("unknown dtype \"F33\""));
  CHECK_THAT(message(file_with_header(R"({"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,4]}})", 4)),
             Catch::Contains("`w`") && Catch::Contains("shape must hold integers >= 0, not a negative integer"));
  CHECK_THAT(message(file_with_header(R"({"__metadata__":{"k":"a","k":"b"}})")),
             Catch::StartsWith("[DuplicateKey]") && Catch::Contains("metadata key `k`"));
  CHECK_THAT(message(file_with_header(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 3)),
             Catch::StartsWith("[MetadataIncompleteBuffer]") && Catch::Contains("trailing bytes"));
}

TEST_CASE("open() names the file in its errors and reports missing files") {
  try {
    (void)SafetensorsReader::open(fixture("manifest.json"));
    FAIL("a JSON file parsed as safetensors");
  } catch (const Error& e) {
    CHECK(e.code() == "HeaderTooLarge");
    CHECK_THAT(e.what(), Catch::Contains("manifest.json") && Catch::Contains("JSON file"));
  }
  try {
    (void)SafetensorsReader::open(fixture("no-such-file.safetensors"));
    FAIL("a missing file opened");
  } catch (const Error& e) {
    CHECK(e.code() == "IoError");
    CHECK_THAT(e.what(), Catch::Contains("no-such-file.safetensors") && Catch::Contains("No such file"));
  }
}
