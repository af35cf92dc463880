// cuda/cross_entropy.cuh against the CPU lm_head_cross_entropy it mirrors
// (itself checked against torch + transformers in tests/nn/cross_entropy_test.cpp)
// on the same random inputs: vocabularies of 5, 64, 1000 and 5003 (below a
// warp, and 1 to 10 elements per thread of a 512-thread row CTA), hidden
// sizes 80 and 7, several chunks with a partial last one and one chunk
// larger than T, with and without a bias, grad_scale != 1, logits in the
// thousands (exp overflows fp32 without the max subtraction), ignored rows (including
// a run of them and the first and last positions), gradients accumulated onto
// non-zero values, forward only, no supervised token, and the errors. Without
// a GPU the test exits 77 (skipped, tests/cuda/support.cuh).
//
// Inputs are dyadic, so that every product and partial sum of a logit is
// exact in fp32 and cuBLAS and Eigen produce the same logits bit for bit
// whatever their summation order; the comparison then measures the softmax
// and the backward alone. weight = k/16 with |k| <= 16, bias = k/32 with
// |k| <= 32, hidden (H = 80) k/8 with |k| <= 16: multiples of 1/128 below
// 2^8. With H = 7, hidden = k/512 (k/8 for the large logits, up to ~3600)
// with |k| <= 4095: 12 significant bits, which TF32 (11) would round — a
// TF32 GEMM moves a logit by ~1e-4, far past the loss tolerance — while the
// 7-term sums stay within fp32's 24 bits.
//
// Tolerances:
//  * loss_sum: per row, max and z[target] are exact and identical; log Σ exp
//    differs by the relative error of Σ: each exp(z − max) is within 2 ulp
//    (CUDA expf) or 1 ulp (Eigen) and the sums are in double, so |Δ| <= ~2e-7
//    a row. Allowed: 1e-6 per supervised row; a wrong target, row or bias
//    moves the loss by O(1) a row.
//  * count: exact.
//  * the gradients: each G = s·(p − onehot) differs by a few fp32 roundings
//    (the exp, the 1/Σ factor, the product: <= ~1e-6 relative); the
//    backward GEMMs (dhidden over V terms, dweight over a chunk of tokens)
//    and the CPU's fp32 dbias column sums add their summation-order error,
//    ~sqrt(n)·2^-24 (<= 5e-6 for n = 5003) of Σ|G|·|operand|, itself at
//    most a few times the tensor's largest |value|. Allowed: 2e-5 of the
//    tensor's largest |value| (check_close with floor 1); a missing scale,
//    onehot, bias or row is O(1) of it.
//  * forward only vs backward, and a repeated call: bit-identical (the same
//    kernels on the same data; cuBLAS is deterministic on one device and
//    stream, and nothing uses atomics).
//  * ignored rows of dhidden: exactly zero; with no supervised token, the
//    accumulators keep their bits.
#include <qlora/cuda/cross_entropy.cuh>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <qlora/core/tensor.hpp>
#include <qlora/cuda/common.cuh>
#include <qlora/cuda/cublas.cuh>
#include <qlora/nn/cross_entropy.hpp>

#include "cuda/device_tensors.cuh"
#include "cuda/support.cuh"
#include "support/errors.hpp"
#include "support/splitmix.hpp"

using namespace qlora;
namespace qcuda = qlora::cuda;  // `cuda::` alone is ambiguous with CCCL's ::cuda under `using namespace qlora`
using test::check_close;
using test::OnDevice;
using test::require_error;
using test::same_bits;

namespace {

/// Values k·step for integers k drawn uniformly from [-range, range]: exact
/// fp32 products and sums (see the header comment).
Tensor dyadic_tensor(Shape shape, std::uint64_t seed, int range, float step) {
  Tensor t(DType::F32, shape);
  const auto span = t.span<float>();
  for (std::size_t i = 0; i < span.size(); ++i) {
    const auto k = static_cast<int>(test::splitmix64(seed * 1000003u + i) % static_cast<std::uint64_t>(2 * range + 1));
    span[i] = static_cast<float>(k - range) * step;
  }
  return t;
}

/// Targets in [0, vocab), with ignored_target at the first and last
/// positions, at every 5th and on a run of four in the middle.
std::vector<std::int32_t> mixed_targets(std::int64_t tokens, std::int64_t vocab, std::uint64_t seed) {
  std::vector<std::int32_t> targets(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) {
    const bool ignored = t == 0 || t == tokens - 1 || t % 5 == 3 || (t >= tokens / 2 && t < tokens / 2 + 4);
    targets[static_cast<std::size_t>(t)] =
        ignored ? ignored_target
                : static_cast<std::int32_t>(test::splitmix64(seed + static_cast<std::uint64_t>(t)) %
                                            static_cast<std::uint64_t>(vocab));
  }
  return targets;
}

/// A device copy of host I32 targets.
struct TargetsOnDevice {
  qcuda::DeviceBuffer<std::int32_t> buffer;
  TensorView view;

