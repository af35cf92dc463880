// The fixture of tests/reference/nn_elementwise.py (torch / transformers
// forward outputs and autograd gradients of the norms, activations and
// embedding, with the inputs they were given), and the comparison the nn
// element-wise tests make against it.
#pragma once

#include <qlora/core/tensor.hpp>
#include <qlora/io/safetensors_reader.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace qlora::test {

inline const SafetensorsReader& elementwise_fixture() {
  static const SafetensorsReader reader =
      SafetensorsReader::open(std::string(QLORA_TEST_DATA_DIR) + "/nn/elementwise.safetensors");
  return reader;
}

/// The metadata of the fixture's cases of `op` ("layer_norm", "gelu_new", ...).
inline std::vector<nlohmann::json> fixture_cases(std::string_view op) {
  const auto cases = nlohmann::json::parse(elementwise_fixture().metadata_value("cases").value());
  std::vector<nlohmann::json> selected;
  for (const auto& c : cases) {
    if (c.at("op").get<std::string>() == op) selected.push_back(c);
  }
  REQUIRE(!selected.empty());
  return selected;
}

/// Fixture tensor "<case>.<name>" as an F32 tensor of its stored shape.
inline Tensor fixture_tensor(std::string_view case_name, std::string_view name) {
  const std::string key = std::string(case_name) + "." + std::string(name);
  const SafetensorsTensor& stored = elementwise_fixture().tensor(key);
  Tensor t(DType::F32, Shape(std::span<const std::int64_t>(stored.shape)));
  const std::vector<float> values = stored.read<float>();
  std::copy(values.begin(), values.end(), t.span<float>().begin());
  return t;
}

/// Fixture token ids "<case>.ids" (I32).
inline std::vector<std::int32_t> fixture_ids(std::string_view case_name) {
  return elementwise_fixture().read<std::int32_t>(std::string(case_name) + ".ids");
}

/// Requires |got − want| <= tolerance · max(|want|, floor) element by element
/// (a relative bound that turns absolute below `floor`), and reports the worst
/// element in those units.
inline void require_close(const TensorView& got, const TensorView& want, double tolerance, double floor,
                          std::string_view what) {
  REQUIRE(got.numel() == want.numel());
  const auto g = got.span<const float>();
  const auto w = want.span<const float>();
  double worst = 0.0;
  std::size_t worst_at = 0;
  for (std::size_t i = 0; i < g.size(); ++i) {
    const double error = std::abs(double(g[i]) - double(w[i])) / std::max(std::abs(double(w[i])), floor);
    if (!(error <= worst)) {  // also catches NaN
      worst = std::isnan(error) ? std::numeric_limits<double>::infinity() : error;
      worst_at = i;
    }
  }
  INFO(what << ": worst element " << worst_at << " got " << g[worst_at] << " want " << w[worst_at]
            << ", error " << worst / std::numeric_limits<float>::epsilon() << " fp32 eps (of max(|want|, " << floor
            << ")), allowed " << tolerance / std::numeric_limits<float>::epsilon());
  CHECK(worst <= tolerance);
}

/// Requires two tensors to hold the same bits (NaN-free data).
inline void require_identical(const TensorView& a, const TensorView& b, std::string_view what) {
  INFO(what);
  REQUIRE(a.numel() == b.numel());
  CHECK(std::memcmp(a.raw_data(), b.raw_data(), a.byte_size()) == 0);
}

}  // namespace qlora::test
