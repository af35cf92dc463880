// The CUDA LoraLinear (cuda/lora_linear.cuh) against the CPU LoraLinear
// (lora/lora_linear.hpp), built from the same weights, config and seeds:
// NF4/bf16 (in = 200, not a multiple of the blocksize 64, double
// quantization), NF4/bf16 with tiles that start on nested-block boundaries,
// FP4/fp16 (in = 75: tiles starting at odd elements), NoQuant/fp32; dropout
// 0.1 and a trainable bias everywhere. Each layer is run with the default
// tiling and with forced small tiles (mid-block and odd tile starts take the
// generic dequantize kernel, aligned ones the fast one).
//
// What must agree bit for bit: the initial A (drawn on the host by both), the
// adapter weights after set_adapter_weights, the saved x. What agrees to one
// fp32 ulp: xa and db (summed in double on both backends, then rounded once).
// What agrees up to the order of fp32 sums (tolerances below): y, dx, dA, dB,
// the merged weight and the merge report. Exits 77 (skipped) where there is
// no CUDA device.
#include <qlora/cuda/lora_linear.cuh>
#include <qlora/lora/lora_linear.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "cuda/support.cuh"
#include "support/tensors.hpp"

namespace {

using namespace qlora;
using test::as_double;
using test::error_of;
using test::filled;
namespace qcuda = qlora::cuda;  // `cuda::` alone is ambiguous with CCCL's ::cuda under `using namespace qlora`

// ---- tolerances ---------------------------------------------------------------------
//
// Both backends compute every fp32 quantity as a sum of the same exact
// products (bf16 x bf16 and fp16 x fp16 products are exact in fp32; fp32
// adapter GEMMs run in true fp32 on both: no TF32), in different orders. By
// the standard bound (Higham, Accuracy and Stability of Numerical Algorithms,
// §3.1), any order gives |computed - exact| <= γ_K · Σ|terms| with
// γ_K ≈ K·u, u = 2^-24, K the number of additions along the longest chain
// (e.g. y = x·W̃ᵀ + s·xa·Bᵀ + b chains in + r + 2 of them, xa's own sum
// included). The two backends then differ by at most 2·γ_K·Σ|terms|; another
// factor 2 covers tensor-core accumulation, whose internal additions may
// truncate instead of rounding to nearest. Σ|terms| is evaluated per element
// in float64 from the same inputs (masks included).
//
// y and dx are then rounded once to Compute: two fp32 values that differ by
// δ round to Compute values that differ by at most δ + one Compute ulp (where
// they straddle a rounding boundary), so those comparisons add one ulp.
//
// xa and db are summed in double on both backends (the CPU header's rule) and
// rounded once to fp32: the same bound with u = 2^-53, plus one fp32 ulp.

double fp32_sum_bound(std::int64_t additions, double sum_of_magnitudes) {
  return 4.0 * static_cast<double>(additions) * 0x1p-24 * sum_of_magnitudes;
}
double fp64_sum_bound(std::int64_t additions, double sum_of_magnitudes) {
  return 4.0 * static_cast<double>(additions) * 0x1p-53 * sum_of_magnitudes;
}

/// One unit in the last place of T at `magnitude` (subnormal spacing below the normal range).
template <class T>
double ulp(double magnitude) {
  constexpr int digits = std::is_same_v<T, float> ? 24 : std::is_same_v<T, bf16> ? 8 : 11;  // significand bits
  constexpr int min_exponent = std::is_same_v<T, fp16> ? -14 : -126;                       // of the smallest normal
  int exponent = 0;
  (void)std::frexp(magnitude, &exponent);  // magnitude = m·2^exponent, m in [0.5, 1)
  return std::ldexp(1.0, std::max(exponent - 1, min_exponent) - (digits - 1));
}

/// Every |gpu[i] - cpu[i]| must be <= allowed(i, max(|gpu[i]|, |cpu[i]|)); reports the worst element.
void check_close(const std::string& what, const std::vector<double>& gpu, const std::vector<double>& cpu,
                 const std::function<double(std::size_t, double)>& allowed) {
  REQUIRE(gpu.size() == cpu.size());
  double worst_ratio = 0;
  std::size_t worst = 0;
  for (std::size_t i = 0; i < gpu.size(); ++i) {
    const double difference = std::abs(gpu[i] - cpu[i]);
    const double limit = allowed(i, std::max(std::abs(gpu[i]), std::abs(cpu[i])));
    const double ratio = difference == 0 ? 0.0 : (limit > 0 ? difference / limit : INFINITY);
    if (!(ratio <= worst_ratio)) {  // also catches NaN
      worst_ratio = ratio;
      worst = i;
    }
  }
  INFO(what << ": worst element " << worst << " of " << gpu.size() << ": gpu " << gpu[worst] << ", cpu " << cpu[worst]
            << ", difference/allowed " << worst_ratio);
  CHECK(worst_ratio <= 1.0);
}

// ---- data -------------------------------------------------------------------------

/// Device memory holding a tensor (default stream, like the layers here).
struct DeviceTensor {
  qcuda::DeviceBuffer<std::byte> buffer;
  TensorView view;

