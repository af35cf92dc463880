// The CUDA paths of nn/ (cuda/norms.cuh, cuda/activations.cuh,
// cuda/embedding.cuh, cuda/rotary.cuh, cuda/attention.cuh) against the CPU functions they mirror — themselves
// checked against torch in tests/nn/ — on the same random inputs, with the
// awkward shapes: one token, widths that are not a multiple of the CTA
// (257), widths below a warp (5), a width of one, in-place outputs, and
// gradients accumulated onto non-zero values. Without a GPU the test exits 77
// (skipped, tests/cuda/support.cuh).
//
// Tolerances:
//  * embedding and rotary: bit-exact — the same fp32 operations in the same
//    order (rotary: the host's cos and sin, the CPU's roundings).
//  * norms: the formulas are the CPU's operation by operation; only the order
//    of the double row sums differs, which can move a row's mean or rstd by
//    one fp32 rounding (6e-8 relative), carried through at most four more
//    roundings: 1e-6 of the row's largest |value| is ~10x that, while a
//    wrong term (a missing centring, a transposed index) is O(1) of it.
//    The parameter gradients (column sums in token order, in double) too.
//  * activations: CUDA's expf/tanhf against Eigen's exp/tanh (each within a
//    few ulp): 1e-5 relative to max(|value|, 1e-3·the tensor's largest).
//  * attention: the same formulas in fp32 with other summation orders (dot
//    products over head_dim, softmax sums over 32-key instead of 128-key
//    tiles) and expf against Eigen's exp: each score is off by a few ulp of
//    its size (|score| <= ~sqrt(head_dim) here), a relative error of ~1e-6
//    in each probability. out and logsumexp: 1e-5 of the tensor's largest
//    |value|; the gradients, whose dS = P·(dP − delta) subtracts nearly
//    equal terms, 5e-5 of it. A wrong mask, head or tile offset is O(1).
#include <qlora/cuda/activations.cuh>
#include <qlora/cuda/attention.cuh>
#include <qlora/cuda/embedding.cuh>
#include <qlora/cuda/norms.cuh>
#include <qlora/cuda/rotary.cuh>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/device_tensors.cuh"
#include "cuda/support.cuh"
#include "support/errors.hpp"
#include "support/splitmix.hpp"

using namespace qlora;
namespace qcuda = qlora::cuda;  // `cuda::` alone is ambiguous with CCCL's ::cuda under `using namespace qlora`
using test::check_close;
using test::OnDevice;
using test::random_tensor;
using test::same_bits;

namespace {

/// The norms' tolerance: 1e-6 of the tensor's largest |value|.
void check_scaled_close(const std::string& what, const Tensor& gpu, const Tensor& cpu) {
  check_close(what, gpu, cpu, 1e-6, 1.0);
}

}  // namespace

