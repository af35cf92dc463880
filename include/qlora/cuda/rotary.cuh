// The rotary embedding on the GPU: RotaryEmbedding::apply / apply_backward
// (nn/rotary.hpp: partial rotary, dynamic NTK by seq_len) on a device tensor
// x [tokens, heads, head_dim] (Device::cuda, F32, contiguous), in place, on
// `stream`. The host computes the angles' cos and sin exactly as the CPU path
// does (RotaryEmbedding::token_angles, with its cache of the unscaled base)
// and uploads them, 2 · tokens · rotary_dim/2 floats, a small fraction of q
// and k; the kernel turns the pairs with the CPU's roundings. Results are
// bit-identical to the CPU's. positions is a host span (checked there).
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/rotary.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>

#include <cstdint>
#include <span>

#include <qlora/core/tensor_view.hpp>
#include <qlora/cuda/common.cuh>
#include <qlora/cuda/kernel/rotary.cuh>
#include <qlora/nn/rotary.hpp>

namespace qlora::cuda {

namespace detail {

inline void rotate(const RotaryEmbedding& rope, const TensorView& x, std::span<const std::int32_t> positions,
                   std::int64_t seq_len, float sin_sign, const char* op, const char* name, cudaStream_t stream) {
  const RotaryConfig& config = rope.config();
  check(x.rank() == 3 && x.shape()[2] == config.head_dim, "ShapeMismatch", "{}: {} is {}, expected [tokens, heads, {}]",
        op, name, x.shape().to_string(), config.head_dim);
  const qlora::detail::F32Arguments args{op, Device::cuda};
  args.tensor(x, x.shape(), name);
  const std::int64_t tokens = x.shape()[0], heads = x.shape()[1];
  check(static_cast<std::int64_t>(positions.size()) == tokens, "ShapeMismatch", "{}: {} positions for {} tokens", op,
        positions.size(), tokens);
  const RotaryEmbedding::TokenAngles angles = rope.token_angles(positions, seq_len, op);
  if (tokens == 0 || heads == 0) return;
  const std::int64_t half = config.rotary_dim / 2;
  const DeviceBuffer<float> cos = to_device(std::span<const float>(angles.cos), stream);
  const DeviceBuffer<float> sin = to_device(std::span<const float>(angles.sin), stream);
  constexpr int threads = 256;
  rotary_kernel<float><<<grid_for(ceil_div(tokens * heads * half, threads)), threads, 0, stream>>>(
      x.data<float>(), cos.data(), sin.data(), sin_sign, tokens, heads, config.head_dim, half);
  check_launch("rotary_kernel");
}

}  // namespace detail

/// rope.apply on the device: rotates x [tokens, heads, head_dim] in place; token t sits at
/// positions[t] of a row of seq_len tokens.
inline void rotary_apply(const RotaryEmbedding& rope, const TensorView& x, std::span<const std::int32_t> positions,
                         std::int64_t seq_len, cudaStream_t stream) {
  detail::rotate(rope, x, positions, seq_len, 1.0f, "cuda::rotary_apply", "x", stream);
}

/// rope.apply_backward on the device: turns dx in place by the opposite angles.
inline void rotary_apply_backward(const RotaryEmbedding& rope, const TensorView& dx,
                                  std::span<const std::int32_t> positions, std::int64_t seq_len, cudaStream_t stream) {
  detail::rotate(rope, dx, positions, seq_len, -1.0f, "cuda::rotary_apply_backward", "dx", stream);
}

}  // namespace qlora::cuda
