// LoraLinear<Quant, Compute, Cuda>: the CUDA backend of the QLoRA layer
// (lora/lora_linear.hpp is the CPU backend and the specification):
//
//   y = x·W̃ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ        s = alpha/r  (alpha/sqrt(r) with rsLoRA)
//
// Same maths, same numerics rule, same public interface, with device tensors:
// x, y, dx and dy are device TensorViews (Device::cuda, contiguous) of Compute
// [T, features]; the trainable A, B, the bias and their gradients are fp32
// device buffers handed out as device views, so an optimizer can update them
// in place. All work is enqueued on the layer's stream (LoraLinearCudaOptions);
// nothing synchronizes except the host copies (download*, merge's report).
//
// Construction: from a host FrozenWeight + host bias + LoraConfig +
// LoraLinearOptions, exactly like the CPU layer. The 4-bit weight is uploaded
// as a cuda::DeviceQuantized4bit (NoQuant: the dense Compute weight), A is
// drawn on the host as the CPU layer draws it (init_lora_a) and uploaded, B = 0: a CPU and a
// CUDA layer built from the same arguments start bit-identical.
//
// Numerics (the CPU header's rule, so the two backends differ only in the
// order of fp32 sums, plus one Compute ulp where y or dx straddle a rounding
// boundary):
//   * base path: W̃ dequantized tile by tile into a Compute workspace (the
//     same bits as FrozenWeight::dequantize_tile), then cublasGemmEx with
//     Compute inputs and an fp32 output (CUBLAS_COMPUTE_32F: bf16 x bf16 and
//     fp16 x fp16 products are exact in fp32, sums are fp32; Compute = float
//     uses CUBLAS_COMPUTE_32F_PEDANTIC, so no TF32);
//   * adapter path: fp32 operands (x widened and dropped out in fp32, as
//     PEFT casts it), GEMMs in CUBLAS_COMPUTE_32F_PEDANTIC; xa = drop(x)·Aᵀ
//     and db are summed in double and rounded once to fp32, as the CPU does
//     (xa: a DGEMM on the fp32 operands widened exactly to double,
//     CUBLAS_COMPUTE_64F_PEDANTIC; db: a column-sum kernel in double);
//   * y and dx: one rounding to Compute from the fp32 sum of base, adapter
//     and bias, in an epilogue kernel.
// The dropout mask is DropoutMask::factor of flat element t * in + i, the
// same host/device function the CPU calls: identical masks on both backends.
//
// Memory the layer holds (bytes() / workspace_bytes()):
//   * the base as uploaded (packed codes + statistics, or dense Compute), and
//     after merge() the merged base too (the original is kept: unmerge() is exact);
//   * A, B, dA, dB (fp32) and bias, db (fp32) when there is a bias;
//   * cached workspaces, grown on demand and kept until release_workspace():
//     the W̃ tile (Compute, tile_rows x in; 4-bit bases only), one fp32
//     buffer of T x max(in, out) (drop(x) in fp32 or, in chunks of tokens,
//     in double for xa; then the fp32 y or dx accumulator), one fp32 [T, r]
//     buffer (xa of an inference forward, gb = dy·B in backward), and A and
//     xa in double ([r, in] and [T, r]). The tile is at most
//     max_tile_elements (default 2^24: a whole 4096x4096 weight, 32 MiB of bf16).
// merge() also allocates, for its duration, the fp32 merged weight [out, in]
// (the 4-bit quantizer needs the whole tensor: double quantization takes the
// mean of all block scales) and the quantizer's outputs.
// A forward_train returns cuda::LoraActivations: x in Compute [T, in] and xa
// in fp32 [T, r] (device), plus the dropout key.
//
// merge(): on the device. W̃ + s·B·A is formed in fp32 (the same bits of W̃
// as the forward uses, SGEMM for B·A), re-quantized with the existing GPU
// quantizer (cuda::quantize_4bit, bit-identical to the CPU's quantize_4bit_ref
// for the same fp32 input, with the base's blocksize and double quantization;
// NoQuant: rounded to Compute), and the MergeReport is reduced on the device
// in double. The fp32 merged weight can differ from the CPU's by the order
// of the r-term sums, so rarely a code on a decision boundary differs.
//
// Threading: one layer, one stream. forward() is const but uses the cached
// workspaces, so two host threads must not drive the same layer at once.
// Device tensors passed in must be ready on the layer's stream (the caller
// orders its other streams against it). The stream must outlive the layer.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/lora_linear.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/detail/bit_cast.hpp>
#include <qlora/core/device.hpp>
#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/cuda/common.cuh>
#include <qlora/cuda/cublas.cuh>
#include <qlora/cuda/dequantize_4bit.cuh>
#include <qlora/cuda/kernel/lora_linear.cuh>
#include <qlora/cuda/quant_state.cuh>
#include <qlora/cuda/quantize_4bit.cuh>
#include <qlora/lora/dropout.hpp>
#include <qlora/lora/frozen_weight.hpp>
#include <qlora/lora/lora_config.hpp>
#include <qlora/lora/lora_init.hpp>
#include <qlora/lora/lora_linear.hpp>
#include <qlora/quant/quant_policy.hpp>

