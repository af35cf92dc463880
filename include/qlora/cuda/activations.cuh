// The MLP activations on the GPU: nn/activations.hpp's gelu_new, silu and
// swiglu, forward and backward, with device tensors (Device::cuda, F32,
// contiguous, any shape, as many elements as the first argument), enqueued on
// `stream`. Same argument checks as the CPU functions (plus DeviceMismatch);
// any output may alias any input. Numerics: cuda/kernel/activations.cuh.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/activations.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>

#include <cstdint>

#include <qlora/core/tensor_view.hpp>
#include <qlora/cuda/common.cuh>
#include <qlora/cuda/kernel/activations.cuh>
#include <qlora/nn/activations.hpp>

namespace qlora::cuda {

namespace detail {

inline constexpr int activation_threads = 256;

template <Activation Act>
void launch_activation_forward(std::int64_t count, const float* a, const float* b, float* out, cudaStream_t stream) {
  if (count == 0) return;
  activation_forward_kernel<Act>
      <<<grid_for(ceil_div(count, activation_threads)), activation_threads, 0, stream>>>(a, b, out, count);
  check_launch("activation_forward_kernel");
}

template <Activation Act>
void launch_activation_backward(std::int64_t count, const float* a, const float* b, const float* dout, float* da,
                                float* db, cudaStream_t stream) {
  if (count == 0) return;
  activation_backward_kernel<Act>
      <<<grid_for(ceil_div(count, activation_threads)), activation_threads, 0, stream>>>(a, b, dout, da, db, count);
  check_launch("activation_backward_kernel");
}

}  // namespace detail

/// y = gelu_new(x). y may be x.
inline void gelu_new_forward(const TensorView& x, const TensorView& y, cudaStream_t stream) {
  const std::int64_t count = qlora::detail::check_elementwise("cuda::gelu_new", {{&x, "x"}, {&y, "y"}}, Device::cuda);
  detail::launch_activation_forward<Activation::gelu_new>(count, x.data<const float>(), nullptr, y.data<float>(), stream);
}

/// dx = dy · gelu_new'(x). dx may be dy or x.
inline void gelu_new_backward(const TensorView& x, const TensorView& dy, const TensorView& dx, cudaStream_t stream) {
  const std::int64_t count = qlora::detail::check_elementwise("cuda::gelu_new_backward",
                                                              {{&x, "x"}, {&dy, "dy"}, {&dx, "dx"}}, Device::cuda);
  detail::launch_activation_backward<Activation::gelu_new>(count, x.data<const float>(), nullptr,
                                                           dy.data<const float>(), dx.data<float>(), nullptr, stream);
}

/// y = silu(x). y may be x.
inline void silu_forward(const TensorView& x, const TensorView& y, cudaStream_t stream) {
  const std::int64_t count = qlora::detail::check_elementwise("cuda::silu", {{&x, "x"}, {&y, "y"}}, Device::cuda);
  detail::launch_activation_forward<Activation::silu>(count, x.data<const float>(), nullptr, y.data<float>(), stream);
}

/// dx = dy · silu'(x). dx may be dy or x.
inline void silu_backward(const TensorView& x, const TensorView& dy, const TensorView& dx, cudaStream_t stream) {
  const std::int64_t count = qlora::detail::check_elementwise("cuda::silu_backward",
                                                              {{&x, "x"}, {&dy, "dy"}, {&dx, "dx"}}, Device::cuda);
  detail::launch_activation_backward<Activation::silu>(count, x.data<const float>(), nullptr, dy.data<const float>(),
                                                       dx.data<float>(), nullptr, stream);
}

/// out = silu(gate) · up. out may be gate or up.
inline void swiglu_forward(const TensorView& gate, const TensorView& up, const TensorView& out, cudaStream_t stream) {
  const std::int64_t count = qlora::detail::check_elementwise(
      "cuda::swiglu", {{&gate, "gate"}, {&up, "up"}, {&out, "out"}}, Device::cuda);
  detail::launch_activation_forward<Activation::swiglu>(count, gate.data<const float>(), up.data<const float>(),
                                                        out.data<float>(), stream);
}

/// dgate = silu'(gate)·(dout·up), dup = dout·silu(gate). Either output may alias any input.
inline void swiglu_backward(const TensorView& gate, const TensorView& up, const TensorView& dout,
                            const TensorView& dgate, const TensorView& dup, cudaStream_t stream) {
  const std::int64_t count = qlora::detail::check_elementwise(
      "cuda::swiglu_backward", {{&gate, "gate"}, {&up, "up"}, {&dout, "dout"}, {&dgate, "dgate"}, {&dup, "dup"}},
      Device::cuda);
  detail::launch_activation_backward<Activation::swiglu>(count, gate.data<const float>(), up.data<const float>(),
                                                         dout.data<const float>(), dgate.data<float>(),
                                                         dup.data<float>(), stream);
}

}  // namespace qlora::cuda
