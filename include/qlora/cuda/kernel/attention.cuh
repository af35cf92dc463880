// Kernels of the CUDA causal attention (cuda/attention.cuh): the
// flash-attention scheme of nn/attention.hpp in fp32 — scores exist only as a
// 32 x 32 tile in registers, an online softmax in the forward, the
// probabilities rebuilt from the saved logsumexp in the backward.
//
// Work split. A CTA takes one tile of 32 rows (queries, or keys in dK/dV) of
// one head and runs 8 warps; warp w owns rows 4w..4w+3 of the tile. The other
// side (keys, or queries in dK/dV) streams through shared memory 32 rows at a
// time, and lane l takes row l of that stream: each lane computes one score
// as a full dot product over head_dim (no shuffles), the warp reduces the 32
// scores of a row for the softmax, and the weighted sums over the 32 streamed
// rows go to the lanes by head_dim element (lane l holds elements l, l + 32,
// ... of its warp's output rows, in registers). Streamed tiles that lanes
// read by row are padded to head_dim + 1 floats so the 32 lanes hit 32
// different banks; tiles read by element are not.
//
// Backward: delta_i = Σ_d dO_i·O_i first (attention_delta_kernel), then two
// kernels that both rebuild P = exp(scale·q·k − logsumexp) and
// dS = P ∘ (dO·vᵀ − delta): one per query tile for dQ = scale·dS·K, one per
// key tile for dV = Pᵀ·dO and dK = scale·dSᵀ·Q, looping over the query heads
// of its kv head (grouped-query attention sums there, in head order). Every
// output element is written by one thread in a fixed order: no atomics, so
// the results are deterministic run to run.
//
// Causality in a tile: query row r (relative to its sequence) sits at key
// position r + keys − queries (keys = queries in a packed batch; a KV cache
// has more keys) and sees keys [0, that position].
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/kernel/attention.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>

#include <cmath>  // INFINITY
#include <cstdint>