namespace qlora {
namespace cuda {

/// A host copy of a contiguous device tensor (copied on `stream`, which is then synchronized).
inline Tensor to_host(const TensorView& device_view, cudaStream_t stream) {
  check(device_view.device() == Device::cuda && device_view.is_contiguous(), "DeviceMismatch",
        "to_host: expected a contiguous device tensor, got a {} one", device_name(device_view.device()));
  Tensor host(device_view.dtype(), device_view.shape());
  if (host.byte_size() > 0) {
    check_not_null(device_view.raw_data(), "to_host", "device_view");
    QLORA_CUDA_CHECK(cudaMemcpyAsync(host.view().raw_data(), device_view.raw_data(), host.byte_size(),
                                     cudaMemcpyDeviceToHost, stream));
  }
  synchronize(stream);
  return host;
}

/// Device options of a CUDA LoraLinear.
struct LoraLinearCudaOptions {
  cudaStream_t stream = nullptr;  ///< every operation of the layer is enqueued here
  cublasHandle_t cublas = nullptr;  ///< a handle to share; null: the layer creates its own
  /// Elements of W̃ dequantized at once (the tile workspace, in Compute). The
  /// tile height is rounded down so that every tile starts on a block (and
  /// nested-block) boundary where the shape allows it, which lets the fast
  /// dequantize kernel (cuda/dequantize_4bit.cuh) do the work.
  std::int64_t max_tile_elements = std::int64_t{1} << 24;
  /// > 0: exactly this many output rows per tile (tests use it to put tile
  /// starts mid-block and at odd elements).
  std::int64_t tile_rows = 0;
};

/// What a training forward keeps for its backward, in device memory: the
/// device twin of qlora::LoraActivations. Buffers are stream-ordered on the
/// layer's stream.
struct LoraActivations {
  DeviceBuffer<std::byte> x;  ///< the layer input, Compute [T, in]
  DeviceBuffer<float> xa;     ///< drop(x)·Aᵀ, F32 [T, r]
  DropoutMask dropout;        ///< regenerates the forward's mask
  DType dtype = DType::F32;   ///< Compute of the layer that made it
  std::int64_t token_count = 0;
  std::int64_t in_features = 0;
  std::int64_t rank = 0;

  [[nodiscard]] std::int64_t tokens() const noexcept { return token_count; }
  [[nodiscard]] std::size_t bytes() const noexcept { return x.size_bytes() + xa.size_bytes(); }
  [[nodiscard]] TensorView x_view() const { return {x.data(), dtype, Shape{token_count, in_features}, Device::cuda}; }
  [[nodiscard]] TensorView xa_view() const { return {xa.data(), DType::F32, Shape{token_count, rank}, Device::cuda}; }
};

}  // namespace cuda

template <QuantPolicy Quant, FloatStorage Compute>
class LoraLinear<Quant, Compute, Cuda> {
  static constexpr bool dense_base = std::is_same_v<Quant, NoQuant>;

 public:
  using Base = FrozenWeight<Quant, Compute>;
  using CpuLayer = LoraLinear<Quant, Compute, Cpu>;
  /// The base as it lives on the device.
  using DeviceBase = std::conditional_t<dense_base, cuda::DeviceBuffer<Compute>, cuda::DeviceQuantized4bit>;

  /// The layer at module `path`, uploaded from a host base weight. `bias` is a
  /// host [out] tensor in any float dtype, or an empty view for none. A is
  /// initialised per config.init (the CPU layer's values), B = 0.
  LoraLinear(std::string path, const Base& base, const TensorView& bias, const LoraConfig& config,
             const LoraLinearOptions& options = {}, const cuda::LoraLinearCudaOptions& cuda_options = {})
      : path_(std::move(path)),
        in_(base.in_features()),
        out_(base.out_features()),
        rank_(checked_rank(config)),
        scaling_(config.scaling_for(path_)),
        dropout_probability_(static_cast<float>(config.lora_dropout)),
        bias_trainable_(config.bias != LoraBias::none),
        stream_(cuda_options.stream),
        cublas_(cuda_options.cublas != nullptr ? cuda::CublasHandle::borrow(cuda_options.cublas)
                                               : cuda::CublasHandle::create()),
        base_(upload_base(base)),
        tile_rows_(choose_tile_rows(cuda_options)),
        a_(element_count(rank_, in_), stream_),
        b_(element_count(out_, rank_), stream_),
        grad_a_(a_.size(), stream_),
        grad_b_(b_.size(), stream_) {
    if (!detail::LayerArguments<Compute>::absent(bias)) {
      arguments().bias(bias, out_);
      bias_ = cuda::DeviceBuffer<float>(static_cast<std::size_t>(out_), stream_);
      grad_bias_ = cuda::DeviceBuffer<float>(static_cast<std::size_t>(out_), stream_);
      upload_floats(bias, bias_, "bias");
    }
    std::vector<float> a(a_.size());
    init_lora_a<typename CpuLayer::InitialRounding>(a, rank_, in_, config.init, options.init_seed,
                                                    options.init_stream);  // as the CPU layer does
    cuda::copy_to_device(a_.data(), std::span<const float>(a), stream_);  // pageable: `a` is staged before the return
    QLORA_CUDA_CHECK(cudaMemsetAsync(b_.data(), 0, b_.size_bytes(), stream_));
    zero_grad();
  }

