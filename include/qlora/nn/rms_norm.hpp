// RMSNorm over the last dimension, forward and backward, with the semantics
// of InternLM2RMSNorm / transformers' LlamaRMSNorm (InternLM2's attention_norm,
// ffn_norm and final norm):
//
//   y = weight * (x * rsqrt(mean(x²) + eps))
//
// x, y, dy, dx are F32 [T, H]; weight and dweight F32 [H]. mean(x²) is summed
// in double and rounded once to fp32; rsqrt and the two products are then
// done in fp32 in the order transformers does them (x·rstd first, then the
// weight), so results agree with it to about an ulp. The forward returns the
// per-row rstd (NormStatistics::mean stays empty); the backward writes dx and
// accumulates dweight (summed over tokens in a fixed order: the same bits for
// any thread count).
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/nn/detail/f32_arguments.hpp>
#include <qlora/nn/detail/row_reduction.hpp>
#include <qlora/nn/layer_norm.hpp>

#include <cmath>
#include <cstdint>

namespace qlora {

/// y = RMSNorm(x) · weight. y may be x (in place). Returns the row rstd.
inline NormStatistics rms_norm_forward(const TensorView& x, const TensorView& weight, float eps, const TensorView& y,
                                       unsigned threads = default_thread_count()) {
  const detail::F32Arguments args{"rms_norm"};
  const std::int64_t hidden = detail::norm_hidden_size(args, weight);
  const std::int64_t tokens = args.rows(x, hidden, "x");
  args.tensor(y, Shape{tokens, hidden}, "y");
  detail::check_norm_epsilon(args, eps);

  NormStatistics saved{Tensor(), Tensor(DType::F32, Shape{tokens})};
  const float* xs = x.data<const float>();
  float* ys = y.data<float>();
  const float* w = weight.data<const float>();
  float* rstds = saved.rstd.view().data<float>();
  detail::for_row_chunks(
      tokens, hidden,
      [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t t = begin; t < end; ++t) {
          const float* in = xs + t * hidden;
          float* out = ys + t * hidden;
          const auto variance = static_cast<float>(
              detail::lane_sum(hidden, [in](std::int64_t i) { return double(in[i]) * double(in[i]); }) /
              double(hidden));
          const float rstd = 1.0f / std::sqrt(variance + eps);
          rstds[t] = rstd;
          for (std::int64_t i = 0; i < hidden; ++i) out[i] = w[i] * (in[i] * rstd);
        }
      },
      threads);
  return saved;
}

/// The RMSNorm backward: writes dx (an empty view: not wanted; dx may be dy)
/// and adds Σ_t dy·x̂ to dweight (optional), where x̂ = x·rstd from `saved`.
inline void rms_norm_backward(const TensorView& x, const TensorView& weight, const NormStatistics& saved,
                              const TensorView& dy, const TensorView& dx, const TensorView& dweight,
                              unsigned threads = default_thread_count()) {
  const detail::F32Arguments args{"rms_norm_backward"};
  const std::int64_t hidden = detail::norm_hidden_size(args, weight);
  const std::int64_t tokens = args.rows(x, hidden, "x");
  args.tensor(dy, Shape{tokens, hidden}, "dy");
  detail::check_norm_statistics(args, saved, tokens, false);
  const bool want_dx = args.optional(dx, Shape{tokens, hidden}, "dx");
  const bool want_dweight = args.optional(dweight, Shape{hidden}, "dweight");

  const float* xs = x.data<const float>();
  const float* dys = dy.data<const float>();
  const float* w = weight.data<const float>();
  const float* rstds = saved.rstd.view().data<const float>();
  float* dxs = want_dx ? dx.data<float>() : nullptr;
  const auto normalized = [&](std::int64_t t, std::int64_t i) { return xs[t * hidden + i] * rstds[t]; };

  // The parameter gradient first: dx may overwrite dy.
  if (want_dweight) {
    detail::accumulate_column_sums(
        tokens, hidden, dweight.data<float>(),
        [&](std::int64_t t, std::int64_t i) { return double(dys[t * hidden + i]) * double(normalized(t, i)); },
        threads);
  }
  if (!want_dx) return;

  // With g = dy·weight: dx = rstd · (g − x̂ · mean(g·x̂)).
  detail::for_row_chunks(
      tokens, hidden,
      [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t t = begin; t < end; ++t) {
          const float* grad = dys + t * hidden;
          const auto mean_g_xhat = static_cast<float>(detail::lane_sum(hidden, [&](std::int64_t i) {
                                                        return double(grad[i]) * double(w[i]) * double(normalized(t, i));
                                                      }) /
                                                      double(hidden));
          const float rstd = rstds[t];
          float* out = dxs + t * hidden;
          for (std::int64_t i = 0; i < hidden; ++i) out[i] = rstd * (grad[i] * w[i] - normalized(t, i) * mean_g_xhat);
        }
      },
      threads);
}

}  // namespace qlora
