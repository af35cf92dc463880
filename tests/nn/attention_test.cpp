// Causal attention over packed sequences against torch: tests/reference/nn_attention.py
// ran torch.nn.functional.scaled_dot_product_attention in fp32 with a
// block-diagonal causal mask (GQA through transformers' repeat_kv) and recorded
// out, the logsumexp of the masked scaled scores and the autograd gradients
// dq, dk, dv, for one sequence (head_dim 80), a packed row of sequences 5, 1, 9
// with GQA 4:1, and a packed row 3, 1, 196 (longer than our 128 x 128 tiles).
//
// Tolerance: both sides compute the same fp32 quantities but sum in different
// orders (torch: whole rows; here: an online softmax over key tiles, and
// GEMMs blocked differently), so each result differs by a few fp32 roundings of
// its terms. With inputs of size ≤ 2 and head_dim ≤ 80 the scores are O(1)
// and every output is a sum of ≤ 196 terms of O(1): rounding differences stay
// below ~2e-6 (measured: at most 1.6e-6, in dv of long_gqa), and 1e-5 + 1e-5·|ref|
// leaves room for another compiler or SIMD width. A masking, scaling, GQA or
// sequence-boundary mistake errs by O(0.1) or more.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/io/safetensors_reader.hpp>
#include <qlora/nn/attention.hpp>
#include <string>
#include <vector>

#include "support/errors.hpp"

using namespace qlora;
using nlohmann::json;

namespace {

const SafetensorsReader& fixture() {
  static const SafetensorsReader reader = SafetensorsReader::open(QLORA_TEST_DATA_DIR "/nn/attention.safetensors");
  return reader;
}

Tensor load(const std::string& name) {
  const SafetensorsTensor& stored = fixture().tensor(name);
  Tensor t(DType::F32, Shape(std::span<const std::int64_t>(stored.shape)));
  const std::vector<float> values = fixture().read<float>(name);
  std::copy(values.begin(), values.end(), t.span<float>().begin());
  return t;
}

/// Rows [first, first + count) of a [T, heads, dim] tensor, as a contiguous copy.
Tensor token_rows(const TensorView& t, std::int64_t first, std::int64_t count) {
  Tensor rows(DType::F32, Shape{count, t.shape()[1], t.shape()[2]});
  const std::int64_t width = t.shape()[1] * t.shape()[2];
  const float* source = t.data<const float>() + first * width;
  std::copy(source, source + count * width, rows.span<float>().begin());
  return rows;
}

/// |ours - ref| ≤ 1e-5 + 1e-5·|ref| element by element (see the header comment).
void require_close(const TensorView& ours, const TensorView& ref, const std::string& what) {
  REQUIRE(ours.shape() == ref.shape());
  const auto a = ours.span<const float>();
  const auto b = ref.span<const float>();
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double error = std::fabs(double(a[i]) - double(b[i]));
    worst = std::max(worst, error);
    INFO(what << " element " << i << ": ours " << a[i] << ", torch " << b[i]);
    REQUIRE(error <= 1e-5 + 1e-5 * std::fabs(b[i]));
  }
  UNSCOPED_INFO(what << ": max abs error " << worst);
}

void require_identical(const TensorView& a, const TensorView& b) {
  REQUIRE(std::equal(a.span<const float>().begin(), a.span<const float>().end(), b.span<const float>().begin()));
}

struct Case {
  std::string name;
  Tensor q, k, v, dout;
  std::vector<std::int32_t> cu_seqlens;
  float scale;
};

Case load_case(const std::string& name) {
  const json meta = json::parse(std::string(*fixture().metadata_value(name)));
  return {name,
          load(name + ".q"),
          load(name + ".k"),
          load(name + ".v"),
          load(name + ".dout"),
          fixture().read<std::int32_t>(name + ".cu_seqlens"),
          static_cast<float>(meta["scale"].get<double>())};
}

}  // namespace