  [[nodiscard]] const std::string& path() const noexcept { return path_; }
  [[nodiscard]] std::int64_t in_features() const noexcept { return in_; }
  [[nodiscard]] std::int64_t out_features() const noexcept { return out_; }
  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] float scaling() const noexcept { return scaling_; }
  [[nodiscard]] bool has_bias() const noexcept { return !bias_.empty(); }
  [[nodiscard]] bool bias_trainable() const noexcept { return has_bias() && bias_trainable_; }
  [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }
  [[nodiscard]] cublasHandle_t cublas_handle() const noexcept { return cublas_.get(); }
  /// Output rows of W̃ per dequantized tile.
  [[nodiscard]] std::int64_t tile_rows() const noexcept { return tile_rows_; }
  [[nodiscard]] const DeviceBase& device_base() const noexcept { return base_; }

  /// Trainable weights and their gradients: F32 device views (an optimizer updates them in place).
  [[nodiscard]] TensorView lora_A() const { return device_view(a_, {rank_, in_}); }
  [[nodiscard]] TensorView lora_B() const { return device_view(b_, {out_, rank_}); }
  [[nodiscard]] TensorView grad_A() const { return device_view(grad_a_, {rank_, in_}); }
  [[nodiscard]] TensorView grad_B() const { return device_view(grad_b_, {out_, rank_}); }
  /// Empty views when the layer has no bias.
  [[nodiscard]] TensorView bias() const { return has_bias() ? device_view(bias_, {out_}) : TensorView{}; }
  [[nodiscard]] TensorView grad_bias() const { return has_bias() ? device_view(grad_bias_, {out_}) : TensorView{}; }

  /// A host copy of one of the views above (or any contiguous device tensor);
  /// synchronizes the layer's stream.
  [[nodiscard]] Tensor download(const TensorView& device_tensor) const { return cuda::to_host(device_tensor, stream_); }

  /// The base weight as uploaded, back on the host (synchronizes).
  [[nodiscard]] Base download_base() const { return download_weight(base_); }
  /// The merged base that forward() uses after merge(), on the host (synchronizes).
  [[nodiscard]] Base download_merged_base() const {
    check(merged_.has_value(), "AdapterNotMerged", "{}: download_merged_base on a layer that is not merged", path_);
    return download_weight(*merged_);
  }

  /// Replaces A [r, in] and B [out, r]: host views in F32, F16 or BF16 (e.g.
  /// from a PEFT file), or F32 device views (copied on the layer's stream).
  void set_adapter_weights(const TensorView& a, const TensorView& b) {
    check(!merged_, "AdapterMerged", "{}: set_adapter_weights on a merged layer; unmerge() first", path_);
    arguments().adapter_factors(a, b, rank_, in_, out_);
    upload_floats(a, a_, "lora_A");
    upload_floats(b, b_, "lora_B");
  }

  /// Replaces the bias [out]: a host view in any float dtype or an F32 device view.
  void set_bias(const TensorView& bias) {
    check(has_bias(), "ShapeMismatch", "{}: set_bias on a layer built without a bias", path_);
    check(!merged_, "AdapterMerged", "{}: set_bias on a merged layer; unmerge() first", path_);
    arguments().bias(bias, out_);
    upload_floats(bias, bias_, "bias");
  }

  void zero_grad() {
    for (auto* grad : {&grad_a_, &grad_b_, &grad_bias_}) {
      if (!grad->empty()) QLORA_CUDA_CHECK(cudaMemsetAsync(grad->data(), 0, grad->size_bytes(), stream_));
    }
  }

  /// With the adapter disabled the layer is its base alone (PEFT's disable_adapter).
  void set_adapter_enabled(bool enabled) noexcept { adapter_enabled_ = enabled; }
  [[nodiscard]] bool adapter_enabled() const noexcept { return adapter_enabled_; }

