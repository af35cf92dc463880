// rms_norm_forward / rms_norm_backward against transformers' LlamaRMSNorm
// (the maths of InternLM2RMSNorm; tests/reference/nn_elementwise.py records
// its output, its rstd and autograd's dx and dweight), plus determinism
// across thread counts, in-place use and bad arguments.
//
// Tolerances, in fp32 eps (2^-23) of max(|torch's value|, floor); observed
// maxima in brackets:
//  * rstd: the same fp32 rsqrt of mean(x²) + eps; mean(x²) is our double sum
//    rounded once vs torch's fp32 sum of rounded squares: 4 eps [1.3].
//  * y = w·(x·rstd): the same two fp32 products after that rstd: 8 eps,
//    floor 1e-3 [2.2].
//  * dx = rstd·(g − x̂·mean(g·x̂)): a difference of terms up to ~|g|·|x̂|, the
//    mean in double (ours) or fp32 (torch): 8 eps, floor 1 [2].
//  * dweight: sums over T ≤ 7 tokens of terms ≤ ~8, double vs fp32: 8 eps,
//    floor 1 [1.5].
// A wrong formula (mean of |x| instead of x², eps outside the root, a
// missing term) errs by 1e-3 or more.
#include <qlora/nn/rms_norm.hpp>

#include <catch2/catch.hpp>

#include <limits>
#include <string>

#include "nn/elementwise_fixture.hpp"
#include "support/errors.hpp"
#include "support/tensors.hpp"

using namespace qlora;
using test::fixture_tensor;
using test::require_close;
using test::require_error;

namespace {

constexpr double eps32 = std::numeric_limits<float>::epsilon();

}  // namespace

TEST_CASE("rms_norm matches LlamaRMSNorm forward and backward", "[nn][rms_norm]") {
  for (const auto& c : test::fixture_cases("rms_norm")) {
    const std::string name = c.at("name");
    const std::int64_t tokens = c.at("T"), hidden = c.at("H");
    const auto eps = c.at("eps").get<float>();
    SECTION(name) {
      const Tensor x = fixture_tensor(name, "x"), weight = fixture_tensor(name, "weight"), dy = fixture_tensor(name, "dy");
      Tensor y(DType::F32, Shape{tokens, hidden});
      const NormStatistics saved = rms_norm_forward(x.view(), weight.view(), eps, y.view(), 1);
      CHECK(saved.mean.view().raw_data() == nullptr);  // RMSNorm does not centre
      require_close(saved.rstd.view(), fixture_tensor(name, "rstd").view(), 4 * eps32, 1e-3, name + " rstd");
      require_close(y.view(), fixture_tensor(name, "y").view(), 8 * eps32, 1e-3, name + " y");

      Tensor dx(DType::F32, Shape{tokens, hidden});
      Tensor dweight(DType::F32, Shape{hidden});
      rms_norm_backward(x.view(), weight.view(), saved, dy.view(), dx.view(), dweight.view(), 1);
      require_close(dx.view(), fixture_tensor(name, "dx").view(), 8 * eps32, 1.0, name + " dx");
      require_close(dweight.view(), fixture_tensor(name, "dweight").view(), 8 * eps32, 1.0, name + " dweight");
    }
  }
}

TEST_CASE("rms_norm_backward accumulates dweight and may write dx over dy", "[nn][rms_norm]") {
  const std::string name = "rms_norm";
  const Tensor x = fixture_tensor(name, "x"), weight = fixture_tensor(name, "weight");
  const std::int64_t hidden = weight.numel();
  Tensor y(DType::F32, x.shape());
  const NormStatistics saved = rms_norm_forward(x.view(), weight.view(), 1e-5f, y.view(), 1);

  // Starting from 1, dweight ends at 1 + torch's gradient (one more rounding at the scale of 1: floor 1).
  Tensor dweight = test::tensor_of<float>(std::vector<float>(static_cast<std::size_t>(hidden), 1.0f), {hidden});
  Tensor dx_over_dy = fixture_tensor(name, "dy");
  rms_norm_backward(x.view(), weight.view(), saved, dx_over_dy.view(), dx_over_dy.view(), dweight.view(), 1);
  for (auto& v : dweight.span<float>()) v -= 1.0f;
  require_close(dweight.view(), fixture_tensor(name, "dweight").view(), 8 * eps32, 1.0, "dweight +=");
  require_close(dx_over_dy.view(), fixture_tensor(name, "dx").view(), 8 * eps32, 1.0, "dx over dy");
}