  explicit TargetsOnDevice(const std::vector<std::int32_t>& host)
      : buffer(host.size(), nullptr),
        view(buffer.data(), DType::I32, Shape{static_cast<std::int64_t>(host.size())}, Device::cuda) {
    qcuda::copy_to_device(buffer.data(), std::span<const std::int32_t>(host), nullptr);
  }
};

/// The view of an optional device tensor: empty when there is none.
TensorView view_of(const std::optional<OnDevice>& tensor) { return tensor ? tensor->view : TensorView{}; }

/// Whether the rows of a [T, H] host tensor whose target is ignored are all +0.0 bits.
bool rows_are_zero(const Tensor& tensor, const std::vector<std::int32_t>& targets) {
  const auto values = tensor.span<const float>();
  if (targets.empty()) return true;
  const std::size_t width = values.size() / targets.size();
  for (std::size_t t = 0; t < targets.size(); ++t) {
    if (targets[t] != ignored_target) continue;
    for (std::size_t i = 0; i < width; ++i) {
      if (test::bits_of(values[t * width + i]) != 0) return false;
    }
  }
  return true;
}

}  // namespace

TEST_CASE("CUDA lm_head_cross_entropy matches the CPU op, forward and backward", "[cuda][nn][cross_entropy]") {
  struct Case {
    const char* name;
    std::int64_t vocab, width, tokens, chunk_tokens;
    bool bias;
    float grad_scale;
    int hidden_range;   ///< hidden = k·hidden_step, |k| <= hidden_range
    float hidden_step;
  };
  const Case c = GENERATE(Case{"several chunks, a partial last one", 1000, 80, 45, 8, true, 1.0f, 16, 1.0f / 8},
                          Case{"tiny vocabulary, one chunk larger than T", 5, 7, 11, 128, false, 1.0f, 4095, 1.0f / 512},
                          Case{"grad_scale, chunks of 5", 64, 80, 20, 5, true, 0.37f, 16, 1.0f / 8},
                          Case{"large logits", 1000, 7, 30, 16, true, 0.5f, 4095, 1.0f / 8},
                          Case{"wide vocabulary, no bias", 5003, 7, 12, 5, false, 1.0f, 4095, 1.0f / 512});
  INFO(c.name << ": vocab " << c.vocab << ", hidden " << c.width << ", " << c.tokens << " tokens in chunks of "
              << c.chunk_tokens);
  const Tensor hidden = dyadic_tensor(Shape{c.tokens, c.width}, 1, c.hidden_range, c.hidden_step);
  const Tensor weight = dyadic_tensor(Shape{c.vocab, c.width}, 2, 16, 1.0f / 16);
  const Tensor bias = c.bias ? dyadic_tensor(Shape{c.vocab}, 3, 32, 1.0f / 32) : Tensor();
  const std::vector<std::int32_t> targets = mixed_targets(c.tokens, c.vocab, 4);
  const Tensor dhidden_start = test::random_tensor(Shape{c.tokens, c.width}, 5);  // overwritten: rows must be zeroed
  const Tensor dweight_start = test::random_tensor(Shape{c.vocab, c.width}, 6);
  const Tensor dbias_start = test::random_tensor(Shape{c.vocab}, 7);
  const LmHeadLossOptions options{.chunk_tokens = c.chunk_tokens, .grad_scale = c.grad_scale};

  Tensor dhidden(DType::F32, hidden.shape());
  Tensor dweight = test::random_tensor(Shape{c.vocab, c.width}, 6), dbias = test::random_tensor(Shape{c.vocab}, 7);
  const CrossEntropySums cpu = lm_head_cross_entropy(hidden.view(), weight.view(), bias.view(), targets, options,
                                                     dhidden.view(), dweight.view(),
                                                     c.bias ? dbias.view() : TensorView{});

  const qcuda::CublasHandle cublas = qcuda::CublasHandle::create();
  const OnDevice ghidden(hidden), gweight(weight);
  const std::optional<OnDevice> gbias = c.bias ? std::optional<OnDevice>(std::in_place, bias) : std::nullopt;
  const TargetsOnDevice gtargets(targets);
  const auto backward = [&](const OnDevice& gdhidden, const OnDevice& gdweight, const std::optional<OnDevice>& gdbias) {
    return qcuda::lm_head_cross_entropy(ghidden.view, gweight.view, view_of(gbias), gtargets.view, options,
                                        gdhidden.view, gdweight.view, view_of(gdbias), cublas.get(), nullptr);
  };
  const OnDevice gdhidden(dhidden_start), gdweight(dweight_start);
  const std::optional<OnDevice> gdbias = c.bias ? std::optional<OnDevice>(std::in_place, dbias_start) : std::nullopt;
  const CrossEntropySums gpu = backward(gdhidden, gdweight, gdbias);

  CHECK(gpu.count == cpu.count);
  const double allowed = 1e-6 * static_cast<double>(cpu.count);
  INFO("loss_sum: gpu " << gpu.loss_sum << ", cpu " << cpu.loss_sum << ", allowed difference " << allowed);
  CHECK(std::abs(gpu.loss_sum - cpu.loss_sum) <= allowed);
  const Tensor gpu_dhidden = gdhidden.to_host();
  check_close("dhidden", gpu_dhidden, dhidden, 2e-5, 1.0);
  CHECK(rows_are_zero(gpu_dhidden, targets));
  check_close("dweight", gdweight.to_host(), dweight, 2e-5, 1.0);
  if (c.bias) check_close("dbias", gdbias->to_host(), dbias, 2e-5, 1.0);

  SECTION("forward only gives the backward's loss bits") {
    const CrossEntropySums forward = qcuda::lm_head_cross_entropy(
        ghidden.view, gweight.view, view_of(gbias), gtargets.view, options, {}, {}, {}, cublas.get(), nullptr);
    CHECK(forward.count == gpu.count);
    CHECK(test::bits_of(forward.loss_sum) == test::bits_of(gpu.loss_sum));
  }
  SECTION("a second call gives the same bits") {
    const OnDevice again_dhidden(dhidden_start), again_dweight(dweight_start);
    const std::optional<OnDevice> again_dbias =
        c.bias ? std::optional<OnDevice>(std::in_place, dbias_start) : std::nullopt;
    const CrossEntropySums again = backward(again_dhidden, again_dweight, again_dbias);
    CHECK(test::bits_of(again.loss_sum) == test::bits_of(gpu.loss_sum));
    CHECK(same_bits(again_dhidden.to_host(), gpu_dhidden));
    CHECK(same_bits(again_dweight.to_host(), gdweight.to_host()));
    if (c.bias) CHECK(same_bits(again_dbias->to_host(), gdbias->to_host()));
  }
}