  /// Inference: y = x·W̃ᵀ + b (+ the adapter unless disabled or merged). No dropout.
  void forward(const TensorView& x, const TensorView& y) const {
    const std::int64_t tokens = arguments().input_output(x, in_, y, out_);
    if (tokens == 0) return;
    prepare_cublas();
    const DeviceBase& weight = merged_ && adapter_enabled_ ? *merged_ : base_;  // disabled: the base alone
    const Compute* x_data = x.data<const Compute>();
    if (!adapter_active()) {
      project(weight, x_data, tokens, nullptr, y.data<Compute>());
      return;
    }
    ensure(small_, element_count(tokens, rank_));
    adapter_down(x_data, tokens, DropoutMask{}, small_.data());
    project(weight, x_data, tokens, small_.data(), y.data<Compute>());
  }

  /// Training forward: as forward(), with dropout on the adapter input drawn
  /// from `key`; returns what backward() needs (device buffers).
  [[nodiscard]] cuda::LoraActivations forward_train(const TensorView& x, const TensorView& y,
                                                    std::optional<DropoutKey> key = std::nullopt) const {
    arguments().training_forward(merged_.has_value(), adapter_enabled_, key.has_value(), dropout_probability_);
    const std::int64_t tokens = arguments().input_output(x, in_, y, out_);
    cuda::LoraActivations saved;
    saved.dropout = DropoutMask{key.value_or(DropoutKey{}), dropout_probability_};
    saved.dtype = dtype_of_v<Compute>;
    saved.token_count = tokens;
    saved.in_features = in_;
    saved.rank = rank_;
    if (tokens == 0) return saved;
    prepare_cublas();
    saved.x = cuda::DeviceBuffer<std::byte>(x.byte_size(), stream_);
    saved.xa = cuda::DeviceBuffer<float>(element_count(tokens, rank_), stream_);
    QLORA_CUDA_CHECK(cudaMemcpyAsync(saved.x.data(), x.raw_data(), x.byte_size(), cudaMemcpyDeviceToDevice, stream_));
    const Compute* x_data = x.data<const Compute>();
    adapter_down(x_data, tokens, saved.dropout, saved.xa.data());
    project(base_, x_data, tokens, saved.xa.data(), y.data<Compute>());
    return saved;
  }

  /// Backward of forward_train: accumulates dA, dB (and db when trained) into
  /// the gradients and writes dx (Compute [T, in]) unless `dx` is an empty view.
  void backward(const cuda::LoraActivations& saved, const TensorView& dy, const TensorView& dx) {
    const std::int64_t tokens = saved.tokens();
    arguments().tensor(dy, {tokens, out_}, "dy");
    const bool want_dx = !detail::LayerArguments<Compute>::absent(dx);
    if (want_dx) arguments().tensor(dx, {tokens, in_}, "dx");
    check(saved.rank == rank_ && saved.in_features == in_ && saved.dtype == dtype_of_v<Compute>, "ShapeMismatch",
          "{}: activations are from a layer of another shape", path_);
    check(tokens >= 0 && saved.x.size() == static_cast<std::size_t>(tokens * in_) * sizeof(Compute) &&
              saved.xa.size() == static_cast<std::size_t>(tokens * rank_),
          "ShapeMismatch", "{}: activations hold buffers of another size than {} tokens", path_, tokens);
    if (tokens == 0) return;
    prepare_cublas();
    const Compute* g = dy.data<const Compute>();
    const auto* x = reinterpret_cast<const Compute*>(saved.x.data());
    ensure(scratch_, scratch_elements(tokens));
    ensure(small_, element_count(tokens, rank_));
    float* const scratch = scratch_.data();
    float* const gb = small_.data();

    // dy in fp32 [T, out] (in scratch), then gb = dy·B [T, r]: the gradient reaching xa, before scaling.
    widen(g, tokens * out_, DropoutMask{}, scratch);
    gemm<float>(false, false, tokens, rank_, out_, 1.0f, scratch, out_, b_.data(), rank_, 0.0f, gb, rank_);
    // dB += s·dyᵀ·xa and db += Σ_t dy.
    gemm<float>(true, false, out_, rank_, tokens, scaling_, scratch, out_, saved.xa.data(), rank_, 1.0f,
                grad_b_.data(), rank_);
    if (bias_trainable()) {
      const dim3 threads(cuda::kernel::column_sum_columns, cuda::kernel::column_sum_lanes);
      const unsigned grid = cuda::grid_for(cuda::ceil_div(out_, cuda::kernel::column_sum_columns));
      cuda::kernel::column_sums_kernel<Compute><<<grid, threads, 0, stream_>>>(g, grad_bias_.data(), tokens, out_);
      cuda::check_launch("column_sums_kernel");
    }

    // dA += s·gbᵀ·drop(x), with drop(x) in fp32 [T, in] (in scratch, after dy is no longer read).
    widen(x, tokens * in_, saved.dropout, scratch);
    gemm<float>(true, false, rank_, in_, tokens, scaling_, gb, rank_, scratch, in_, 1.0f, grad_a_.data(), in_);
    if (!want_dx) return;

    // dx = round(dy·W̃ + s·drop'(gb·A)), the fp32 sum in scratch [T, in].
    gemm<float>(false, false, tokens, in_, rank_, scaling_, gb, rank_, a_.data(), in_, 0.0f, scratch, in_);
    if (saved.dropout.active()) {
      cuda::kernel::apply_dropout_kernel<float><<<elementwise_grid(tokens * in_), cuda::kernel::lora_threads, 0, stream_>>>(
          scratch, tokens * in_, saved.dropout);
      cuda::check_launch("apply_dropout_kernel");
    }
    for (std::int64_t r0 = 0; r0 < out_; r0 += tile_rows_) {
      const std::int64_t r1 = std::min(out_, r0 + tile_rows_);
      const Compute* rows = weight_rows(base_, r0, r1);
      gemm<Compute>(false, false, tokens, in_, r1 - r0, 1.0f, g + r0, out_, rows, in_, 1.0f, scratch, in_);
    }
    store_rounded(scratch, nullptr, dx.data<Compute>(), tokens, in_);
  }

