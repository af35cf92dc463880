// The token embedding on the GPU: nn/embedding.hpp's gather and its
// scatter-add backward with device tensors (Device::cuda, F32, contiguous),
// enqueued on `stream`. The ids are a host span, as for the CPU function:
// they are range-checked there (TokenOutOfRange names the position) and
// uploaded (stream-ordered; the span may be released when the call returns).
// The backward adds in token order per column (cuda/kernel/embedding.cuh):
// bit-identical to the CPU's, deterministic.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/embedding.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <span>

#include <qlora/core/tensor_view.hpp>
#include <qlora/cuda/common.cuh>
#include <qlora/cuda/kernel/embedding.cuh>
#include <qlora/nn/embedding.hpp>

namespace qlora::cuda {

namespace detail {

/// Checks a [vocab, hidden] device table and returns {vocab, hidden}.
inline std::pair<std::int64_t, std::int64_t> checked_table(const qlora::detail::F32Arguments& args,
                                                           const TensorView& table, std::string_view name) {
  check(table.rank() == 2, "ShapeMismatch", "{}: {} is {}, expected [vocab, hidden]", args.op, name,
        table.shape().to_string());
  args.tensor(table, table.shape(), name);
  return {table.shape()[0], table.shape()[1]};
}

inline void embedding_backward(std::span<const std::int32_t> ids, const TensorView& dout, const TensorView& dtable,
                               std::optional<std::int32_t> padding, cudaStream_t stream) {
  const qlora::detail::F32Arguments args{"cuda::embedding_backward", Device::cuda};
  const auto [vocab, hidden] = checked_table(args, dtable, "dtable");
  const auto tokens = static_cast<std::int64_t>(ids.size());
  args.tensor(dout, Shape{tokens, hidden}, "dout");
  check(!padding || (*padding >= 0 && *padding < vocab), "InvalidArgument",
        "cuda::embedding_backward: padding id {} is outside the table's {} rows [0, {})", padding.value_or(0), vocab,
        vocab);
  qlora::detail::check_token_ids(args.op, ids, vocab);
  if (tokens == 0) return;
  const DeviceBuffer<std::int32_t> device_ids = to_device(ids, stream);
  constexpr int threads = 128;
  embedding_backward_kernel<float><<<grid_for(ceil_div(hidden, threads)), threads, 0, stream>>>(
      device_ids.data(), dout.data<const float>(), tokens, hidden, padding.value_or(-1), dtable.data<float>());
  check_launch("embedding_backward_kernel");
}

}  // namespace detail

/// out[t] = table[ids[t]].
inline void embedding_forward(const TensorView& table, std::span<const std::int32_t> ids, const TensorView& out,
                              cudaStream_t stream) {
  const qlora::detail::F32Arguments args{"cuda::embedding", Device::cuda};
  const auto [vocab, hidden] = detail::checked_table(args, table, "table");
  const auto tokens = static_cast<std::int64_t>(ids.size());
  args.tensor(out, Shape{tokens, hidden}, "out");
  qlora::detail::check_token_ids(args.op, ids, vocab);
  if (tokens == 0) return;
  const DeviceBuffer<std::int32_t> device_ids = to_device(ids, stream);
  constexpr int threads = 256;
  embedding_forward_kernel<float><<<grid_for(ceil_div(tokens * hidden, threads)), threads, 0, stream>>>(
      table.data<const float>(), device_ids.data(), tokens, hidden, out.data<float>());
  check_launch("embedding_forward_kernel");
}

/// dtable[ids[t]] += dout[t] for every token t.
inline void embedding_backward(std::span<const std::int32_t> ids, const TensorView& dout, const TensorView& dtable,
                               cudaStream_t stream) {
  detail::embedding_backward(ids, dout, dtable, std::nullopt, stream);
}

/// The same, leaving the gradient of row `padding.id` untouched (torch's padding_idx).
inline void embedding_backward(std::span<const std::int32_t> ids, const TensorView& dout, const TensorView& dtable,
                               EmbeddingPadding padding, cudaStream_t stream) {
  detail::embedding_backward(ids, dout, dtable, padding.id, stream);
}

}  // namespace qlora::cuda
