// Causal attention over packed sequences on the GPU: nn/attention.hpp's
// causal_attention_forward / causal_attention_backward / cached_attention_forward
// with device tensors (Device::cuda, F32, contiguous), enqueued on `stream`.
// Same shapes (q, out, dq [T, Hq, D]; k, v, dk, dv [T, Hkv, D]; GQA when
// Hkv < Hq), same argument checks and errors, same semantics: each token sees
// the keys of its own sequence up to itself, cu_seqlens (a host span, as the
// caller's batch layout is) marks the sequences.
//
// Unlike the CPU forward, which returns the logsumexp in a host Tensor, the
// forward writes it into a device view the caller owns (F32 [T, Hq]) and the
// backward reads it from there: device memory is the caller's to plan.
//
// Kernels: cuda/kernel/attention.cuh (fp32 flash attention, deterministic).
// head_dim up to 256; the kernels use up to ~130 KiB of shared memory per CTA
// at head_dim 256 (about 66 KiB at 128), which every sm_80+ data-centre GPU
// has; a device with less is refused with the numbers.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/attention.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include <qlora/core/tensor_view.hpp>
#include <qlora/cuda/common.cuh>
#include <qlora/cuda/kernel/attention.cuh>
#include <qlora/nn/attention.hpp>

namespace qlora::cuda {

namespace detail {

/// The largest head_dim the kernels hold in registers (8 elements per lane).
inline constexpr int attention_max_head_dim = 256;

/// Checks what the CPU op checks, on the device, plus the kernels' own limits.
inline AttentionShape checked_device_attention_shape(const qlora::detail::F32Arguments& args, const TensorView& q,
                                                     const TensorView& k, const TensorView& v) {
  const AttentionShape shape = qlora::detail::checked_attention_shape(args, q, k, v);
  check(shape.head_dim <= attention_max_head_dim, "ShapeMismatch",
        "{}: head_dim {} (q is {}) is larger than the {} the CUDA kernels support", args.op, shape.head_dim,
        q.shape().to_string(), attention_max_head_dim);
  check(shape.query_heads <= 65535, "ShapeMismatch", "{}: {} query heads exceed the grid's 65535", args.op,
        shape.query_heads);
  check(q.shape()[0] <= std::numeric_limits<std::int32_t>::max() &&
            k.shape()[0] <= std::numeric_limits<std::int32_t>::max(),
        "ShapeMismatch", "{}: q is {} and k is {}: more tokens than int32 indexes", args.op, q.shape().to_string(),
        k.shape().to_string());
  return shape;
}

/// The checks of a packed batch's forward and backward: q, k, v, out [T, ...] and logsumexp
/// [T, Hq] as the CPU op wants them, cu_seqlens ending at T, a positive scale.
inline AttentionShape checked_packed_attention(const qlora::detail::F32Arguments& args, const TensorView& q,
                                               const TensorView& k, const TensorView& v, const TensorView& out,
                                               const TensorView& logsumexp, std::span<const std::int32_t> cu_seqlens,
                                               float scale) {
  const AttentionShape shape = checked_device_attention_shape(args, q, k, v);
  const std::int64_t tokens = q.shape()[0];
  args.tensor(k, Shape{tokens, shape.kv_heads, shape.head_dim}, "k");
  args.tensor(out, q.shape(), "out");
  args.tensor(logsumexp, Shape{tokens, shape.query_heads}, "logsumexp");
  qlora::detail::check_cu_seqlens(args.op, cu_seqlens, tokens);
  qlora::detail::check_scale(args.op, scale);
  return shape;
}

/// The 32-row tiles of every sequence of a packed batch, by descending first row (the forward
/// and dQ kernels start with the tiles that see the most keys; dK/dV reads the table backwards).
inline std::vector<AttentionTileRef> packed_attention_tiles(std::span<const std::int32_t> cu_seqlens) {
  std::vector<AttentionTileRef> tiles;
  for (std::size_t s = 0; s + 1 < cu_seqlens.size(); ++s) {
    const std::int32_t begin = cu_seqlens[s], length = cu_seqlens[s + 1] - cu_seqlens[s];
    for (std::int32_t first = 0; first < length; first += attention_tile_rows)
      tiles.push_back({begin, begin, length, length, first});
  }
  std::stable_sort(tiles.begin(), tiles.end(),
                   [](const AttentionTileRef& a, const AttentionTileRef& b) { return a.first > b.first; });
  return tiles;
}

/// Calls f(std::integral_constant<int, MaxHeadDim>) with the smaller register layout that holds head_dim.
template <class F>
void dispatch_head_dim(int head_dim, F&& f) {
  if (head_dim <= 128) {
    f(std::integral_constant<int, 128>{});
  } else {
    f(std::integral_constant<int, attention_max_head_dim>{});
  }
}

/// Lets `kernel` use `bytes` of dynamic shared memory, or refuses the shape with the device's limit.
template <class Kernel>
void allow_shared_memory(Kernel* kernel, std::size_t bytes, std::string_view op, int head_dim) {
  int device = 0, limit = 0;
  QLORA_CUDA_CHECK(cudaGetDevice(&device));
  QLORA_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  check(bytes <= static_cast<std::size_t>(limit), "ShapeMismatch",
        "{}: head_dim {} needs {} bytes of shared memory per CTA; device {} allows {}", op, head_dim, bytes, device,
        limit);
  QLORA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

/// Shared memory of a kernel holding `plain` tiles of 32 x D, `padded` tiles of 32 x (D + 1) and `extra` floats.
constexpr std::size_t attention_shared_bytes(int head_dim, int plain, int padded, int extra) {
  const std::size_t rows = attention_tile_rows;
  return sizeof(float) * (rows * static_cast<std::size_t>(head_dim) * plain +
                          rows * static_cast<std::size_t>(head_dim + 1) * padded + static_cast<std::size_t>(extra));
}

/// Runs the forward kernel over `tiles` (host table, uploaded here); logsumexp may be null.
inline void launch_attention_forward(const std::vector<AttentionTileRef>& tiles, const AttentionShape& shape,
                                     const TensorView& q, const TensorView& k, const TensorView& v, float scale,
                                     const TensorView& out, float* logsumexp, std::string_view op, cudaStream_t stream) {
  if (tiles.empty()) return;
  const DeviceBuffer<AttentionTileRef> table = to_device(std::span<const AttentionTileRef>(tiles), stream);
  const std::size_t bytes = attention_shared_bytes(shape.head_dim, 2, 1, attention_warps * 32);
  dispatch_head_dim(shape.head_dim, [&](auto max_head_dim) {
    constexpr int max = decltype(max_head_dim)::value;
    allow_shared_memory(attention_forward_kernel<max>, bytes, op, shape.head_dim);
    const dim3 grid(static_cast<unsigned>(tiles.size()), static_cast<unsigned>(shape.query_heads));
    attention_forward_kernel<max><<<grid, attention_threads, bytes, stream>>>(
        q.data<const float>(), k.data<const float>(), v.data<const float>(), table.data(), shape.query_heads,
        shape.kv_heads, shape.head_dim, scale, out.data<float>(), logsumexp);
    check_launch("attention_forward_kernel");
  });
}

}  // namespace detail

/// Writes out [T, Hq, D] and the logsumexp [T, Hq] the backward needs (both device views).
inline void causal_attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                                     std::span<const std::int32_t> cu_seqlens, float scale, const TensorView& out,
                                     const TensorView& logsumexp, cudaStream_t stream) {
  const qlora::detail::F32Arguments args{"cuda::causal_attention_forward", Device::cuda};
  const AttentionShape shape = detail::checked_packed_attention(args, q, k, v, out, logsumexp, cu_seqlens, scale);
  detail::launch_attention_forward(detail::packed_attention_tiles(cu_seqlens), shape, q, k, v, scale, out,
                                   logsumexp.data<float>(), args.op, stream);
}

/// Writes dq [T, Hq, D], dk and dv [T, Hkv, D] from dout and the forward's q, k, v, out and logsumexp.
/// Device workspace: T·Hq floats (delta) and the tile table, freed stream-ordered on return.
inline void causal_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                      const TensorView& out, const TensorView& logsumexp,
                                      std::span<const std::int32_t> cu_seqlens, float scale, const TensorView& dout,
                                      const TensorView& dq, const TensorView& dk, const TensorView& dv,
                                      cudaStream_t stream) {
  const qlora::detail::F32Arguments args{"cuda::causal_attention_backward", Device::cuda};
  const AttentionShape shape = detail::checked_packed_attention(args, q, k, v, out, logsumexp, cu_seqlens, scale);
  const std::int64_t tokens = q.shape()[0];
  args.tensor(dout, q.shape(), "dout");
  args.tensor(dq, q.shape(), "dq");
  args.tensor(dk, k.shape(), "dk");
  args.tensor(dv, k.shape(), "dv");

  const std::int64_t rows = tokens * shape.query_heads;
  const DeviceBuffer<float> delta(static_cast<std::size_t>(rows), stream);
  constexpr int delta_threads = 256;
  attention_delta_kernel<float><<<grid_for(ceil_div(rows, delta_threads / 32)), delta_threads, 0, stream>>>(
      out.data<const float>(), dout.data<const float>(), rows, shape.head_dim, delta.data());
  check_launch("attention_delta_kernel");

  const std::vector<AttentionTileRef> tiles = detail::packed_attention_tiles(cu_seqlens);
  const DeviceBuffer<AttentionTileRef> table = to_device(std::span<const AttentionTileRef>(tiles), stream);
  const auto tile_count = static_cast<unsigned>(tiles.size());
  const std::size_t dq_bytes = detail::attention_shared_bytes(shape.head_dim, 2, 2, attention_warps * 32);
  const std::size_t dkdv_bytes =
      detail::attention_shared_bytes(shape.head_dim, 2, 2, 2 * attention_tile_rows + 2 * attention_warps * 32);
  detail::dispatch_head_dim(shape.head_dim, [&](auto max_head_dim) {
    constexpr int max = decltype(max_head_dim)::value;
    detail::allow_shared_memory(attention_dq_kernel<max>, dq_bytes, args.op, shape.head_dim);
    detail::allow_shared_memory(attention_dkdv_kernel<max>, dkdv_bytes, args.op, shape.head_dim);
    attention_dq_kernel<max><<<dim3(tile_count, static_cast<unsigned>(shape.query_heads)), attention_threads,
                               dq_bytes, stream>>>(
        q.data<const float>(), k.data<const float>(), v.data<const float>(), dout.data<const float>(),
        logsumexp.data<const float>(), delta.data(), table.data(), shape.query_heads, shape.kv_heads, shape.head_dim,
        scale, dq.data<float>());
    check_launch("attention_dq_kernel");
    attention_dkdv_kernel<max><<<dim3(tile_count, static_cast<unsigned>(shape.kv_heads)), attention_threads,
                                 dkdv_bytes, stream>>>(
        q.data<const float>(), k.data<const float>(), v.data<const float>(), dout.data<const float>(),
        logsumexp.data<const float>(), delta.data(), table.data(), static_cast<int>(tile_count), shape.query_heads,
        shape.kv_heads, shape.head_dim, scale, dk.data<float>(), dv.data<float>());
    check_launch("attention_dkdv_kernel");
  });
}