TEST_CASE("CUDA LayerNorm and RMSNorm match the CPU ones, forward and backward", "[cuda][nn][norms]") {
  const std::int64_t hidden = GENERATE(1, 5, 80, 257, 2560);
  const std::int64_t tokens = GENERATE(1, 7);
  INFO("tokens " << tokens << ", hidden " << hidden);
  // Inputs with an offset, so that LayerNorm's centring matters.
  Tensor x = random_tensor(Shape{tokens, hidden}, 1, 2.0);
  for (float& v : x.span<float>()) v += 0.75f;
  const Tensor weight = random_tensor(Shape{hidden}, 2), bias = random_tensor(Shape{hidden}, 3, 0.1);
  const Tensor dy = random_tensor(Shape{tokens, hidden}, 4);
  const Tensor dweight_start = random_tensor(Shape{hidden}, 5), dbias_start = random_tensor(Shape{hidden}, 6);
  const float eps = 1e-5f;

  SECTION("LayerNorm") {
    Tensor y(DType::F32, x.shape()), dx(DType::F32, x.shape());
    Tensor dweight = random_tensor(Shape{hidden}, 5), dbias = random_tensor(Shape{hidden}, 6);
    const NormStatistics stats = layer_norm_forward(x.view(), weight.view(), bias.view(), eps, y.view(), 1);
    layer_norm_backward(x.view(), weight.view(), stats, dy.view(), dx.view(), dweight.view(), dbias.view(), 1);

    const OnDevice gx(x), gw(weight), gb(bias), gdy(dy), gdw(dweight_start), gdb(dbias_start);
    const OnDevice gy(Tensor(DType::F32, x.shape())), gdx(Tensor(DType::F32, x.shape()));
    const OnDevice gmean(Tensor(DType::F32, Shape{tokens})), grstd(Tensor(DType::F32, Shape{tokens}));
    qcuda::layer_norm_forward(gx.view, gw.view, gb.view, eps, gy.view, gmean.view, grstd.view, nullptr);
    qcuda::layer_norm_backward(gx.view, gw.view, gmean.view, grstd.view, gdy.view, gdx.view, gdw.view, gdb.view,
                               nullptr);
    check_scaled_close("y", gy.to_host(), y);
    check_scaled_close("mean", gmean.to_host(), stats.mean);
    check_scaled_close("rstd", grstd.to_host(), stats.rstd);
    check_scaled_close("dx", gdx.to_host(), dx);
    check_scaled_close("dweight", gdw.to_host(), dweight);
    check_scaled_close("dbias", gdb.to_host(), dbias);
  }
  SECTION("RMSNorm, y in place over x and dx over dy") {
    Tensor y(DType::F32, x.shape()), dx(DType::F32, x.shape());
    Tensor dweight = random_tensor(Shape{hidden}, 5);
    const NormStatistics stats = rms_norm_forward(x.view(), weight.view(), eps, y.view(), 1);
    rms_norm_backward(x.view(), weight.view(), stats, dy.view(), dx.view(), dweight.view(), 1);

    const OnDevice gx(x), gw(weight), gdy(dy), gdw(dweight_start);
    const OnDevice gy(x), grstd(Tensor(DType::F32, Shape{tokens}));  // y starts as a copy of x: in place
    qcuda::rms_norm_forward(gy.view, gw.view, eps, gy.view, grstd.view, nullptr);
    qcuda::rms_norm_backward(gx.view, gw.view, grstd.view, gdy.view, gdy.view, gdw.view, nullptr);
    check_scaled_close("y", gy.to_host(), y);
    check_scaled_close("rstd", grstd.to_host(), stats.rstd);
    check_scaled_close("dx", gdy.to_host(), dx);
    check_scaled_close("dweight", gdw.to_host(), dweight);
  }
}

TEST_CASE("CUDA gelu_new, silu and swiglu match the CPU ones", "[cuda][nn][activations]") {
  const std::int64_t count = GENERATE(1, 31, 1000, 100003);
  INFO("elements " << count);
  const Tensor x = random_tensor(Shape{count}, 7, 4.0), up = random_tensor(Shape{count}, 8), dy = random_tensor(Shape{count}, 9);
  const auto close = [](const std::string& what, const Tensor& gpu, const Tensor& cpu) {
    check_close(what, gpu, cpu, 1e-5, 1e-3);
  };
  Tensor y(DType::F32, x.shape()), dx(DType::F32, x.shape()), dup(DType::F32, x.shape());
  const OnDevice gx(x), gup(up), gdy(dy), gy(y), gdx(dx), gdup(dup);

  gelu_new_forward(x.view(), y.view(), 1);
  qcuda::gelu_new_forward(gx.view, gy.view, nullptr);
  close("gelu_new", gy.to_host(), y);
  gelu_new_backward(x.view(), dy.view(), dx.view(), 1);
  qcuda::gelu_new_backward(gx.view, gdy.view, gdx.view, nullptr);
  close("gelu_new_backward", gdx.to_host(), dx);

  silu_forward(x.view(), y.view(), 1);
  qcuda::silu_forward(gx.view, gy.view, nullptr);
  close("silu", gy.to_host(), y);
  silu_backward(x.view(), dy.view(), dx.view(), 1);
  qcuda::silu_backward(gx.view, gdy.view, gdx.view, nullptr);
  close("silu_backward", gdx.to_host(), dx);

  swiglu_forward(x.view(), up.view(), y.view(), 1);
  qcuda::swiglu_forward(gx.view, gup.view, gy.view, nullptr);
  close("swiglu", gy.to_host(), y);
  swiglu_backward(x.view(), up.view(), dy.view(), dx.view(), dup.view(), 1);
  qcuda::swiglu_backward(gx.view, gup.view, gdy.view, gdx.view, gdup.view, nullptr);
  close("swiglu_backward dgate", gdx.to_host(), dx);
  close("swiglu_backward dup", gdup.to_host(), dup);
}

