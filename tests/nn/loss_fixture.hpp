// One case of tests/reference/nn_loss.py (tests/data/nn/loss_<name>.safetensors):
// the head's inputs regenerated with the script's generator (its probes prove
// both sides drew the same numbers), the labels, and the float64 truth with
// torch's float32 error against it. Shared by the lm_head and cross_entropy tests.
#pragma once

#include <qlora/core/tensor.hpp>
#include <qlora/io/safetensors_reader.hpp>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "support/tensors.hpp"

namespace qlora::test {

inline constexpr const char* loss_case_names[] = {"batch_rows", "packed", "short", "large_logits"};

struct LossCase {
  LossCase(std::string case_name, SafetensorsReader file) : name(std::move(case_name)), fixture(std::move(file)) {}

  std::string name;
  SafetensorsReader fixture;
  nlohmann::json meta;
  std::int64_t tokens = 0, width = 0, vocab = 0, row_length = 0;
  Tensor hidden, weight, bias;  // bias: empty Tensor when the case has none
  std::vector<std::int32_t> labels;

  [[nodiscard]] bool has_bias() const { return bias.view().raw_data() != nullptr; }
  [[nodiscard]] std::vector<float> truth(const std::string& tensor) const { return fixture.read<float>(tensor); }
};

inline void check_probes(const nlohmann::json& probes, const std::string& name, const TensorView& t) {
  INFO("probe " << name);
  const auto values = t.span<const float>();
  const auto hex = [](float v) { return fmt::format("{:08x}", std::bit_cast<std::uint32_t>(v)); };
  CHECK(probes.at(name).at(0).get<std::string>() == hex(values[0]));
  CHECK(probes.at(name).at(1).get<std::string>() == hex(values[1]));
  CHECK(probes.at(name).at(2).get<std::string>() == hex(values[values.size() - 1]));
}

inline LossCase load_loss_case(const std::string& name) {
  LossCase c{name, SafetensorsReader::open(std::string(QLORA_TEST_DATA_DIR) + "/nn/loss_" + name + ".safetensors")};
  c.meta = nlohmann::json::parse(std::string(c.fixture.metadata_value("case").value()));
  c.tokens = c.meta.at("T");
  c.width = c.meta.at("H");
  c.vocab = c.meta.at("V");
  c.row_length = c.meta.at("row_length");
  const std::uint64_t seed = c.meta.at("seed");
  const auto count = [](std::int64_t n) { return static_cast<std::size_t>(n); };
  c.hidden = tensor_of<float>(normalish(count(c.tokens * c.width), 100 * seed + 1, 1.0), {c.tokens, c.width});
  c.weight = tensor_of<float>(normalish(count(c.vocab * c.width), 100 * seed + 2, c.meta.at("w_scale").get<double>()),
                              {c.vocab, c.width});
  const nlohmann::json& probes = c.meta.at("probes");
  check_probes(probes, "hidden", c.hidden.view());
  check_probes(probes, "weight", c.weight.view());
  if (c.meta.at("bias").get<bool>()) {
    std::vector<float> bias = normalish(count(c.vocab), 100 * seed + 3, 0.5);
    const auto offset = static_cast<float>(c.meta.at("bias_offset").get<double>());
    for (float& b : bias) b += offset;  // float32 addition, as the script's numpy does
    c.bias = tensor_of<float>(bias, {c.vocab});
    check_probes(probes, "bias", c.bias.view());
  }
  c.labels = c.fixture.read<std::int32_t>("labels");
  return c;
}

struct Errors {
  double max_abs = 0, rms = 0;
};

inline Errors errors_against(std::span<const float> got, const std::vector<float>& truth) {
  REQUIRE(got.size() == truth.size());
  Errors e;
  double sum = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double d = std::abs(double(got[i]) - double(truth[i]));
    e.max_abs = std::max(e.max_abs, d);
    sum += d * d;
  }
  e.rms = got.empty() ? 0.0 : std::sqrt(sum / static_cast<double>(got.size()));
  return e;
}

/// Our error on `output` against the float64 truth is at most twice torch's
/// float32 error (max and rms), plus twice the floor the fixture records for
/// gradients: the error of the exact gradient of the exact logits rounded once
/// to fp32. Both sides compute the same formulas with fp32 products and sums,
/// so their errors are of the same size; twice leaves room for another
/// summation order (and for Eigen without FMA). The floor term matters only
/// where logits are large (near 150: an ulp is 1.5e-5): there the logits'
/// own rounding dominates every fp32 implementation's gradient error, and
/// which elements it hits depends on how each one's logits happened to round.
/// A real mistake (a wrong scale, a shifted target, a missing bias or block:
/// errors of 1e-5 and more) still fails.
inline void check_against_torch(const LossCase& c, const std::string& output, std::span<const float> ours) {
  const Errors e = errors_against(ours, c.truth(output + "_true"));
  const nlohmann::json& torch = c.meta.at("torch");
  const auto allowed = [&](const char* stat) {
    const double floor = torch.contains("floor") && torch.at("floor").contains(output)
                             ? torch.at("floor").at(output).at(stat).get<double>()
                             : 0.0;
    return 2 * (torch.at(output).at(stat).get<double>() + floor);
  };
  INFO(c.name << " " << output << ": ours max " << e.max_abs << " rms " << e.rms << "; allowed max "
              << allowed("max_abs_err") << " rms " << allowed("rms_err"));
  CHECK(e.max_abs <= allowed("max_abs_err"));
  CHECK(e.rms <= allowed("rms_err"));
}

/// A bound on the error of any fp32 evaluation of a logit h·w + b, whatever
/// the order of its sums: γ_{H+1}·max(Σ|h_k·w_k| + |b|) with γ_n = n·u/(1 − n·u),
/// u = 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms, §3.1).
inline double logit_error_bound(const LossCase& c) {
  const auto h = c.hidden.span<const float>(), w = c.weight.span<const float>();
    double worst = 0;
  for (std::int64_t t = 0; t < c.tokens; ++t) {
    for (std::int64_t v = 0; v < c.vocab; ++v) {
      double magnitude = c.has_bias() ? std::abs(double(c.bias.span<const float>()[static_cast<std::size_t>(v)])) : 0.0;
      for (std::int64_t k = 0; k < c.width; ++k) {
        magnitude += std::abs(double(h[static_cast<std::size_t>(t * c.width + k)]) *
                              double(w[static_cast<std::size_t>(v * c.width + k)]));
      }
      worst = std::max(worst, magnitude);
    }
  }
  const double nu = double(c.width + 1) * std::ldexp(1.0, -24);
  return nu / (1 - nu) * worst;
}

}  // namespace qlora::test
