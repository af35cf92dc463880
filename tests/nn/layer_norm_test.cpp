// layer_norm_forward / layer_norm_backward against torch.nn.LayerNorm
// (tests/reference/nn_elementwise.py: forward output, torch's saved mean and
// rstd, and autograd's dx, dweight, dbias), plus determinism across thread
// counts, in-place use and bad arguments.
//
// Tolerances, in fp32 eps (2^-23) of max(|torch's value|, floor); observed
// maxima in brackets:
//  * mean, rstd: ours is the double sum rounded once (≤ 0.5 ulp), torch's an
//    fp32 cascade sum: 4 eps, floor 1e-3 [1.1].
//  * y: both form (x·rstd − rstd·mean)·w + b in fp32, four roundings of terms
//    up to |x·rstd| ≈ 4 (inputs are offset by up to 3 std) from statistics
//    that differ as above: 16 eps, floor 1 [3.5] (the error is one of the
//    large terms, so absolute for a y near 0).
//  * dx: rstd·(g − mean(g) − x̂·mean(g·x̂)), terms up to ~|g|·4, the means in
//    double (ours) or fp32 (torch): 16 eps, floor 1 [2.8].
//  * dweight, dbias: sums over T ≤ 7 tokens of terms ≤ ~8, double vs fp32:
//    8 eps, floor 1 [3].
// A wrong formula (unbiased variance, eps outside the root, a missing term)
// errs by 1e-3 or more.
#include <qlora/nn/layer_norm.hpp>

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

TEST_CASE("layer_norm matches torch.nn.LayerNorm forward and backward", "[nn][layer_norm]") {
  for (const auto& c : test::fixture_cases("layer_norm")) {
    const std::string name = c.at("name");
    const std::int64_t tokens = c.at("T"), hidden = c.at("H");
    const auto eps = c.at("eps").get<float>();
    const bool has_bias = c.at("bias");
    SECTION(name) {
      const Tensor x = fixture_tensor(name, "x"), weight = fixture_tensor(name, "weight"), dy = fixture_tensor(name, "dy");
      const Tensor bias = has_bias ? fixture_tensor(name, "bias") : Tensor();
      const TensorView bias_view = has_bias ? bias.view() : TensorView{};
      Tensor y(DType::F32, Shape{tokens, hidden});
      const NormStatistics saved = layer_norm_forward(x.view(), weight.view(), bias_view, eps, y.view(), 1);
      require_close(saved.mean.view(), fixture_tensor(name, "mean").view(), 4 * eps32, 1e-3, name + " mean");
      require_close(saved.rstd.view(), fixture_tensor(name, "rstd").view(), 4 * eps32, 1e-3, name + " rstd");
      require_close(y.view(), fixture_tensor(name, "y").view(), 16 * eps32, 1.0, name + " y");

      Tensor dx(DType::F32, Shape{tokens, hidden});
      Tensor dweight(DType::F32, Shape{hidden});
      Tensor dbias = has_bias ? Tensor(DType::F32, Shape{hidden}) : Tensor();
      layer_norm_backward(x.view(), weight.view(), saved, dy.view(), dx.view(), dweight.view(),
                          has_bias ? dbias.view() : TensorView{}, 1);
      require_close(dx.view(), fixture_tensor(name, "dx").view(), 16 * eps32, 1.0, name + " dx");
      require_close(dweight.view(), fixture_tensor(name, "dweight").view(), 8 * eps32, 1.0, name + " dweight");
      if (has_bias) require_close(dbias.view(), fixture_tensor(name, "dbias").view(), 8 * eps32, 1.0, name + " dbias");
    }
  }
}