  /// The dense merged weight W̃ + s·B·A, F32 [out, in] (W̃ as the forward uses
  /// it), copied to the host (synchronizes).
  [[nodiscard]] Tensor merged_weight() const {
    prepare_cublas();
    const cuda::DeviceBuffer<float> exact = exact_merged_weight();
    return cuda::to_host(device_view(exact, {out_, in_}), stream_);
  }

  /// Folds the adapter into a merged base (re-quantized to Quant on the GPU
  /// with the base's blocksize and double quantization; NoQuant: rounded to
  /// Compute) that forward() then uses alone. The original base is kept, so
  /// unmerge() is exact. Returns the error the merged base has against
  /// W̃ + s·B·A (synchronizes).
  MergeReport merge() {
    check(!merged_, "AdapterMerged", "{}: already merged", path_);
    prepare_cublas();
    const cuda::DeviceBuffer<float> exact = exact_merged_weight();
    DeviceBase merged = store_merged(exact);
    const MergeReport report = merge_report(merged, exact);
    merged_.emplace(std::move(merged));
    return report;
  }
  void unmerge() noexcept { merged_.reset(); }
  [[nodiscard]] bool merged() const noexcept { return merged_.has_value(); }

  /// Device bytes the layer holds: base (and merged copy), A, B, their
  /// gradients and the bias; the cached workspaces are workspace_bytes().
  [[nodiscard]] std::size_t bytes() const {
    std::size_t total = weight_bytes(base_) + (merged_ ? weight_bytes(*merged_) : 0) + a_.size_bytes() +
                        b_.size_bytes() + grad_a_.size_bytes() + grad_b_.size_bytes();
    return total + bias_.size_bytes() + grad_bias_.size_bytes();
  }
  /// Device bytes of the cached workspaces (tile, fp32 accumulator, [T, r] buffers, A in double).
  [[nodiscard]] std::size_t workspace_bytes() const noexcept {
    return tile_.size_bytes() + scratch_.size_bytes() + small_.size_bytes() + a_double_.size_bytes() +
           xa_double_.size_bytes();
  }
  /// Frees the cached workspaces (stream-ordered); the next call reallocates them.
  void release_workspace() noexcept {
    tile_.reset();
    scratch_.reset();
    small_.reset();
    a_double_.reset();
    xa_double_.reset();
  }

 private:
  // ---- construction ------------------------------------------------------------------

  int checked_rank(const LoraConfig& config) const {
    config.validate_for(path_, in_, out_);
    return config.rank_for(path_);
  }

