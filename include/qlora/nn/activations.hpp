// The MLP activations of Phi-2 and InternLM2, forward and backward, element
// by element on F32 tensors of any shape:
//
//   gelu_new(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))   transformers' NewGELUActivation (Phi-2)
//   silu(x)     = x / (1 + exp(−x))                            torch.nn.functional.silu
//   swiglu(g,u) = silu(g)·u                                    InternLM2's w2(silu(w1 x) * w3 x)
//
// Each forward evaluates its formula in fp32 in the order transformers' or
// torch's CPU kernel does (every intermediate rounded to fp32, as the chain
// of torch ops rounds it), and each backward in the order autograd chains
// the ops' derivatives, so results agree with torch to a few ulp. exp and
// tanh are Eigen's vectorised ones; the rest are plain loops the compiler
// vectorises. Work is cut into blocks of a few hundred elements (their
// intermediates stay in L1) spread over threads; every output element
// depends only on the same element of the inputs, read before it is
// written, so any output may alias any input (y = x in place, dx = dy, ...).
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/tensor_view.hpp>
#include <qlora/nn/detail/f32_arguments.hpp>
#include <qlora/nn/detail/row_reduction.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <string_view>
#include <utility>

namespace qlora {

namespace detail {

/// Elements per block: the intermediates of a block fit in L1 next to its operands.
inline constexpr std::int64_t activation_block = 512;

using ActivationScratch = std::array<float, static_cast<std::size_t>(activation_block)>;

/// Calls body(begin, end, scratch) on blocks of at most activation_block
/// elements covering [0, count), over up to `threads` threads.
template <class Body>
void for_activation_blocks(std::int64_t count, Body&& body, unsigned threads) {
  parallel_for(
      count, min_parallel_elements,
      [&](std::int64_t begin, std::int64_t end) {
        ActivationScratch scratch;
        for (std::int64_t block = begin; block < end; block += activation_block) {
          body(block, std::min(end, block + activation_block), scratch.data());
        }
      },
      threads);
}

/// values[i] = exp(values[i]) / tanh(values[i]), vectorised by Eigen.
inline void exp_in_place(float* values, std::int64_t count) {
  Eigen::Map<Eigen::ArrayXf> a(values, count);
  a = a.exp();
}
/// Eigen's tanh is a rational approximation accurate relative to 1, and clamped
/// at |u| ≈ 7.9; but gelu_new needs 1 + tanh(u) and 1 − tanh², which are tiny
/// in the tails. Past |u| = 0.625 we use 1 − 2/(exp(2|u|) + 1) instead, whose
/// error is relative to that distance from 1 (as torch's Sleef tanh is).
inline void tanh_in_place(float* values, std::int64_t count) {
  Eigen::Map<Eigen::ArrayXf> a(values, count);
  a = (a.abs() < 0.625f).select(a.tanh(), a.sign() * (1.0f - 2.0f / ((2.0f * a.abs()).exp() + 1.0f)));
}

// transformers writes the constants as Python floats; torch rounds them to
// fp32 for an fp32 tensor.
inline constexpr float gelu_sqrt_2_over_pi = 0.7978845608028654f;  // math.sqrt(2.0 / math.pi)
inline constexpr float gelu_cubic = 0.044715f;

/// scratch[i] = √(2/π)·(x + 0.044715·x³) for the elements [begin, end) of x.
inline void gelu_new_inner(const float* x, std::int64_t begin, std::int64_t end, float* scratch) {
  for (std::int64_t i = begin; i < end; ++i) {
    const float v = x[i];
    scratch[i - begin] = gelu_sqrt_2_over_pi * (v + gelu_cubic * (v * v * v));
  }
}

/// scratch[i] = exp(−x) for the elements [begin, end) of x: silu's and sigmoid's denominator is 1 + scratch[i].
inline void exp_of_negated(const float* x, std::int64_t begin, std::int64_t end, float* scratch) {
  for (std::int64_t i = begin; i < end; ++i) scratch[i - begin] = -x[i];
  exp_in_place(scratch, end - begin);
}

/// What an element-wise op's arguments must be: F32 tensors on `device` with as many elements as the first.
inline std::int64_t check_elementwise(std::string_view op, std::initializer_list<std::pair<const TensorView*, std::string_view>> tensors,
                                      Device device = Device::cpu) {
  const F32Arguments args{op, device};
  const auto& [first, first_name] = *tensors.begin();
  for (const auto& [tensor, name] : tensors) args.same_size(*tensor, name, *first, first_name);
  return first->numel();
}

}  // namespace detail

/// y = gelu_new(x) (transformers' NewGELUActivation). y may be x.
inline void gelu_new_forward(const TensorView& x, const TensorView& y, unsigned threads = default_thread_count()) {
  const std::int64_t count = detail::check_elementwise("gelu_new", {{&x, "x"}, {&y, "y"}});
  const float* xs = x.data<const float>();
  float* ys = y.data<float>();
  detail::for_activation_blocks(
      count,
      [&](std::int64_t begin, std::int64_t end, float* tanh_inner) {
        detail::gelu_new_inner(xs, begin, end, tanh_inner);
        detail::tanh_in_place(tanh_inner, end - begin);
        for (std::int64_t i = begin; i < end; ++i) ys[i] = (0.5f * xs[i]) * (1.0f + tanh_inner[i - begin]);
      },
      threads);
}

/// dx = dy · gelu_new'(x). dx may be dy or x.
inline void gelu_new_backward(const TensorView& x, const TensorView& dy, const TensorView& dx,
                              unsigned threads = default_thread_count()) {
  const std::int64_t count = detail::check_elementwise("gelu_new_backward", {{&x, "x"}, {&dy, "dy"}, {&dx, "dx"}});
  const float* xs = x.data<const float>();
  const float* dys = dy.data<const float>();
  float* dxs = dx.data<float>();
  detail::for_activation_blocks(
      count,
      [&](std::int64_t begin, std::int64_t end, float* tanh_inner) {
        detail::gelu_new_inner(xs, begin, end, tanh_inner);
        detail::tanh_in_place(tanh_inner, end - begin);
        for (std::int64_t i = begin; i < end; ++i) {
          // Autograd's chain through 0.5·x·(1 + tanh(k·(x + c·x³))): the gradient
          // reaching the tanh argument's sum, then its three paths back to x.
          const float v = xs[i];
          const float grad = dys[i];
          const float th = tanh_inner[i - begin];
          const float through_sum = ((grad * (0.5f * v)) * (1.0f - th * th)) * detail::gelu_sqrt_2_over_pi;
          const float through_cube = (through_sum * detail::gelu_cubic) * (3.0f * (v * v));
          dxs[i] = ((grad * (1.0f + th)) * 0.5f + through_sum) + through_cube;
        }
      },
      threads);
}

/// y = silu(x) = x / (1 + exp(−x)). y may be x.
inline void silu_forward(const TensorView& x, const TensorView& y, unsigned threads = default_thread_count()) {
  const std::int64_t count = detail::check_elementwise("silu", {{&x, "x"}, {&y, "y"}});
  const float* xs = x.data<const float>();
  float* ys = y.data<float>();
  detail::for_activation_blocks(
      count,
      [&](std::int64_t begin, std::int64_t end, float* exp_neg) {
        detail::exp_of_negated(xs, begin, end, exp_neg);
        for (std::int64_t i = begin; i < end; ++i) ys[i] = xs[i] / (1.0f + exp_neg[i - begin]);
      },
      threads);
}

/// dx = dy · silu'(x) = dy · σ(x) · (1 + x·(1 − σ(x))), as torch's silu_backward. dx may be dy or x.
inline void silu_backward(const TensorView& x, const TensorView& dy, const TensorView& dx,
                          unsigned threads = default_thread_count()) {
  const std::int64_t count = detail::check_elementwise("silu_backward", {{&x, "x"}, {&dy, "dy"}, {&dx, "dx"}});
  const float* xs = x.data<const float>();
  const float* dys = dy.data<const float>();
  float* dxs = dx.data<float>();
  detail::for_activation_blocks(
      count,
      [&](std::int64_t begin, std::int64_t end, float* exp_neg) {
        detail::exp_of_negated(xs, begin, end, exp_neg);
        for (std::int64_t i = begin; i < end; ++i) {
          const float sigmoid = 1.0f / (1.0f + exp_neg[i - begin]);
          dxs[i] = (dys[i] * sigmoid) * (1.0f + xs[i] * (1.0f - sigmoid));
        }
      },
      threads);
}

/// out = silu(gate) · up. out may be gate or up.
inline void swiglu_forward(const TensorView& gate, const TensorView& up, const TensorView& out,
                           unsigned threads = default_thread_count()) {
  const std::int64_t count = detail::check_elementwise("swiglu", {{&gate, "gate"}, {&up, "up"}, {&out, "out"}});
  const float* gates = gate.data<const float>();
  const float* ups = up.data<const float>();
  float* outs = out.data<float>();
  detail::for_activation_blocks(
      count,
      [&](std::int64_t begin, std::int64_t end, float* exp_neg) {
        detail::exp_of_negated(gates, begin, end, exp_neg);
        for (std::int64_t i = begin; i < end; ++i) outs[i] = (gates[i] / (1.0f + exp_neg[i - begin])) * ups[i];
      },
      threads);
}

/// dgate = silu'(gate)·(dout·up) and dup = dout·silu(gate). Either output may alias any input.
inline void swiglu_backward(const TensorView& gate, const TensorView& up, const TensorView& dout,
                            const TensorView& dgate, const TensorView& dup, unsigned threads = default_thread_count()) {
  const std::int64_t count = detail::check_elementwise(
      "swiglu_backward", {{&gate, "gate"}, {&up, "up"}, {&dout, "dout"}, {&dgate, "dgate"}, {&dup, "dup"}});
  const float* gates = gate.data<const float>();
  const float* ups = up.data<const float>();
  const float* douts = dout.data<const float>();
  float* dgates = dgate.data<float>();
  float* dups = dup.data<float>();
  detail::for_activation_blocks(
      count,
      [&](std::int64_t begin, std::int64_t end, float* exp_neg) {
        detail::exp_of_negated(gates, begin, end, exp_neg);
        for (std::int64_t i = begin; i < end; ++i) {
          const float g = gates[i];
          const float grad = douts[i];
          const float u = ups[i];
          const float denominator = 1.0f + exp_neg[i - begin];
          const float sigmoid = 1.0f / denominator;
          dups[i] = grad * (g / denominator);
          dgates[i] = ((grad * u) * sigmoid) * (1.0f + g * (1.0f - sigmoid));
        }
      },
      threads);
}

}  // namespace qlora
