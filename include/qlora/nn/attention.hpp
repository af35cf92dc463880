// Causal softmax attention over packed sequences (flash-attention "varlen"
// semantics), forward and backward, on the CPU:
//
//   out_i = Σ_j softmax_j(scale · q_i·k_j) v_j     over keys j ≤ i of i's own sequence
//
// q, out, dout, dq are [T, query_heads, head_dim]; k, v, dk, dv are
// [T, kv_heads, head_dim] (T = tokens of the packed batch); cu_seqlens [n+1]
// marks where each sequence starts (0 = cu_seqlens[0] < ... < cu_seqlens[n] = T).
// Grouped-query attention: query head h reads kv head h / (query_heads /
// kv_heads), as transformers' repeat_kv does; dk and dv sum over the group.
//
// Why this shape of computation: the score matrix is never materialised per
// sequence — tiles of 128 queries x 128 keys with an online softmax keep each
// thread's memory O(tile²) (detail/attention_tiles.hpp), every product is an
// Eigen GEMM, and work items (sequence, head, query tile) in the forward and
// (sequence, head) in the backward are handed out to threads largest first,
// so a packed row of unequal sequences still keeps every thread busy.
// The forward saves only the logsumexp of each query row (fp32 [T, query_heads]);
// the backward recomputes the probabilities from it.
//
// cached_attention_forward is the generation step: the n newest tokens'
// queries against a KV cache whose last n rows are those tokens.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <qlora/core/error.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/core/tensor_view.hpp>
#include <qlora/nn/detail/attention_tiles.hpp>
#include <qlora/nn/detail/f32_arguments.hpp>
#include <qlora/nn/detail/row_reduction.hpp>
#include <span>
#include <string_view>
#include <vector>

namespace qlora {

struct AttentionShape {
  int query_heads = 0;
  int kv_heads = 0;  ///< divides query_heads (grouped-query attention when smaller)
  int head_dim = 0;