TEST_CASE("CUDA embedding matches the CPU one bit for bit", "[cuda][nn][embedding]") {
  const std::int64_t vocab = 50, hidden = GENERATE(1, 80, 257);
  const Tensor table = random_tensor(Shape{vocab, hidden}, 10);
  const std::vector<std::int32_t> ids{3, 0, 49, 3, 3, 17, 0};  // repeats: the scatter-add's order matters
  const auto tokens = static_cast<std::int64_t>(ids.size());
  const Tensor dout = random_tensor(Shape{tokens, hidden}, 11);
  Tensor out(DType::F32, Shape{tokens, hidden});
  Tensor dtable = random_tensor(Shape{vocab, hidden}, 12), dtable_padded = random_tensor(Shape{vocab, hidden}, 12);
  embedding_forward(table.view(), ids, out.view(), 1);
  embedding_backward(ids, dout.view(), dtable.view(), 1);
  embedding_backward(ids, dout.view(), dtable_padded.view(), EmbeddingPadding{3}, 1);

  const OnDevice gtable(table), gdout(dout), gout(Tensor(DType::F32, Shape{tokens, hidden}));
  const OnDevice gdtable(random_tensor(Shape{vocab, hidden}, 12)), gdtable_padded(random_tensor(Shape{vocab, hidden}, 12));
  qcuda::embedding_forward(gtable.view, ids, gout.view, nullptr);
  qcuda::embedding_backward(ids, gdout.view, gdtable.view, nullptr);
  qcuda::embedding_backward(ids, gdout.view, gdtable_padded.view, EmbeddingPadding{3}, nullptr);
  CHECK(same_bits(gout.to_host(), out));
  CHECK(same_bits(gdtable.to_host(), dtable));
  CHECK(same_bits(gdtable_padded.to_host(), dtable_padded));
}

TEST_CASE("CUDA rotary turns q and k exactly as the CPU does", "[cuda][nn][rotary]") {
  struct Case {
    const char* name;
    RotaryConfig config;
    int heads;
    std::int64_t seq_len;
  };
  // Phi-2's partial rotary (32 of 80 dims); InternLM2's full rotary past max_position_embeddings (NTK on).
  const Case cases[] = {
      {"phi", {.head_dim = 80, .rotary_dim = 32, .theta = 10000.0, .max_position_embeddings = 2048}, 3, 12},
      {"internlm2 ntk",
       {.head_dim = 128, .rotary_dim = 128, .theta = 1000000.0, .dynamic_ntk_factor = 2.0, .max_position_embeddings = 16},
       2, 24},
  };
  for (const Case& c : cases) {
    INFO(c.name);
    const RotaryEmbedding rope(c.config);
    std::vector<std::int32_t> positions;
    for (std::int32_t p = 0; p < 7; ++p) positions.push_back(p);  // a packed row: two segments
    for (std::int32_t p = 0; p < 5; ++p) positions.push_back(p + 19);
    const auto tokens = static_cast<std::int64_t>(positions.size());
    Tensor x = random_tensor(Shape{tokens, c.heads, c.config.head_dim}, 15);
    const OnDevice gx(x);
    rope.apply(x.view(), positions, c.seq_len, 1);
    qcuda::rotary_apply(rope, gx.view, positions, c.seq_len, nullptr);
    CHECK(same_bits(gx.to_host(), x));
    rope.apply_backward(x.view(), positions, c.seq_len, 1);
    qcuda::rotary_apply_backward(rope, gx.view, positions, c.seq_len, nullptr);
    CHECK(same_bits(gx.to_host(), x));
  }
}

