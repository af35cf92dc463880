// LoraLinear against torch + peft + bitsandbytes: tests/reference/lora_linear.py
// ran PEFT's QLoRA layer (bnb Linear4bit base, or a plain Linear for Quant =
// None) on CPU for seven shapes and compute dtypes, and recorded its outputs
// and gradients next to a float64 evaluation of the same maths ("truth").
// Inputs are not stored: both sides draw them from the same splitmix
// generator, and the fixture's probes (bit patterns of a few elements) prove
// the C++ side drew the same numbers. The base weight is ours quantized from
// the same bf16 W, checked byte for byte against bitsandbytes' packing.
//
// Tolerance (the reference rule): for each of y, dx, dA, dB and db,
// our max and rms error against the truth must be at most twice torch's. Both
// implementations compute the same formulas with fp32 accumulation, so their
// errors are of the same size; twice leaves room for a different summation
// order without letting a real mistake (a wrong scale, a missing term, a
// transposed operand: errors of order 1) through.
#include <qlora/lora/lora_linear.hpp>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <string>
#include <vector>

#include <qlora/io/safetensors_reader.hpp>

#include "support/tensors.hpp"

using namespace qlora;
using test::as_double;
using test::tensor_of;
using nlohmann::json;

namespace {

template <class T>
std::string hex_bits(T value) {
  if constexpr (sizeof(T) == 2) {
    std::uint16_t bits;
    std::memcpy(&bits, &value, 2);
    return fmt::format("{:04x}", bits);
  } else {
    std::uint32_t bits;
    std::memcpy(&bits, &value, 4);
    return fmt::format("{:08x}", bits);
  }
}

/// The fixture's probes: elements 0, 1 and -1 of a generated input, as hex bits.
template <class T>
void check_probes(const json& probes, const std::string& name, const TensorView& t) {
  INFO("probe " << name);
  const auto values = t.span<const T>();
  REQUIRE(probes.contains(name));
  CHECK(probes[name][0].get<std::string>() == hex_bits(values[0]));
  CHECK(probes[name][1].get<std::string>() == hex_bits(values[1]));
  CHECK(probes[name][2].get<std::string>() == hex_bits(values[values.size() - 1]));
}

struct Errors {
  double max_abs = 0, rms = 0;
};

Errors errors_against(const std::vector<double>& got, const std::vector<float>& truth) {
  REQUIRE(got.size() == truth.size());
  Errors e;
  double sum = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double d = std::abs(got[i] - truth[i]);
    e.max_abs = std::max(e.max_abs, d);
    sum += d * d;
  }
  e.rms = std::sqrt(sum / static_cast<double>(got.size()));
  return e;
}

/// Our error on `name` against the truth is at most twice torch's (max and rms).
void check_against_torch(const json& c, const SafetensorsReader& fixture, const std::string& name,
                         const std::vector<double>& ours) {
  const std::string prefix = c.at("name").get<std::string>() + ".";
  const Errors e = errors_against(ours, fixture.read<float>(prefix + name + "_true"));
  const json& torch = c.at("stats").at(name);
  INFO(prefix << name << ": ours max " << e.max_abs << " rms " << e.rms << "; torch max "
              << torch.at("max_abs_err").get<double>() << " rms " << torch.at("rms_err").get<double>());
  CHECK(e.max_abs <= 2 * torch.at("max_abs_err").get<double>());
  CHECK(e.rms <= 2 * torch.at("rms_err").get<double>());
  // Where torch's own error is far above the best possible (its CPU backward multiplies by a
  // bf16-rounded weight whatever the compute dtype, so its fp32/fp16 dx errs by up to 55,000x the
  // floor), 2x torch proves little. For the outputs rounded to the compute dtype, also bound ours by
  // the floor itself: one rounding of the truth (round_max_abs_err; 2x, since an fp32 sum next to a
  // rounding boundary can round the other way) plus the fp32 accumulation error, below 1e-6 of the
  // outputs' rms for sums of up to 10240 terms of these magnitudes.
  if (torch.contains("round_max_abs_err")) {
    CHECK(e.max_abs <= 2 * torch.at("round_max_abs_err").get<double>() + 1e-6 * torch.at("truth_rms").get<double>());
  }
}