  DeviceTensor(DType dtype, Shape shape) : buffer(TensorView(nullptr, dtype, shape).byte_size(), nullptr) {
    view = TensorView(buffer.data(), dtype, shape, Device::cuda);
    if (!buffer.empty()) QLORA_CUDA_CHECK(cudaMemset(buffer.data(), 0, buffer.size_bytes()));
  }
  explicit DeviceTensor(const Tensor& host) : DeviceTensor(host.dtype(), host.shape()) {
    if (!buffer.empty()) {
      QLORA_CUDA_CHECK(cudaMemcpy(buffer.data(), host.view().raw_data(), buffer.size_bytes(), cudaMemcpyHostToDevice));
    }
  }
};

bool same_bits(const TensorView& a, const TensorView& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.raw_data(), b.raw_data(), a.byte_size()) == 0;
}

template <class Quant, class Compute>
FrozenWeight<Quant, Compute> make_base(const TensorView& dense, std::int64_t blocksize, bool double_quant) {
  if constexpr (std::is_same_v<Quant, NoQuant>) {
    return FrozenWeight<Quant, Compute>(dense);
  } else {
    return FrozenWeight<Quant, Compute>::quantize(dense, {.blocksize = blocksize, .double_quant = double_quant});
  }
}

/// Elements (4-bit codes, or dense values) in which two bases differ.
template <class Quant, class Compute>
std::int64_t differing_elements(const FrozenWeight<Quant, Compute>& a, const FrozenWeight<Quant, Compute>& b) {
  std::int64_t count = 0;
  if constexpr (std::is_same_v<Quant, NoQuant>) {
    const auto x = a.dense().template span<const Compute>(), y = b.dense().template span<const Compute>();
    for (std::size_t i = 0; i < x.size(); ++i) count += std::memcmp(&x[i], &y[i], sizeof(Compute)) != 0;
  } else {
    const auto& x = a.quantized().packed;
    const auto& y = b.quantized().packed;
    REQUIRE(x.size() == y.size());
    for (std::size_t i = 0; i < x.size(); ++i) count += ((x[i] ^ y[i]) >> 4 != 0) + (((x[i] ^ y[i]) & 0xF) != 0);
  }
  return count;
}

struct Case {
  std::int64_t out, in, rank, tokens;
  std::int64_t blocksize = 64;
  bool double_quant = false;
  std::int64_t tile_rows = 0;  ///< 0: the layer's default tiling
};

/// The float64 magnitudes Σ|terms| of every quantity, from the host inputs.
struct Magnitudes {
  std::vector<double> xa, y, y_inference, y_base, gb, grad_a, grad_b, grad_bias, dx, merged;
};