TEST_CASE("rms_norm gives the same bits for any thread count, and in place", "[nn][rms_norm]") {
  const std::int64_t tokens = 37, hidden = 1000;  // big enough to be split among threads
  const Tensor x = test::tensor_of<float>(test::normalish(tokens * hidden, 21, 2.0), {tokens, hidden});
  const Tensor weight = test::tensor_of<float>(test::normalish(hidden, 22, 0.5), {hidden});
  const Tensor dy = test::tensor_of<float>(test::normalish(tokens * hidden, 23, 1.0), {tokens, hidden});

  struct Run {
    Tensor y, dx, dweight;
  };
  const auto run = [&](unsigned threads) {
    Run r{Tensor(DType::F32, x.shape()), Tensor(DType::F32, x.shape()), Tensor(DType::F32, weight.shape())};
    const NormStatistics saved = rms_norm_forward(x.view(), weight.view(), 1e-6f, r.y.view(), threads);
    rms_norm_backward(x.view(), weight.view(), saved, dy.view(), r.dx.view(), r.dweight.view(), threads);
    return r;
  };
  const Run one = run(1);
  for (const unsigned threads : {2u, 3u, 8u}) {
    const Run many = run(threads);
    test::require_identical(one.y.view(), many.y.view(), "y");
    test::require_identical(one.dx.view(), many.dx.view(), "dx");
    test::require_identical(one.dweight.view(), many.dweight.view(), "dweight");
  }

  Tensor in_place = test::tensor_of<float>(test::normalish(tokens * hidden, 21, 2.0), {tokens, hidden});
  rms_norm_forward(in_place.view(), weight.view(), 1e-6f, in_place.view(), 3);
  test::require_identical(in_place.view(), one.y.view(), "y over x");
}

TEST_CASE("rms_norm refuses bad arguments", "[nn][rms_norm][errors]") {
  const Tensor x(DType::F32, Shape{4, 16}), weight(DType::F32, Shape{16});
  Tensor y(DType::F32, Shape{4, 16});
  require_error([&] { rms_norm_forward(Tensor(DType::F32, Shape{4, 8}).view(), weight.view(), 1e-5f, y.view(), 1); },
                "ShapeMismatch", "rms_norm: x is [4, 8], expected [tokens, 16]");
  require_error([&] { rms_norm_forward(x.view(), weight.view(), 1e-5f, Tensor(DType::F32, Shape{4, 17}).view(), 1); },
                "ShapeMismatch", "y is [4, 17], expected [4, 16]");
  require_error([&] { rms_norm_forward(x.view(), Tensor(DType::F16, Shape{16}).view(), 1e-5f, y.view(), 1); },
                "DTypeMismatch", "weight is F16, expected F32");
  require_error([&] { rms_norm_forward(x.view(), weight.view(), std::numeric_limits<float>::infinity(), y.view(), 1); },
                "InvalidArgument", "eps");

  const NormStatistics saved = rms_norm_forward(x.view(), weight.view(), 1e-5f, y.view(), 1);
  Tensor dx(DType::F32, Shape{4, 16});
  require_error([&] { rms_norm_backward(x.view(), weight.view(), saved, Tensor(DType::F32, Shape{4, 8}).view(), dx.view(), TensorView{}, 1); },
                "ShapeMismatch", "rms_norm_backward: dy is [4, 8], expected [4, 16]");
  require_error([&] { rms_norm_backward(x.view(), weight.view(), saved, y.view(), Tensor(DType::I32, Shape{4, 16}).view(), TensorView{}, 1); },
                "DTypeMismatch", "dx is I32");
  const NormStatistics empty;
  require_error([&] { rms_norm_backward(x.view(), weight.view(), empty, y.view(), dx.view(), TensorView{}, 1); },
                "ShapeMismatch", "saved.rstd is [], expected [4]");
}
