// IWYU pragma: private
// The tile kernels of causal attention for one head over one sequence, in the
// flash-attention style: scores exist only as a (query tile x key tile) block,
// so memory per thread is O(tile²) whatever the sequence length, and every
// product is an Eigen GEMM on fp32 tiles with the softmax in fp32.
//
// Forward (per query tile): online softmax over the key tiles up to the
// causal limit — a running row max m and sum l, the output accumulator
// rescaled by exp(m_old - m_new) whenever the max grows — then out = acc / l
// and logsumexp = m + log l, which the backward uses to rebuild the
// probabilities P = exp(S - logsumexp) without a second normalisation.
//
// Backward (per head): for each key tile, all query tiles at or after it:
//   dV_j += Pᵀ·dO_i     dP = dO_i·V_jᵀ     dS = P ∘ (dP - rowsum(dO∘O))
//   dQ_i += scale·dS·K_j     dK_j += scale·dSᵀ·Q_i
// dK_j and dV_j stay in the tile accumulators; dQ accumulates in place.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <qlora/core/detail/eigen_matrix.hpp>

namespace qlora::detail {

/// Query rows and keys per tile: a 128 x 128 fp32 score block is 64 KiB (L2-resident), and
/// 128-row operands keep Eigen's GEMM kernels busy for head dims of 80-128 (64 x 128 and
/// 128 x 256 tiles measured 1.2-1.6x slower at T = 1024, 32 heads x 80, AVX2).
inline constexpr std::int64_t attention_query_tile = 128;
inline constexpr std::int64_t attention_key_tile = 128;

/// One head of one sequence: where its rows live and how queries line up with keys.
/// Query r sits at key position r + (keys - queries) and attends keys [0, that position].
struct HeadSlices {
  const float* q;  ///< row r at q + r·q_stride
  const float* k;  ///< row j at k + j·kv_stride
  const float* v;
  std::int64_t q_stride;
  std::int64_t kv_stride;
  std::int64_t queries;
  std::int64_t keys;
  std::int64_t head_dim;

  [[nodiscard]] std::int64_t key_position(std::int64_t query) const noexcept { return query + keys - queries; }
  [[nodiscard]] ConstMatrixRef query_rows(std::int64_t first, std::int64_t count) const {
    return matrix(q + first * q_stride, count, head_dim, q_stride);
  }
  [[nodiscard]] ConstMatrixRef key_rows(std::int64_t first, std::int64_t count) const {
    return matrix(k + first * kv_stride, count, head_dim, kv_stride);
  }
  [[nodiscard]] ConstMatrixRef value_rows(std::int64_t first, std::int64_t count) const {
    return matrix(v + first * kv_stride, count, head_dim, kv_stride);
  }
};

/// Sets the scores of keys after each query's position to -inf (only tiles on the diagonal have any).
template <class Scores>
void mask_future_keys(Scores& scores, const HeadSlices& head, std::int64_t first_query, std::int64_t first_key) {
  const std::int64_t rows = scores.rows();
  const std::int64_t cols = scores.cols();
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t first_masked = std::max<std::int64_t>(0, head.key_position(first_query + r) + 1 - first_key);
    for (std::int64_t c = first_masked; c < cols; ++c) scores(r, c) = -std::numeric_limits<float>::infinity();
  }
}

/// Per-thread buffers of the forward, sized for full tiles once.
struct AttentionForwardScratch {
  explicit AttentionForwardScratch(std::int64_t head_dim)
      : scores(attention_query_tile, attention_key_tile),
        accumulator(attention_query_tile, head_dim),
        row_max(attention_query_tile),
        row_sum(attention_query_tile),
        rescale(attention_query_tile) {}
  RowMajorMatrix scores;
  RowMajorMatrix accumulator;
  Eigen::ArrayXf row_max;
  Eigen::ArrayXf row_sum;
  Eigen::ArrayXf rescale;
};

/// out rows [first_query, first_query + rows) of `head` (out row r at out + r·out_stride), and their
/// logsumexp (at logsumexp + r·logsumexp_stride) unless logsumexp is null. rows ≤ attention_query_tile.
inline void attention_forward_tile(const HeadSlices& head, std::int64_t first_query, std::int64_t rows, float scale,
                                   float* out, std::int64_t out_stride, float* logsumexp, std::int64_t logsumexp_stride,
                                   AttentionForwardScratch& scratch) {
  const ConstMatrixRef q = head.query_rows(first_query, rows);
  auto accumulator = scratch.accumulator.topRows(rows);
  auto row_max = scratch.row_max.head(rows);
  auto row_sum = scratch.row_sum.head(rows);
  auto rescale = scratch.rescale.head(rows);
  accumulator.setZero();
  row_max.setConstant(-std::numeric_limits<float>::infinity());
  row_sum.setZero();

  // Key tiles from 0 (every query sees key 0, so the running max is finite after the first tile).
  const std::int64_t key_end = head.key_position(first_query + rows - 1) + 1;
  for (std::int64_t first_key = 0; first_key < key_end; first_key += attention_key_tile) {
    const std::int64_t cols = std::min(attention_key_tile, key_end - first_key);
    auto scores = scratch.scores.topLeftCorner(rows, cols);
    scores.noalias() = q * head.key_rows(first_key, cols).transpose();
    scores *= scale;
    if (first_key + cols - 1 > head.key_position(first_query)) mask_future_keys(scores, head, first_query, first_key);

    const Eigen::ArrayXf tile_max = scores.rowwise().maxCoeff().array();
    const Eigen::ArrayXf new_max = row_max.max(tile_max);
    rescale = (row_max - new_max).exp();
    scores.array().colwise() -= new_max;
    scores = scores.array().exp().matrix();
    row_sum = row_sum * rescale + scores.rowwise().sum().array();
    accumulator = rescale.matrix().asDiagonal() * accumulator;
    accumulator.noalias() += scores * head.value_rows(first_key, cols);
    row_max = new_max;
  }

  matrix(out, rows, head.head_dim, out_stride) = row_sum.inverse().matrix().asDiagonal() * accumulator;
  if (logsumexp != nullptr) {
    for (std::int64_t r = 0; r < rows; ++r) logsumexp[r * logsumexp_stride] = row_max(r) + std::log(row_sum(r));
  }
}

