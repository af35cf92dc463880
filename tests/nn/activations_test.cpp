// gelu_new, silu and swiglu, forward and backward, against transformers'
// NewGELUActivation and torch.nn.functional.silu with autograd
// (tests/reference/nn_elementwise.py; inputs up to |x| = 8, past both tails
// of tanh and exp), plus in-place use, thread-count independence and bad
// arguments.
//
// Tolerances: 4 fp32 eps (2^-23) of max(|torch's value|, floor) everywhere
// (observed: at most 1.7). Both sides evaluate the same chain of fp32 ops
// in the same order, so they differ only by exp and tanh (ours: Eigen's
// exp, and tanh from it past |u| = 0.625; torch's: Sleef's; each within
// about 1 ulp) and what that changes downstream.
//  * floor 1e-6 (relative, down to tiny values) for silu, swiglu's out and
//    dup: their products keep exp's relative error.
//  * floor 1 (absolute below 1) for gelu_new and every backward: torch forms
//    1 + tanh(u) and 1 − tanh², whose rounding near tanh = ±1 is an absolute
//    error of half an ulp of 1, unbounded relative to a tiny result; and the
//    derivatives change sign (near x = −0.75 for gelu_new, −1.28 for silu),
//    where a sum of larger terms of opposite sign is only good absolutely.
// A wrong constant or formula (erf GELU instead of tanh, a missing factor)
// errs by 1e-4 or more.
#include <qlora/nn/activations.hpp>

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
using test::require_identical;

namespace {

constexpr double eps32 = std::numeric_limits<float>::epsilon();

using UnaryForward = void (*)(const TensorView&, const TensorView&, unsigned);
using UnaryBackward = void (*)(const TensorView&, const TensorView&, const TensorView&, unsigned);

/// A unary op's fixture cases: forward (out of place and in place) and backward (out of place and over dy).
void check_unary(const std::string& op, UnaryForward forward, UnaryBackward backward, double forward_tolerance,
                 double forward_floor, double backward_tolerance) {
  for (const auto& c : test::fixture_cases(op)) {
    const std::string name = c.at("name");
    INFO("case " << name);
    const Tensor x = fixture_tensor(name, "x"), dy = fixture_tensor(name, "dy");
    const Tensor want_y = fixture_tensor(name, "y"), want_dx = fixture_tensor(name, "dx");
    Tensor y(DType::F32, x.shape());
    forward(x.view(), y.view(), 1);
    require_close(y.view(), want_y.view(), forward_tolerance, forward_floor, name + " y");
    Tensor in_place = fixture_tensor(name, "x");
    forward(in_place.view(), in_place.view(), 1);
    require_identical(in_place.view(), y.view(), name + " y over x");

    Tensor dx(DType::F32, x.shape());
    backward(x.view(), dy.view(), dx.view(), 1);
    require_close(dx.view(), want_dx.view(), backward_tolerance, 1.0, name + " dx");
    Tensor over_dy = fixture_tensor(name, "dy");
    backward(x.view(), over_dy.view(), over_dy.view(), 1);
    require_identical(over_dy.view(), dx.view(), name + " dx over dy");
  }
}

}  // namespace

TEST_CASE("gelu_new matches transformers' NewGELUActivation", "[nn][activations]") {
  check_unary("gelu_new", gelu_new_forward, gelu_new_backward, 4 * eps32, 1.0, 4 * eps32);
}

TEST_CASE("silu matches torch.nn.functional.silu", "[nn][activations]") {
  check_unary("silu", silu_forward, silu_backward, 4 * eps32, 1e-6, 4 * eps32);
}

