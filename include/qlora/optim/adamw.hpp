// AdamW: the optimizer behind the HF Trainer's optim="paged_adamw_32bit" —
// bitsandbytes.optim.AdamW with 32-bit state (kOptimizer32bit2State<ADAM>).
// "Paged" only says where bitsandbytes keeps the state (unified memory); the
// maths is this, per element, with fp32 state m, v and the 1-based step t:
//
//   m ← β1·m + (1−β1)·g          v ← β2·v + (1−β2)·g²
//   p ← p − lr·(sqrt(1−β2^t)/(1−β1^t)) · m / (sqrt(v) + eps·sqrt(1−β2^t))
//   p ← p·(1 − lr·wd)            weight decay, after the step (bitsandbytes'
//                                CUDA kernel) or before it (torch.optim.AdamW)
//
// which is torch's m̂/(sqrt(v̂)+eps) rearranged. The per-step scalars are
// computed in double and rounded to fp32 once (as bitsandbytes' CPU backend
// and torch do); the per-element work is fp32, in the kernel's order.
//
// The optimizer does not check gradients for inf/NaN: the trainer does, before
// clipping, and skips the step. It neither zeroes gradients nor owns the
// parameters: it updates the caller's F32 tensors in place.
//
// save_state / load_state keep m and v in a safetensors file (`<name>.exp_avg`,
// `<name>.exp_avg_sq`) with the step count and options in its metadata, so a
// resumed run continues bit for bit.
#pragma once

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/core/tensor_view.hpp>
#include <qlora/optim/adamw_options.hpp>
#include <qlora/optim/detail/adamw_state_file.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <ranges>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace qlora {

namespace detail {

/// The fp32 scalars of one step, each computed in double and rounded once.
struct AdamWCoefficients {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float step_size;     ///< −lr·sqrt(1−β2^t)/(1−β1^t)
  float scaled_eps;    ///< eps·sqrt(1−β2^t)
  float decay_factor;  ///< 1 − lr·wd

  AdamWCoefficients(const AdamWOptions& options, std::int64_t t, double lr)
      : beta1(static_cast<float>(options.beta1)),
        one_minus_beta1(static_cast<float>(1.0 - options.beta1)),
        beta2(static_cast<float>(options.beta2)),
        one_minus_beta2(static_cast<float>(1.0 - options.beta2)),
        step_size(0),
        scaled_eps(0),
        decay_factor(static_cast<float>(1.0 - lr * options.weight_decay)) {
    const double correction1 = 1.0 - std::pow(options.beta1, static_cast<double>(t));
    const double correction2 = std::sqrt(1.0 - std::pow(options.beta2, static_cast<double>(t)));
    step_size = static_cast<float>(-lr * correction2 / correction1);
    scaled_eps = static_cast<float>(options.eps * correction2);
  }
};

enum class DecayAt { none, before, after };

/// The update of elements [0, n) of one parameter, written as the kernel
/// writes it: a plain loop over restrict pointers. Compilers vectorise it only
/// under -fno-math-errno (std::sqrt may set errno); that flag changes no
/// result, as SIMD sqrt and division are correctly rounded too.
template <DecayAt decay>
void adamw_update(float* __restrict param, const float* __restrict grad, float* __restrict exp_avg,
                  float* __restrict exp_avg_sq, std::int64_t n, const AdamWCoefficients& c) {
  for (std::int64_t i = 0; i < n; ++i) {
    const float g = grad[i];
    const float m = exp_avg[i] * c.beta1 + c.one_minus_beta1 * g;
    const float v = exp_avg_sq[i] * c.beta2 + c.one_minus_beta2 * (g * g);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    const float update = c.step_size * (m / (std::sqrt(v) + c.scaled_eps));
    if constexpr (decay == DecayAt::before) {
      param[i] = param[i] * c.decay_factor + update;
    } else if constexpr (decay == DecayAt::after) {
      param[i] = (param[i] + update) * c.decay_factor;
    } else {
      param[i] = param[i] + update;
    }
  }
}

/// The update of one parameter: of its weight-decay group (`decay`), in the options' decay order.
using AdamWUpdate = void (*)(float*, const float*, float*, float*, std::int64_t, const AdamWCoefficients&);
inline AdamWUpdate adamw_update_for(bool decay, const AdamWOptions& options) {
  if (!decay || options.weight_decay <= 0) return &adamw_update<DecayAt::none>;
  return options.decay_order == AdamWOptions::DecayOrder::before_step ? &adamw_update<DecayAt::before>
                                                                      : &adamw_update<DecayAt::after>;
}

/// `options` after AdamW's checks: Error("InvalidArgument") unless 0 ≤ β1, β2 < 1, eps ≥ 0 and
/// weight_decay ≥ 0 (bitsandbytes' and torch's checks), all finite; threads at least 1.
inline AdamWOptions checked(AdamWOptions options) {
  const auto in_unit = [](double beta) { return beta >= 0 && beta < 1; };
  check(in_unit(options.beta1), "InvalidArgument", "AdamW: beta1 {} is not in [0, 1)", options.beta1);
  check(in_unit(options.beta2), "InvalidArgument", "AdamW: beta2 {} is not in [0, 1)", options.beta2);
  check(std::isfinite(options.eps) && options.eps >= 0, "InvalidArgument", "AdamW: eps {} is not a finite value ≥ 0",
        options.eps);
  check(std::isfinite(options.weight_decay) && options.weight_decay >= 0, "InvalidArgument",
        "AdamW: weight_decay {} is not a finite value ≥ 0", options.weight_decay);
  options.threads = std::max(1u, options.threads);
  return options;
}

/// A parameter or gradient an optimizer updates in place: a contiguous F32 host tensor with data.
inline void check_trainable_tensor(std::string_view optimizer, std::string_view name, std::string_view what,
                                   const TensorView& t) {
  check(t.dtype() == DType::F32, "DTypeMismatch", "{}: the {} of `{}` is {}, expected F32", optimizer, what, name,
        dtype_name(t.dtype()));
  check(t.device() == Device::cpu, "DeviceMismatch", "{}: the {} of `{}` is on {}, expected the host", optimizer, what,
        name, device_name(t.device()));
  check(t.is_contiguous(), "NotContiguous", "{}: the {} of `{}` is not contiguous", optimizer, what, name);
  check(t.numel() == 0 || t.raw_data() != nullptr, "NullPointer", "{}: the {} of `{}` has no data", optimizer, what,
        name);
}

}  // namespace detail