namespace qlora::cuda {

/// Rows per tile on both sides: a warp's worth, so a lane owns one streamed row.
inline constexpr int attention_tile_rows = 32;
/// Warps per CTA; each owns attention_tile_rows / attention_warps rows of the tile.
inline constexpr int attention_warps = 8;
inline constexpr int attention_rows_per_warp = attention_tile_rows / attention_warps;
inline constexpr int attention_threads = attention_warps * 32;

/// One tile of one sequence (the same for every head): rows [first, first + 32) ∩ [0, rows of
/// its side) of the sequence whose queries start at token q_begin of q and whose keys start at
/// row k_begin of k and v.
struct AttentionTileRef {
  std::int32_t q_begin;
  std::int32_t k_begin;
  std::int32_t queries;
  std::int32_t keys;
  std::int32_t first;  ///< the tile's first row, relative to the sequence (a query, or a key in dK/dV)
};

namespace kernel_detail {

__device__ inline float warp_max(float value) {
  for (int offset = 16; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

__device__ inline float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

/// Σ_d a[d]·b[d] over head_dim elements.
__device__ inline float dot(const float* a, const float* b, int head_dim) {
  float sum = 0.0f;
  for (int d = 0; d < head_dim; ++d) sum += a[d] * b[d];
  return sum;
}

/// Copies rows [first, first + 32) of one head from `source` (row r at source + r·stride) into a
/// shared tile with `pitch` floats per row; rows at or past `count` are zeros, so that the
/// arithmetic on them stays finite (their weights are zero).
__device__ inline void load_tile(float* tile, int pitch, const float* source, std::int64_t stride, int first,
                                 int count, int head_dim) {
  for (int e = static_cast<int>(threadIdx.x); e < attention_tile_rows * head_dim; e += attention_threads) {
    const int row = e / head_dim, d = e % head_dim;
    const int index = first + row;
    tile[row * pitch + d] = index < count ? source[static_cast<std::int64_t>(index) * stride + d] : 0.0f;
  }
}

/// Per-lane registers of a warp's rows: element d = lane + 32·e of row i at values[i][e].
template <int MaxHeadDim>
struct LaneRows {
  static constexpr int per_lane = MaxHeadDim / 32;
  float values[attention_rows_per_warp][per_lane];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < attention_rows_per_warp; ++i)
#pragma unroll
      for (int e = 0; e < per_lane; ++e) values[i][e] = 0.0f;
  }

  /// values[i] = values[i]·rescale + Σ_j weights[j]·tile[j] (tile rows of `pitch` floats).
  __device__ void accumulate(int i, float rescale, const float* weights, const float* tile, int pitch, int head_dim) {
    const int lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll
    for (int e = 0; e < per_lane; ++e) {
      const int d = lane + 32 * e;
      if (d < head_dim) {
        float sum = values[i][e] * rescale;
        for (int j = 0; j < attention_tile_rows; ++j) sum += weights[j] * tile[j * pitch + d];
        values[i][e] = sum;
      }
    }
  }

  /// destination[d] = values[i][·]·factor for the lane's elements.
  __device__ void store(int i, float factor, float* destination, int head_dim) const {
    const int lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll
    for (int e = 0; e < per_lane; ++e) {
      const int d = lane + 32 * e;
      if (d < head_dim) destination[d] = values[i][e] * factor;
    }
  }
};

}  // namespace kernel_detail

/// Forward, one CTA per (query tile, query head): out = softmax(scale·q·kᵀ)·v over the keys each
/// query sees; writes logsumexp [tokens, query_heads] when it is not null.
/// Dynamic shared memory: q (32 x D), k (32 x (D + 1)), v (32 x D), weights (8 x 32) floats.
template <int MaxHeadDim>
__global__ void __launch_bounds__(attention_threads)
    attention_forward_kernel(const float* q, const float* k, const float* v, const AttentionTileRef* tiles,
                             int query_heads, int kv_heads, int head_dim, float scale, float* out, float* logsumexp) {
  extern __shared__ float shared[];
  const int d_pad = head_dim + 1;
  float* q_tile = shared;
  float* k_tile = q_tile + attention_tile_rows * head_dim;
  float* v_tile = k_tile + attention_tile_rows * d_pad;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  float* weights = v_tile + attention_tile_rows * head_dim + warp * 32;

  const AttentionTileRef tile = tiles[blockIdx.x];
  const int head = static_cast<int>(blockIdx.y);
  const int kv_head = head / (query_heads / kv_heads);
  const std::int64_t q_stride = static_cast<std::int64_t>(query_heads) * head_dim;
  const std::int64_t kv_stride = static_cast<std::int64_t>(kv_heads) * head_dim;
  const int key_offset = tile.keys - tile.queries;  // key position of query 0
  const float* q_head = q + tile.q_begin * q_stride + head * head_dim;
  const float* k_head = k + tile.k_begin * kv_stride + kv_head * head_dim;
  const float* v_head = v + tile.k_begin * kv_stride + kv_head * head_dim;

  kernel_detail::load_tile(q_tile, head_dim, q_head, q_stride, tile.first, tile.queries, head_dim);
  kernel_detail::LaneRows<MaxHeadDim> accumulator;
  accumulator.zero();
  float row_max[attention_rows_per_warp], row_sum[attention_rows_per_warp];
#pragma unroll
  for (int i = 0; i < attention_rows_per_warp; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.0f;
  }
  const int last_query = min(tile.first + attention_tile_rows, tile.queries) - 1;
  const int last_key = last_query + key_offset;
  for (int first_key = 0; first_key <= last_key; first_key += attention_tile_rows) {
    __syncthreads();  // the previous key tile is no longer read
    kernel_detail::load_tile(k_tile, d_pad, k_head, kv_stride, first_key, tile.keys, head_dim);
    kernel_detail::load_tile(v_tile, head_dim, v_head, kv_stride, first_key, tile.keys, head_dim);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < attention_rows_per_warp; ++i) {
      const int row = warp * attention_rows_per_warp + i;
      const int position = tile.first + row + key_offset;  // warp-uniform
      if (tile.first + row >= tile.queries || first_key > position) continue;
      const int key = first_key + lane;
      const bool visible = key <= position;
      const float score = visible ? scale * kernel_detail::dot(q_tile + row * head_dim, k_tile + lane * d_pad, head_dim)
                                  : -INFINITY;
      const float new_max = fmaxf(row_max[i], kernel_detail::warp_max(score));  // finite: key first_key is visible
      const float weight = visible ? expf(score - new_max) : 0.0f;
      const float rescale = expf(row_max[i] - new_max);  // 0 on the first tile (max −inf)
      row_sum[i] = row_sum[i] * rescale + kernel_detail::warp_sum(weight);
      row_max[i] = new_max;
      weights[lane] = weight;
      __syncwarp();
      accumulator.accumulate(i, rescale, weights, v_tile, head_dim, head_dim);
      __syncwarp();  // weights is rewritten by the next row
    }
  }
#pragma unroll
  for (int i = 0; i < attention_rows_per_warp; ++i) {
    const int query = tile.first + warp * attention_rows_per_warp + i;
    if (query >= tile.queries) continue;
    const std::int64_t token = tile.q_begin + query;
    accumulator.store(i, 1.0f / row_sum[i], out + token * q_stride + head * head_dim, head_dim);
    if (logsumexp != nullptr && lane == 0) logsumexp[token * query_heads + head] = row_max[i] + logf(row_sum[i]);
  }
}