  [[nodiscard]] int group_size() const noexcept { return query_heads / kv_heads; }
};

/// What causal_attention_forward keeps for the backward.
struct AttentionSaved {
  Tensor logsumexp;  ///< F32 [T, query_heads]: log Σ_j exp(scale · q_i·k_j) over the keys row i sees
};

namespace detail {

/// The shape q [tokens, Hq, D], k and v [keys, Hkv, D] describe, after checking them.
inline AttentionShape checked_attention_shape(const F32Arguments& args, const TensorView& q, const TensorView& k,
                                              const TensorView& v) {
  check(q.rank() == 3 && q.shape()[1] > 0 && q.shape()[2] > 0, "ShapeMismatch",
        "{}: q is {}, expected [tokens, query_heads, head_dim]", args.op, q.shape().to_string());
  check(k.rank() == 3 && k.shape()[1] > 0 && k.shape()[2] == q.shape()[2], "ShapeMismatch",
        "{}: k is {}, expected [tokens, kv_heads, {}]", args.op, k.shape().to_string(), q.shape()[2]);
  const AttentionShape shape{static_cast<int>(q.shape()[1]), static_cast<int>(k.shape()[1]),
                             static_cast<int>(q.shape()[2])};
  check(shape.query_heads % shape.kv_heads == 0, "ShapeMismatch",
        "{}: {} query heads (q is {}) are not a multiple of {} kv heads (k is {})", args.op, shape.query_heads,
        q.shape().to_string(), shape.kv_heads, k.shape().to_string());
  args.tensor(q, q.shape(), "q");
  args.tensor(k, k.shape(), "k");
  args.tensor(v, k.shape(), "v");
  return shape;
}

inline void check_cu_seqlens(std::string_view op, std::span<const std::int32_t> cu_seqlens, std::int64_t tokens) {
  check(cu_seqlens.size() >= 2 && cu_seqlens.front() == 0, "InvalidCuSeqlens",
        "{}: cu_seqlens must start with 0 and hold at least 2 entries (got {} entries)", op, cu_seqlens.size());
  check(cu_seqlens.back() == tokens, "InvalidCuSeqlens", "{}: cu_seqlens ends at {}, expected the {} tokens of q", op,
        cu_seqlens.back(), tokens);
  for (std::size_t s = 1; s < cu_seqlens.size(); ++s) {
    check(cu_seqlens[s] > cu_seqlens[s - 1], "InvalidCuSeqlens",
          "{}: cu_seqlens[{}] = {} is not greater than cu_seqlens[{}] = {} (sequences must be non-empty)", op, s,
          cu_seqlens[s], s - 1, cu_seqlens[s - 1]);
  }
}

inline void check_scale(std::string_view op, float scale) {
  check(std::isfinite(scale) && scale > 0.0f, "InvalidArgument", "{}: scale {} must be positive and finite", op, scale);
}

/// A thread is worth starting for about this many multiply-adds of attention work.
inline constexpr std::int64_t attention_work_per_thread = std::int64_t{1} << 20;

/// Calls body(item, scratch) for every item in [0, count) on up to `threads` threads; each thread
/// makes one scratch and takes the next item when it finishes one, so items of unequal cost
/// (ordered largest first by the caller) balance.
template <class MakeScratch, class Body>
void for_each_attention_item(std::int64_t count, std::int64_t total_work, MakeScratch&& make_scratch, Body&& body,
                             unsigned threads) {
  const std::int64_t useful = std::max<std::int64_t>(1, total_work / attention_work_per_thread);
  const auto workers =
      static_cast<unsigned>(std::clamp<std::int64_t>(std::min<std::int64_t>(count, useful), 1, std::max(1u, threads)));
  std::atomic<std::int64_t> next{0};
  parallel_for(
      workers, 1,
      [&](std::int64_t, std::int64_t) {
        auto scratch = make_scratch();
        for (std::int64_t item = next++; item < count; item = next++) body(item, scratch);
      },
      workers);
}

/// One query tile of one head of one sequence: a forward work item.
struct AttentionTile {
  std::int64_t first_token;  ///< the sequence's first token
  std::int64_t tokens;       ///< the sequence's queries
  std::int64_t first_query;  ///< the tile's first query, relative to first_token
  int head;
};

/// Query tiles of every (sequence, head), the most keys first.
inline std::vector<AttentionTile> attention_tiles(std::span<const std::int32_t> cu_seqlens, int query_heads) {
  std::vector<AttentionTile> tiles;
  for (std::size_t s = 0; s + 1 < cu_seqlens.size(); ++s) {
    const std::int64_t tokens = cu_seqlens[s + 1] - cu_seqlens[s];
    for (int head = 0; head < query_heads; ++head) {
      for (std::int64_t first = 0; first < tokens; first += attention_query_tile) {
        tiles.push_back({cu_seqlens[s], tokens, first, head});
      }
    }
  }
  std::stable_sort(tiles.begin(), tiles.end(), [](const AttentionTile& a, const AttentionTile& b) {
    return std::min(a.first_query + attention_query_tile, a.tokens) >
           std::min(b.first_query + attention_query_tile, b.tokens);
  });
  return tiles;
}

}  // namespace detail

/// Writes out [T, Hq, D] and returns the logsumexp the backward needs.
inline AttentionSaved causal_attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                                               std::span<const std::int32_t> cu_seqlens, float scale,
                                               const TensorView& out, unsigned threads = default_thread_count()) {
  const detail::F32Arguments args{"causal_attention_forward"};
  const AttentionShape shape = detail::checked_attention_shape(args, q, k, v);
  const std::int64_t tokens = q.shape()[0];
  args.tensor(k, Shape{tokens, shape.kv_heads, shape.head_dim}, "k");
  args.tensor(out, q.shape(), "out");
  detail::check_cu_seqlens(args.op, cu_seqlens, tokens);
  detail::check_scale(args.op, scale);

  AttentionSaved saved{Tensor(DType::F32, Shape{tokens, shape.query_heads})};
  const std::int64_t d = shape.head_dim;
  const std::int64_t q_stride = shape.query_heads * d;
  const std::int64_t kv_stride = shape.kv_heads * d;
  const auto* q_data = q.data<const float>();
  const auto* k_data = k.data<const float>();
  const auto* v_data = v.data<const float>();
  auto* out_data = out.data<float>();
  auto* logsumexp = saved.logsumexp.view().data<float>();

  const std::vector<detail::AttentionTile> tiles = detail::attention_tiles(cu_seqlens, shape.query_heads);
  std::int64_t work = 0;
  for (const auto& tile : tiles)
    work += std::min(detail::attention_query_tile, tile.tokens - tile.first_query) *
            (tile.first_query + detail::attention_query_tile) * d;
  detail::for_each_attention_item(
      static_cast<std::int64_t>(tiles.size()), work, [d] { return detail::AttentionForwardScratch(d); },
      [&](std::int64_t item, detail::AttentionForwardScratch& scratch) {
        const detail::AttentionTile& tile = tiles[static_cast<std::size_t>(item)];
        const std::int64_t kv_head = tile.head / shape.group_size();
        const detail::HeadSlices head{q_data + tile.first_token * q_stride + tile.head * d,
                                      k_data + tile.first_token * kv_stride + kv_head * d,
                                      v_data + tile.first_token * kv_stride + kv_head * d,
                                      q_stride,
                                      kv_stride,
                                      tile.tokens,
                                      tile.tokens,
                                      d};
        const std::int64_t row = tile.first_token + tile.first_query;
        detail::attention_forward_tile(head, tile.first_query,
                                       std::min(detail::attention_query_tile, tile.tokens - tile.first_query), scale,
                                       out_data + row * q_stride + tile.head * d, q_stride,
                                       logsumexp + row * shape.query_heads + tile.head, shape.query_heads, scratch);
      },
      threads);
  return saved;
}