class AdamW {
 public:
  /// Throws Error("InvalidArgument") unless 0 ≤ β1, β2 < 1, eps ≥ 0 and
  /// weight_decay ≥ 0 (bitsandbytes' and torch's checks), all finite.
  explicit AdamW(AdamWOptions options = {}) : options_(detail::checked(options)) {}

  /// Registers a trainable parameter and its gradient: contiguous F32 host
  /// tensors of one shape, which must outlive the optimizer. `decay` false puts
  /// it in the Trainer's no-decay group (biases, norms). Its state starts at
  /// zero. Throws DuplicateParameter, DTypeMismatch, ShapeMismatch,
  /// NotContiguous, DeviceMismatch (naming the parameter), and
  /// Error("InvalidArgument") once the optimizer has stepped (bitsandbytes
  /// counts steps per parameter; here every parameter shares one count).
  void add(std::string name, const TensorView& param, const TensorView& grad, bool decay = true) {
    check(steps_ == 0, "InvalidArgument", "AdamW: parameter `{}` added after {} steps; add every parameter first", name,
          steps_);
    check(!names_.contains(name), "DuplicateParameter", "AdamW: parameter `{}` was added twice", name);
    detail::check_trainable_tensor("AdamW", name, "parameter", param);
    detail::check_trainable_tensor("AdamW", name, "gradient", grad);
    check(param.shape() == grad.shape(), "ShapeMismatch", "AdamW: parameter `{}` is {} but its gradient is {}", name,
          param.shape().to_string(), grad.shape().to_string());
    names_.insert(name);
    parameters_.push_back({std::move(name), param, grad, decay, Tensor(DType::F32, param.shape()),
                           Tensor(DType::F32, param.shape())});
    const std::size_t index = parameters_.size() - 1;
    for (std::int64_t begin = 0; begin < param.numel(); begin += chunk_elements) {
      chunks_.push_back({index, begin, std::min(chunk_elements, param.numel() - begin)});
    }
  }