  static std::size_t element_count(std::int64_t rows, std::int64_t cols) {
    return static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols);
  }

  DeviceBase upload_base(const Base& base) const {
    if constexpr (dense_base) {
      return cuda::to_device(base.dense().template span<const Compute>(), stream_);
    } else {
      return cuda::upload(base.quantized(), stream_);
    }
  }

  /// Rows per tile: as many as fit max_tile_elements, rounded down to a
  /// multiple of the rows that make r0·in a multiple of the (nested) block
  /// span, so that every tile can use the fast dequantize kernel.
  std::int64_t choose_tile_rows(const cuda::LoraLinearCudaOptions& options) const {
    if (options.tile_rows > 0) return std::min(options.tile_rows, out_);
    if constexpr (dense_base) {
      return out_;  // the dense weight is multiplied in place: one "tile"
    } else {
      check(options.max_tile_elements > 0, "InvalidArgument", "{}: max_tile_elements is {}, expected > 0", path_,
            options.max_tile_elements);
      std::int64_t rows = std::clamp<std::int64_t>(options.max_tile_elements / in_, 1, out_);
      const std::int64_t span = fast_tile_alignment();
      const std::int64_t step = span / std::gcd(in_, span);
      if (rows < out_ && rows >= step) rows -= rows % step;
      return rows;
    }
  }

  /// Tile starts (flat elements) that the fast dequantize kernel can take: a
  /// whole block, and with double quantization a whole nested block of 256.
  std::int64_t fast_tile_alignment() const {
    if constexpr (dense_base) {
      return 1;
    } else {
      return base_.nested ? nested_blocksize * base_.blocksize : base_.blocksize;
    }
  }

  /// Copies a host float view (any float dtype, widened) or an F32 device view into `target`.
  void upload_floats(const TensorView& source, cuda::DeviceBuffer<float>& target, std::string_view name) const {
    if (source.device() == Device::cuda) {
      check(source.dtype() == DType::F32 && source.is_contiguous(), "DTypeMismatch",
            "{}: a device {} must be a contiguous F32 tensor, got {}", path_, name, dtype_name(source.dtype()));
      QLORA_CUDA_CHECK(cudaMemcpyAsync(target.data(), source.raw_data(), target.size_bytes(), cudaMemcpyDeviceToDevice,
                                       stream_));
      return;
    }
    std::vector<float> values(target.size());
    visit_float_dtype(source.dtype(), [&]<class T>(T) {
      const auto elements = source.span<const T>();
      for (std::size_t i = 0; i < elements.size(); ++i) values[i] = to_float(elements[i]);
    }, name);
    cuda::copy_to_device(target.data(), std::span<const float>(values), stream_);
    // A pageable host-to-device copy returns once `values` is staged, so it may go now.
  }

  // ---- checks (the CPU layer's codes and messages, for device tensors) ------------------

  [[nodiscard]] detail::LayerArguments<Compute> arguments() const noexcept { return {path_, Device::cuda}; }

  // ---- device work ----------------------------------------------------------------------

  [[nodiscard]] bool adapter_active() const noexcept { return adapter_enabled_ && !merged_; }

  static TensorView device_view(const cuda::DeviceBuffer<float>& buffer, std::initializer_list<std::int64_t> shape) {
    return {buffer.data(), DType::F32, Shape(shape), Device::cuda};
  }

  /// Grows a cached workspace to at least `count` elements (contents are not kept).
  template <class T>
  void ensure(cuda::DeviceBuffer<T>& buffer, std::size_t count) const {
    if (buffer.size() < count) {
      buffer.reset();  // stream-ordered: freed after the work already enqueued
      buffer = cuda::DeviceBuffer<T>(count, stream_);
    }
  }

  static unsigned elementwise_grid(std::int64_t n) { return cuda::grid_for(cuda::ceil_div(n, cuda::kernel::lora_threads)); }

  /// A shared handle may have been moved to another stream or pointer mode since our last call.
  void prepare_cublas() const {
    QLORA_CUBLAS_CHECK(cublasSetStream(cublas_.get(), stream_));
    QLORA_CUBLAS_CHECK(cublasSetPointerMode(cublas_.get(), CUBLAS_POINTER_MODE_HOST));
  }

  /// cuda::gemm_row_major on this layer's handle: T = float true fp32 (never TF32), bf16/fp16
  /// exact products with fp32 accumulation into an fp32 C, double in double.
  template <class T, class C = std::conditional_t<std::is_same_v<T, double>, double, float>>
  void gemm(bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n, std::int64_t k, C alpha, const T* a,
            std::int64_t lda, const T* b, std::int64_t ldb, C beta, C* c, std::int64_t ldc) const {
    cuda::gemm_row_major(cublas_.get(), path_, transpose_a, transpose_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }

  /// out[i] = Out(fl32(float(x[i]) · mask.factor(first + i))) for n elements.
  template <class T, class Out>
  void widen(const T* x, std::int64_t n, const DropoutMask& mask, Out* out, std::int64_t first = 0) const {
    cuda::kernel::widen_dropout_kernel<T, Out><<<elementwise_grid(n), cuda::kernel::lora_threads, 0, stream_>>>(
        x, out, n, mask, first);
    cuda::check_launch("widen_dropout_kernel");
  }

  /// out = Out(acc + bias) for a row-major [rows, cols] block (bias may be null; Acc = double: no bias).
  template <class Acc, class Out>
  void store_rounded(const Acc* acc, const float* bias, Out* out, std::int64_t rows, std::int64_t cols) const {
    const std::int64_t n = rows * cols;
    cuda::kernel::store_rounded_kernel<Out, Acc><<<elementwise_grid(n), cuda::kernel::lora_threads, 0, stream_>>>(
        acc, bias, out, n, cols);
    cuda::check_launch("store_rounded_kernel");
  }

  /// Launches materialize_kernel: out[j] = Out(values(first + j)), j < count.
  template <class Values, class Out>
  void materialize(const Values& values, std::int64_t first, std::int64_t count, Out* out) const {
    cuda::kernel::materialize_kernel<Values, Out><<<elementwise_grid(count), cuda::kernel::lora_threads, 0, stream_>>>(
        values, first, count, out);
    cuda::check_launch("materialize_kernel");
  }

  static int log2_of(std::int64_t blocksize) {
    int log2 = 0;
    while ((std::int64_t{1} << log2) < blocksize) ++log2;
    return log2;
  }

  /// Calls f(values) with the element functor of `weight` (W̃ as the forward uses it).
  template <class F>
  static void visit_values(const DeviceBase& weight, F&& f) {
    if constexpr (dense_base) {
      f(cuda::kernel::DenseValues<Compute>{weight.data()});
    } else {
      const cuda::DeviceQuantState state = weight.view();
      cuda::detail::dispatch_bool(state.nested, [&](auto nested) {
        f(cuda::kernel::QuantizedValues<Quant, Compute, decltype(nested)::value>{weight.packed.data(), state,
                                                                               log2_of(weight.blocksize)});
      });
    }
  }

  /// Rows [r0, r1) of W̃ in Compute, row-major [rows, in]: the dense weight in
  /// place, or the tile workspace after dequantizing into it. Tiles that start
  /// on a (nested) block boundary use the fast kernel of cuda/dequantize_4bit.cuh
  /// on offset pointers; others (mid-block, odd starts) materialize_kernel.
  const Compute* weight_rows(const DeviceBase& weight, std::int64_t r0, std::int64_t r1) const {
    if constexpr (dense_base) {
      return weight.data() + r0 * in_;
    } else {
      const std::int64_t first = r0 * in_, count = (r1 - r0) * in_;
      ensure(tile_, element_count(tile_rows_, in_));
      if (first % fast_tile_alignment() == 0) {
        cuda::DeviceQuantState state = weight.view();
        const std::int64_t first_block = first / weight.blocksize;
        state.numel = count;
        if (state.nested) {
          state.nested_codes += first_block;
          state.nested_absmax += first_block / nested_blocksize;
        } else {
          state.absmax += first_block;
        }
        cuda::dequantize_4bit<Compute>(
            std::span<const std::uint8_t>(weight.packed.data() + first / 2, static_cast<std::size_t>((count + 1) / 2)),
            state, std::span<Compute>(tile_.data(), static_cast<std::size_t>(count)), stream_);
      } else {
        visit_values(weight, [&](const auto& values) { materialize(values, first, count, tile_.data()); });
      }
      return tile_.data();
    }
  }

  /// xa = drop(x)·Aᵀ [T, r]: the fp32 products summed in double, rounded
  /// once to fp32 (the CPU rule). drop(x) is rounded in fp32, widened to
  /// double in chunks of tokens that fit the scratch buffer (at least half of
  /// T per chunk), and multiplied by A in double with a DGEMM.
  void adapter_down(const Compute* x, std::int64_t tokens, const DropoutMask& dropout, float* xa) const {
    ensure(scratch_, scratch_elements(tokens));
    ensure(a_double_, a_.size());
    ensure(xa_double_, element_count(tokens, rank_));
    widen(a_.data(), rank_ * in_, DropoutMask{}, a_double_.data());
    auto* const x_double = reinterpret_cast<double*>(scratch_.data());  // 256-byte aligned: cudaMallocAsync
    const std::int64_t chunk = std::max<std::int64_t>(1, static_cast<std::int64_t>(scratch_.size() / 2) / in_);
    for (std::int64_t t0 = 0; t0 < tokens; t0 += chunk) {
      const std::int64_t rows = std::min(chunk, tokens - t0);
      widen(x + t0 * in_, rows * in_, dropout, x_double, t0 * in_);
      gemm<double>(false, true, rows, rank_, in_, 1.0, x_double, in_, a_double_.data(), in_, 0.0,
                   xa_double_.data() + t0 * rank_, rank_);
    }
    store_rounded(xa_double_.data(), nullptr, xa, tokens, rank_);
  }

  /// Floats in the scratch buffer: the fp32 [T, max(in, out)] accumulators,
  /// and at least one token of drop(x) in double (2·in floats).
  std::size_t scratch_elements(std::int64_t tokens) const {
    return std::max(element_count(tokens, std::max(in_, out_)), element_count(2, in_));
  }

  /// y = round(x·W̃ᵀ + s·xa·Bᵀ + b), the fp32 sum in the scratch buffer (which
  /// adapter_down has finished reading: same stream); xa == nullptr: no adapter.
  void project(const DeviceBase& weight, const Compute* x, std::int64_t tokens, const float* xa, Compute* y) const {
    ensure(scratch_, scratch_elements(tokens));
    float* const acc = scratch_.data();
    for (std::int64_t r0 = 0; r0 < out_; r0 += tile_rows_) {
      const std::int64_t r1 = std::min(out_, r0 + tile_rows_);
      const Compute* rows = weight_rows(weight, r0, r1);
      gemm<Compute>(false, true, tokens, r1 - r0, in_, 1.0f, x, in_, rows, in_, 0.0f, acc + r0, out_);
    }
    if (xa != nullptr) gemm<float>(false, true, tokens, out_, rank_, scaling_, xa, rank_, b_.data(), rank_, 1.0f, acc, out_);
    store_rounded(acc, has_bias() ? bias_.data() : nullptr, y, tokens, out_);
  }

  /// W̃ + s·B·A in fp32 [out, in], in a new device buffer.
  cuda::DeviceBuffer<float> exact_merged_weight() const {
    const std::int64_t n = out_ * in_;
    cuda::DeviceBuffer<float> exact(static_cast<std::size_t>(n), stream_);
    visit_values(base_, [&](const auto& values) { materialize(values, 0, n, exact.data()); });
    gemm<float>(false, false, out_, in_, rank_, scaling_, b_.data(), rank_, a_.data(), in_, 1.0f, exact.data(), in_);
    return exact;
  }

  DeviceBase store_merged(const cuda::DeviceBuffer<float>& exact) const {
    if constexpr (dense_base) {
      cuda::DeviceBuffer<Compute> merged(exact.size(), stream_);
      materialize(cuda::kernel::DenseValues<float>{exact.data()}, 0, static_cast<std::int64_t>(exact.size()),
                  merged.data());
      return merged;
    } else {
      const Quantize4bitOptions options{.blocksize = base_.blocksize, .double_quant = base_.nested};
      return cuda::quantize_4bit<Quant, float>(std::span<const float>(exact.data(), exact.size()), {out_, in_}, options,
                                               stream_);
    }
  }

  MergeReport merge_report(const DeviceBase& merged, const cuda::DeviceBuffer<float>& exact) const {
    const auto n = static_cast<std::int64_t>(exact.size());
    cuda::DeviceBuffer<cuda::MergeErrorSums> sums(1, stream_);
    QLORA_CUDA_CHECK(cudaMemsetAsync(sums.data(), 0, sizeof(cuda::MergeErrorSums), stream_));
    // A bounded grid: the kernel loops, and each warp makes one set of atomics.
    const auto grid = static_cast<unsigned>(std::min<std::int64_t>(cuda::ceil_div(n, cuda::kernel::lora_threads), 1024));
    visit_values(merged, [&](const auto& values) {
      cuda::kernel::merge_error_kernel<<<grid, cuda::kernel::lora_threads, 0, stream_>>>(values, exact.data(), n,
                                                                                          sums.data());
      cuda::check_launch("merge_error_kernel");
    });
    cuda::MergeErrorSums host{};
    QLORA_CUDA_CHECK(cudaMemcpyAsync(&host, sums.data(), sizeof(host), cudaMemcpyDeviceToHost, stream_));
    cuda::synchronize(stream_);
    MergeReport report;
    report.max_abs_error = qlora::detail::bit_cast<double>(host.max_abs_error_bits);
    report.rms_error = std::sqrt(host.sum_squared_error / static_cast<double>(n));
    report.relative_rms_error = host.sum_squared > 0 ? std::sqrt(host.sum_squared_error / host.sum_squared) : 0.0;
    return report;
  }

  Base download_weight(const DeviceBase& weight) const {
    if constexpr (dense_base) {
      return Base(cuda::to_host(TensorView(weight.data(), dtype_of_v<Compute>, Shape{out_, in_}, Device::cuda), stream_)
                      .view());
    } else {
      return Base(cuda::download(weight, stream_));
    }
  }

  static std::size_t weight_bytes(const DeviceBase& weight) {
    if constexpr (dense_base) {
      return weight.size_bytes();
    } else {
      return weight.packed.size_bytes() + weight.absmax.size_bytes() + weight.nested_codes.size_bytes() +
             weight.nested_absmax.size_bytes() + weight.nested_code_map.size_bytes() + weight.nested_offset.size_bytes();
    }
  }

  // Destroyed in reverse order: device buffers (stream-ordered frees) before the cuBLAS handle.
  std::string path_;
  std::int64_t in_, out_;
  int rank_;
  float scaling_;
  float dropout_probability_;
  bool bias_trainable_;
  bool adapter_enabled_ = true;
  cudaStream_t stream_;
  cuda::CublasHandle cublas_;
  DeviceBase base_;
  std::int64_t tile_rows_;
  std::optional<DeviceBase> merged_;
  cuda::DeviceBuffer<float> a_, b_, grad_a_, grad_b_;
  cuda::DeviceBuffer<float> bias_, grad_bias_;  ///< empty without a bias
  mutable cuda::DeviceBuffer<Compute> tile_;    ///< W̃ rows, Compute [tile_rows, in] (4-bit bases)
  mutable cuda::DeviceBuffer<float> scratch_;   ///< fp32 [T, max(in, out)]: drop(x), then the y / dx / dy accumulator
  mutable cuda::DeviceBuffer<float> small_;     ///< fp32 [T, r]: xa (inference) or gb (backward)
  mutable cuda::DeviceBuffer<double> a_double_;   ///< A in double [r, in], for xa
  mutable cuda::DeviceBuffer<double> xa_double_;  ///< xa in double [T, r], before its rounding
};

}  // namespace qlora