/// Writes dq [T, Hq, D], dk and dv [T, Hkv, D] from dout and the forward's q, k, v, out and saved state.
inline void causal_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                      const TensorView& out, const AttentionSaved& saved,
                                      std::span<const std::int32_t> cu_seqlens, float scale, const TensorView& dout,
                                      const TensorView& dq, const TensorView& dk, const TensorView& dv,
                                      unsigned threads = default_thread_count()) {
  const detail::F32Arguments args{"causal_attention_backward"};
  const AttentionShape shape = detail::checked_attention_shape(args, q, k, v);
  const std::int64_t tokens = q.shape()[0];
  args.tensor(k, Shape{tokens, shape.kv_heads, shape.head_dim}, "k");
  args.tensor(out, q.shape(), "out");
  args.tensor(saved.logsumexp.view(), Shape{tokens, shape.query_heads}, "saved.logsumexp");
  args.tensor(dout, q.shape(), "dout");
  args.tensor(dq, q.shape(), "dq");
  args.tensor(dk, k.shape(), "dk");
  args.tensor(dv, k.shape(), "dv");
  detail::check_cu_seqlens(args.op, cu_seqlens, tokens);
  detail::check_scale(args.op, scale);

  const std::int64_t d = shape.head_dim;
  const std::int64_t q_stride = shape.query_heads * d;
  const std::int64_t kv_stride = shape.kv_heads * d;
  const int group = shape.group_size();
  // With GQA every query head gets its own dk/dv rows, summed over the group afterwards:
  // query heads of a group can then run on different threads without sharing outputs.
  Tensor head_dk, head_dv;
  if (group > 1) {
    head_dk = Tensor(DType::F32, q.shape());
    head_dv = Tensor(DType::F32, q.shape());
  }
  auto* dk_target = group > 1 ? head_dk.view().data<float>() : dk.data<float>();
  auto* dv_target = group > 1 ? head_dv.view().data<float>() : dv.data<float>();
  const std::int64_t target_stride = group > 1 ? q_stride : kv_stride;

  struct HeadItem {
    std::int64_t first_token, tokens;
    int head;
  };
  std::vector<HeadItem> items;
  std::int64_t work = 0;
  for (std::size_t s = 0; s + 1 < cu_seqlens.size(); ++s) {
    const std::int64_t length = cu_seqlens[s + 1] - cu_seqlens[s];
    for (int head = 0; head < shape.query_heads; ++head) items.push_back({cu_seqlens[s], length, head});
    work += shape.query_heads * length * length * d;
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const HeadItem& a, const HeadItem& b) { return a.tokens > b.tokens; });

  const auto* q_data = q.data<const float>();
  const auto* k_data = k.data<const float>();
  const auto* v_data = v.data<const float>();
  const auto* out_data = out.data<const float>();
  const auto* dout_data = dout.data<const float>();
  const auto* logsumexp = saved.logsumexp.view().data<const float>();
  auto* dq_data = dq.data<float>();
  detail::for_each_attention_item(
      static_cast<std::int64_t>(items.size()), work, [d] { return detail::AttentionBackwardScratch(d); },
      [&](std::int64_t index, detail::AttentionBackwardScratch& scratch) {
        const HeadItem& item = items[static_cast<std::size_t>(index)];
        const std::int64_t kv_head = item.head / group;
        const std::int64_t q_offset = item.first_token * q_stride + item.head * d;
        const std::int64_t kv_offset = item.first_token * kv_stride + kv_head * d;
        const std::int64_t target_offset = item.first_token * target_stride + (group > 1 ? item.head : kv_head) * d;
        const detail::HeadSlices head{q_data + q_offset, k_data + kv_offset, v_data + kv_offset, q_stride,
                                      kv_stride,         item.tokens,        item.tokens,        d};
        const detail::HeadGradientInputs inputs{out_data + q_offset, dout_data + q_offset,
                                                logsumexp + item.first_token * shape.query_heads + item.head,
                                                shape.query_heads};
        const detail::HeadGradients gradients{dq_data + q_offset, dk_target + target_offset, dv_target + target_offset,
                                              target_stride};
        detail::attention_backward_head(head, inputs, scale, gradients, scratch);
      },
      threads);

  if (group > 1) {
    // dk[t, g] = Σ over the group's query heads r of head_dk[t, g·group + r] (and dv alike), in head order.
    const auto* head_dk_data = head_dk.view().data<const float>();
    const auto* head_dv_data = head_dv.view().data<const float>();
    auto* dk_data = dk.data<float>();
    auto* dv_data = dv.data<float>();
    parallel_for(
        tokens * shape.kv_heads, std::max<std::int64_t>(1, detail::min_parallel_elements / (group * d)),
        [&](std::int64_t begin, std::int64_t end) {
          for (std::int64_t row = begin; row < end; ++row) {  // row = t·kv_heads + g
            const float* dk_group = head_dk_data + row * group * d;
            const float* dv_group = head_dv_data + row * group * d;
            float* dk_row = dk_data + row * d;
            float* dv_row = dv_data + row * d;
            std::copy(dk_group, dk_group + d, dk_row);
            std::copy(dv_group, dv_group + d, dv_row);
            for (int r = 1; r < group; ++r) {
              for (std::int64_t e = 0; e < d; ++e) {
                dk_row[e] += dk_group[r * d + e];
                dv_row[e] += dv_group[r * d + e];
              }
            }
          }
        },
        threads);
  }
}

