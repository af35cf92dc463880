// lm_head_logits against torch's F.linear: tests/reference/nn_loss.py
// recorded the float64 logits of four head shapes (with and without bias, a
// vocabulary that is not a multiple of the 512-row work block, logits near
// 150) and torch's float32 error against them.
#include <qlora/nn/lm_head.hpp>

#include <catch2/catch.hpp>

#include <qlora/core/tensor.hpp>

#include <algorithm>
#include <cmath>

#include "nn/loss_fixture.hpp"
#include "support/bits.hpp"
#include "support/errors.hpp"

using namespace qlora;
using test::require_error;

TEST_CASE("lm_head_logits matches torch's F.linear", "[lm_head][fixture]") {
  for (const char* name : test::loss_case_names) {
    DYNAMIC_SECTION(name) {
      const auto c = test::load_loss_case(name);
      Tensor logits(DType::F32, {c.tokens, c.vocab});
      lm_head_logits(c.hidden.view(), c.weight.view(), c.bias.view(), logits.view(), 3);
      test::check_against_torch(c, "logits", logits.span<const float>());
      // And within the a-priori bound of any fp32 evaluation order, plus the
      // stored truth's own rounding to fp32 (half an ulp: 2^-24 of its magnitude).
      const auto truth = c.truth("logits_true");
      double largest = 0;
      for (const float z : truth) largest = std::max(largest, double(std::abs(z)));
      const test::Errors e = test::errors_against(logits.span<const float>(), truth);
      CHECK(e.max_abs <= test::logit_error_bound(c) + std::ldexp(largest, -24));
    }
  }
}

TEST_CASE("lm_head_logits gives the same bits for any thread count", "[lm_head]") {
  const auto c = test::load_loss_case("batch_rows");  // V = 1037: three vocabulary blocks
  Tensor reference(DType::F32, {c.tokens, c.vocab});
  lm_head_logits(c.hidden.view(), c.weight.view(), c.bias.view(), reference.view(), 1);
  for (unsigned threads : {2u, 3u, 8u}) {
    Tensor logits(DType::F32, {c.tokens, c.vocab});
    lm_head_logits(c.hidden.view(), c.weight.view(), c.bias.view(), logits.view(), threads);
    CHECK(test::same_bits(logits.span<const float>(), reference.span<const float>()));
  }
}

TEST_CASE("lm_head_logits without tokens writes nothing", "[lm_head]") {
  const Tensor hidden(DType::F32, {0, 4}), weight(DType::F32, {3, 4}), logits(DType::F32, {0, 3});
  lm_head_logits(hidden.view(), weight.view(), TensorView{}, logits.view());
}

TEST_CASE("lm_head_logits refuses bad arguments", "[lm_head][errors]") {
  const Tensor hidden(DType::F32, {2, 4}), weight(DType::F32, {3, 4}), bias(DType::F32, {3}),
      logits(DType::F32, {2, 3});
  const auto call = [&](const TensorView& h, const TensorView& w, const TensorView& b, const TensorView& out) {
    return [&, h, w, b, out] { lm_head_logits(h, w, b, out); };
  };
  const Tensor half(DType::F16, {2, 4}), narrow(DType::F32, {3, 5}), short_bias(DType::F32, {2}),
      wide_logits(DType::F32, {2, 4}), vector(DType::F32, {8});
  require_error(call(half.view(), weight.view(), bias.view(), logits.view()), "DTypeMismatch", "hidden is F16");
  require_error(call(hidden.view(), narrow.view(), bias.view(), logits.view()), "ShapeMismatch", "weight is [3, 5]",
                "expected [3, 4]");
  require_error(call(vector.view(), weight.view(), bias.view(), logits.view()), "ShapeMismatch", "hidden is [8]");
  require_error(call(hidden.view(), weight.view(), short_bias.view(), logits.view()), "ShapeMismatch",
                "bias is [2], expected [3]");
  require_error(call(hidden.view(), weight.view(), bias.view(), wide_logits.view()), "ShapeMismatch",
                "logits is [2, 4], expected [2, 3]");
  const Tensor square(DType::F32, {4, 4});
  require_error(call(square.view().transposed(0, 1), weight.view(), bias.view(), Tensor(DType::F32, {4, 3}).view()),
                "NotContiguous", "hidden");
}
