// Global gradient-norm clipping, as the HF Trainer does before every optimizer
// step (max_grad_norm = 1.0 by default): torch.nn.utils.clip_grad_norm_ over
// all trainable tensors at once.
//
// The norm is summed in double over fixed blocks whose partial sums are added
// in one fixed order, so it is the same for any thread count (a resumed run
// on another machine clips identically). The scaling itself reproduces
// torch's fp32 arithmetic: coef = max_norm · (1 / (total + 1e-6)), clamped to
// 1, and every gradient multiplied by it.
#pragma once

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/tensor_view.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace qlora {

namespace detail {

/// Elements per partial sum: big enough to amortise the bookkeeping, small
/// enough that a few large tensors still spread over the threads.
inline constexpr std::int64_t grad_norm_block = std::int64_t{1} << 14;

/// One block of one gradient tensor.
struct GradBlock {
  float* data;
  std::int64_t size;
};

/// The gradients cut into blocks, after checking each is a contiguous F32 host tensor.
inline std::vector<GradBlock> grad_blocks(std::span<const TensorView> grads) {
  std::vector<GradBlock> blocks;
  for (std::size_t i = 0; i < grads.size(); ++i) {
    const TensorView& grad = grads[i];
    check(grad.dtype() == DType::F32, "DTypeMismatch", "gradient {} is {}, expected F32", i, dtype_name(grad.dtype()));
    check(grad.device() == Device::cpu, "DeviceMismatch", "gradient {} is on {}, expected the host", i,
          device_name(grad.device()));
    check(grad.is_contiguous(), "NotContiguous", "gradient {} ({}) is not contiguous", i, grad.shape().to_string());
    float* data = grad.data<float>();
    for (std::int64_t begin = 0; begin < grad.numel(); begin += grad_norm_block) {
      blocks.push_back({data + begin, std::min(grad_norm_block, grad.numel() - begin)});
    }
  }
  return blocks;
}

/// Σ x² in double (each square is exact: a float product fits in a double).
/// Four independent sums let the loop pipeline; their order is fixed.
inline double sum_of_squares(const float* data, std::int64_t size) {
  double sums[4] = {0, 0, 0, 0};
  std::int64_t i = 0;
  for (; i + 4 <= size; i += 4) {
    for (int lane = 0; lane < 4; ++lane) {
      const double x = data[i + lane];
      sums[lane] += x * x;
    }
  }
  for (; i < size; ++i) sums[0] += static_cast<double>(data[i]) * data[i];
  return (sums[0] + sums[1]) + (sums[2] + sums[3]);
}

/// Threads get at least this many blocks: thread start-up costs more than summing fewer.
inline constexpr std::int64_t grad_blocks_per_thread = 4;

}  // namespace detail

/// ‖concat(grads)‖₂ over every element of every gradient (contiguous F32 host
/// tensors), accumulated in double; 0 for no gradients. Deterministic: the same
/// bits for any `threads`. An inf or NaN element gives an inf or NaN norm.
/// Throws DTypeMismatch / DeviceMismatch / NotContiguous naming the gradient's index.
inline double global_grad_norm(std::span<const TensorView> grads, unsigned threads = default_thread_count()) {
  const std::vector<detail::GradBlock> blocks = detail::grad_blocks(grads);
  std::vector<double> partial(blocks.size());
  parallel_for(
      static_cast<std::int64_t>(blocks.size()), detail::grad_blocks_per_thread,
      [&](std::int64_t begin, std::int64_t end) {
        for (auto b = static_cast<std::size_t>(begin); b < static_cast<std::size_t>(end); ++b) {
          partial[b] = detail::sum_of_squares(blocks[b].data, blocks[b].size);
        }
      },
      threads);
  double total = 0;
  for (const double sum : partial) total += sum;
  return std::sqrt(total);
}

namespace detail {

/// torch's clip coefficient for gradients of norm `total`: min(1, max_norm · (1 / (total + 1e-6)))
/// in fp32; 1 when max_norm ≤ 0 (nothing clipped). A NaN norm gives NaN (torch propagates it).
inline float clip_coefficient(double total, double max_norm) {
  if (max_norm <= 0) return 1.0f;
  // torch: `max_norm / (total + 1e-6)` is Tensor.__rtruediv__ = reciprocal() * max_norm, all fp32.
  const float denominator = static_cast<float>(total) + 1e-6f;
  const float coefficient = (1.0f / denominator) * static_cast<float>(max_norm);
  // torch.clamp(coef, max=1.0) keeps a NaN (from an inf or NaN norm).
  return coefficient < 1.0f || std::isnan(coefficient) ? coefficient : 1.0f;
}

}  // namespace detail

/// torch.nn.utils.clip_grad_norm_(params, max_norm) for the gradients `grads`
/// (scaled in place): with total = global_grad_norm(grads) rounded to fp32,
/// every gradient is multiplied by min(1, max_norm · (1 / (total + 1e-6))),
/// computed in fp32 as torch does. Returns the norm before clipping (the
/// double value; torch's fp32 result is this rounded to float). max_norm ≤ 0
/// clips nothing (the Trainer's "0 disables"; torch itself would zero the
/// gradients). Non-finite gradients are not refused here — torch's NaN
/// propagation is reproduced — so the trainer checks them first.
/// Throws Error("InvalidArgument") for a NaN max_norm, and what global_grad_norm throws.
inline double clip_grad_norm(std::span<const TensorView> grads, double max_norm,
                             unsigned threads = default_thread_count()) {
  check(!std::isnan(max_norm), "InvalidArgument", "clip_grad_norm: max_norm is NaN");
  const double total = global_grad_norm(grads, threads);
  const float clamped = detail::clip_coefficient(total, max_norm);
  if (clamped == 1.0f) return total;  // multiplying by 1 changes no bits
  const std::vector<detail::GradBlock> blocks = detail::grad_blocks(grads);
  parallel_for(
      static_cast<std::int64_t>(blocks.size()), detail::grad_blocks_per_thread,
      [&](std::int64_t begin, std::int64_t end) {
        for (auto b = static_cast<std::size_t>(begin); b < static_cast<std::size_t>(end); ++b) {
          float* data = blocks[b].data;
          for (std::int64_t i = 0; i < blocks[b].size; ++i) data[i] *= clamped;
        }
      },
      threads);
  return total;
}

}  // namespace qlora