/// Generation with a KV cache: q [n, Hq, D] are the n newest tokens, k_cache and v_cache
/// [L, Hkv, D] hold every token so far (the last n rows are the new ones); token i of the n
/// attends cache rows [0, L - n + i]. Writes out [n, Hq, D].
inline void cached_attention_forward(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                                     float scale, const TensorView& out, unsigned threads = default_thread_count()) {
  const detail::F32Arguments args{"cached_attention_forward"};
  const AttentionShape shape = detail::checked_attention_shape(args, q, k_cache, v_cache);
  const std::int64_t queries = q.shape()[0];
  const std::int64_t keys = k_cache.shape()[0];
  check(queries <= keys, "ShapeMismatch", "{}: q has {} tokens but the KV cache only {} rows (it must include them)",
        args.op, queries, keys);
  args.tensor(out, q.shape(), "out");
  detail::check_scale(args.op, scale);

  const std::int64_t d = shape.head_dim;
  const std::int64_t q_stride = shape.query_heads * d;
  const std::int64_t kv_stride = shape.kv_heads * d;
  const auto* q_data = q.data<const float>();
  const auto* k_data = k_cache.data<const float>();
  const auto* v_data = v_cache.data<const float>();
  auto* out_data = out.data<float>();
  const std::int64_t tiles_per_head = (queries + detail::attention_query_tile - 1) / detail::attention_query_tile;
  detail::for_each_attention_item(
      tiles_per_head * shape.query_heads, queries * keys * shape.query_heads * d,
      [d] { return detail::AttentionForwardScratch(d); },
      [&](std::int64_t item, detail::AttentionForwardScratch& scratch) {
        const int head = static_cast<int>(item % shape.query_heads);
        const std::int64_t first_query = (item / shape.query_heads) * detail::attention_query_tile;
        const std::int64_t kv_head = head / shape.group_size();
        const detail::HeadSlices slices{
            q_data + head * d, k_data + kv_head * d, v_data + kv_head * d, q_stride, kv_stride, queries, keys, d};
        detail::attention_forward_tile(slices, first_query,
                                       std::min(detail::attention_query_tile, queries - first_query), scale,
                                       out_data + first_query * q_stride + head * d, q_stride, nullptr, 0, scratch);
      },
      threads);
}

}  // namespace qlora
