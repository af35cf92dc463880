// The output head of a causal LM: logits = hidden · weightᵀ + bias, the
// Linear that maps the final hidden states [T, H] to scores over the
// vocabulary [T, V] (Phi-2's lm_head 2560 → 51200 with a bias, InternLM2's
// output 4096 → 92544 without). All F32, as PEFT's
// prepare_model_for_kbit_training leaves the unquantized head.
//
// lm_head_logits materialises [T, V]: meant for generation and evaluation of
// a few rows. Training never does: lm_head_cross_entropy (cross_entropy.hpp)
// computes the loss chunk by chunk through the same per-block product.
//
// Work is split over fixed blocks of vocabulary rows, never over a count
// derived from the thread count, so every logit is computed by the same
// operations whatever the number of threads: results are bit-identical for 1
// or 16 threads.
#pragma once

#include <qlora/core/detail/eigen_matrix.hpp>
#include <qlora/core/device.hpp>
#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/tensor_view.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <string_view>

namespace qlora {

namespace detail {

/// Vocabulary rows per work item: a weight slice of 512 x H (5 MiB for
/// Phi-2) is a GEMM big enough for Eigen's blocking and small enough that a
/// 51200-row vocabulary gives 100 items to share among the threads.
inline constexpr std::int64_t lm_head_vocab_block = 512;

/// The dimensions of a head call, read from its checked arguments.
struct LmHeadShape {
  std::int64_t tokens = 0;  ///< T
  std::int64_t width = 0;   ///< H, the hidden size
  std::int64_t vocab = 0;   ///< V
};

/// `view` is a contiguous host F32 tensor of shape `expected`; errors name
/// `function` and the argument.
inline void check_f32_argument(std::string_view function, std::string_view name, const TensorView& view,
                               const Shape& expected) {
  check(view.dtype() == DType::F32, "DTypeMismatch", "{}: {} is {}, expected F32", function, name,
        dtype_name(view.dtype()));
  check(view.shape() == expected, "ShapeMismatch", "{}: {} is {}, expected {}", function, name,
        view.shape().to_string(), expected.to_string());
  check(view.device() == Device::cpu, "DeviceMismatch", "{}: {} lives on {}, expected host memory", function, name,
        device_name(view.device()));
  check(view.is_contiguous(), "NotContiguous", "{}: {} {} is not contiguous", function, name,
        view.shape().to_string());
}

/// Checks hidden [T, H], weight [V, H] and bias ([V] or empty) and returns T, H, V.
inline LmHeadShape lm_head_arguments(std::string_view function, const TensorView& hidden, const TensorView& weight,
                                     const TensorView& bias) {
  check(hidden.rank() == 2, "ShapeMismatch", "{}: hidden is {}, expected [tokens, hidden_size]", function,
        hidden.shape().to_string());
  check(weight.rank() == 2, "ShapeMismatch", "{}: weight is {}, expected [vocab_size, hidden_size]", function,
        weight.shape().to_string());
  const LmHeadShape shape{hidden.shape()[0], hidden.shape()[1], weight.shape()[0]};
  check_f32_argument(function, "hidden", hidden, Shape{shape.tokens, shape.width});
  check_f32_argument(function, "weight", weight, Shape{shape.vocab, shape.width});
  if (bias.raw_data() != nullptr) check_f32_argument(function, "bias", bias, Shape{shape.vocab});
  return shape;
}

/// Number of lm_head_vocab_block blocks covering `vocab` rows.
inline std::int64_t vocab_block_count(std::int64_t vocab) {
  return (vocab + lm_head_vocab_block - 1) / lm_head_vocab_block;
}

/// Columns [v0, v1) of logits [rows, logits_stride]: hidden [rows, H] ·
/// weight[v0:v1]ᵀ (+ bias[v0:v1] when bias is not null).
inline void lm_head_logits_block(const float* hidden, std::int64_t rows, std::int64_t width, const float* weight,
                                 const float* bias, std::int64_t v0, std::int64_t v1, float* logits,
                                 std::int64_t logits_stride) {
  auto block = matrix(logits + v0, rows, v1 - v0, logits_stride);
  block.noalias() = matrix(hidden, rows, width, width) * matrix(weight + v0 * width, v1 - v0, width, width).transpose();
  if (bias != nullptr) block.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(bias + v0, v1 - v0);
}

}  // namespace detail

/// logits [T, V] = hidden [T, H] · weight [V, H]ᵀ + bias [V] (bias may be an
/// empty view: no bias). All F32 and contiguous. Memory: the output only.
inline void lm_head_logits(const TensorView& hidden, const TensorView& weight, const TensorView& bias,
                           const TensorView& logits, unsigned threads = default_thread_count()) {
  constexpr std::string_view function = "lm_head_logits";
  const auto shape = detail::lm_head_arguments(function, hidden, weight, bias);
  detail::check_f32_argument(function, "logits", logits, Shape{shape.tokens, shape.vocab});
  if (shape.tokens == 0) return;
  const float* bias_data = bias.raw_data() != nullptr ? bias.data<const float>() : nullptr;
  parallel_for(
      detail::vocab_block_count(shape.vocab), 1,
      [&](std::int64_t b0, std::int64_t b1) {
        for (std::int64_t b = b0; b < b1; ++b) {
          const std::int64_t v0 = b * detail::lm_head_vocab_block;
          const std::int64_t v1 = std::min(shape.vocab, v0 + detail::lm_head_vocab_block);
          detail::lm_head_logits_block(hidden.data<const float>(), shape.tokens, shape.width,
                                       weight.data<const float>(), bias_data, v0, v1, logits.data<float>(),
                                       shape.vocab);
        }
      },
      threads);
}

}  // namespace qlora