namespace {

/// A packed batch for attention: q [T, Hq, D], k and v [T, Hkv, D], dout like q.
struct AttentionInputs {
  Tensor q, k, v, dout;
};

AttentionInputs attention_inputs(std::int64_t tokens, int query_heads, int kv_heads, int head_dim) {
  return {random_tensor(Shape{tokens, query_heads, head_dim}, 21), random_tensor(Shape{tokens, kv_heads, head_dim}, 22),
          random_tensor(Shape{tokens, kv_heads, head_dim}, 23), random_tensor(Shape{tokens, query_heads, head_dim}, 24)};
}

}  // namespace

TEST_CASE("CUDA causal attention matches the CPU one over packed sequences, forward and backward",
          "[cuda][nn][attention]") {
  struct Case {
    const char* name;
    int query_heads, kv_heads, head_dim;
  };
  // Phi-2's heads (80: not a multiple of the warp), InternLM2's GQA at 128, the largest head_dim
  // the kernels take (256), and a tiny one (5).
  const Case c = GENERATE(Case{"phi", 4, 4, 80}, Case{"gqa", 6, 2, 128}, Case{"wide", 2, 1, 256},
                          Case{"tiny", 3, 3, 5});
  // One-token, tile-sized, odd and multi-tile sequences (several 32-row tiles, and past the CPU's 128).
  const std::vector<std::int32_t> cu_seqlens{0, 1, 33, 65, 135, 271};
  const std::int64_t tokens = cu_seqlens.back();
  INFO(c.name << ": " << c.query_heads << "/" << c.kv_heads << " heads of " << c.head_dim);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  const AttentionInputs in = attention_inputs(tokens, c.query_heads, c.kv_heads, c.head_dim);

  Tensor out(DType::F32, in.q.shape()), dq(DType::F32, in.q.shape());
  Tensor dk(DType::F32, in.k.shape()), dv(DType::F32, in.k.shape());
  const AttentionSaved saved = causal_attention_forward(in.q.view(), in.k.view(), in.v.view(), cu_seqlens, scale,
                                                        out.view(), 2);
  causal_attention_backward(in.q.view(), in.k.view(), in.v.view(), out.view(), saved, cu_seqlens, scale,
                            in.dout.view(), dq.view(), dk.view(), dv.view(), 2);

  const OnDevice gq(in.q), gk(in.k), gv(in.v), gdout(in.dout);
  const OnDevice gout(Tensor(DType::F32, in.q.shape())), glse(Tensor(DType::F32, Shape{tokens, c.query_heads}));
  const OnDevice gdq(Tensor(DType::F32, in.q.shape()));
  const OnDevice gdk(Tensor(DType::F32, in.k.shape())), gdv(Tensor(DType::F32, in.k.shape()));
  qcuda::causal_attention_forward(gq.view, gk.view, gv.view, cu_seqlens, scale, gout.view, glse.view, nullptr);
  qcuda::causal_attention_backward(gq.view, gk.view, gv.view, gout.view, glse.view, cu_seqlens, scale, gdout.view,
                                   gdq.view, gdk.view, gdv.view, nullptr);
  check_close("out", gout.to_host(), out, 1e-5, 1.0);
  check_close("logsumexp", glse.to_host(), saved.logsumexp, 1e-5, 1.0);
  check_close("dq", gdq.to_host(), dq, 5e-5, 1.0);
  check_close("dk", gdk.to_host(), dk, 5e-5, 1.0);
  check_close("dv", gdv.to_host(), dv, 5e-5, 1.0);

  // No atomics: a second backward gives the same bits.
  const OnDevice again_dq(Tensor(DType::F32, in.q.shape())), again_dk(Tensor(DType::F32, in.k.shape()));
  const OnDevice again_dv(Tensor(DType::F32, in.k.shape()));
  qcuda::causal_attention_backward(gq.view, gk.view, gv.view, gout.view, glse.view, cu_seqlens, scale, gdout.view,
                                   again_dq.view, again_dk.view, again_dv.view, nullptr);
  CHECK(same_bits(again_dq.to_host(), gdq.to_host()));
  CHECK(same_bits(again_dk.to_host(), gdk.to_host()));
  CHECK(same_bits(again_dv.to_host(), gdv.to_host()));
}

