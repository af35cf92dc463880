// LayerNorm over the last dimension, forward and backward, with
// torch.nn.LayerNorm's semantics (Phi-2's input and final layernorms):
//
//   y = (x - mean) * rstd * weight + bias      rstd = 1 / sqrt(var + eps)
//
// with the biased variance (divided by H) and eps inside the square root.
// x, y, dy, dx are F32 [T, H]; weight, bias, dweight, dbias F32 [H]. Row
// statistics are summed in double and rounded once; y is then formed in
// float as torch's CPU kernel forms it, (x·rstd − rstd·mean)·weight + bias,
// so the two agree to a few ulp. The forward returns the per-row mean and
// rstd (NormStatistics) for the backward, which writes dx and accumulates
// dweight and dbias (summed over tokens in a fixed order: the same bits for
// any thread count).
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/nn/detail/f32_arguments.hpp>
#include <qlora/nn/detail/row_reduction.hpp>

#include <cmath>
#include <cstdint>

namespace qlora {

/// What a norm's forward keeps for its backward: F32 [T] per-row statistics.
struct NormStatistics {
  Tensor mean;  ///< the row means (LayerNorm); empty for RMSNorm, which does not centre
  Tensor rstd;  ///< 1 / sqrt(var + eps) (LayerNorm) or 1 / sqrt(mean(x²) + eps) (RMSNorm)
};

namespace detail {

/// Checks a norm's weight [H] (H >= 1) and returns H.
inline std::int64_t norm_hidden_size(const F32Arguments& args, const TensorView& weight) {
  check(weight.rank() == 1 && weight.shape()[0] >= 1, "ShapeMismatch", "{}: weight is {}, expected [hidden]", args.op,
        weight.shape().to_string());
  args.tensor(weight, weight.shape(), "weight");
  return weight.shape()[0];
}

inline void check_norm_epsilon(const F32Arguments& args, float eps) {
  check(std::isfinite(eps) && eps >= 0.0f, "InvalidArgument", "{}: eps is {}, expected a finite value >= 0", args.op,
        eps);
}

/// Checks the statistics a forward over `tokens` rows returned.
inline void check_norm_statistics(const F32Arguments& args, const NormStatistics& saved, std::int64_t tokens,
                                  bool centred) {
  if (centred) args.tensor(saved.mean.view(), Shape{tokens}, "saved.mean");
  args.tensor(saved.rstd.view(), Shape{tokens}, "saved.rstd");
}

}  // namespace detail

/// y = LayerNorm(x) with `weight` and `bias` (an empty view: no bias), eps
/// inside the square root. y may be x (in place). Returns the row statistics.
inline NormStatistics layer_norm_forward(const TensorView& x, const TensorView& weight, const TensorView& bias,
                                         float eps, const TensorView& y, unsigned threads = default_thread_count()) {
  const detail::F32Arguments args{"layer_norm"};
  const std::int64_t hidden = detail::norm_hidden_size(args, weight);
  const bool has_bias = args.optional(bias, Shape{hidden}, "bias");
  const std::int64_t tokens = args.rows(x, hidden, "x");
  args.tensor(y, Shape{tokens, hidden}, "y");
  detail::check_norm_epsilon(args, eps);

  NormStatistics saved{Tensor(DType::F32, Shape{tokens}), Tensor(DType::F32, Shape{tokens})};
  const float* xs = x.data<const float>();
  float* ys = y.data<float>();
  const float* w = weight.data<const float>();
  const float* b = has_bias ? bias.data<const float>() : nullptr;
  float* means = saved.mean.view().data<float>();
  float* rstds = saved.rstd.view().data<float>();
  detail::for_row_chunks(
      tokens, hidden,
      [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t t = begin; t < end; ++t) {
          const float* in = xs + t * hidden;
          float* out = ys + t * hidden;
          const double mean = detail::lane_sum(hidden, [in](std::int64_t i) { return double(in[i]); }) / double(hidden);
          const double variance = detail::lane_sum(hidden, [in, mean](std::int64_t i) {
                                    const double centred = double(in[i]) - mean;
                                    return centred * centred;
                                  }) / double(hidden);
          const auto rstd = static_cast<float>(1.0 / std::sqrt(variance + double(eps)));
          means[t] = static_cast<float>(mean);
          rstds[t] = rstd;
          const float shift = -rstd * means[t];
          if (b != nullptr) {
            for (std::int64_t i = 0; i < hidden; ++i) out[i] = (in[i] * rstd + shift) * w[i] + b[i];
          } else {
            for (std::int64_t i = 0; i < hidden; ++i) out[i] = (in[i] * rstd + shift) * w[i];
          }
        }
      },
      threads);
  return saved;
}