Magnitudes magnitudes_of(const Case& c, float s, const std::vector<double>& w, const std::vector<double>& a,
                         const std::vector<double>& b, const std::vector<double>& bias, const std::vector<double>& x,
                         const std::vector<double>& dy, const std::vector<double>& factor) {
  const std::int64_t T = c.tokens, in = c.in, out = c.out, r = c.rank;
  Magnitudes m;
  const auto adapter_down = [&](bool masked) {
    std::vector<double> xa(static_cast<std::size_t>(T * r));
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t k = 0; k < r; ++k)
        for (std::int64_t i = 0; i < in; ++i)
          xa[t * r + k] += std::abs(x[t * in + i]) * (masked ? factor[t * in + i] : 1.0) * std::abs(a[k * in + i]);
    return xa;
  };
  const auto project = [&](const std::vector<double>* xa) {
    std::vector<double> y(static_cast<std::size_t>(T * out));
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t o = 0; o < out; ++o) {
        double sum = std::abs(bias[o]);
        for (std::int64_t i = 0; i < in; ++i) sum += std::abs(x[t * in + i] * w[o * in + i]);
        if (xa != nullptr)
          for (std::int64_t k = 0; k < r; ++k) sum += s * (*xa)[t * r + k] * std::abs(b[o * r + k]);
        y[t * out + o] = sum;
      }
    return y;
  };
  m.xa = adapter_down(true);
  const std::vector<double> xa_inference = adapter_down(false);
  m.y = project(&m.xa);
  m.y_inference = project(&xa_inference);
  m.y_base = project(nullptr);

  m.gb.assign(static_cast<std::size_t>(T * r), 0.0);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t k = 0; k < r; ++k)
      for (std::int64_t o = 0; o < out; ++o) m.gb[t * r + k] += std::abs(dy[t * out + o] * b[o * r + k]);
  m.grad_b.assign(static_cast<std::size_t>(out * r), 0.0);
  m.grad_bias.assign(static_cast<std::size_t>(out), 0.0);
  for (std::int64_t o = 0; o < out; ++o)
    for (std::int64_t t = 0; t < T; ++t) {
      for (std::int64_t k = 0; k < r; ++k) m.grad_b[o * r + k] += s * std::abs(dy[t * out + o]) * m.xa[t * r + k];
      m.grad_bias[o] += std::abs(dy[t * out + o]);
    }
  m.grad_a.assign(static_cast<std::size_t>(r * in), 0.0);
  for (std::int64_t k = 0; k < r; ++k)
    for (std::int64_t i = 0; i < in; ++i)
      for (std::int64_t t = 0; t < T; ++t)
        m.grad_a[k * in + i] += s * m.gb[t * r + k] * std::abs(x[t * in + i]) * factor[t * in + i];
  m.dx.assign(static_cast<std::size_t>(T * in), 0.0);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t i = 0; i < in; ++i) {
      double adapter = 0;
      for (std::int64_t k = 0; k < r; ++k) adapter += m.gb[t * r + k] * std::abs(a[k * in + i]);
      double base = 0;
      for (std::int64_t o = 0; o < out; ++o) base += std::abs(dy[t * out + o] * w[o * in + i]);
      m.dx[t * in + i] = base + s * factor[t * in + i] * adapter;
    }
  m.merged.assign(static_cast<std::size_t>(out * in), 0.0);
  for (std::int64_t o = 0; o < out; ++o)
    for (std::int64_t i = 0; i < in; ++i) {
      double sum = std::abs(w[o * in + i]);
      for (std::int64_t k = 0; k < r; ++k) sum += s * std::abs(b[o * r + k] * a[k * in + i]);
      m.merged[o * in + i] = sum;
    }
  return m;
}

LoraConfig test_config(std::int64_t rank) {
  LoraConfig config;
  config.r = static_cast<int>(rank);
  config.lora_alpha = 2.0 * static_cast<double>(rank);  // s = 2
  config.lora_dropout = 0.1;
  config.bias = LoraBias::all;
  config.target_modules = {"proj"};
  return config;
}