TEST_CASE("layer_norm_backward accumulates parameter gradients and skips unwanted outputs", "[nn][layer_norm]") {
  const std::string name = "layer_norm_bias";
  const Tensor x = fixture_tensor(name, "x"), weight = fixture_tensor(name, "weight"), dy = fixture_tensor(name, "dy");
  const Tensor bias = fixture_tensor(name, "bias");
  const std::int64_t hidden = weight.numel();
  Tensor y(DType::F32, x.shape());
  const NormStatistics saved = layer_norm_forward(x.view(), weight.view(), bias.view(), 1e-5f, y.view(), 1);

  // A second micro-batch adds to what the first left: start from 1 and find 1 + torch's gradient
  // (the +1 costs one rounding at the scale of 1: the floor of 1 covers it).
  Tensor dweight = test::tensor_of<float>(std::vector<float>(static_cast<std::size_t>(hidden), 1.0f), {hidden});
  Tensor dbias = test::tensor_of<float>(std::vector<float>(static_cast<std::size_t>(hidden), 1.0f), {hidden});
  layer_norm_backward(x.view(), weight.view(), saved, dy.view(), TensorView{}, dweight.view(), dbias.view(), 1);
  for (auto& v : dweight.span<float>()) v -= 1.0f;
  for (auto& v : dbias.span<float>()) v -= 1.0f;
  require_close(dweight.view(), fixture_tensor(name, "dweight").view(), 8 * eps32, 1.0, "dweight += ");
  require_close(dbias.view(), fixture_tensor(name, "dbias").view(), 8 * eps32, 1.0, "dbias += ");

  // dx alone, written over dy (in place).
  Tensor dx_in_place = fixture_tensor(name, "dy");
  layer_norm_backward(x.view(), weight.view(), saved, dx_in_place.view(), dx_in_place.view(), TensorView{},
                      TensorView{}, 1);
  require_close(dx_in_place.view(), fixture_tensor(name, "dx").view(), 16 * eps32, 1.0, "dx over dy");
}

TEST_CASE("layer_norm gives the same bits for any thread count, and in place", "[nn][layer_norm]") {
  // 37 x 1000: big enough to be split among threads (rows and columns).
  const std::int64_t tokens = 37, hidden = 1000;
  const Tensor x = test::tensor_of<float>(test::normalish(tokens * hidden, 11, 2.0), {tokens, hidden});
  const Tensor weight = test::tensor_of<float>(test::normalish(hidden, 12, 0.5), {hidden});
  const Tensor bias = test::tensor_of<float>(test::normalish(hidden, 13, 0.5), {hidden});
  const Tensor dy = test::tensor_of<float>(test::normalish(tokens * hidden, 14, 1.0), {tokens, hidden});

  struct Run {
    Tensor y, dx, dweight, dbias;
  };
  const auto run = [&](unsigned threads) {
    Run r{Tensor(DType::F32, x.shape()), Tensor(DType::F32, x.shape()), Tensor(DType::F32, weight.shape()),
          Tensor(DType::F32, weight.shape())};
    const NormStatistics saved = layer_norm_forward(x.view(), weight.view(), bias.view(), 1e-5f, r.y.view(), threads);
    layer_norm_backward(x.view(), weight.view(), saved, dy.view(), r.dx.view(), r.dweight.view(), r.dbias.view(),
                        threads);
    return r;
  };
  const Run one = run(1);
  for (const unsigned threads : {2u, 3u, 8u}) {
    const Run many = run(threads);
    test::require_identical(one.y.view(), many.y.view(), "y");
    test::require_identical(one.dx.view(), many.dx.view(), "dx");
    test::require_identical(one.dweight.view(), many.dweight.view(), "dweight");
    test::require_identical(one.dbias.view(), many.dbias.view(), "dbias");
  }

  Tensor in_place = test::tensor_of<float>(test::normalish(tokens * hidden, 11, 2.0), {tokens, hidden});
  layer_norm_forward(in_place.view(), weight.view(), bias.view(), 1e-5f, in_place.view(), 3);
  test::require_identical(in_place.view(), one.y.view(), "y over x");
}

