// Helpers shared by the io/ tests: fixture paths, files as bytes, hex, JSON
// fixtures, scratch directories, and checking a tensor against the values a
// Python reference script recorded.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#include <qlora/core/dtype.hpp>
#include <qlora/io/detail/json.hpp>
#include <qlora/io/safetensors_tensor.hpp>

namespace qlora::test {

using Json = detail::Json;

/// tests/data/io/<name>
inline std::filesystem::path fixture(std::string_view name) {
  return std::filesystem::path(QLORA_TEST_DATA_DIR) / "io" / name;
}

inline std::vector<std::byte> read_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  const std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> bytes(chars.size());
  if (!chars.empty()) std::memcpy(bytes.data(), chars.data(), chars.size());
  return bytes;
}

inline void write_bytes(const std::filesystem::path& path, std::string_view text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  REQUIRE(out.good());
}

inline std::string read_text(const std::filesystem::path& path) {
  const std::vector<std::byte> bytes = read_bytes(path);
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

inline std::vector<std::byte> from_hex(std::string_view hex) {
  REQUIRE(hex.size() % 2 == 0);
  std::vector<std::byte> bytes(hex.size() / 2);
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    bytes[i] = static_cast<std::byte>(std::stoul(std::string(hex.substr(2 * i, 2)), nullptr, 16));
  }
  return bytes;
}

inline Json load_json(const std::filesystem::path& path) { return Json::parse(read_text(path)); }

/// A fresh directory under the system temp directory, removed with its content.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "qlora-io-test-XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    path_ = pattern;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  [[nodiscard]] const std::filesystem::path& path() const { return path_; }
  [[nodiscard]] std::filesystem::path operator/(std::string_view name) const { return path_ / name; }

  /// The names in the directory, sorted.
  [[nodiscard]] std::vector<std::string> listing() const {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(path_)) names.push_back(entry.path().filename());
    std::sort(names.begin(), names.end());
    return names;
  }

 private:
  std::filesystem::path path_;
};

/// A recorded float: a JSON number, or "nan" / "inf" / "-inf".
inline double recorded_float(const Json& value) {
  if (value.is_number()) return value.get<double>();
  const auto text = value.get<std::string>();
  if (text == "nan") return std::nan("");
  return text == "inf" ? INFINITY : -INFINITY;
}

/// Same value and, for zeros, same sign; NaN equals NaN.
inline bool same_float(double actual, double expected) {
  if (std::isnan(expected)) return std::isnan(actual);
  return actual == expected && std::signbit(actual) == std::signbit(expected);
}

template <class T, class ToDouble>
void check_floats(const SafetensorsTensor& tensor, const Json& expected, ToDouble to_double) {
  const std::vector<T> values = tensor.read<T>();
  REQUIRE(values.size() == expected.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    INFO("element " << i);
    CHECK(same_float(to_double(values[i]), recorded_float(expected[i])));
  }
}

template <class T>
void check_integers(const SafetensorsTensor& tensor, const Json& expected) {
  const std::vector<T> values = tensor.read<T>();
  REQUIRE(values.size() == expected.size());
  for (std::size_t i = 0; i < values.size(); ++i) CHECK(values[i] == expected[i].get<T>());
}

/// Checks `tensor` against a manifest.json record {name, dtype, shape, values | raw}.
inline void check_recorded_tensor(const SafetensorsTensor& tensor, const Json& record) {
  INFO("tensor " << record["name"].get<std::string>());
  CHECK(tensor.name == record["name"].get<std::string>());
  CHECK(dtype_name(tensor.dtype) == record["dtype"].get<std::string>());
  CHECK(tensor.shape == record["shape"].get<std::vector<std::int64_t>>());
  if (record.contains("raw")) {
    const auto raw = record["raw"].get<std::vector<std::uint8_t>>();
    REQUIRE(tensor.data.size() == raw.size());
    for (std::size_t i = 0; i < raw.size(); ++i) CHECK(std::to_integer<std::uint8_t>(tensor.data[i]) == raw[i]);
    return;
  }
  const Json& values = record["values"];
  switch (tensor.dtype) {
    case DType::F64:
      check_floats<double>(tensor, values, [](double v) { return v; });
      break;
    case DType::F32:
      check_floats<float>(tensor, values, [](float v) { return double{v}; });
      break;
    case DType::F16:
      check_floats<fp16>(tensor, values, [](fp16 v) { return double{v.to_float()}; });
      break;
    case DType::BF16:
      check_floats<bf16>(tensor, values, [](bf16 v) { return double{v.to_float()}; });
      break;
    case DType::I64:
      check_integers<std::int64_t>(tensor, values);
      break;
    case DType::I32:
      check_integers<std::int32_t>(tensor, values);
      break;
    case DType::I16:
      check_integers<std::int16_t>(tensor, values);
      break;
    case DType::I8:
      check_integers<std::int8_t>(tensor, values);
      break;
    case DType::U64:
      check_integers<std::uint64_t>(tensor, values);
      break;
    case DType::U32:
      check_integers<std::uint32_t>(tensor, values);
      break;
    case DType::U16:
      check_integers<std::uint16_t>(tensor, values);
      break;
    case DType::U8:
      check_integers<std::uint8_t>(tensor, values);
      break;
    case DType::BOOL: {
      const std::vector<bool> flags = tensor.read<bool>();
      REQUIRE(flags.size() == values.size());
      for (std::size_t i = 0; i < flags.size(); ++i) CHECK(flags[i] == values[i].get<bool>());
      break;
    }
    case DType::C64: {  // (real, imaginary) float pairs; there is no C++ element type for it
      REQUIRE(tensor.data.size() == values.size() * 8);
      for (std::size_t i = 0; i < values.size(); ++i) {
        float parts[2];
        std::memcpy(parts, tensor.data.data() + 8 * i, sizeof parts);
        CHECK(same_float(parts[0], recorded_float(values[i][0])));
        CHECK(same_float(parts[1], recorded_float(values[i][1])));
      }
      break;
    }
    default:
      FAIL("no recorded values for dtype " << dtype_name(tensor.dtype));
  }
}

}  // namespace qlora::test