TEST_CASE("attention: forward and backward match torch's scaled_dot_product_attention", "[nn][attention]") {
  for (const std::string name : {"single", "packed_gqa", "long_gqa"}) {
    SECTION(name) {
      const Case c = load_case(name);
      Tensor reference_run[4];  // out, dq, dk, dv of the one-thread run
      for (const unsigned threads : {1u, 3u}) {
        Tensor out(DType::F32, c.q.shape());
        const AttentionSaved saved =
            causal_attention_forward(c.q.view(), c.k.view(), c.v.view(), c.cu_seqlens, c.scale, out.view(), threads);
        require_close(out.view(), load(name + ".out").view(), "out");
        require_close(saved.logsumexp.view(), load(name + ".logsumexp").view(), "logsumexp");

        Tensor dq(DType::F32, c.q.shape()), dk(DType::F32, c.k.shape()), dv(DType::F32, c.v.shape());
        causal_attention_backward(c.q.view(), c.k.view(), c.v.view(), out.view(), saved, c.cu_seqlens, c.scale,
                                  c.dout.view(), dq.view(), dk.view(), dv.view(), threads);
        require_close(dq.view(), load(name + ".dq").view(), "dq");
        require_close(dk.view(), load(name + ".dk").view(), "dk");
        require_close(dv.view(), load(name + ".dv").view(), "dv");

        // Work items never share outputs and GQA sums run in a fixed order: any thread count, same bits.
        if (threads == 1) {
          reference_run[0] = std::move(out);
          reference_run[1] = std::move(dq);
          reference_run[2] = std::move(dk);
          reference_run[3] = std::move(dv);
        } else {
          require_identical(out.view(), reference_run[0].view());
          require_identical(dq.view(), reference_run[1].view());
          require_identical(dk.view(), reference_run[2].view());
          require_identical(dv.view(), reference_run[3].view());
        }
      }
    }
  }
}

TEST_CASE("attention: cached forward gives the newest rows of the causal forward", "[nn][attention]") {
  // Against torch's out: the last n queries of a sequence over a cache of all its keys.
  SECTION("single sequence, the last token and the last five") {
    const Case c = load_case("single");
    const Tensor ref = load("single.out");
    for (const std::int64_t n : {1, 5}) {
      const Tensor q = token_rows(c.q.view(), 16 - n, n);
      Tensor out(DType::F32, q.shape());
      cached_attention_forward(q.view(), c.k.view(), c.v.view(), c.scale, out.view(), 2);
      require_close(out.view(), token_rows(ref.view(), 16 - n, n).view(), "cached out");
    }
  }
  SECTION("GQA, 70 new tokens over a cache of 196 (two key tiles)") {
    const Case c = load_case("long_gqa");  // the third sequence is tokens [4, 200)
    const Tensor q = token_rows(c.q.view(), 130, 70);
    const Tensor k = token_rows(c.k.view(), 4, 196);
    const Tensor v = token_rows(c.v.view(), 4, 196);
    Tensor out(DType::F32, q.shape());
    cached_attention_forward(q.view(), k.view(), v.view(), c.scale, out.view(), 2);
    require_close(out.view(), token_rows(load("long_gqa.out").view(), 130, 70).view(), "cached out");
  }
}