  /// One optimizer step at learning rate `lr` over every parameter, reading the
  /// gradients as they are now. Throws Error("InvalidArgument") for a negative
  /// or non-finite lr, before touching anything.
  void step(double lr) {
    check(std::isfinite(lr) && lr >= 0, "InvalidArgument", "AdamW: learning rate {} is not a finite value ≥ 0", lr);
    const detail::AdamWCoefficients coefficients(options_, steps_ + 1, lr);
    parallel_for(
        static_cast<std::int64_t>(chunks_.size()), chunks_per_thread,
        [&](std::int64_t begin, std::int64_t end) {
          for (auto c = static_cast<std::size_t>(begin); c < static_cast<std::size_t>(end); ++c) {
            const Chunk& chunk = chunks_[c];
            const Parameter& p = parameters_[chunk.parameter];
            detail::adamw_update_for(p.decay, options_)(
                p.param.data<float>() + chunk.begin, p.grad.data<float>() + chunk.begin,
                p.exp_avg.view().data<float>() + chunk.begin, p.exp_avg_sq.view().data<float>() + chunk.begin,
                chunk.size, coefficients);
          }
        },
        options_.threads);
    ++steps_;
  }

  /// Optimizer steps taken (restored by load_state).
  [[nodiscard]] std::int64_t steps() const noexcept { return steps_; }
  /// Bytes of optimizer state: two fp32 values per parameter element.
  [[nodiscard]] std::size_t state_bytes() const noexcept {
    std::size_t bytes = 0;
    for (const Parameter& p : parameters_) bytes += p.exp_avg.byte_size() + p.exp_avg_sq.byte_size();
    return bytes;
  }
  [[nodiscard]] const AdamWOptions& options() const noexcept { return options_; }
  /// The first moment m of parameter `name` (F32, its shape); throws Error("UnknownParameter").
  [[nodiscard]] const TensorView& exp_avg(std::string_view name) const { return parameter(name).exp_avg.view(); }
  /// The second moment v of parameter `name`; throws Error("UnknownParameter").
  [[nodiscard]] const TensorView& exp_avg_sq(std::string_view name) const {
    return parameter(name).exp_avg_sq.view();
  }

  /// Writes the state to `file` (safetensors, optim/detail/adamw_state_file.hpp)
  /// atomically: a crash or an error leaves the previous file or none, never a torn one.
  void save_state(const std::filesystem::path& file) const {
    std::vector<detail::AdamWStateEntry> entries;
    for (const Parameter& p : parameters_)
      entries.push_back({p.name, p.exp_avg.shape(), p.decay, p.exp_avg.span<const float>(),
                         p.exp_avg_sq.span<const float>()});
    detail::write_adamw_state(file, options_, steps_, entries);
  }

  /// Restores the state save_state wrote. All or nothing: the file must hold
  /// exactly this optimizer's parameters (names, shapes, decay groups) and
  /// options, else Error("OptimizerStateMismatch") naming the file and what
  /// differs; a malformed file throws the safetensors reader's error. On any
  /// error the optimizer is unchanged.
  void load_state(const std::filesystem::path& file) {
    std::vector<detail::AdamWStateEntry> entries;
    for (const Parameter& p : parameters_) entries.push_back({p.name, p.exp_avg.shape(), p.decay, {}, {}});
    const detail::AdamWStateFile saved(file, options_, entries);
    // Everything is checked: nothing below can throw.
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      saved.read_exp_avg(i, parameters_[i].exp_avg.span<float>());
      saved.read_exp_avg_sq(i, parameters_[i].exp_avg_sq.span<float>());
    }
    steps_ = saved.steps();
  }

 private:
  struct Parameter {
    std::string name;
    TensorView param;
    TensorView grad;
    bool decay;
    Tensor exp_avg;
    Tensor exp_avg_sq;
  };
  /// A slice of one parameter: the unit of work handed to a thread.
  struct Chunk {
    std::size_t parameter;
    std::int64_t begin;
    std::int64_t size;
  };

  static constexpr std::int64_t chunk_elements = std::int64_t{1} << 14;
  /// A thread must get at least this many chunks to be worth starting.
  static constexpr std::int64_t chunks_per_thread = 4;
  const Parameter& parameter(std::string_view name) const {
    const auto found = std::ranges::find(parameters_, name, &Parameter::name);
    check(found != parameters_.end(), "UnknownParameter", "AdamW: no parameter `{}`", name);
    return *found;
  }

  AdamWOptions options_;
  std::vector<Parameter> parameters_;
  std::set<std::string, std::less<>> names_;
  std::vector<Chunk> chunks_;
  std::int64_t steps_ = 0;
};

}  // namespace qlora