/// The LayerNorm backward: writes dx (an empty view: not wanted; dx may be dy)
/// and adds Σ_t dy·x̂ to dweight and Σ_t dy to dbias (each optional), where
/// x̂ = (x − mean)·rstd from `saved`.
inline void layer_norm_backward(const TensorView& x, const TensorView& weight, const NormStatistics& saved,
                                const TensorView& dy, const TensorView& dx, const TensorView& dweight,
                                const TensorView& dbias, unsigned threads = default_thread_count()) {
  const detail::F32Arguments args{"layer_norm_backward"};
  const std::int64_t hidden = detail::norm_hidden_size(args, weight);
  const std::int64_t tokens = args.rows(x, hidden, "x");
  args.tensor(dy, Shape{tokens, hidden}, "dy");
  detail::check_norm_statistics(args, saved, tokens, true);
  const bool want_dx = args.optional(dx, Shape{tokens, hidden}, "dx");
  const bool want_dweight = args.optional(dweight, Shape{hidden}, "dweight");
  const bool want_dbias = args.optional(dbias, Shape{hidden}, "dbias");

  const float* xs = x.data<const float>();
  const float* dys = dy.data<const float>();
  const float* w = weight.data<const float>();
  const float* means = saved.mean.view().data<const float>();
  const float* rstds = saved.rstd.view().data<const float>();
  float* dxs = want_dx ? dx.data<float>() : nullptr;
  const auto normalized = [&](std::int64_t t, std::int64_t i) {
    return (xs[t * hidden + i] - means[t]) * rstds[t];
  };

  // Parameter gradients first: dx may overwrite dy.
  if (want_dweight) {
    detail::accumulate_column_sums(
        tokens, hidden, dweight.data<float>(),
        [&](std::int64_t t, std::int64_t i) { return double(dys[t * hidden + i]) * double(normalized(t, i)); },
        threads);
  }
  if (want_dbias) {
    detail::accumulate_column_sums(
        tokens, hidden, dbias.data<float>(), [&](std::int64_t t, std::int64_t i) { return double(dys[t * hidden + i]); },
        threads);
  }
  if (!want_dx) return;

  // With g = dy·weight: dx = rstd · (g − mean(g) − x̂ · mean(g·x̂)).
  detail::for_row_chunks(
      tokens, hidden,
      [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t t = begin; t < end; ++t) {
          const float* grad = dys + t * hidden;
          const double sum_g = detail::lane_sum(hidden, [&](std::int64_t i) { return double(grad[i]) * double(w[i]); });
          const double sum_g_xhat = detail::lane_sum(hidden, [&](std::int64_t i) {
            return double(grad[i]) * double(w[i]) * double(normalized(t, i));
          });
          const auto mean_g = static_cast<float>(sum_g / double(hidden));
          const auto mean_g_xhat = static_cast<float>(sum_g_xhat / double(hidden));
          const float rstd = rstds[t];
          float* out = dxs + t * hidden;
          for (std::int64_t i = 0; i < hidden; ++i) {
            out[i] = rstd * (grad[i] * w[i] - mean_g - normalized(t, i) * mean_g_xhat);
          }
        }
      },
      threads);
}

}  // namespace qlora