template <class Quant, class Compute>
void compare_backends(const Case& c) {
  using Cpu = LoraLinear<Quant, Compute, qlora::Cpu>;
  using Gpu = LoraLinear<Quant, Compute, qlora::Cuda>;
  const std::string path = "model.layers.0.proj";
  const LoraConfig config = test_config(c.rank);
  const LoraLinearOptions options{.init_seed = 11, .init_stream = 3};
  const std::int64_t T = c.tokens, in = c.in, out = c.out, r = c.rank;

  const Tensor dense = filled<float>({out, in}, 1, 0.05);
  const FrozenWeight<Quant, Compute> base = make_base<Quant, Compute>(dense.view(), c.blocksize, c.double_quant);
  const Tensor bias = filled<float>({out}, 2000, 0.1);
  Cpu cpu(path, make_base<Quant, Compute>(dense.view(), c.blocksize, c.double_quant), bias.view(), config, options);
  Gpu gpu(path, base, bias.view(), config, options, {.tile_rows = c.tile_rows});
  CAPTURE(c.out, c.in, c.rank, c.tokens, c.blocksize, c.double_quant, gpu.tile_rows());
  const float s = cpu.scaling();
  REQUIRE(gpu.scaling() == s);

  SECTION("a fresh layer: the same A as the CPU's, bit for bit, and B = 0") {
    CHECK(same_bits(gpu.download(gpu.lora_A()).view(), cpu.lora_A()));
    CHECK(same_bits(gpu.download(gpu.lora_B()).view(), cpu.lora_B()));
    CHECK(same_bits(gpu.download(gpu.bias()).view(), cpu.bias()));
    CHECK(gpu.bytes() >= static_cast<std::size_t>(2 * (r * in + out * r) + 2 * out) * sizeof(float));
  }

  // The same non-zero adapter on both (B = 0 would hide the whole adapter path).
  const Tensor a = filled<float>({r, in}, 3000, 0.1);
  const Tensor b = filled<float>({out, r}, 4000, 0.1);
  cpu.set_adapter_weights(a.view(), b.view());
  gpu.set_adapter_weights(a.view(), b.view());

  const Tensor x_host = filled<Compute>({T, in}, 5000, 1.0);
  const Tensor dy_host = filled<Compute>({T, out}, 6000, 0.5);
  const DeviceTensor x(x_host), dy(dy_host);
  const DropoutKey key{42, 7};
  const DropoutMask mask{key, static_cast<float>(config.lora_dropout)};

  std::vector<double> w(static_cast<std::size_t>(out * in));
  {
    std::vector<float> tile(w.size());
    base.dequantize_tile(0, out, 0, in, tile.data(), in);
    std::copy(tile.begin(), tile.end(), w.begin());
  }
  std::vector<double> factor(static_cast<std::size_t>(T * in));
  for (std::size_t i = 0; i < factor.size(); ++i) factor[i] = mask.factor(i);
  const Magnitudes m = magnitudes_of(c, s, w, as_double<float>(a.view()), as_double<float>(b.view()),
                                     as_double<float>(bias.view()), as_double<Compute>(x_host.view()),
                                     as_double<Compute>(dy_host.view()), factor);
  const auto rounded = [](const std::vector<double>& magnitude, std::int64_t additions) {
    return [&magnitude, additions](std::size_t i, double value) {
      return fp32_sum_bound(additions, magnitude[i]) + ulp<Compute>(value);
    };
  };
  const auto fp32 = [](const std::vector<double>& magnitude, std::int64_t additions, double times = 1.0) {
    return [&magnitude, additions, times](std::size_t i, double) {
      return fp32_sum_bound(additions, times * magnitude[i]);
    };
  };
  const auto double_sum = [](const std::vector<double>& magnitude, std::int64_t additions, double ulps = 1.0) {
    return [&magnitude, additions, ulps](std::size_t i, double value) {
      return fp64_sum_bound(additions, magnitude[i]) + ulps * ulp<float>(value);
    };
  };

  SECTION("forward_train and backward agree") {
    Tensor y_cpu(dtype_of_v<Compute>, {T, out});
    const DeviceTensor y_gpu(dtype_of_v<Compute>, {T, out});
    const LoraActivations saved_cpu = cpu.forward_train(x_host.view(), y_cpu.view(), key);
    const qcuda::LoraActivations saved_gpu = gpu.forward_train(x.view, y_gpu.view, key);
    CHECK(saved_gpu.tokens() == T);
    // The saved input is a copy of x; xa = drop(x)·Aᵀ, masks identical (a mask
    // difference would move xa by ~|x·A|/(1-p), far beyond one fp32 ulp).
    CHECK(same_bits(gpu.download(saved_gpu.x_view()).view(), saved_cpu.x.view()));
    check_close("xa", as_double<float>(gpu.download(saved_gpu.xa_view()).view()), as_double<float>(saved_cpu.xa.view()),
                double_sum(m.xa, in));
    check_close("y", as_double<Compute>(gpu.download(y_gpu.view).view()), as_double<Compute>(y_cpu.view()),
                rounded(m.y, in + r + 2));

    Tensor dx_cpu(dtype_of_v<Compute>, {T, in});
    const DeviceTensor dx_gpu(dtype_of_v<Compute>, {T, in});
    cpu.zero_grad();
    gpu.zero_grad();
    cpu.backward(saved_cpu, dy_host.view(), dx_cpu.view());
    gpu.backward(saved_gpu, dy.view, dx_gpu.view);
    check_close("dx", as_double<Compute>(gpu.download(dx_gpu.view).view()), as_double<Compute>(dx_cpu.view()),
                rounded(m.dx, out + r + 2));
    check_close("dA", as_double<float>(gpu.download(gpu.grad_A()).view()), as_double<float>(cpu.grad_A()),
                fp32(m.grad_a, T + out + 2));
    check_close("dB", as_double<float>(gpu.download(gpu.grad_B()).view()), as_double<float>(cpu.grad_B()),
                fp32(m.grad_b, T + in + 2));
    check_close("db", as_double<float>(gpu.download(gpu.grad_bias()).view()), as_double<float>(cpu.grad_bias()),
                double_sum(m.grad_bias, T));

    // A second backward, without dx, accumulates: every gradient doubles.
    cpu.backward(saved_cpu, dy_host.view(), TensorView{});
    gpu.backward(saved_gpu, dy.view, TensorView{});
    check_close("dA (accumulated)", as_double<float>(gpu.download(gpu.grad_A()).view()), as_double<float>(cpu.grad_A()),
                fp32(m.grad_a, T + out + 3, 2.0));
    check_close("dB (accumulated)", as_double<float>(gpu.download(gpu.grad_B()).view()), as_double<float>(cpu.grad_B()),
                fp32(m.grad_b, T + in + 3, 2.0));
    check_close("db (accumulated)", as_double<float>(gpu.download(gpu.grad_bias()).view()),
                as_double<float>(cpu.grad_bias()), double_sum(m.grad_bias, 2 * T, 2.0));
    gpu.zero_grad();
    CHECK(as_double<float>(gpu.download(gpu.grad_A()).view()) == std::vector<double>(static_cast<std::size_t>(r * in)));
    CHECK(gpu.workspace_bytes() > 0);
    gpu.release_workspace();
    CHECK(gpu.workspace_bytes() == 0);
  }

  SECTION("inference forward, adapter disabled, merge and unmerge agree") {
    Tensor y_cpu(dtype_of_v<Compute>, {T, out});
    const DeviceTensor y_gpu(dtype_of_v<Compute>, {T, out});
    cpu.forward(x_host.view(), y_cpu.view());
    gpu.forward(x.view, y_gpu.view);
    check_close("y (inference)", as_double<Compute>(gpu.download(y_gpu.view).view()), as_double<Compute>(y_cpu.view()),
                rounded(m.y_inference, in + r + 2));

    cpu.set_adapter_enabled(false);
    gpu.set_adapter_enabled(false);
    cpu.forward(x_host.view(), y_cpu.view());
    gpu.forward(x.view, y_gpu.view);
    check_close("y (adapter disabled)", as_double<Compute>(gpu.download(y_gpu.view).view()),
                as_double<Compute>(y_cpu.view()), rounded(m.y_base, in + 1));
    CHECK(error_of([&] { (void)gpu.forward_train(x.view, y_gpu.view, key); }).code() == "AdapterDisabled");
    cpu.set_adapter_enabled(true);
    gpu.set_adapter_enabled(true);

    // W̃ + s·B·A in fp32: r products per element, then one addition.
    const Tensor exact_cpu = cpu.merged_weight();
    check_close("merged weight", as_double<float>(gpu.merged_weight().view()), as_double<float>(exact_cpu.view()),
                fp32(m.merged, r + 2));

    const MergeReport report_cpu = cpu.merge();
    const MergeReport report_gpu = gpu.merge();
    REQUIRE(gpu.merged());
    // The merged bases come from fp32 weights that differ by a few fp32 ulps
    // at most, so codes differ only where a value sits on a decision boundary
    // (never, in practice); there either code has the same error magnitude,
    // so the reports agree closely either way.
    const FrozenWeight<Quant, Compute> merged_gpu = gpu.download_merged_base();
    const FrozenWeight<Quant, Compute> merged_cpu = make_base<Quant, Compute>(exact_cpu.view(), c.blocksize, c.double_quant);
    if constexpr (std::is_same_v<Quant, NoQuant>) {
      // Dense fp32: the merged base is the fp32 sum itself, which may differ in its last bits.
      std::vector<float> stored(static_cast<std::size_t>(out * in));
      merged_gpu.dequantize_tile(0, out, 0, in, stored.data(), in);
      check_close("merged base", std::vector<double>(stored.begin(), stored.end()), as_double<float>(exact_cpu.view()),
                  rounded(m.merged, r + 2));
    } else {
      CHECK(differing_elements(merged_gpu, merged_cpu) <= out * in / 1000);
    }
    CHECK(report_gpu.max_abs_error == Approx(report_cpu.max_abs_error).epsilon(1e-3).margin(1e-12));
    CHECK(report_gpu.rms_error == Approx(report_cpu.rms_error).epsilon(1e-3).margin(1e-12));
    CHECK(report_gpu.relative_rms_error == Approx(report_cpu.relative_rms_error).epsilon(1e-3).margin(1e-12));

    // The merged GPU layer is its merged base alone: compare with a CPU layer
    // on that very base with its adapter off.
    Cpu reference(path, gpu.download_merged_base(), bias.view(), config, options);  // a base is move-only
    reference.set_adapter_enabled(false);
    std::vector<double> w_merged(static_cast<std::size_t>(out * in));
    {
      std::vector<float> tile(w_merged.size());
      merged_gpu.dequantize_tile(0, out, 0, in, tile.data(), in);
      std::copy(tile.begin(), tile.end(), w_merged.begin());
    }
    std::vector<double> y_merged_magnitude(static_cast<std::size_t>(T * out));
    const std::vector<double> xs = as_double<Compute>(x_host.view()), bs = as_double<float>(bias.view());
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t o = 0; o < out; ++o) {
        double sum = std::abs(bs[o]);
        for (std::int64_t i = 0; i < in; ++i) sum += std::abs(xs[t * in + i] * w_merged[o * in + i]);
        y_merged_magnitude[t * out + o] = sum;
      }
    reference.forward(x_host.view(), y_cpu.view());
    gpu.forward(x.view, y_gpu.view);
    check_close("y (merged)", as_double<Compute>(gpu.download(y_gpu.view).view()), as_double<Compute>(y_cpu.view()),
                rounded(y_merged_magnitude, in + 1));
    CHECK(error_of([&] { (void)gpu.forward_train(x.view, y_gpu.view, key); }).code() == "AdapterMerged");
    CHECK(error_of([&] { (void)gpu.merge(); }).code() == "AdapterMerged");

    gpu.unmerge();
    CHECK_FALSE(gpu.merged());
    cpu.unmerge();
    cpu.forward(x_host.view(), y_cpu.view());
    gpu.forward(x.view, y_gpu.view);
    check_close("y (unmerged)", as_double<Compute>(gpu.download(y_gpu.view).view()), as_double<Compute>(y_cpu.view()),
                rounded(m.y_inference, in + r + 2));
  }

  SECTION("bad arguments are refused with the CPU layer's error codes") {
    const DeviceTensor y(dtype_of_v<Compute>, {T, out});
    using Other = std::conditional_t<std::is_same_v<Compute, float>, bf16, float>;
    const DeviceTensor x_other(dtype_of_v<Other>, {T, in});
    const DeviceTensor y_short(dtype_of_v<Compute>, {T, out - 1});
    CHECK(error_of([&] { gpu.forward(x_host.view(), y.view); }).code() == "DeviceMismatch");
    CHECK(error_of([&] { gpu.forward(x_other.view, y.view); }).code() == "DTypeMismatch");
    CHECK(error_of([&] { gpu.forward(x.view, y_short.view); }).code() == "ShapeMismatch");
    CHECK(error_of([&] { gpu.set_adapter_weights(b.view(), a.view()); }).code() == "ShapeMismatch");
    const qcuda::LoraActivations saved = gpu.forward_train(x.view, y.view, key);
    CHECK(error_of([&] { gpu.backward(saved, y_short.view, TensorView{}); }).code() == "ShapeMismatch");
    // Adapter weights from device F32 tensors are copied as they are.
    const DeviceTensor a_device(a), b_device(b);
    gpu.set_adapter_weights(a_device.view, b_device.view);
    CHECK(same_bits(gpu.download(gpu.lora_A()).view(), a.view()));
    CHECK(same_bits(gpu.download(gpu.lora_B()).view(), b.view()));
  }
}

}  // namespace