template <class Quant, class Compute>
void run_case(const json& c, const SafetensorsReader& fixture) {
  const std::string name = c.at("name");
  const std::int64_t tokens = c.at("T"), in = c.at("in"), out = c.at("out");
  const int r = c.at("r");
  const std::uint64_t seed = c.at("seed");
  const json& probes = c.at("probes");

  // The script's generator: W in bf16, A and B in fp32, b, x and dy in the compute dtype.
  const Tensor w = tensor_of<bf16>(test::normalish(static_cast<std::size_t>(out * in), 100 * seed + 1, 0.02), {out, in});
  const Tensor a = tensor_of<float>(test::normalish(static_cast<std::size_t>(r * in), 100 * seed + 3, 1.0 / std::sqrt(double(in))), {r, in});
  const Tensor b = tensor_of<float>(test::normalish(static_cast<std::size_t>(out * r), 100 * seed + 4, 0.05), {out, r});
  const Tensor x = tensor_of<Compute>(test::normalish(static_cast<std::size_t>(tokens * in), 100 * seed + 5, 1.0), {tokens, in});
  const Tensor dy = tensor_of<Compute>(test::normalish(static_cast<std::size_t>(tokens * out), 100 * seed + 6, 1.0), {tokens, out});
  check_probes<bf16>(probes, "W_bf16", w.view());
  check_probes<float>(probes, "A", a.view());
  check_probes<float>(probes, "B", b.view());
  check_probes<Compute>(probes, "x", x.view());
  check_probes<Compute>(probes, "dy", dy.view());
  Tensor bias;
  if (c.at("bias").get<bool>()) {
    bias = tensor_of<Compute>(test::normalish(static_cast<std::size_t>(out), 100 * seed + 2, 0.1), {out});
    check_probes<Compute>(probes, "b", bias.view());
  }

  auto base = [&] {
    if constexpr (std::is_same_v<Quant, NoQuant>) {
      return FrozenWeight<NoQuant, Compute>(w.view());
    } else {
      auto q = FrozenWeight<Quant, Compute>::quantize(w.view(), {.blocksize = 64, .double_quant = true});
      if (const auto* packed = fixture.find(name + ".packed")) {  // the big case records only a hash
        CHECK(q.quantized().packed == packed->read<std::uint8_t>());
      }
      return q;
    }
  }();
  LoraConfig config;
  config.r = r;
  config.lora_alpha = c.at("alpha");
  config.use_rslora = c.at("use_rslora");
  config.bias = c.at("train_bias").get<bool>() ? LoraBias::all : LoraBias::none;
  LoraLinear<Quant, Compute> layer("proj", std::move(base), bias.view(),  // an empty Tensor: no bias
                                   config);
  CHECK(layer.scaling() == static_cast<float>(c.at("scaling").get<double>()));
  layer.set_adapter_weights(a.view(), b.view());

  Tensor y(dtype_of_v<Compute>, {tokens, out}), dx(dtype_of_v<Compute>, {tokens, in});
  const LoraActivations saved = layer.forward_train(x.view(), y.view());
  layer.backward(saved, dy.view(), dx.view());

  check_against_torch(c, fixture, "y", as_double<Compute>(y.view()));
  check_against_torch(c, fixture, "dx", as_double<Compute>(dx.view()));
  check_against_torch(c, fixture, "dA", as_double<float>(layer.grad_A()));
  check_against_torch(c, fixture, "dB", as_double<float>(layer.grad_B()));
  if (layer.bias_trainable()) check_against_torch(c, fixture, "db", as_double<float>(layer.grad_bias()));

  // Merged weight: W̃ as the forward uses it (rounded to Compute, like PEFT's
  // dequantize_bnb_weight) plus s·B·A. The truth has W̃ unrounded, so recover
  // W̃ = merged_true - s·B·A, round it, and allow fp32 rounding of the sum.
  const bool partial = fixture.find(name + ".merged_true") == nullptr;
  const std::vector<float> merged_true = fixture.read<float>(name + (partial ? ".merged_true_rows0_16" : ".merged_true"));
  const std::int64_t rows = static_cast<std::int64_t>(merged_true.size()) / in;
  const Tensor merged = layer.merged_weight();
  const auto av = a.span<const float>(), bv = b.span<const float>();
  double worst = 0;
  for (std::int64_t o = 0; o < rows; ++o) {
    for (std::int64_t i = 0; i < in; ++i) {
      double delta = 0;
      for (int k = 0; k < r; ++k) delta += double(bv[o * r + k]) * av[k * in + i];
      delta *= layer.scaling();
      const double w_rounded = to_float(from_float<Compute>(static_cast<float>(merged_true[o * in + i] - delta)));
      worst = std::max(worst, std::abs(merged.span<const float>()[o * in + i] - (w_rounded + delta)));
    }
  }
  INFO(name << " merged: worst " << worst);
  CHECK(worst < 1e-6);  // |W̃ + s·B·A| < 0.2: fp32 rounding of the sum and of an r-term product
}

}  // namespace

TEST_CASE("LoraLinear matches torch + peft + bitsandbytes within 2x torch's own error", "[lora_linear][fixture]") {
  for (const char* file : {"lora_linear.safetensors", "lora_linear_phi_fc1.safetensors"}) {
    const auto fixture = SafetensorsReader::open(std::string(QLORA_TEST_DATA_DIR) + "/lora/" + file);
    const json cases = json::parse(std::string(fixture.metadata_value("cases").value()));
    REQUIRE(!cases.empty());
    for (const json& c : cases) {
      const std::string quant = c.at("quant"), compute = c.at("compute");
      DYNAMIC_SECTION(c.at("name").get<std::string>()) {
        if (quant == "nf4" && compute == "bf16") run_case<NF4, bf16>(c, fixture);
        else if (quant == "fp4" && compute == "fp16") run_case<FP4, fp16>(c, fixture);
        else if (quant == "nf4" && compute == "fp32") run_case<NF4, float>(c, fixture);
        else if (quant == "none" && compute == "fp32") run_case<NoQuant, float>(c, fixture);
        else if (quant == "none" && compute == "bf16") run_case<NoQuant, bf16>(c, fixture);
        else FAIL("fixture case " << c.at("name") << " uses " << quant << "/" << compute << ", which this test does not build");
      }
    }
  }
}