TEST_CASE("swiglu matches silu(gate) * up with autograd", "[nn][activations]") {
  for (const auto& c : test::fixture_cases("swiglu")) {
    const std::string name = c.at("name");
    INFO("case " << name);
    const Tensor gate = fixture_tensor(name, "gate"), up = fixture_tensor(name, "up"), dout = fixture_tensor(name, "dout");
    Tensor out(DType::F32, gate.shape());
    swiglu_forward(gate.view(), up.view(), out.view(), 1);
    require_close(out.view(), fixture_tensor(name, "out").view(), 4 * eps32, 1e-6, name + " out");
    Tensor over_gate = fixture_tensor(name, "gate");
    swiglu_forward(over_gate.view(), up.view(), over_gate.view(), 1);
    require_identical(over_gate.view(), out.view(), name + " out over gate");
    Tensor over_up = fixture_tensor(name, "up");
    swiglu_forward(gate.view(), over_up.view(), over_up.view(), 1);
    require_identical(over_up.view(), out.view(), name + " out over up");

    Tensor dgate(DType::F32, gate.shape()), dup(DType::F32, gate.shape());
    swiglu_backward(gate.view(), up.view(), dout.view(), dgate.view(), dup.view(), 1);
    require_close(dgate.view(), fixture_tensor(name, "dgate").view(), 4 * eps32, 1.0, name + " dgate");
    require_close(dup.view(), fixture_tensor(name, "dup").view(), 4 * eps32, 1e-6, name + " dup");
    // Gradients written over the inputs they replace (gate → dgate, up → dup).
    Tensor gate_then_dgate = fixture_tensor(name, "gate"), up_then_dup = fixture_tensor(name, "up");
    swiglu_backward(gate_then_dgate.view(), up_then_dup.view(), dout.view(), gate_then_dgate.view(), up_then_dup.view(), 1);
    require_identical(gate_then_dgate.view(), dgate.view(), name + " dgate over gate");
    require_identical(up_then_dup.view(), dup.view(), name + " dup over up");
  }
}

TEST_CASE("activations give the same bits for any thread count", "[nn][activations]") {
  const std::int64_t count = 100003;  // several blocks per thread, and a ragged end
  const Tensor x = test::tensor_of<float>(test::normalish(count, 41, 4.0), {count});
  const Tensor up = test::tensor_of<float>(test::normalish(count, 42, 1.0), {count});
  const Tensor dy = test::tensor_of<float>(test::normalish(count, 43, 1.0), {count});
  const auto run = [&](unsigned threads) {
    std::vector<Tensor> results;
    for (int i = 0; i < 7; ++i) results.emplace_back(DType::F32, Shape{count});
    gelu_new_forward(x.view(), results[0].view(), threads);
    gelu_new_backward(x.view(), dy.view(), results[1].view(), threads);
    silu_forward(x.view(), results[2].view(), threads);
    silu_backward(x.view(), dy.view(), results[3].view(), threads);
    swiglu_forward(x.view(), up.view(), results[4].view(), threads);
    swiglu_backward(x.view(), up.view(), dy.view(), results[5].view(), results[6].view(), threads);
    return results;
  };
  const auto one = run(1);
  for (const unsigned threads : {2u, 3u, 8u}) {
    const auto many = run(threads);
    for (std::size_t i = 0; i < one.size(); ++i) require_identical(one[i].view(), many[i].view(), "result " + std::to_string(i));
  }
}

TEST_CASE("activations refuse mismatched and non-F32 tensors", "[nn][activations][errors]") {
  const Tensor x(DType::F32, Shape{3, 5}), same_count(DType::F32, Shape{15}), fewer(DType::F32, Shape{3, 4});
  Tensor y(DType::F32, Shape{3, 5});
  gelu_new_forward(x.view(), same_count.view(), 1);  // any shape with as many elements is fine
  require_error([&] { gelu_new_forward(x.view(), fewer.view(), 1); }, "ShapeMismatch",
                "gelu_new: y is [3, 4] (12 elements), x is [3, 5] (15 elements)");
  require_error([&] { silu_backward(x.view(), fewer.view(), y.view(), 1); }, "ShapeMismatch", "silu_backward: dy is [3, 4]");
  require_error([&] { silu_forward(Tensor(DType::BF16, Shape{3, 5}).view(), y.view(), 1); }, "DTypeMismatch",
                "silu: x is BF16, expected F32");
  require_error([&] { swiglu_forward(x.view(), fewer.view(), y.view(), 1); }, "ShapeMismatch", "swiglu: up is [3, 4]");
  require_error([&] { swiglu_backward(x.view(), x.view(), x.view(), y.view(), fewer.view(), 1); }, "ShapeMismatch",
                "swiglu_backward: dup is [3, 4]");
  const Tensor wide(DType::F32, Shape{5, 3});
  require_error([&] { gelu_new_backward(wide.view().transposed(0, 1), x.view(), y.view(), 1); }, "NotContiguous",
                "gelu_new_backward: x [3, 5] is not contiguous");
}