/// What the backward of one head reads besides q, k and v: out and dout laid out like q.
struct HeadGradientInputs {
  const float* out;
  const float* dout;
  const float* logsumexp;  ///< row r at logsumexp + r·logsumexp_stride
  std::int64_t logsumexp_stride;
};

/// Where the backward of one head writes: dq laid out like q, dk and dv with their own row stride.
struct HeadGradients {
  float* dq;
  float* dk;
  float* dv;
  std::int64_t dkv_stride;
};

/// Per-thread buffers of the backward, sized for full tiles once.
struct AttentionBackwardScratch {
  explicit AttentionBackwardScratch(std::int64_t head_dim)
      : probabilities(attention_query_tile, attention_key_tile),
        dprobabilities(attention_query_tile, attention_key_tile),
        dk(attention_key_tile, head_dim),
        dv(attention_key_tile, head_dim) {}
  Eigen::ArrayXf dout_dot_out;  ///< rowsum(dO∘O) per query
  RowMajorMatrix probabilities;
  RowMajorMatrix dprobabilities;
  RowMajorMatrix dk;
  RowMajorMatrix dv;
};

/// dq, dk and dv of one head over one sequence (queries == keys: training).
inline void attention_backward_head(const HeadSlices& head, const HeadGradientInputs& in, float scale,
                                    const HeadGradients& grad, AttentionBackwardScratch& scratch) {
  const std::int64_t d = head.head_dim;
  const ConstMatrixRef out_rows = matrix(in.out, head.queries, d, head.q_stride);
  const ConstMatrixRef dout_rows = matrix(in.dout, head.queries, d, head.q_stride);
  scratch.dout_dot_out = out_rows.cwiseProduct(dout_rows).rowwise().sum().array();
  MatrixRef dq_rows = matrix(grad.dq, head.queries, d, head.q_stride);
  dq_rows.setZero();  // accumulated over the key tiles
  for (std::int64_t first_key = 0; first_key < head.keys; first_key += attention_key_tile) {
    const std::int64_t cols = std::min(attention_key_tile, head.keys - first_key);
    const ConstMatrixRef k = head.key_rows(first_key, cols);
    const ConstMatrixRef v = head.value_rows(first_key, cols);
    auto dk = scratch.dk.topRows(cols);
    auto dv = scratch.dv.topRows(cols);
    dk.setZero();
    dv.setZero();
    // Queries before first_key see none of these keys.
    for (std::int64_t first_query = first_key; first_query < head.queries; first_query += attention_query_tile) {
      const std::int64_t rows = std::min(attention_query_tile, head.queries - first_query);
      const ConstMatrixRef q = head.query_rows(first_query, rows);
      const auto dout = dout_rows.middleRows(first_query, rows);
      auto p = scratch.probabilities.topLeftCorner(rows, cols);
      auto dp = scratch.dprobabilities.topLeftCorner(rows, cols);

      p.noalias() = q * k.transpose();
      p *= scale;
      if (first_key + cols - 1 > head.key_position(first_query)) mask_future_keys(p, head, first_query, first_key);
      for (std::int64_t r = 0; r < rows; ++r) {
        p.row(r).array() -= in.logsumexp[(first_query + r) * in.logsumexp_stride];
      }
      p = p.array().exp().matrix();

      dv.noalias() += p.transpose() * dout;
      dp.noalias() = dout * v.transpose();
      dp.array().colwise() -= scratch.dout_dot_out.segment(first_query, rows);
      dp.array() *= p.array();  // now dS (without the scale, applied to dq and dk at the end)
      dq_rows.middleRows(first_query, rows).noalias() += dp * k;
      dk.noalias() += dp.transpose() * q;
    }
    matrix(grad.dk + first_key * grad.dkv_stride, cols, d, grad.dkv_stride) = dk * scale;
    matrix(grad.dv + first_key * grad.dkv_stride, cols, d, grad.dkv_stride) = dv;
  }
  dq_rows *= scale;
}

}  // namespace qlora::detail