/// delta[t, h] = Σ_d dout[t, h, d]·out[t, h, d], one warp per (token, head), grid-stride.
/// (A template, like every kernel here, so that the header obeys the ODR.)
template <class T>
__global__ void attention_delta_kernel(const T* out, const T* dout, std::int64_t rows, int head_dim, float* delta) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * (blockDim.x / 32);
  for (std::int64_t row = (blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x) / 32; row < rows;
       row += warps) {
    float sum = 0.0f;
    for (int d = lane; d < head_dim; d += 32) sum += dout[row * head_dim + d] * out[row * head_dim + d];
    sum = kernel_detail::warp_sum(sum);
    if (lane == 0) delta[row] = sum;
  }
}

/// dQ, one CTA per (query tile, query head): dq = scale·Σ_keys dS·k.
/// Dynamic shared memory: q, dout (32 x D each), k, v (32 x (D + 1) each), dS (8 x 32) floats.
template <int MaxHeadDim>
__global__ void __launch_bounds__(attention_threads)
    attention_dq_kernel(const float* q, const float* k, const float* v, const float* dout, const float* logsumexp,
                        const float* delta, const AttentionTileRef* tiles, int query_heads, int kv_heads, int head_dim,
                        float scale, float* dq) {
  extern __shared__ float shared[];
  const int d_pad = head_dim + 1;
  float* q_tile = shared;
  float* dout_tile = q_tile + attention_tile_rows * head_dim;
  float* k_tile = dout_tile + attention_tile_rows * head_dim;
  float* v_tile = k_tile + attention_tile_rows * d_pad;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  float* score_gradients = v_tile + attention_tile_rows * d_pad + warp * 32;

  const AttentionTileRef tile = tiles[blockIdx.x];
  const int head = static_cast<int>(blockIdx.y);
  const int kv_head = head / (query_heads / kv_heads);
  const std::int64_t q_stride = static_cast<std::int64_t>(query_heads) * head_dim;
  const std::int64_t kv_stride = static_cast<std::int64_t>(kv_heads) * head_dim;
  const int key_offset = tile.keys - tile.queries;
  const float* k_head = k + tile.k_begin * kv_stride + kv_head * head_dim;
  const float* v_head = v + tile.k_begin * kv_stride + kv_head * head_dim;
  kernel_detail::load_tile(q_tile, head_dim, q + tile.q_begin * q_stride + head * head_dim, q_stride, tile.first,
                           tile.queries, head_dim);
  kernel_detail::load_tile(dout_tile, head_dim, dout + tile.q_begin * q_stride + head * head_dim, q_stride, tile.first,
                           tile.queries, head_dim);
  // Each warp's rows' logsumexp and delta, in registers (rows past the sequence: unused).
  float row_logsumexp[attention_rows_per_warp], row_delta[attention_rows_per_warp];
#pragma unroll
  for (int i = 0; i < attention_rows_per_warp; ++i) {
    const int query = tile.first + warp * attention_rows_per_warp + i;
    const std::int64_t at = (tile.q_begin + static_cast<std::int64_t>(min(query, tile.queries - 1))) * query_heads + head;
    row_logsumexp[i] = logsumexp[at];
    row_delta[i] = delta[at];
  }
  kernel_detail::LaneRows<MaxHeadDim> accumulator;
  accumulator.zero();
  const int last_key = min(tile.first + attention_tile_rows, tile.queries) - 1 + key_offset;
  for (int first_key = 0; first_key <= last_key; first_key += attention_tile_rows) {
    __syncthreads();
    kernel_detail::load_tile(k_tile, d_pad, k_head, kv_stride, first_key, tile.keys, head_dim);
    kernel_detail::load_tile(v_tile, d_pad, v_head, kv_stride, first_key, tile.keys, head_dim);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < attention_rows_per_warp; ++i) {
      const int row = warp * attention_rows_per_warp + i;
      const int position = tile.first + row + key_offset;
      if (tile.first + row >= tile.queries || first_key > position) continue;
      const bool visible = first_key + lane <= position;
      float score_gradient = 0.0f;
      if (visible) {
        const float probability =
            expf(scale * kernel_detail::dot(q_tile + row * head_dim, k_tile + lane * d_pad, head_dim) - row_logsumexp[i]);
        const float dprobability = kernel_detail::dot(dout_tile + row * head_dim, v_tile + lane * d_pad, head_dim);
        score_gradient = probability * (dprobability - row_delta[i]);
      }
      score_gradients[lane] = score_gradient;
      __syncwarp();
      accumulator.accumulate(i, 1.0f, score_gradients, k_tile, d_pad, head_dim);
      __syncwarp();
    }
  }
