// The causal-LM loss through the output head on the GPU: nn/cross_entropy.hpp's
// lm_head_cross_entropy (the specification: maths, contract, errors) with
// device tensors (Device::cuda, F32, contiguous; targets I32), enqueued on
// `stream`. Σ −log softmax(hidden·Wᵀ + b)[target] over the supervised tokens
// (target ≠ ignored_target) and, when wanted, its gradients scaled by
// options.grad_scale, never holding the [T, V] logits: chunk_tokens
// supervised tokens at a time (options.threads is unused).
//
// Per chunk (cuda/kernel/cross_entropy.cuh for the kernels):
//   1. gather the chunk's rows of hidden into a contiguous [rows, H] block;
//   2. logits [rows, V] = block · Wᵀ (cuBLAS);
//   3. one CTA per row: logsumexp, the row loss, and for a backward the
//      logits turned in place into G = s·(softmax − onehot);
//   4. dweight += Gᵀ·block (cuBLAS, beta = 1), dbias += column sums of G (in
//      double, lora_linear's column_sums_kernel), then dhidden rows = G·W
//      (cuBLAS, into the block) scattered back to their positions.
// The GEMMs run in CUBLAS_COMPUTE_32F_PEDANTIC: true fp32 products and sums
// (never TF32, whatever math mode a shared handle was given), as the CPU's
// Eigen GEMM; only the order of the fp32 sums differs.
//
// The supervised positions are found on the host: targets is copied back
// once (4 bytes a token) and the stream synchronized. The host needs their
// count anyway — it sizes the workspace and the chunk loop, and the function
// returns the loss to the host — and checking there gives the CPU op's
// TokenOutOfRange error, naming the position, before anything is written.
// The positions go back up in one copy; the row losses (double) come down in
// one copy at the end and are summed on the host in row order.
//
// Memory, allocated once per call on `stream` (stream-ordered): the
// chunk x (V + H) fp32 workspace (27 MB for Phi-2 at 128 tokens), plus the
// positions and the row losses (16 bytes per supervised token).
//
// Deterministic: fixed reduction shapes, no atomics, so the same call gives
// the same bits on the same device (cuBLAS picks the same algorithm for the
// same shapes on one stream).
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/cross_entropy.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <span>
#include <vector>

#include <qlora/core/device.hpp>
#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/tensor_view.hpp>
#include <qlora/cuda/common.cuh>
#include <qlora/cuda/cublas.cuh>
#include <qlora/cuda/embedding.cuh>
#include <qlora/cuda/kernel/cross_entropy.cuh>
#include <qlora/cuda/kernel/lora_linear.cuh>
#include <qlora/nn/cross_entropy.hpp>
#include <qlora/nn/detail/f32_arguments.hpp>