TEST_CASE("CUDA lm_head_cross_entropy with no supervised token", "[cuda][nn][cross_entropy]") {
  const std::int64_t tokens = GENERATE(0, 6);
  INFO(tokens << " tokens, all ignored");
  const std::int64_t vocab = 64, width = 7;
  const Tensor weight = dyadic_tensor(Shape{vocab, width}, 2, 16, 1.0f / 16);
  const Tensor bias = dyadic_tensor(Shape{vocab}, 3, 32, 1.0f / 32);
  const Tensor dweight_start = test::random_tensor(Shape{vocab, width}, 6);
  const Tensor dbias_start = test::random_tensor(Shape{vocab}, 7);
  const qcuda::CublasHandle cublas = qcuda::CublasHandle::create();
  const OnDevice gweight(weight), gbias(bias), gdweight(dweight_start), gdbias(dbias_start);
  const std::vector<std::int32_t> targets(static_cast<std::size_t>(tokens), ignored_target);
  const OnDevice ghidden(dyadic_tensor(Shape{tokens, width}, 1, 16, 0.125f));
  const OnDevice gdhidden(test::random_tensor(Shape{tokens, width}, 5));
  const TargetsOnDevice gtargets(targets);

  const CrossEntropySums sums =
      qcuda::lm_head_cross_entropy(ghidden.view, gweight.view, gbias.view, gtargets.view, {}, gdhidden.view,
                                   gdweight.view, gdbias.view, cublas.get(), nullptr);
  CHECK(sums.count == 0);
  CHECK(sums.loss_sum == 0.0);
  CHECK(rows_are_zero(gdhidden.to_host(), targets));
  CHECK(same_bits(gdweight.to_host(), dweight_start));
  CHECK(same_bits(gdbias.to_host(), dbias_start));
}