#pragma unroll
  for (int i = 0; i < attention_rows_per_warp; ++i) {
    const int query = tile.first + warp * attention_rows_per_warp + i;
    if (query >= tile.queries) continue;
    accumulator.store(i, scale, dq + (tile.q_begin + static_cast<std::int64_t>(query)) * q_stride + head * head_dim,
                      head_dim);
  }
}

/// dK and dV, one CTA per (key tile, kv head), over the query heads of its group in order:
/// dv = Σ_queries P·dout, dk = scale·Σ_queries dS·q.
/// Dynamic shared memory: k, v (32 x D each), q, dout (32 x (D + 1) each), logsumexp, delta (32
/// each), P and dS (8 x 32 each) floats.
template <int MaxHeadDim>
__global__ void __launch_bounds__(attention_threads)
    attention_dkdv_kernel(const float* q, const float* k, const float* v, const float* dout, const float* logsumexp,
                          const float* delta, const AttentionTileRef* tiles, int tile_count, int query_heads,
                          int kv_heads, int head_dim, float scale, float* dk, float* dv) {
  extern __shared__ float shared[];
  const int d_pad = head_dim + 1;
  float* k_tile = shared;
  float* v_tile = k_tile + attention_tile_rows * head_dim;
  float* q_tile = v_tile + attention_tile_rows * head_dim;
  float* dout_tile = q_tile + attention_tile_rows * d_pad;
  float* query_logsumexp = dout_tile + attention_tile_rows * d_pad;
  float* query_delta = query_logsumexp + attention_tile_rows;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  float* probabilities = query_delta + attention_tile_rows + warp * 32;
  float* score_gradients = probabilities + attention_warps * 32;

  // The tiles are ordered by descending first row; the key tiles with the most queries after
  // them (the smallest first row) are the most work, so they start first.
  const AttentionTileRef tile = tiles[tile_count - 1 - static_cast<int>(blockIdx.x)];
  const int kv_head = static_cast<int>(blockIdx.y);
  const int group = query_heads / kv_heads;
  const std::int64_t q_stride = static_cast<std::int64_t>(query_heads) * head_dim;
  const std::int64_t kv_stride = static_cast<std::int64_t>(kv_heads) * head_dim;
  const int key_offset = tile.keys - tile.queries;
  const std::int64_t kv_at = tile.k_begin * kv_stride + kv_head * head_dim;
  kernel_detail::load_tile(k_tile, head_dim, k + kv_at, kv_stride, tile.first, tile.keys, head_dim);
  kernel_detail::load_tile(v_tile, head_dim, v + kv_at, kv_stride, tile.first, tile.keys, head_dim);

  kernel_detail::LaneRows<MaxHeadDim> key_gradient, value_gradient;
  key_gradient.zero();
  value_gradient.zero();
  // The first query that sees the tile's first key.
  const int first_query = max(0, tile.first - key_offset);
  for (int head = kv_head * group; head < (kv_head + 1) * group; ++head) {
    const float* q_head = q + tile.q_begin * q_stride + head * head_dim;
    const float* dout_head = dout + tile.q_begin * q_stride + head * head_dim;
    for (int first = first_query; first < tile.queries; first += attention_tile_rows) {
      __syncthreads();
      kernel_detail::load_tile(q_tile, d_pad, q_head, q_stride, first, tile.queries, head_dim);
      kernel_detail::load_tile(dout_tile, d_pad, dout_head, q_stride, first, tile.queries, head_dim);
      if (threadIdx.x < attention_tile_rows) {
        const int query = first + static_cast<int>(threadIdx.x);
        const std::int64_t at = (tile.q_begin + static_cast<std::int64_t>(query)) * query_heads + head;
        query_logsumexp[threadIdx.x] = query < tile.queries ? logsumexp[at] : 0.0f;
        query_delta[threadIdx.x] = query < tile.queries ? delta[at] : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < attention_rows_per_warp; ++i) {
        const int row = warp * attention_rows_per_warp + i;
        const int key = tile.first + row;
        if (key >= tile.keys) continue;
        const int query = first + lane;
        const bool sees_key = query < tile.queries && query + key_offset >= key;
        float probability = 0.0f, score_gradient = 0.0f;
        if (sees_key) {
          probability = expf(scale * kernel_detail::dot(q_tile + lane * d_pad, k_tile + row * head_dim, head_dim) -
                             query_logsumexp[lane]);
          const float dprobability = kernel_detail::dot(dout_tile + lane * d_pad, v_tile + row * head_dim, head_dim);
          score_gradient = probability * (dprobability - query_delta[lane]);
        }
        probabilities[lane] = probability;
        score_gradients[lane] = score_gradient;
        __syncwarp();
        value_gradient.accumulate(i, 1.0f, probabilities, dout_tile, d_pad, head_dim);
        key_gradient.accumulate(i, 1.0f, score_gradients, q_tile, d_pad, head_dim);
        __syncwarp();
      }
    }
  }
#pragma unroll
  for (int i = 0; i < attention_rows_per_warp; ++i) {
    const int key = tile.first + warp * attention_rows_per_warp + i;
    if (key >= tile.keys) continue;
    const std::int64_t at = (tile.k_begin + static_cast<std::int64_t>(key)) * kv_stride + kv_head * head_dim;
    key_gradient.store(i, scale, dk + at, head_dim);
    value_gradient.store(i, 1.0f, dv + at, head_dim);
  }
}

}  // namespace qlora::cuda