namespace qlora::cuda {

namespace detail {

/// targets is an I32 [tokens] device tensor.
inline void check_cross_entropy_targets(const qlora::detail::F32Arguments& args, const TensorView& targets,
                                        std::int64_t tokens) {
  check(targets.dtype() == DType::I32, "DTypeMismatch", "{}: targets is {}, expected I32", args.op,
        dtype_name(targets.dtype()));
  check(targets.shape() == Shape{tokens}, "ShapeMismatch", "{}: targets is {}, expected [{}]", args.op,
        targets.shape().to_string(), tokens);
  check(targets.device() == Device::cuda, "DeviceMismatch", "{}: targets is on {}, expected a cuda tensor", args.op,
        device_name(targets.device()));
  check(targets.is_contiguous(), "NotContiguous", "{}: targets {} is not contiguous", args.op,
        targets.shape().to_string());
  check(tokens == 0 || targets.raw_data() != nullptr, "NullPointer", "{}: targets has no data", args.op);
}

/// The positions whose target counts, in order, read from the device
/// targets (one copy, then a synchronization of `stream`); throws
/// TokenOutOfRange, as the CPU op, for a target outside [0, vocab) that is
/// not ignored_target.
inline std::vector<std::int64_t> supervised_positions(std::string_view op, const TensorView& targets,
                                                      std::int64_t vocab, cudaStream_t stream) {
  std::vector<std::int32_t> host(static_cast<std::size_t>(targets.numel()));
  copy_to_host(std::span<std::int32_t>(host), targets.data<const std::int32_t>(), stream);
  synchronize(stream);
  std::vector<std::int64_t> positions;
  for (std::size_t t = 0; t < host.size(); ++t) {
    const std::int32_t target = host[t];
    if (target == ignored_target) continue;
    check(target >= 0 && target < vocab, "TokenOutOfRange",
          "{}: targets[{}] is {}, outside the vocabulary [0, {}) and not the ignore index {}", op, t, target, vocab,
          ignored_target);
    positions.push_back(static_cast<std::int64_t>(t));
  }
  return positions;
}

template <RowCopy Direction>
void copy_rows(const float* source, float* destination, const std::int64_t* positions, std::int64_t rows,
               std::int64_t width, cudaStream_t stream) {
  copy_rows_kernel<Direction>
      <<<grid_for(ceil_div(rows * width, cross_entropy_copy_threads)), cross_entropy_copy_threads, 0, stream>>>(
          source, destination, positions, rows, width);
  check_launch("copy_rows_kernel");
}

}  // namespace detail

/// The summed cross-entropy of the head's predictions against `targets`
/// (I32 [T], device; already shifted, ignored_target = not supervised) and,
/// when wanted, its gradients scaled by options.grad_scale:
///   dhidden [T, H] is written (zero rows for ignored targets), empty = forward only;
///   dweight [V, H] and dbias [V] are accumulated (+=), empty = frozen.
/// hidden [T, H], weight [V, H], bias [V] (or empty: no bias): F32 device
/// tensors. Synchronizes `stream` (twice: for the targets and for the loss).
inline CrossEntropySums lm_head_cross_entropy(const TensorView& hidden, const TensorView& weight,
                                              const TensorView& bias, const TensorView& targets,
                                              const LmHeadLossOptions& options, const TensorView& dhidden,
                                              const TensorView& dweight, const TensorView& dbias,
                                              cublasHandle_t cublas, cudaStream_t stream) {
  const qlora::detail::F32Arguments args{"cuda::lm_head_cross_entropy", Device::cuda};
  const auto table = detail::checked_table(args, weight, "weight");
  const std::int64_t vocab = table.first, width = table.second;  // named copies: a lambda captures them below
  const std::int64_t tokens = args.rows(hidden, width, "hidden");
  const bool has_bias = args.optional(bias, Shape{vocab}, "bias");
  detail::check_cross_entropy_targets(args, targets, tokens);
  check(options.chunk_tokens > 0, "InvalidArgument", "{}: chunk_tokens is {}, expected > 0", args.op,
        options.chunk_tokens);
  const bool want_dhidden = args.optional(dhidden, Shape{tokens, width}, "dhidden");
  const bool want_dweight = args.optional(dweight, Shape{vocab, width}, "dweight");
  const bool want_dbias = args.optional(dbias, Shape{vocab}, "dbias");
  check(!want_dbias || has_bias, "ShapeMismatch", "{}: dbias given for a head without a bias", args.op);
  check_not_null(cublas, args.op.data(), "cublas");
  for (const std::int64_t extent : {vocab, width}) {
    check(extent <= INT_MAX, "ShapeMismatch", "{}: a GEMM extent of {} exceeds cuBLAS's 32-bit int", args.op, extent);
  }

  const std::vector<std::int64_t> supervised = detail::supervised_positions(args.op, targets, vocab, stream);
  if (want_dhidden && dhidden.numel() > 0) {
    QLORA_CUDA_CHECK(cudaMemsetAsync(dhidden.raw_data(), 0, dhidden.byte_size(), stream));
  }
  CrossEntropySums sums{0.0, static_cast<std::int64_t>(supervised.size())};
  if (sums.count == 0) return sums;

  // chunk <= count <= tokens, and each GEMM's extents are chunk, V or H.
  const std::int64_t chunk = std::min(options.chunk_tokens, sums.count);
  check(chunk <= INT_MAX, "ShapeMismatch", "{}: a GEMM extent of {} exceeds cuBLAS's 32-bit int", args.op, chunk);
  const DeviceBuffer<std::int64_t> positions = to_device(std::span<const std::int64_t>(supervised), stream);
  const DeviceBuffer<double> row_losses(static_cast<std::size_t>(sums.count), stream);
  const DeviceBuffer<float> workspace(static_cast<std::size_t>(chunk * (vocab + width)), stream);
  float* const logits = workspace.data();                  // [chunk, V]: logits, then s·G
  float* const chunk_hidden = workspace.data() + chunk * vocab;  // [chunk, H]: gathered hidden, then s·G·W

  // A shared handle may have been moved to another stream or pointer mode since its last use.
  QLORA_CUBLAS_CHECK(cublasSetStream(cublas, stream));
  QLORA_CUBLAS_CHECK(cublasSetPointerMode(cublas, CUBLAS_POINTER_MODE_HOST));
  const float* const weight_data = weight.data<const float>();
  const bool backward = want_dhidden || want_dweight || want_dbias;
  for (std::int64_t first = 0; first < sums.count; first += chunk) {
    const std::int64_t rows = std::min(chunk, sums.count - first);
    const std::int64_t* const chunk_positions = positions.data() + first;
    detail::copy_rows<RowCopy::gather>(hidden.data<const float>(), chunk_hidden, chunk_positions, rows, width, stream);
    gemm_row_major(cublas, args.op, false, true, rows, vocab, width, 1.0f, chunk_hidden, width, weight_data, width,
                   0.0f, logits, vocab);
    detail::dispatch_bool(backward, [&](auto with_gradient) {
      cross_entropy_rows_kernel<decltype(with_gradient)::value><<<grid_for(rows), cross_entropy_threads, 0, stream>>>(
          logits, has_bias ? bias.data<const float>() : nullptr, targets.data<const std::int32_t>(), chunk_positions,
          rows, vocab, options.grad_scale, row_losses.data() + first);
    });
    check_launch("cross_entropy_rows_kernel");
    if (!backward) continue;
    if (want_dweight) {
      gemm_row_major(cublas, args.op, true, false, vocab, width, rows, 1.0f, logits, vocab, chunk_hidden, width, 1.0f,
                     dweight.data<float>(), width);
    }
    if (want_dbias) {
      const dim3 threads(kernel::column_sum_columns, kernel::column_sum_lanes);
      kernel::column_sums_kernel<float><<<grid_for(ceil_div(vocab, kernel::column_sum_columns)), threads, 0, stream>>>(
          logits, dbias.data<float>(), rows, vocab);
      check_launch("column_sums_kernel");
    }
    if (want_dhidden) {
      // The gathered rows are no longer needed (dweight's GEMM ran before, on the same stream).
      gemm_row_major(cublas, args.op, false, false, rows, width, vocab, 1.0f, logits, vocab, weight_data, width, 0.0f,
                     chunk_hidden, width);
      detail::copy_rows<RowCopy::scatter>(chunk_hidden, dhidden.data<float>(), chunk_positions, rows, width, stream);
    }
  }

  std::vector<double> losses(supervised.size());
  copy_to_host(std::span<double>(losses), row_losses.data(), stream);
  synchronize(stream);
  for (const double loss : losses) sums.loss_sum += loss;
  return sums;
}

}  // namespace qlora::cuda