TEST_CASE("attention: bad input is refused", "[nn][attention]") {
  Tensor q(DType::F32, Shape{6, 4, 8}), k(DType::F32, Shape{6, 2, 8}), v(DType::F32, Shape{6, 2, 8});
  Tensor out(DType::F32, Shape{6, 4, 8});
  const std::vector<std::int32_t> cu{0, 2, 6};
  const float scale = 0.5f;
  const auto forward = [&](std::vector<std::int32_t> cu_seqlens) {
    return [&, cu_seqlens] {
      (void)causal_attention_forward(q.view(), k.view(), v.view(), cu_seqlens, scale, out.view());
    };
  };

  SECTION("cu_seqlens") {
    test::require_error(forward({1, 2, 6}), "InvalidCuSeqlens", "start with 0");
    test::require_error(forward({0}), "InvalidCuSeqlens", "at least 2");
    test::require_error(forward({0, 2, 5}), "InvalidCuSeqlens", "ends at 5", "6 tokens");
    test::require_error(forward({0, 2, 2, 6}), "InvalidCuSeqlens", "cu_seqlens[2] = 2");
    test::require_error(forward({0, 4, 2, 6}), "InvalidCuSeqlens", "cu_seqlens[2] = 2");
  }
  SECTION("shapes") {
    Tensor q6(DType::F32, Shape{6, 6, 8}), out6(DType::F32, Shape{6, 6, 8}), k4(DType::F32, Shape{6, 4, 8});
    test::require_error(
        [&] { (void)causal_attention_forward(q6.view(), k4.view(), k4.view(), cu, scale, out6.view()); },
        "ShapeMismatch", "6 query heads", "not a multiple of 4 kv heads");
    Tensor k_short(DType::F32, Shape{5, 2, 8});
    test::require_error(
        [&] { (void)causal_attention_forward(q.view(), k_short.view(), k_short.view(), cu, scale, out.view()); },
        "ShapeMismatch", "k is [5, 2, 8], expected [6, 2, 8]");
    Tensor k_dim(DType::F32, Shape{6, 2, 4});
    test::require_error(
        [&] { (void)causal_attention_forward(q.view(), k_dim.view(), v.view(), cu, scale, out.view()); },
        "ShapeMismatch", "k is [6, 2, 4], expected [tokens, kv_heads, 8]");
    Tensor v_heads(DType::F32, Shape{6, 1, 8});
    test::require_error(
        [&] { (void)causal_attention_forward(q.view(), k.view(), v_heads.view(), cu, scale, out.view()); },
        "ShapeMismatch", "v is [6, 1, 8], expected [6, 2, 8]");
    Tensor q2(DType::F32, Shape{6, 32});
    test::require_error([&] { (void)causal_attention_forward(q2.view(), k.view(), v.view(), cu, scale, out.view()); },
                        "ShapeMismatch", "q is [6, 32]");
    Tensor out_small(DType::F32, Shape{6, 2, 8});
    test::require_error(
        [&] { (void)causal_attention_forward(q.view(), k.view(), v.view(), cu, scale, out_small.view()); },
        "ShapeMismatch", "out is [6, 2, 8], expected [6, 4, 8]");
  }
  SECTION("dtype and scale") {
    Tensor q_bf16(DType::BF16, Shape{6, 4, 8});
    test::require_error(
        [&] { (void)causal_attention_forward(q_bf16.view(), k.view(), v.view(), cu, scale, out.view()); },
        "DTypeMismatch", "q is BF16");
    test::require_error(
        [&] {
          (void)causal_attention_forward(q.view(), k.view(), v.view(), cu, std::numeric_limits<float>::quiet_NaN(),
                                         out.view());
        },
        "InvalidArgument", "scale");
  }
  SECTION("backward arguments") {
    const AttentionSaved saved = causal_attention_forward(q.view(), k.view(), v.view(), cu, scale, out.view());
    Tensor dq(DType::F32, q.shape()), dk(DType::F32, k.shape()), dv(DType::F32, v.shape());
    Tensor dk_wide(DType::F32, Shape{6, 4, 8});
    test::require_error(
        [&] {
          causal_attention_backward(q.view(), k.view(), v.view(), out.view(), saved, cu, scale, out.view(), dq.view(),
                                    dk_wide.view(), dv.view());
        },
        "ShapeMismatch", "dk is [6, 4, 8], expected [6, 2, 8]");
    const AttentionSaved none;
    test::require_error(
        [&] {
          causal_attention_backward(q.view(), k.view(), v.view(), out.view(), none, cu, scale, out.view(), dq.view(),
                                    dk.view(), dv.view());
        },
        "ShapeMismatch", "saved.logsumexp");
    test::require_error(
        [&] {
          causal_attention_backward(q.view(), k.view(), v.view(), out.view(), saved, std::vector<std::int32_t>{0, 6, 7},
                                    scale, out.view(), dq.view(), dk.view(), dv.view());
        },
        "InvalidCuSeqlens", "ends at 7");
  }
  SECTION("cached forward") {
    Tensor k_cache(DType::F32, Shape{4, 2, 8});
    test::require_error([&] { cached_attention_forward(q.view(), k_cache.view(), k_cache.view(), scale, out.view()); },
                        "ShapeMismatch", "6 tokens", "only 4 rows");
  }
}
