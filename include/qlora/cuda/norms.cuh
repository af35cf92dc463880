// LayerNorm and RMSNorm on the GPU: nn/layer_norm.hpp's and nn/rms_norm.hpp's
// forward and backward with device tensors (Device::cuda, F32, contiguous),
// enqueued on `stream`. Same shapes, same argument checks (errors name the op
// and the argument, plus DeviceMismatch for a host tensor), same rules:
// dx is written, dweight and dbias are accumulated (+=), an empty view means
// "not wanted", y may be x and dx may be dy.
//
// Unlike the CPU functions, which return NormStatistics, the forward writes
// the per-row statistics into device views the caller owns (mean and rstd,
// F32 [tokens]; RMSNorm has no mean): device memory is the caller's to plan.
//
// Numerics (cuda/kernel/norms.cuh): the CPU's formulas operation by
// operation; only the order of the double row sums differs, so results agree
// with the CPU functions to about an fp32 ulp of each row's scale.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/norms.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>

#include <cstdint>

#include <qlora/core/tensor_view.hpp>
#include <qlora/cuda/common.cuh>
#include <qlora/cuda/kernel/norms.cuh>
#include <qlora/nn/layer_norm.hpp>
#include <qlora/nn/rms_norm.hpp>

namespace qlora::cuda {

namespace detail {

/// Checks a norm's arguments as the CPU op does, on the device; returns {tokens, hidden}.
struct NormShape {
  std::int64_t tokens = 0, hidden = 0;
};

inline NormShape check_norm_forward(const qlora::detail::F32Arguments& args, const TensorView& x,
                                    const TensorView& weight, float eps, const TensorView& y) {
  const std::int64_t hidden = qlora::detail::norm_hidden_size(args, weight);
  const std::int64_t tokens = args.rows(x, hidden, "x");
  args.tensor(y, Shape{tokens, hidden}, "y");
  qlora::detail::check_norm_epsilon(args, eps);
  return {tokens, hidden};
}

template <bool Centred>
void launch_norm_forward(const NormShape& shape, const TensorView& x, const TensorView& weight, const float* bias,
                         float eps, const TensorView& y, float* mean, const TensorView& rstd, cudaStream_t stream) {
  if (shape.tokens == 0) return;
  norm_forward_kernel<Centred><<<grid_for(shape.tokens), norm_threads, 0, stream>>>(
      x.data<const float>(), weight.data<const float>(), bias, eps, shape.hidden, y.data<float>(), mean,
      rstd.data<float>());
  check_launch("norm_forward_kernel");
}

template <bool Centred>
void launch_norm_backward(const qlora::detail::F32Arguments& args, const TensorView& x, const TensorView& weight,
                          const float* mean, const TensorView& rstd, const TensorView& dy, const TensorView& dx,
                          const TensorView& dweight, const TensorView& dbias, cudaStream_t stream) {
  const std::int64_t hidden = qlora::detail::norm_hidden_size(args, weight);
  const std::int64_t tokens = args.rows(x, hidden, "x");
  args.tensor(dy, Shape{tokens, hidden}, "dy");
  args.tensor(rstd, Shape{tokens}, "rstd");
  const bool want_dx = args.optional(dx, Shape{tokens, hidden}, "dx");
  const bool want_dweight = args.optional(dweight, Shape{hidden}, "dweight");
  const bool want_dbias = Centred && args.optional(dbias, Shape{hidden}, "dbias");
  if (tokens == 0) return;
  // The parameter gradients first: dx may overwrite dy.
  if (want_dweight || want_dbias) {
    constexpr int threads = 128;
    norm_parameter_gradient_kernel<Centred><<<grid_for(ceil_div(hidden, threads)), threads, 0, stream>>>(
        x.data<const float>(), mean, rstd.data<const float>(), dy.data<const float>(), tokens, hidden,
        want_dweight ? dweight.data<float>() : nullptr, want_dbias ? dbias.data<float>() : nullptr);
    check_launch("norm_parameter_gradient_kernel");
  }
  if (!want_dx) return;
  norm_backward_input_kernel<Centred><<<grid_for(tokens), norm_threads, 0, stream>>>(
      x.data<const float>(), weight.data<const float>(), mean, rstd.data<const float>(), dy.data<const float>(),
      hidden, dx.data<float>());
  check_launch("norm_backward_input_kernel");
}

}  // namespace detail

/// y = LayerNorm(x)·weight + bias (bias may be empty); writes the row means and rstd (F32 [tokens], device).
inline void layer_norm_forward(const TensorView& x, const TensorView& weight, const TensorView& bias, float eps,
                               const TensorView& y, const TensorView& mean, const TensorView& rstd,
                               cudaStream_t stream) {
  const qlora::detail::F32Arguments args{"cuda::layer_norm", Device::cuda};
  const detail::NormShape shape = detail::check_norm_forward(args, x, weight, eps, y);
  const bool has_bias = args.optional(bias, Shape{shape.hidden}, "bias");
  args.tensor(mean, Shape{shape.tokens}, "mean");
  args.tensor(rstd, Shape{shape.tokens}, "rstd");
  detail::launch_norm_forward<true>(shape, x, weight, has_bias ? bias.data<const float>() : nullptr, eps, y,
                                    mean.data<float>(), rstd, stream);
}

/// The LayerNorm backward from the forward's mean and rstd: writes dx, adds to dweight and dbias (each optional).
inline void layer_norm_backward(const TensorView& x, const TensorView& weight, const TensorView& mean,
                                const TensorView& rstd, const TensorView& dy, const TensorView& dx,
                                const TensorView& dweight, const TensorView& dbias, cudaStream_t stream) {
  const qlora::detail::F32Arguments args{"cuda::layer_norm_backward", Device::cuda};
  args.tensor(mean, rstd.shape(), "mean");
  detail::launch_norm_backward<true>(args, x, weight, mean.data<const float>(), rstd, dy, dx, dweight, dbias, stream);
}

/// y = RMSNorm(x)·weight; writes the row rstd (F32 [tokens], device).
inline void rms_norm_forward(const TensorView& x, const TensorView& weight, float eps, const TensorView& y,
                             const TensorView& rstd, cudaStream_t stream) {
  const qlora::detail::F32Arguments args{"cuda::rms_norm", Device::cuda};
  const detail::NormShape shape = detail::check_norm_forward(args, x, weight, eps, y);
  args.tensor(rstd, Shape{shape.tokens}, "rstd");
  detail::launch_norm_forward<false>(shape, x, weight, nullptr, eps, y, nullptr, rstd, stream);
}

/// The RMSNorm backward from the forward's rstd: writes dx, adds to dweight (each optional).
inline void rms_norm_backward(const TensorView& x, const TensorView& weight, const TensorView& rstd,
                              const TensorView& dy, const TensorView& dx, const TensorView& dweight,
                              cudaStream_t stream) {
  const qlora::detail::F32Arguments args{"cuda::rms_norm_backward", Device::cuda};
  detail::launch_norm_backward<false>(args, x, weight, nullptr, rstd, dy, dx, dweight, TensorView{}, stream);
}

}  // namespace qlora::cuda
