// LoraLinear<Quant, Compute, Backend>: a frozen base weight plus a trainable
// low-rank adapter — the QLoRA layer, with PEFT's maths:
//
//   y = x·W̃ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ        s = alpha/r  (alpha/sqrt(r) with rsLoRA)
//
// W̃ [out, in] is the base (Quant = NF4/FP4: 4-bit, dequantized tile by tile
// on every use; NoQuant: dense in Compute), A [r, in] and B [out, r] are fp32
// trainable weights, b [out] an fp32 bias (trainable when config.bias is not
// "none"). x, y, dx and dy are Compute (bf16, fp16 or float) tensors [T, features].
//
// Numerics (one rule on every backend, so CPU and CUDA agree up to the order
// of fp32 sums):
//   * base path: W̃ in Compute (bitsandbytes dequantizes to its compute dtype
//     too), products accumulated in fp32;
//   * adapter path: fp32 operands, as PEFT runs it (it casts x to the fp32
//     adapter dtype), so dA and dB are as accurate as the fp32 reference.
//     xa = drop(x)·Aᵀ and db are summed in double before one rounding to
//     fp32: a portable build has no FMA, and with a rounding per product
//     these two sums came out at 2-3x the error of torch's FMA-based CPU
//     GEMM (tests/lora/lora_linear_fixture_test.cpp); they are small (T x r, T x out);
//   * y and dx are rounded to Compute once, from the fp32 sum of base, bias
//     and adapter parts.
// Saved for backward (LoraActivations): x in Compute [T, in] and xa =
// drop(x)·Aᵀ in fp32 [T, r]; the dropout mask is regenerated from its Philox key.
//
// This header is the CPU backend (Eigen GEMMs on fp32 tiles, threads from
// core/parallel.hpp). The CUDA backend is cuda/lora_linear.cuh.
#pragma once

#include <qlora/core/device.hpp>
#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/core/detail/eigen_matrix.hpp>
#include <qlora/lora/detail/frozen_gemm.hpp>
#include <qlora/lora/detail/layer_arguments.hpp>
#include <qlora/lora/dropout.hpp>
#include <qlora/lora/frozen_weight.hpp>
#include <qlora/lora/lora_config.hpp>
#include <qlora/lora/lora_init.hpp>
#include <qlora/quant/nf4.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace qlora {

template <QuantPolicy Quant = NF4, FloatStorage Compute = bf16, Backend Target = Cpu>
class LoraLinear;

/// What a training forward keeps for its backward.
struct LoraActivations {
  Tensor x;             ///< the layer input, Compute [T, in]
  Tensor xa;            ///< drop(x)·Aᵀ, F32 [T, r]
  DropoutMask dropout;  ///< regenerates the forward's mask

  [[nodiscard]] std::int64_t tokens() const { return x.shape()[0]; }
  [[nodiscard]] std::size_t bytes() const { return x.byte_size() + xa.byte_size(); }
};

/// The error that re-quantizing the merged weight adds (merged 4-bit vs W̃ + s·B·A in fp32).
struct MergeReport {
  double max_abs_error = 0;
  double rms_error = 0;
  double relative_rms_error = 0;  ///< rms_error / rms of the exact merged weight
};

struct LoraLinearOptions {
  std::uint64_t init_seed = 0;    ///< Philox seed of A's initial values
  std::uint64_t init_stream = 0;  ///< tells layers apart under one seed (e.g. the module's index)
  unsigned threads = default_thread_count();
};

template <QuantPolicy Quant, FloatStorage Compute>
class LoraLinear<Quant, Compute, Cpu> {
 public:
  using Base = FrozenWeight<Quant, Compute>;

