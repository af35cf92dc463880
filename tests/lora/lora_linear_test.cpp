// LoraLinear on the CPU, against itself and first principles: a float64
// evaluation of the same formulas, finite differences of a scalar loss, the
// dropout contract and the merge/unmerge/disable life cycle, plus bad input.
// Agreement with torch + peft + bitsandbytes is lora_linear_fixture_test.cpp.
#include <qlora/lora/lora_linear.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "support/tensors.hpp"

using namespace qlora;
using test::as_double;
using test::filled;

namespace {

LoraConfig config_with(int r, double alpha, double dropout = 0.0, LoraBias bias = LoraBias::none) {
  LoraConfig config;
  config.r = r;
  config.lora_alpha = alpha;
  config.lora_dropout = dropout;
  config.bias = bias;
  config.target_modules = {"proj"};
  return config;
}

/// Everything the float64 reference needs, read back from a layer.
struct Dense {
  std::int64_t in, out, r;
  std::vector<double> w, a, b, bias;
  double s;
};

template <class Layer>
Dense dense_of(Layer& layer) {
  Dense d{layer.in_features(), layer.out_features(), layer.rank(), {}, {}, {}, {}, layer.scaling()};
  std::vector<float> w(static_cast<std::size_t>(d.in * d.out));
  layer.base().dequantize_tile(0, d.out, 0, d.in, w.data(), d.in);
  d.w.assign(w.begin(), w.end());
  d.a = as_double<float>(layer.lora_A());
  d.b = as_double<float>(layer.lora_B());
  if (layer.has_bias()) d.bias = as_double<float>(layer.bias());
  return d;
}

/// y = x·Wᵀ + b + s·(m⊙x)·Aᵀ·Bᵀ in float64 (m: the dropout factors, empty = 1).
std::vector<double> reference_forward(const Dense& d, const std::vector<double>& x, std::int64_t tokens,
                                      const std::vector<double>& mask = {}) {
  std::vector<double> y(static_cast<std::size_t>(tokens * d.out));
  for (std::int64_t t = 0; t < tokens; ++t) {
    std::vector<double> xa(static_cast<std::size_t>(d.r));
    for (std::int64_t k = 0; k < d.r; ++k) {
      for (std::int64_t i = 0; i < d.in; ++i) {
        const double m = mask.empty() ? 1.0 : mask[t * d.in + i];
        xa[k] += m * x[t * d.in + i] * d.a[k * d.in + i];
      }
    }
    for (std::int64_t o = 0; o < d.out; ++o) {
      double sum = d.bias.empty() ? 0.0 : d.bias[o];
      for (std::int64_t i = 0; i < d.in; ++i) sum += x[t * d.in + i] * d.w[o * d.in + i];
      for (std::int64_t k = 0; k < d.r; ++k) sum += d.s * xa[k] * d.b[o * d.r + k];
      y[t * d.out + o] = sum;
    }
  }
  return y;
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

double max_abs(const std::vector<double>& a) {
  double m = 0;
  for (const double v : a) m = std::max(m, std::abs(v));
  return m;
}

template <class Layer>
void set_nonzero_adapter(Layer& layer, std::uint64_t seed) {
  const Tensor a = filled<float>({layer.rank(), layer.in_features()}, seed, 0.1);
  const Tensor b = filled<float>({layer.out_features(), layer.rank()}, seed + 100000, 0.1);
  layer.set_adapter_weights(a.view(), b.view());
}

}  // namespace

TEST_CASE("fp32 dense layer: forward and backward equal a float64 evaluation", "[lora_linear]") {
  const std::int64_t tokens = 7, in = 70, out = 45;
  const Tensor w = filled<float>({out, in}, 1, 0.05);
  const Tensor bias = filled<float>({out}, 2000, 0.1);
  LoraLinear<NoQuant, float> layer("model.proj", FrozenWeight<NoQuant, float>(w.view()), bias.view(),
                                   config_with(6, 12.0, 0.0, LoraBias::all));
  set_nonzero_adapter(layer, 3000);
  const Dense d = dense_of(layer);
  const Tensor x = filled<float>({tokens, in}, 5000, 1.0);
  Tensor y(DType::F32, {tokens, out});
  const LoraActivations saved = layer.forward_train(x.view(), y.view());
  // Sums of ~80 fp32 products of magnitude <= ~1: fp32 rounding stays below 1e-5.
  CHECK(max_abs_diff(as_double<float>(y.view()), reference_forward(d, as_double<float>(x.view()), tokens)) < 1e-5);

  Tensor y_inference(DType::F32, {tokens, out});
  layer.forward(x.view(), y_inference.view());
  CHECK(as_double<float>(y_inference.view()) == as_double<float>(y.view()));

  // Loss L = Σ y ⊙ dy: its gradients are exactly what backward returns, and
  // L is linear in each of x, A, B, b, so central differences are exact up to
  // rounding of L (|L| ~ 10, fp32 eps ~ 1e-6 -> ~1e-5 / step).
  const Tensor dy = filled<float>({tokens, out}, 7000, 1.0);
  Tensor dx(DType::F32, {tokens, in});
  layer.zero_grad();
  layer.backward(saved, dy.view(), dx.view());
  const auto loss = [&](const Tensor& input) {
    Tensor output(DType::F32, {tokens, out});
    layer.forward(input.view(), output.view());
    double sum = 0;
    const auto yv = output.span<const float>();
    const auto dyv = dy.span<const float>();
    for (std::size_t i = 0; i < yv.size(); ++i) sum += static_cast<double>(yv[i]) * dyv[i];
    return sum;
  };
  const double h = 0.25;  // L is linear: a large step loses nothing and dwarfs the rounding
  const auto finite_difference = [&](float& parameter, const Tensor& input) {
    const float original = parameter;
    parameter = original + static_cast<float>(h);
    const double up = loss(input);
    parameter = original - static_cast<float>(h);
    const double down = loss(input);
    parameter = original;
    return (up - down) / (2 * h);
  };
  Tensor x_probe(DType::F32, {tokens, in});
  std::ranges::copy(x.span<const float>(), x_probe.span<float>().begin());
  for (const std::int64_t i : {std::int64_t{0}, std::int64_t{13}, std::int64_t{69}, std::int64_t{300}, tokens * in - 1}) {
    CHECK(finite_difference(x_probe.span<float>()[i], x_probe) == Approx(dx.span<const float>()[i]).margin(1e-4));
  }
  for (const std::int64_t i : {0, 17, 6 * 70 - 1}) {
    CHECK(finite_difference(layer.lora_A().span<float>()[i], x) == Approx(layer.grad_A().span<const float>()[i]).margin(1e-4));
  }
  for (const std::int64_t i : {0, 31, 45 * 6 - 1}) {
    CHECK(finite_difference(layer.lora_B().span<float>()[i], x) == Approx(layer.grad_B().span<const float>()[i]).margin(1e-4));
  }
  for (const std::int64_t i : {0, 44}) {
    CHECK(finite_difference(layer.bias().span<float>()[i], x) == Approx(layer.grad_bias().span<const float>()[i]).margin(1e-4));
  }

  // Gradients accumulate over backward calls, as torch's do.
  const std::vector<double> once = as_double<float>(layer.grad_A());
  layer.backward(saved, dy.view(), TensorView{});
  const std::vector<double> twice = as_double<float>(layer.grad_A());
  for (std::size_t i = 0; i < once.size(); ++i) CHECK(twice[i] == Approx(2 * once[i]).margin(1e-6));
}

TEST_CASE("NF4 bf16 layer: base tiles are bitsandbytes' bf16 dequantization", "[lora_linear]") {
  const std::int64_t tokens = 5, in = 200, out = 72;  // in % 64 != 0: blocks cross rows
  const Tensor w = filled<bf16>({out, in}, 11, 0.02);
  auto base = FrozenWeight<NF4, bf16>::quantize(w.view(), {.blocksize = 64, .double_quant = true});
  const Quantized4bit q = base.quantized();
  LoraLinear<NF4, bf16> layer("proj", std::move(base), TensorView{}, config_with(4, 8.0));
  set_nonzero_adapter(layer, 21);

  // Every tile of the base equals dequantize_4bit to bf16 (the flat-block reference).
  std::vector<bf16> expected(static_cast<std::size_t>(in * out));
  dequantize_4bit_ref<bf16>(q.packed, q.state, expected);
  std::vector<float> tile(static_cast<std::size_t>(10 * 37));
  layer.base().dequantize_tile(30, 40, 101, 138, tile.data(), 37);
  for (std::int64_t r = 0; r < 10; ++r) {
    for (std::int64_t c = 0; c < 37; ++c) {
      CHECK(tile[r * 37 + c] == to_float(expected[(30 + r) * in + 101 + c]));
    }
  }

  const Tensor x = filled<bf16>({tokens, in}, 31, 1.0);
  Tensor y(DType::BF16, {tokens, out});
  layer.forward(x.view(), y.view());
  const auto reference = reference_forward(dense_of(layer), as_double<bf16>(x.view()), tokens);
  // One bf16 rounding of the output: |error| <= 2^-8 |y| (+ fp32 sums, far smaller).
  const auto got = as_double<bf16>(y.view());
  for (std::size_t i = 0; i < got.size(); ++i) CHECK(std::abs(got[i] - reference[i]) <= std::abs(reference[i]) * 0x1p-8 + 1e-6);
}

TEST_CASE("dropout: one mask per key, applied to the adapter input only", "[lora_linear]") {
  const std::int64_t tokens = 64, in = 96, out = 40;
  const Tensor w = filled<float>({out, in}, 41, 0.05);
  LoraLinear<NoQuant, float> layer("proj", FrozenWeight<NoQuant, float>(w.view()), TensorView{}, config_with(8, 8.0, 0.25));
  set_nonzero_adapter(layer, 51);
  const Tensor x = filled<float>({tokens, in}, 61, 1.0);
  Tensor y(DType::F32, {tokens, out});
  const DropoutKey key{.seed = 99, .call = 7};
  const LoraActivations saved = layer.forward_train(x.view(), y.view(), key);

  const DropoutMask mask{key, 0.25f};
  std::vector<double> factors;
  std::int64_t kept = 0;
  for (std::int64_t i = 0; i < tokens * in; ++i) {
    factors.push_back(mask.factor(static_cast<std::uint64_t>(i)));
    kept += factors.back() != 0.0;
  }
  // 6144 Bernoulli(0.75) draws: the kept fraction is 0.75 ± 0.0055 (1 sigma); allow 5 sigma.
  CHECK(std::abs(static_cast<double>(kept) / static_cast<double>(tokens * in) - 0.75) < 0.028);
  CHECK(factors[static_cast<std::size_t>(std::ranges::find_if(factors, [](double f) { return f != 0; }) - factors.begin())] ==
        Approx(1.0 / 0.75));
  const auto reference = reference_forward(dense_of(layer), as_double<float>(x.view()), tokens, factors);
  CHECK(max_abs_diff(as_double<float>(y.view()), reference) < 1e-5);

  // Inference draws no mask; another key draws another mask.
  Tensor y_inference(DType::F32, {tokens, out});
  layer.forward(x.view(), y_inference.view());
  CHECK(max_abs_diff(as_double<float>(y_inference.view()), reference_forward(dense_of(layer), as_double<float>(x.view()), tokens)) < 1e-5);
  Tensor y_other(DType::F32, {tokens, out});
  (void)layer.forward_train(x.view(), y_other.view(), DropoutKey{.seed = 99, .call = 8});
  CHECK(max_abs_diff(as_double<float>(y_other.view()), as_double<float>(y.view())) > 1e-3);

  // Backward uses the same mask: dA = s·(dy·B)ᵀ·(m⊙x).
  const Tensor dy = filled<float>({tokens, out}, 71, 1.0);
  layer.zero_grad();
  layer.backward(saved, dy.view(), TensorView{});
  const Dense d = dense_of(layer);
  const auto xv = as_double<float>(x.view());
  const auto dyv = as_double<float>(dy.view());
  for (const std::int64_t k : {0, 7}) {
    for (const std::int64_t i : {0, 50, 95}) {
      double expected = 0;
      for (std::int64_t t = 0; t < tokens; ++t) {
        double gb = 0;
        for (std::int64_t o = 0; o < out; ++o) gb += dyv[t * out + o] * d.b[o * d.r + k];
        expected += d.s * gb * factors[t * in + i] * xv[t * in + i];
      }
      CHECK(layer.grad_A().span<const float>()[k * in + i] == Approx(expected).margin(1e-4));
    }
  }
}

TEST_CASE("init: PEFT's distributions, B = 0, a fresh adapter changes nothing", "[lora_linear]") {
  const std::int64_t in = 256, out = 64;
  const Tensor w = filled<float>({out, in}, 81, 0.05);
  LoraLinear<NoQuant, float> layer("proj", FrozenWeight<NoQuant, float>(w.view()), TensorView{}, config_with(16, 16.0),
                                   {.init_seed = 5, .init_stream = 3});
  const auto a = as_double<float>(layer.lora_A());
  const double bound = 1.0 / 16.0;  // 1/sqrt(in)
  CHECK(max_abs(a) <= bound);
  CHECK(max_abs(a) > 0.99 * bound);  // 4096 uniform draws reach the bound's last 1%
  CHECK(max_abs(as_double<float>(layer.lora_B())) == 0.0);

  LoraConfig gaussian = config_with(16, 16.0);
  gaussian.init = LoraInit::gaussian;
  LoraLinear<NoQuant, float> g("proj", FrozenWeight<NoQuant, float>(w.view()), TensorView{}, gaussian);
  double sum_squares = 0;
  for (const double v : as_double<float>(g.lora_A())) sum_squares += v * v;
  // std 1/r = 0.0625 over 4096 draws: the sample std is within ~1.1% (1 sigma); allow 5%.
  CHECK(std::sqrt(sum_squares / 4096.0) == Approx(1.0 / 16).epsilon(0.05));

  // PEFT casts A to the base weight's dtype and back when that is a float type: over a dense bf16
  // base the initial values are bf16 numbers; a bitsandbytes 4-bit weight is uint8, so A stays fp32.
  const Tensor wb = filled<bf16>({out, in}, 81, 0.05);
  LoraLinear<NoQuant, bf16> dense("proj", FrozenWeight<NoQuant, bf16>(wb.view()), TensorView{}, config_with(8, 16.0));
  for (const float v : dense.lora_A().span<const float>()) CHECK(to_float(from_float<bf16>(v)) == v);
  LoraLinear<NF4, bf16> q("proj", FrozenWeight<NF4, bf16>::quantize(wb.view()), TensorView{}, config_with(8, 16.0));
  std::int64_t not_bf16 = 0;
  for (const float v : q.lora_A().span<const float>()) not_bf16 += to_float(from_float<bf16>(v)) != v;
  CHECK(not_bf16 > q.lora_A().numel() / 2);  // fp32 draws: almost none is a bf16 number

  const Tensor x = filled<float>({3, in}, 91, 1.0);
  Tensor with_adapter(DType::F32, {3, out}), base_only(DType::F32, {3, out});
  layer.forward(x.view(), with_adapter.view());
  layer.set_adapter_enabled(false);
  layer.forward(x.view(), base_only.view());
  CHECK(as_double<float>(with_adapter.view()) == as_double<float>(base_only.view()));
}

TEST_CASE("merge: W̃ + s·B·A, re-quantized with its error reported; unmerge is exact", "[lora_linear]") {
  const std::int64_t tokens = 4, in = 128, out = 96;
  const Tensor w = filled<bf16>({out, in}, 101, 0.02);
  LoraLinear<NF4, bf16> layer("proj", FrozenWeight<NF4, bf16>::quantize(w.view(), {.double_quant = true}), TensorView{},
                              config_with(8, 16.0));
  set_nonzero_adapter(layer, 111);
  const Dense d = dense_of(layer);
  const Tensor merged = layer.merged_weight();
  double worst = 0;
  for (std::int64_t o = 0; o < out; ++o) {
    for (std::int64_t i = 0; i < in; ++i) {
      double delta = 0;
      for (std::int64_t k = 0; k < d.r; ++k) delta += d.b[o * d.r + k] * d.a[k * in + i];
      worst = std::max(worst, std::abs(merged.span<const float>()[o * in + i] - (d.w[o * in + i] + d.s * delta)));
    }
  }
  CHECK(worst < 1e-6);  // an fp32 rank-8 product plus one add

  const Tensor x = filled<bf16>({tokens, in}, 121, 1.0);
  Tensor before(DType::BF16, {tokens, out});
  layer.forward(x.view(), before.view());
  const MergeReport report = layer.merge();
  CHECK(layer.merged());
  // NF4 re-quantization: the error is real (> 0) and about NF4's step size times the block absmax.
  CHECK(report.max_abs_error > 0);
  CHECK(report.relative_rms_error > 0.01);
  CHECK(report.relative_rms_error < 0.2);
  Tensor y_merged(DType::BF16, {tokens, out});
  layer.forward(x.view(), y_merged.view());
  // The merged base differs from W̃ + s·B·A by at most report.max_abs_error per element, so each output
  // moves by at most that times Σ|x| over the row, plus a bf16 rounding of each side (2^-8 |y|).
  const auto xv = as_double<bf16>(x.view()), merged_y = as_double<bf16>(y_merged.view()), before_y = as_double<bf16>(before.view());
  for (std::int64_t t = 0; t < tokens; ++t) {
    double x_l1 = 0;
    for (std::int64_t i = 0; i < in; ++i) x_l1 += std::abs(xv[t * in + i]);
    for (std::int64_t o = 0; o < out; ++o) {
      const double a = merged_y[t * out + o], b = before_y[t * out + o];
      CHECK(std::abs(a - b) <= report.max_abs_error * x_l1 + (std::abs(a) + std::abs(b)) * 0x1p-8);
    }
  }
  CHECK(max_abs_diff(merged_y, before_y) > 0);
  CHECK_THROWS_WITH(layer.forward_train(x.view(), y_merged.view()), Catch::Contains("AdapterMerged"));
  CHECK_THROWS_WITH(layer.set_adapter_weights(layer.lora_A(), layer.lora_B()), Catch::Contains("AdapterMerged"));

  // Disabling the adapter of a merged layer gives the base alone, as PEFT's disable_adapter does.
  Tensor base_only(DType::BF16, {tokens, out}), merged_disabled(DType::BF16, {tokens, out});
  layer.unmerge();
  layer.set_adapter_enabled(false);
  layer.forward(x.view(), base_only.view());
  layer.set_adapter_enabled(true);
  (void)layer.merge();
  layer.set_adapter_enabled(false);
  layer.forward(x.view(), merged_disabled.view());
  CHECK(as_double<bf16>(merged_disabled.view()) == as_double<bf16>(base_only.view()));
  layer.set_adapter_enabled(true);
  layer.unmerge();
  Tensor after(DType::BF16, {tokens, out});
  layer.forward(x.view(), after.view());
  CHECK(as_double<bf16>(after.view()) == as_double<bf16>(before.view()));
}

TEST_CASE("bad input: a named error saying what was expected", "[lora_linear]") {
  const Tensor w = filled<float>({32, 48}, 131, 0.05);
  const auto make = [&](const LoraConfig& config) {
    return LoraLinear<NoQuant, float>("model.layers.0.proj", FrozenWeight<NoQuant, float>(w.view()), TensorView{}, config);
  };
  CHECK_THROWS_WITH(make(config_with(0, 8.0)), Catch::Contains("InvalidLoraConfig") && Catch::Contains("r = 0"));
  CHECK_THROWS_WITH(make(config_with(-3, 8.0)), Catch::Contains("InvalidLoraConfig"));
  CHECK_THROWS_WITH(make(config_with(33, 8.0)),
                    Catch::Contains("model.layers.0.proj") && Catch::Contains("exceeds min(in_features 48, out_features 32)"));
  CHECK_THROWS_WITH(make(config_with(4, 0.0)), Catch::Contains("lora_alpha = 0"));
  CHECK_THROWS_WITH(make(config_with(4, -1.0)), Catch::Contains("lora_alpha"));
  CHECK_THROWS_WITH(make(config_with(4, 8.0, 1.0)), Catch::Contains("lora_dropout"));

  auto layer = make(config_with(4, 8.0));
  const Tensor bad_bias = filled<float>({31}, 1, 1.0);
  const auto with_bias = [&](const TensorView& bias) {
    return LoraLinear<NoQuant, float>("p", FrozenWeight<NoQuant, float>(w.view()), bias, config_with(4, 8.0));
  };
  CHECK_THROWS_WITH(with_bias(bad_bias.view()), Catch::Contains("bias is [31], expected [32]"));
  Tensor y(DType::F32, {2, 32});
  const Tensor x_bf16 = filled<bf16>({2, 48}, 1, 1.0);
  CHECK_THROWS_WITH(layer.forward(x_bf16.view(), y.view()), Catch::Contains("DTypeMismatch") && Catch::Contains("computes in F32"));
  const Tensor x_wide = filled<float>({2, 49}, 1, 1.0);
  CHECK_THROWS_WITH(layer.forward(x_wide.view(), y.view()), Catch::Contains("x is [2, 49], expected [2, 48]"));
  const Tensor x = filled<float>({2, 48}, 1, 1.0);
  Tensor y_short(DType::F32, {3, 32});
  CHECK_THROWS_WITH(layer.forward(x.view(), y_short.view()), Catch::Contains("y is [3, 32], expected [2, 32]"));
  const Tensor a_wrong = filled<float>({5, 48}, 1, 1.0), b = filled<float>({32, 4}, 1, 1.0);
  CHECK_THROWS_WITH(layer.set_adapter_weights(a_wrong.view(), b.view()), Catch::Contains("lora_A is [5, 48], expected [4, 48]"));
  const Tensor a_int(DType::I32, {4, 48});
  CHECK_THROWS_WITH(layer.set_adapter_weights(a_int.view(), b.view()), Catch::Contains("lora_A is I32"));

  const LoraActivations saved = layer.forward_train(x.view(), y.view());
  Tensor dy_wrong(DType::F32, {3, 32}), dx(DType::F32, {2, 48});
  CHECK_THROWS_WITH(layer.backward(saved, dy_wrong.view(), dx.view()), Catch::Contains("dy is [3, 32], expected [2, 32]"));

  // A half-bad adapter changes nothing: B's dtype is checked before A is written.
  const std::vector<double> a_before = as_double<float>(layer.lora_A());
  const Tensor a_good = filled<float>({4, 48}, 9, 1.0), b_int(DType::I32, {32, 4});
  CHECK_THROWS_WITH(layer.set_adapter_weights(a_good.view(), b_int.view()), Catch::Contains("lora_B is I32"));
  CHECK(as_double<float>(layer.lora_A()) == a_before);

  // A view with a shape but no data is refused, not taken for "no bias".
  const TensorView null_bias(nullptr, DType::F32, {32});
  CHECK_THROWS_WITH(with_bias(null_bias), Catch::Contains("NullPointer") && Catch::Contains("bias has no data"));

  // Dropout needs a key: a default one would repeat the same mask at every step.
  auto dropping = make(config_with(4, 8.0, 0.1));
  CHECK_THROWS_WITH(dropping.forward_train(x.view(), y.view()), Catch::Contains("DropoutKeyRequired"));

  // Patterns are regular expressions, checked as the config is validated.
  LoraConfig bad_regex = config_with(4, 8.0);
  bad_regex.rank_pattern = {{"layers.(0", 8}};
  CHECK_THROWS_WITH(make(bad_regex), Catch::Contains("InvalidLoraConfig") && Catch::Contains("layers.(0"));

  // Activations of another call size are refused.
  Tensor x3 = filled<float>({3, 48}, 1, 1.0), y3(DType::F32, {3, 32});
  LoraActivations other = layer.forward_train(x3.view(), y3.view());
  other.xa = Tensor(DType::F32, {2, 4});
  Tensor dy3(DType::F32, {3, 32});
  CHECK_THROWS_WITH(layer.backward(other, dy3.view(), TensorView{}), Catch::Contains("saved xa"));

  // A 4-bit weight of the other type is refused by the layer that expects NF4.
  const Tensor wb = filled<bf16>({32, 48}, 1, 0.05);
  auto fp4 = FrozenWeight<FP4, bf16>::quantize(wb.view());
  CHECK_THROWS_WITH((FrozenWeight<NF4, bf16>(fp4.quantized())), Catch::Contains("QuantTypeMismatch"));
}

// Misuse of the policies is a constraint failure at the point of use, not an
// error deep inside the class: these are compile-time checks.
template <class Quant, class Compute>
concept LayerExists = requires { typename LoraLinear<Quant, Compute>::Base; };
static_assert(LayerExists<NF4, bf16> && LayerExists<FP4, fp16> && LayerExists<NoQuant, float>);
static_assert(!LayerExists<int, bf16>, "a Quant that is no QuantPolicy is refused");
static_assert(!LayerExists<NF4, double>, "a Compute that is no FloatStorage is refused");

TEST_CASE("threads: one thread and many give the same layer outputs", "[lora_linear]") {
  const std::int64_t tokens = 33, in = 300, out = 260;
  const Tensor w = filled<bf16>({out, in}, 141, 0.02);
  const auto make = [&](unsigned threads) {
    LoraLinear<NF4, bf16> layer("proj", FrozenWeight<NF4, bf16>::quantize(w.view()), TensorView{}, config_with(8, 16.0),
                                {.threads = threads});
    set_nonzero_adapter(layer, 151);
    return layer;
  };
  auto one = make(1), many = make(4);
  const Tensor x = filled<bf16>({tokens, in}, 161, 1.0), dy = filled<bf16>({tokens, out}, 171, 1.0);
  Tensor y1(DType::BF16, {tokens, out}), y4(DType::BF16, {tokens, out});
  Tensor dx1(DType::BF16, {tokens, in}), dx4(DType::BF16, {tokens, in});
  one.backward(one.forward_train(x.view(), y1.view()), dy.view(), dx1.view());
  many.backward(many.forward_train(x.view(), y4.view()), dy.view(), dx4.view());
  // Threads split output rows / input columns, never a sum. But Eigen's blocking (and so the order
  // of each fp32 sum) depends on the operand sizes, which the split changes: the fp32 results may
  // differ in the last bits, so allow one bf16 ulp where a sum lands next to a rounding boundary.
  const auto y_1 = as_double<bf16>(y1.view()), y_4 = as_double<bf16>(y4.view());
  for (std::size_t i = 0; i < y_1.size(); ++i) CHECK(std::abs(y_1[i] - y_4[i]) <= std::abs(y_1[i]) * 0x1p-7);
  const auto dx_1 = as_double<bf16>(dx1.view()), dx_4 = as_double<bf16>(dx4.view());
  for (std::size_t i = 0; i < dx_1.size(); ++i) CHECK(std::abs(dx_1[i] - dx_4[i]) <= std::abs(dx_1[i]) * 0x1p-7);
  const auto ga1 = as_double<float>(one.grad_A()), ga4 = as_double<float>(many.grad_A());
  for (std::size_t i = 0; i < ga1.size(); ++i) CHECK(ga1[i] == Approx(ga4[i]).epsilon(1e-5).margin(1e-6));
}
