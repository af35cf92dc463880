// Token embedding lookup, forward and backward (torch.nn.functional.embedding):
//
//   out[t] = table[ids[t]]                 dtable[ids[t]] += dout[t]
//
// table and dtable are F32 [V, H], out and dout F32 [T, H], ids int32 [T].
// Every id is checked against [0, V) before anything is written. The
// backward's scatter-add is deterministic: threads split the hidden columns,
// and every column adds its tokens in order, so repeated ids give the same
// bits for any thread count. With a padding row (torch's padding_idx, which
// Phi-2's and InternLM2's embeddings set to the pad token), that row gets no
// gradient.
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/tensor_view.hpp>
#include <qlora/nn/detail/f32_arguments.hpp>
#include <qlora/nn/detail/row_reduction.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string_view>

namespace qlora {

/// torch.nn.Embedding's padding_idx: the table row whose gradient stays zero.
struct EmbeddingPadding {
  std::int32_t id;
};

namespace detail {

/// Checks that every id indexes one of `vocab` rows.
inline void check_token_ids(std::string_view op, std::span<const std::int32_t> ids, std::int64_t vocab) {
  for (std::size_t t = 0; t < ids.size(); ++t) {
    check(ids[t] >= 0 && ids[t] < vocab, "TokenOutOfRange", "{}: ids[{}] is {}, outside the table's {} rows [0, {})",
          op, t, ids[t], vocab, vocab);
  }
}

inline void embedding_backward(std::span<const std::int32_t> ids, const TensorView& dout, const TensorView& dtable,
                               std::optional<std::int32_t> padding, unsigned threads) {
  const F32Arguments args{"embedding_backward"};
  check(dtable.rank() == 2, "ShapeMismatch", "embedding_backward: dtable is {}, expected [vocab, hidden]",
        dtable.shape().to_string());
  const std::int64_t vocab = dtable.shape()[0];
  const std::int64_t hidden = dtable.shape()[1];
  const auto tokens = static_cast<std::int64_t>(ids.size());
  args.tensor(dtable, dtable.shape(), "dtable");
  args.tensor(dout, Shape{tokens, hidden}, "dout");
  check(!padding || (*padding >= 0 && *padding < vocab), "InvalidArgument",
        "embedding_backward: padding id {} is outside the table's {} rows [0, {})", padding.value_or(0), vocab, vocab);
  check_token_ids(args.op, ids, vocab);

  const float* grads = dout.data<const float>();
  float* table = dtable.data<float>();
  const std::int64_t min_columns = std::max<std::int64_t>(16, min_parallel_elements / std::max<std::int64_t>(1, tokens));
  parallel_for(
      hidden, min_columns,
      [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t t = 0; t < tokens; ++t) {
          const std::int32_t id = ids[static_cast<std::size_t>(t)];
          if (padding && id == *padding) continue;
          float* row = table + id * hidden;
          const float* grad = grads + t * hidden;
          for (std::int64_t c = begin; c < end; ++c) row[c] += grad[c];
        }
      },
      threads);
}

}  // namespace detail

/// out[t] = table[ids[t]]; an id outside [0, V) is a TokenOutOfRange error.
inline void embedding_forward(const TensorView& table, std::span<const std::int32_t> ids, const TensorView& out,
                              unsigned threads = default_thread_count()) {
  const detail::F32Arguments args{"embedding"};
  check(table.rank() == 2, "ShapeMismatch", "embedding: table is {}, expected [vocab, hidden]",
        table.shape().to_string());
  const std::int64_t vocab = table.shape()[0];
  const std::int64_t hidden = table.shape()[1];
  const auto tokens = static_cast<std::int64_t>(ids.size());
  args.tensor(table, table.shape(), "table");
  args.tensor(out, Shape{tokens, hidden}, "out");
  detail::check_token_ids(args.op, ids, vocab);

  const float* rows = table.data<const float>();
  float* outs = out.data<float>();
  const auto row_bytes = static_cast<std::size_t>(hidden) * sizeof(float);
  detail::for_row_chunks(
      tokens, hidden,
      [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t t = begin; t < end; ++t) {
          std::memcpy(outs + t * hidden, rows + ids[static_cast<std::size_t>(t)] * hidden, row_bytes);
        }
      },
      threads);
}

/// dtable[ids[t]] += dout[t] for every token t.
inline void embedding_backward(std::span<const std::int32_t> ids, const TensorView& dout, const TensorView& dtable,
                               unsigned threads = default_thread_count()) {
  detail::embedding_backward(ids, dout, dtable, std::nullopt, threads);
}

/// The same, leaving the gradient of row `padding.id` untouched (torch's padding_idx).
inline void embedding_backward(std::span<const std::int32_t> ids, const TensorView& dout, const TensorView& dtable,
                               EmbeddingPadding padding, unsigned threads = default_thread_count()) {
  detail::embedding_backward(ids, dout, dtable, padding.id, threads);
}

}  // namespace qlora