  /// The layer at module `path` (the name PEFT files use, e.g.
  /// "model.layers.0.mlp.fc1"). `bias` is [out] in any float dtype, or an empty
  /// view for none. A is initialised per config.init, B = 0.
  LoraLinear(std::string path, Base base, const TensorView& bias, const LoraConfig& config,
             const LoraLinearOptions& options = {})
      : path_(std::move(path)),
        base_(std::move(base)),
        rank_(checked_rank(config)),
        scaling_(config.scaling_for(path_)),
        dropout_probability_(static_cast<float>(config.lora_dropout)),
        bias_trainable_(config.bias != LoraBias::none),
        threads_(std::max(1u, options.threads)),
        a_(DType::F32, Shape{rank_, in_features()}),
        b_(DType::F32, Shape{out_features(), rank_}),
        grad_a_(DType::F32, Shape{rank_, in_features()}),
        grad_b_(DType::F32, Shape{out_features(), rank_}) {
    if (!detail::LayerArguments<Compute>::absent(bias)) {
      arguments().bias(bias, out_features());
      bias_ = Tensor(DType::F32, Shape{out_features()});
      grad_bias_ = Tensor(DType::F32, Shape{out_features()});
      detail::widen_into(bias, bias_->span<float>(), "bias");
    }
    init_lora_a<InitialRounding>(a_.span<float>(), rank_, in_features(), config.init, options.init_seed,
                                 options.init_stream);
  }

  /// What PEFT rounds A's initial values through: it casts the adapter to the
  /// base weight's dtype when that is a float type — the Compute type of a
  /// dense base; a bitsandbytes 4-bit weight is uint8, so A stays fp32.
  using InitialRounding = std::conditional_t<std::is_same_v<Quant, NoQuant>, Compute, float>;