TEST_CASE("CUDA LoraLinear NF4/bf16 equals the CPU layer (in not a multiple of the blocksize)", "[gpu][lora_linear]") {
  // Default tiling: one tile, the fast dequantize kernel. 7 rows: tiles start
  // mid-block (7 * 200 = 1400 = 21.875 blocks), the generic kernel.
  const std::int64_t tile_rows = GENERATE(0, 7);
  compare_backends<NF4, bf16>({.out = 96, .in = 200, .rank = 8, .tokens = 37, .blocksize = 64, .double_quant = true,
                               .tile_rows = tile_rows});
}

TEST_CASE("CUDA LoraLinear NF4/bf16 with tiles on nested-block boundaries", "[gpu][lora_linear]") {
  // 64 rows x 256 = 16384 = 256 blocks of 64: every tile start is a nested
  // block boundary, so the fast kernel runs on offset statistics.
  compare_backends<NF4, bf16>(
      {.out = 160, .in = 256, .rank = 16, .tokens = 19, .blocksize = 64, .double_quant = true, .tile_rows = 64});
}

TEST_CASE("CUDA LoraLinear FP4/fp16 equals the CPU layer (odd tile starts)", "[gpu][lora_linear]") {
  // 5 rows x 75: tiles start at odd elements, mid-byte and mid-block (generic
  // kernel); 32 rows x 75 = 2400 = 75 blocks of 32: block-aligned (fast kernel).
  const std::int64_t tile_rows = GENERATE(0, 5, 32);
  compare_backends<FP4, fp16>({.out = 64, .in = 75, .rank = 4, .tokens = 16, .blocksize = 32, .double_quant = false,
                               .tile_rows = tile_rows});
}

TEST_CASE("CUDA LoraLinear NoQuant/fp32 equals the CPU layer", "[gpu][lora_linear]") {
  compare_backends<NoQuant, float>({.out = 50, .in = 70, .rank = 6, .tokens = 9});
}