TEST_CASE("CUDA cached attention matches the CPU one", "[cuda][nn][attention]") {
  const std::int64_t keys = 70;
  const std::int64_t queries = GENERATE(1, 5, 40, 70);  // one decode step, a few, more than a tile, all
  INFO(queries << " new tokens over a cache of " << keys);
  const int query_heads = 6, kv_heads = 2, head_dim = 80;
  const float scale = 0.125f;
  const Tensor q = random_tensor(Shape{queries, query_heads, head_dim}, 25);
  const Tensor k = random_tensor(Shape{keys, kv_heads, head_dim}, 26), v = random_tensor(Shape{keys, kv_heads, head_dim}, 27);
  Tensor out(DType::F32, q.shape());
  cached_attention_forward(q.view(), k.view(), v.view(), scale, out.view(), 2);
  const OnDevice gq(q), gk(k), gv(v), gout(Tensor(DType::F32, q.shape()));
  qcuda::cached_attention_forward(gq.view, gk.view, gv.view, scale, gout.view, nullptr);
  check_close("out", gout.to_host(), out, 1e-5, 1.0);
}

TEST_CASE("the CUDA nn ops refuse host tensors, wrong shapes and bad ids, naming them", "[cuda][nn][errors]") {
  const Tensor host = random_tensor(Shape{2, 8}, 13), weight = random_tensor(Shape{8}, 14);
  const OnDevice x(host), w(weight), y(Tensor(DType::F32, Shape{2, 8})), rstd(Tensor(DType::F32, Shape{2}));
  const OnDevice narrow(Tensor(DType::F32, Shape{2, 4}));
  test::require_error([&] { qcuda::rms_norm_forward(host.view(), w.view, 1e-5f, y.view, rstd.view, nullptr); },
                      "DeviceMismatch", "cuda::rms_norm", "x");
  test::require_error([&] { qcuda::rms_norm_forward(x.view, w.view, 1e-5f, narrow.view, rstd.view, nullptr); },
                      "ShapeMismatch", "y is [2, 4]", "[2, 8]");
  test::require_error([&] { qcuda::gelu_new_forward(x.view, narrow.view, nullptr); }, "ShapeMismatch",
                      "cuda::gelu_new");
  const std::vector<std::int32_t> bad_ids{0, 2};
  const OnDevice table(Tensor(DType::F32, Shape{2, 8}));
  test::require_error([&] { qcuda::embedding_forward(table.view, bad_ids, y.view, nullptr); }, "TokenOutOfRange",
                      "ids[1] is 2");

  const AttentionInputs in = attention_inputs(6, 4, 2, 8);
  const OnDevice q(in.q), k(in.k), v(in.v), out(in.q), lse(Tensor(DType::F32, Shape{6, 4}));
  const std::vector<std::int32_t> cu{0, 2, 6}, short_cu{0, 2, 5};
  test::require_error(
      [&] { qcuda::causal_attention_forward(in.q.view(), k.view, v.view, cu, 0.5f, out.view, lse.view, nullptr); },
      "DeviceMismatch", "cuda::causal_attention_forward", "q");
  test::require_error(
      [&] { qcuda::causal_attention_forward(q.view, k.view, v.view, short_cu, 0.5f, out.view, lse.view, nullptr); },
      "InvalidCuSeqlens", "ends at 5");
  test::require_error(
      [&] { qcuda::causal_attention_forward(q.view, k.view, v.view, cu, 0.5f, out.view, x.view, nullptr); },
      "ShapeMismatch", "logsumexp is [2, 8], expected [6, 4]");
  const AttentionInputs wide = attention_inputs(2, 1, 1, 264);
  const OnDevice wq(wide.q), wk(wide.k), wv(wide.v), wout(wide.q), wlse(Tensor(DType::F32, Shape{2, 1}));
  const std::vector<std::int32_t> one_sequence{0, 2};
  test::require_error(
      [&] {
        qcuda::causal_attention_forward(wq.view, wk.view, wv.view, one_sequence, 0.5f, wout.view, wlse.view, nullptr);
      },
      "ShapeMismatch", "head_dim 264", "256");
}