TEST_CASE("layer_norm refuses bad arguments", "[nn][layer_norm][errors]") {
  const Tensor x(DType::F32, Shape{4, 16}), weight(DType::F32, Shape{16}), bias(DType::F32, Shape{16});
  Tensor y(DType::F32, Shape{4, 16});
  const auto forward = [&](const TensorView& xv, const TensorView& wv, const TensorView& bv, float eps,
                           const TensorView& yv) { return layer_norm_forward(xv, wv, bv, eps, yv, 1); };
  require_error([&] { forward(Tensor(DType::F32, Shape{4, 8}).view(), weight.view(), bias.view(), 1e-5f, y.view()); },
                "ShapeMismatch", "layer_norm: x is [4, 8], expected [tokens, 16]");
  require_error([&] { forward(x.view(), weight.view(), Tensor(DType::F32, Shape{15}).view(), 1e-5f, y.view()); },
                "ShapeMismatch", "bias is [15], expected [16]");
  require_error([&] { forward(x.view(), weight.view(), bias.view(), 1e-5f, Tensor(DType::F32, Shape{3, 16}).view()); },
                "ShapeMismatch", "y is [3, 16], expected [4, 16]");
  require_error([&] { forward(x.view(), Tensor(DType::F32, Shape{4, 4}).view(), bias.view(), 1e-5f, y.view()); },
                "ShapeMismatch", "weight is [4, 4], expected [hidden]");
  require_error([&] { forward(x.view(), Tensor(DType::F32, Shape{0}).view(), bias.view(), 1e-5f, y.view()); },
                "ShapeMismatch", "weight is [0]");
  require_error([&] { forward(x.view(), Tensor(DType::BF16, Shape{16}).view(), bias.view(), 1e-5f, y.view()); },
                "DTypeMismatch", "weight is BF16, expected F32");
  const Tensor wide(DType::F32, Shape{16, 4});
  require_error([&] { forward(wide.view().transposed(0, 1), weight.view(), bias.view(), 1e-5f, y.view()); },
                "NotContiguous", "x [4, 16] is not contiguous");
  require_error([&] { forward(x.view(), weight.view(), bias.view(), -1e-5f, y.view()); }, "InvalidArgument", "eps");
  require_error([&] { forward(x.view(), weight.view(), bias.view(), std::numeric_limits<float>::quiet_NaN(), y.view()); },
                "InvalidArgument", "eps");
  require_error([&] { forward(TensorView(nullptr, DType::F32, Shape{4, 16}), weight.view(), bias.view(), 1e-5f, y.view()); },
                "NullPointer", "x has no data");

  const NormStatistics saved = forward(x.view(), weight.view(), bias.view(), 1e-5f, y.view());
  Tensor dx(DType::F32, Shape{4, 16}), dweight(DType::F32, Shape{16});
  const Tensor dy_short(DType::F32, Shape{4, 8});
  require_error(
      [&] { layer_norm_backward(x.view(), weight.view(), saved, dy_short.view(), dx.view(), dweight.view(), TensorView{}, 1); },
      "ShapeMismatch", "layer_norm_backward: dy is [4, 8], expected [4, 16]");
  require_error(
      [&] { layer_norm_backward(x.view(), weight.view(), saved, y.view(), dx.view(), Tensor(DType::F32, Shape{8}).view(), TensorView{}, 1); },
      "ShapeMismatch", "dweight is [8], expected [16]");
  const NormStatistics other_tokens = forward(Tensor(DType::F32, Shape{3, 16}).view(), weight.view(), bias.view(), 1e-5f,
                                              Tensor(DType::F32, Shape{3, 16}).view());
  require_error(
      [&] { layer_norm_backward(x.view(), weight.view(), other_tokens, y.view(), dx.view(), dweight.view(), TensorView{}, 1); },
      "ShapeMismatch", "saved.mean is [3], expected [4]");
  const NormStatistics no_mean{Tensor(), Tensor(DType::F32, Shape{4})};  // an RMSNorm's statistics
  require_error(
      [&] { layer_norm_backward(x.view(), weight.view(), no_mean, y.view(), dx.view(), dweight.view(), TensorView{}, 1); },
      "ShapeMismatch", "saved.mean");
}