  [[nodiscard]] const std::string& path() const noexcept { return path_; }
  [[nodiscard]] std::int64_t in_features() const noexcept { return base_.in_features(); }
  [[nodiscard]] std::int64_t out_features() const noexcept { return base_.out_features(); }
  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] float scaling() const noexcept { return scaling_; }
  [[nodiscard]] bool has_bias() const noexcept { return bias_.has_value(); }
  [[nodiscard]] bool bias_trainable() const noexcept { return has_bias() && bias_trainable_; }
  [[nodiscard]] const Base& base() const noexcept { return base_; }

  /// Trainable weights and their gradients (F32); an optimizer updates them in place.
  [[nodiscard]] const TensorView& lora_A() noexcept { return a_.view(); }
  [[nodiscard]] const TensorView& lora_B() noexcept { return b_.view(); }
  [[nodiscard]] const TensorView& grad_A() const noexcept { return grad_a_.view(); }
  [[nodiscard]] const TensorView& grad_B() const noexcept { return grad_b_.view(); }
  /// Empty views when the layer has no bias.
  [[nodiscard]] TensorView bias() const noexcept { return bias_ ? bias_->view() : TensorView{}; }
  [[nodiscard]] TensorView grad_bias() const noexcept { return grad_bias_ ? grad_bias_->view() : TensorView{}; }

  /// Replaces A [r, in] and B [out, r] (F32, F16 or BF16), e.g. from a PEFT
  /// file. Refused on a merged layer, whose merged base would go stale.
  void set_adapter_weights(const TensorView& a, const TensorView& b) {
    check(!merged_, "AdapterMerged", "{}: set_adapter_weights on a merged layer; unmerge() first", path_);
    arguments().adapter_factors(a, b, rank_, in_features(), out_features());
    detail::widen_into(a, a_.span<float>(), "lora_A");
    detail::widen_into(b, b_.span<float>(), "lora_B");
  }

  /// Replaces the bias [out] (any float dtype), e.g. a trained one from a PEFT file.
  void set_bias(const TensorView& bias) {
    check(has_bias(), "ShapeMismatch", "{}: set_bias on a layer built without a bias", path_);
    check(!merged_, "AdapterMerged", "{}: set_bias on a merged layer; unmerge() first", path_);
    arguments().bias(bias, out_features());
    detail::widen_into(bias, bias_->span<float>(), "bias");
  }

  void zero_grad() {
    for (Tensor* grad : {&grad_a_, &grad_b_}) std::ranges::fill(grad->span<float>(), 0.0f);
    if (grad_bias_) std::ranges::fill(grad_bias_->span<float>(), 0.0f);
  }

  /// With the adapter disabled the layer is its base alone (PEFT's disable_adapter).
  void set_adapter_enabled(bool enabled) noexcept { adapter_enabled_ = enabled; }
  [[nodiscard]] bool adapter_enabled() const noexcept { return adapter_enabled_; }

  /// Inference: y = x·W̃ᵀ + b (+ the adapter unless disabled or merged). No dropout.
  void forward(const TensorView& x, const TensorView& y) const {
    const std::int64_t tokens = arguments().input_output(x, in_features(), y, out_features());
    const std::vector<float> x_float = detail::widened(x);
    const Base& weight = merged_ && adapter_enabled_ ? *merged_ : base_;  // disabled: the base alone
    if (!adapter_active()) {
      project(weight, x_float.data(), tokens, nullptr, y);
      return;
    }
    const std::vector<float> xa = adapter_down(x_float.data(), tokens, DropoutMask{});
    project(weight, x_float.data(), tokens, xa.data(), y);
  }

  /// Training forward: as forward(), with dropout on the adapter input drawn
  /// from `key`; returns what backward() needs. With lora_dropout > 0 the key
  /// is required: a default one would give every step the same mask.
  [[nodiscard]] LoraActivations forward_train(const TensorView& x, const TensorView& y,
                                              std::optional<DropoutKey> key = std::nullopt) const {
    arguments().training_forward(merged_.has_value(), adapter_enabled_, key.has_value(), dropout_probability_);
    const std::int64_t tokens = arguments().input_output(x, in_features(), y, out_features());
    LoraActivations saved{Tensor(dtype_of_v<Compute>, x.shape()), Tensor(DType::F32, Shape{tokens, rank_}),
                          DropoutMask{key.value_or(DropoutKey{}), dropout_probability_}};
    std::ranges::copy(x.span<const Compute>(), saved.x.span<Compute>().begin());
    const std::vector<float> x_float = detail::widened(x);
    const std::vector<float> xa = adapter_down(x_float.data(), tokens, saved.dropout);
    std::ranges::copy(xa, saved.xa.span<float>().begin());
    project(base_, x_float.data(), tokens, xa.data(), y);
    return saved;
  }

  /// Backward of forward_train: accumulates dA, dB (and db when trained) into
  /// the gradients and writes dx (Compute [T, in]) unless `dx` is an empty view.
  void backward(const LoraActivations& saved, const TensorView& dy, const TensorView& dx) {
    const std::int64_t tokens = saved.tokens();
    arguments().tensor(dy, {tokens, out_features()}, "dy");
    const bool want_dx = !detail::LayerArguments<Compute>::absent(dx);
    if (want_dx) arguments().tensor(dx, {tokens, in_features()}, "dx");
    arguments().tensor(saved.x.view(), {tokens, in_features()}, "saved x");
    check(saved.xa.dtype() == DType::F32 && saved.xa.shape() == Shape{tokens, rank_}, "ShapeMismatch",
          "{}: saved xa is {} {}, expected F32 [{}, {}]: activations from another layer", path_,
          dtype_name(saved.xa.dtype()), saved.xa.shape().to_string(), tokens, rank_);
    const std::vector<float> dy_float = detail::widened(dy);
    const float* g = dy_float.data();
    const std::int64_t in = in_features(), out = out_features();

    // gb = dy·B [T, r]: the gradient reaching xa, before scaling.
    std::vector<float> gb(static_cast<std::size_t>(tokens * rank_));
    parallel_for(tokens, 64, [&](std::int64_t t0, std::int64_t t1) {
      detail::matrix(gb.data() + t0 * rank_, t1 - t0, rank_, rank_).noalias() =
          detail::matrix(g + t0 * out, t1 - t0, out, out) * detail::matrix(b_data(), out, rank_, rank_);
    }, threads_);
    // dB += s·dyᵀ·xa and db += Σ_t dy, by rows of B.
    parallel_for(out, 64, [&](std::int64_t o0, std::int64_t o1) {
      const auto dy_rows = detail::matrix(g + o0, tokens, o1 - o0, out);
      detail::matrix(grad_b_.span<float>().data() + o0 * rank_, o1 - o0, rank_, rank_).noalias() +=
          scaling_ * (dy_rows.transpose() * detail::matrix(saved.xa.span<const float>().data(), tokens, rank_, rank_));
      if (bias_trainable()) {
        detail::matrix(grad_bias_->span<float>().data() + o0, 1, o1 - o0, out) +=
            dy_rows.template cast<double>().colwise().sum().template cast<float>();
      }
    }, threads_);

    // dA += s·gbᵀ·drop(x), by columns of the input.
    std::vector<float> x_dropped = detail::widened(saved.x.view());
    apply_dropout(x_dropped.data(), tokens, saved.dropout);
    const auto gb_matrix = detail::matrix(gb.data(), tokens, rank_, rank_);
    parallel_for(in, 64, [&](std::int64_t c0, std::int64_t c1) {
      detail::matrix(grad_a_.span<float>().data() + c0, rank_, c1 - c0, in).noalias() +=
          scaling_ * (gb_matrix.transpose() * detail::matrix(x_dropped.data() + c0, tokens, c1 - c0, in));
    }, threads_);
    if (!want_dx) return;
    // dx = dy·W̃ + s·drop'(gb·A).
    detail::backward_input_frozen<Compute>(base_, g, tokens, dx, threads_, [&](auto& acc, std::int64_t c0, std::int64_t c1) {
      acc.noalias() = scaling_ * (gb_matrix * detail::matrix(a_data() + c0, rank_, c1 - c0, in));
      if (!saved.dropout.active()) return;
      for (std::int64_t t = 0; t < tokens; ++t) {
        for (std::int64_t c = c0; c < c1; ++c) acc(t, c - c0) *= saved.dropout.factor(t * in + c);
      }
    });
  }

  /// The dense merged weight W̃ + s·B·A, F32 [out, in] (W̃ as the forward uses it).
  [[nodiscard]] Tensor merged_weight() const {
    const std::int64_t in = in_features(), out = out_features();
    Tensor merged(DType::F32, Shape{out, in});
    float* data = merged.span<float>().data();
    parallel_for(out, 64, [&](std::int64_t o0, std::int64_t o1) {
      base_.dequantize_tile(o0, o1, 0, in, data + o0 * in, in);
      detail::matrix(data + o0 * in, o1 - o0, in, in).noalias() +=
          scaling_ * (detail::matrix(b_data() + o0 * rank_, o1 - o0, rank_, rank_) * detail::matrix(a_data(), rank_, in, in));
    }, threads_);
    return merged;
  }

  /// Folds the adapter into a merged base (re-quantized to Quant with the
  /// base's blocksize and double quantization; NoQuant: rounded to Compute)
  /// that forward() then uses alone. The original base is kept, so unmerge()
  /// is exact. Returns the error the merged base has against W̃ + s·B·A.
  MergeReport merge() {
    check(!merged_, "AdapterMerged", "{}: already merged", path_);
    const Tensor exact = merged_weight();
    Base merged = store_merged(exact.view());
    const std::int64_t in = in_features(), out = out_features();
    std::vector<float> stored(static_cast<std::size_t>(out * in));
    merged.dequantize_tile(0, out, 0, in, stored.data(), in);
    MergeReport report;
    double sum_squared_error = 0, sum_squared = 0;
    const auto values = exact.span<const float>();
    for (std::size_t i = 0; i < stored.size(); ++i) {
      const double error = static_cast<double>(stored[i]) - values[i];
      report.max_abs_error = std::max(report.max_abs_error, std::abs(error));
      sum_squared_error += error * error;
      sum_squared += static_cast<double>(values[i]) * values[i];
    }
    report.rms_error = std::sqrt(sum_squared_error / static_cast<double>(stored.size()));
    report.relative_rms_error = sum_squared > 0 ? std::sqrt(sum_squared_error / sum_squared) : 0.0;
    merged_.emplace(std::move(merged));
    return report;
  }
  void unmerge() noexcept { merged_.reset(); }
  [[nodiscard]] bool merged() const noexcept { return merged_.has_value(); }

  /// Bytes the layer holds: base (and merged copy), A, B, their gradients and the bias.
  [[nodiscard]] std::size_t bytes() const {
    std::size_t total = base_.bytes() + (merged_ ? merged_->bytes() : 0) + a_.byte_size() + b_.byte_size() +
                        grad_a_.byte_size() + grad_b_.byte_size();
    if (bias_) total += bias_->byte_size() + grad_bias_->byte_size();
    return total;
  }

 private:
  /// The config's rank for this layer, after checking that it fits the base (runs before A and B are sized).
  int checked_rank(const LoraConfig& config) const {
    config.validate_for(path_, in_features(), out_features());
    return config.rank_for(path_);
  }

  [[nodiscard]] bool adapter_active() const noexcept { return adapter_enabled_ && !merged_; }
  [[nodiscard]] const float* a_data() const { return a_.view().data<const float>(); }
  [[nodiscard]] const float* b_data() const { return b_.view().data<const float>(); }

  Base store_merged(const TensorView& exact) const {
    if constexpr (std::is_same_v<Quant, NoQuant>) {
      return Base(exact);
    } else {
      const QuantState& state = base_.quantized().state;
      return Base::quantize(exact, {.blocksize = state.blocksize, .double_quant = state.nested.has_value(),
                                    .threads = threads_});
    }
  }

  /// xa = drop(x)·Aᵀ [T, r], summed in double (see the header comment) in
  /// chunks of 32 tokens so the double copy of x stays small.
  std::vector<float> adapter_down(const float* x, std::int64_t tokens, const DropoutMask& dropout) const {
    const std::int64_t in = in_features();
    std::vector<float> x_dropped;
    if (dropout.active()) {
      x_dropped.assign(x, x + tokens * in);
      apply_dropout(x_dropped.data(), tokens, dropout);
      x = x_dropped.data();
    }
    std::vector<float> xa(static_cast<std::size_t>(tokens * rank_));
    const Eigen::MatrixXd a_double = detail::matrix(a_data(), rank_, in, in).template cast<double>();
    parallel_for(tokens, 32, [&](std::int64_t t0, std::int64_t t1) {
      for (std::int64_t c0 = t0; c0 < t1; c0 += 32) {
        const std::int64_t rows = std::min<std::int64_t>(32, t1 - c0);
        const Eigen::MatrixXd x_double = detail::matrix(x + c0 * in, rows, in, in).template cast<double>();
        detail::matrix(xa.data() + c0 * rank_, rows, rank_, rank_) = (x_double * a_double.transpose()).template cast<float>();
      }
    }, threads_);
    return xa;
  }

  void apply_dropout(float* x, std::int64_t tokens, const DropoutMask& dropout) const {
    if (!dropout.active()) return;
    const std::int64_t count = tokens * in_features();
    parallel_for(count, 1 << 16, [&](std::int64_t i0, std::int64_t i1) {
      for (std::int64_t i = i0; i < i1; ++i) x[i] *= dropout.factor(static_cast<std::uint64_t>(i));
    }, threads_);
  }

  /// y = round(x·Wᵀ + b + s·xa·Bᵀ); xa == nullptr: no adapter.
  void project(const Base& weight, const float* x, std::int64_t tokens, const float* xa, const TensorView& y) const {
    const float* bias = bias_ ? bias_->view().data<const float>() : nullptr;
    detail::project_frozen<Compute>(weight, x, tokens, bias, y, threads_, [&](auto& acc, std::int64_t r0, std::int64_t rows) {
      if (xa == nullptr) return;
      acc.noalias() += scaling_ * (detail::matrix(xa, tokens, rank_, rank_) *
                                   detail::matrix(b_data() + r0 * rank_, rows, rank_, rank_).transpose());
    });
  }

  [[nodiscard]] detail::LayerArguments<Compute> arguments() const noexcept { return {path_, Device::cpu}; }

  std::string path_;
  Base base_;
  std::optional<Base> merged_;
  int rank_;
  float scaling_;
  float dropout_probability_;
  bool bias_trainable_;
  bool adapter_enabled_ = true;
  unsigned threads_;
  Tensor a_, b_, grad_a_, grad_b_;
  std::optional<Tensor> bias_, grad_bias_;
};

}  // namespace qlora