/// Generation with a KV cache: q [n, Hq, D] are the n newest tokens, k_cache and v_cache
/// [L, Hkv, D] hold every token so far (the last n rows are the new ones); token i of the n
/// attends cache rows [0, L − n + i]. Writes out [n, Hq, D].
inline void cached_attention_forward(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                                     float scale, const TensorView& out, cudaStream_t stream) {
  const qlora::detail::F32Arguments args{"cuda::cached_attention_forward", Device::cuda};
  const AttentionShape shape = detail::checked_device_attention_shape(args, q, k_cache, v_cache);
  const auto queries = static_cast<std::int32_t>(q.shape()[0]);
  const auto keys = static_cast<std::int32_t>(k_cache.shape()[0]);
  check(queries <= keys, "ShapeMismatch", "{}: q has {} tokens but the KV cache only {} rows (it must include them)",
        args.op, queries, keys);
  args.tensor(out, q.shape(), "out");
  qlora::detail::check_scale(args.op, scale);
  std::vector<AttentionTileRef> tiles;
  for (std::int32_t first = 0; first < queries; first += attention_tile_rows) tiles.push_back({0, 0, queries, keys, first});
  std::reverse(tiles.begin(), tiles.end());  // the most keys first, as for a packed batch
  detail::launch_attention_forward(tiles, shape, q, k_cache, v_cache, scale, out, nullptr, args.op, stream);
}

}  // namespace qlora::cuda