TEST_CASE("CUDA lm_head_cross_entropy refuses bad arguments", "[cuda][nn][cross_entropy][errors]") {
  const std::int64_t vocab = 5, width = 4, tokens = 3;
  const Tensor hidden = dyadic_tensor(Shape{tokens, width}, 1, 16, 0.125f);
  const Tensor weight = dyadic_tensor(Shape{vocab, width}, 2, 16, 1.0f / 16);
  const qcuda::CublasHandle cublas = qcuda::CublasHandle::create();
  const OnDevice ghidden(hidden), gweight(weight), gbias(Tensor(DType::F32, Shape{vocab}));
  const OnDevice gdhidden(Tensor(DType::F32, Shape{tokens, width})), gdbias(Tensor(DType::F32, Shape{vocab}));
  const TargetsOnDevice good({1, ignored_target, 4});
  const auto call = [&](const TensorView& hidden_view, const TensorView& bias_view, const TensorView& targets_view,
                        const TensorView& dhidden_view, const TensorView& dbias_view, LmHeadLossOptions options = {}) {
    (void)qcuda::lm_head_cross_entropy(hidden_view, gweight.view, bias_view, targets_view, options, dhidden_view, {},
                                       dbias_view, cublas.get(), nullptr);
  };

  // Targets outside [0, V) that are not ignored_target: the message names the position.
  const TargetsOnDevice too_large({1, ignored_target, 5}), negative({-1, 0, 0});
  require_error([&] { call(ghidden.view, gbias.view, too_large.view, gdhidden.view, {}); }, "TokenOutOfRange",
                "targets[2] is 5", "[0, 5)");
  require_error([&] { call(ghidden.view, gbias.view, negative.view, gdhidden.view, {}); }, "TokenOutOfRange",
                "targets[0] is -1");
  // Targets must be I32 device memory of T entries.
  const OnDevice float_targets(Tensor(DType::F32, Shape{tokens}));
  require_error([&] { call(ghidden.view, gbias.view, float_targets.view, {}, {}); }, "DTypeMismatch",
                "targets is F32, expected I32");
  std::vector<std::int32_t> host_targets{1, 2, 3};
  const TensorView host_targets_view(host_targets.data(), DType::I32, Shape{tokens}, Device::cpu);
  require_error([&] { call(ghidden.view, gbias.view, host_targets_view, {}, {}); }, "DeviceMismatch",
                "targets is on cpu");
  const TargetsOnDevice short_targets({1, 2});
  require_error([&] { call(ghidden.view, gbias.view, short_targets.view, {}, {}); }, "ShapeMismatch",
                "targets is [2], expected [3]");
  // Host activations, wrong shapes, a bad chunk size, dbias without a bias.
  require_error([&] { call(hidden.view(), gbias.view, good.view, {}, {}); }, "DeviceMismatch", "hidden is on cpu");
  const OnDevice wide_hidden(Tensor(DType::F32, Shape{tokens, width + 1}));
  require_error([&] { call(wide_hidden.view, gbias.view, good.view, {}, {}); }, "ShapeMismatch", "hidden is [3, 5]");
  const OnDevice short_dhidden(Tensor(DType::F32, Shape{tokens - 1, width}));
  require_error([&] { call(ghidden.view, gbias.view, good.view, short_dhidden.view, {}); }, "ShapeMismatch",
                "dhidden is [2, 4], expected [3, 4]");
  require_error([&] { call(ghidden.view, gbias.view, good.view, {}, {}, {.chunk_tokens = 0}); }, "InvalidArgument",
                "chunk_tokens is 0");
  require_error([&] { call(ghidden.view, {}, good.view, {}, gdbias.view); }, "ShapeMismatch", "dbias given");
}
