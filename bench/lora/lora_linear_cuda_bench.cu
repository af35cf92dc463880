// One QLoRA layer's training step on the GPU (cuda/lora_linear.cuh):
// forward_train + backward with dx, NF4 base with double quantization, bf16
// compute, dropout 0.1, at Llama-style 4096x4096 (r = 64) and Phi-2's
// 2560 -> 10240 fc1 (r = 32, the shape the CPU bench uses), 1024 and 8192 tokens.
//
// Baseline, in the same run on the same stream: the two dense GEMMs a frozen
// Linear needs anyway, y = x·Wᵀ and dx = dy·W, as cublasGemmEx with bf16
// inputs and outputs and fp32 accumulation on a weight dequantized to bf16
// beforehand. Both are timed with CUDA events, alternating, each iteration
// behind a short spin kernel so that host launch overhead is not counted as
// GPU time (as in quant/dequantize_4bit_cuda_bench.cu).
//
// Counters:
//  - vs_dense_gemm = layer time / baseline time (the CPU bench's definition):
//    what dequantizing the 4-bit base per tile, the fp32 adapter and the
//    epilogues cost on top of the unavoidable GEMMs;
//  - gemm_flops: the baseline GEMMs' 4·T·in·out FLOPs per second of layer time;
//  - held_bytes / workspace_bytes: device memory the layer holds (base,
//    adapter, gradients; plus the saved activations) and its cached workspaces.
// Run: build-cuda/bench/lora_linear_cuda_bench (needs a GPU; exits 77 without one).
#include <qlora/cuda/dequantize_4bit.cuh>
#include <qlora/cuda/lora_linear.cuh>
#include <qlora/cuda/quantize_4bit.cuh>

#include <benchmark/benchmark.h>

#include "support/cuda_timing.cuh"
#include "support/layer_shapes.hpp"

#include <algorithm>
#include <vector>

namespace {

using namespace qlora;
namespace qcuda = qlora::cuda;  // `cuda::` alone is ambiguous with CCCL's ::cuda under `using namespace qlora`

/// out[i] = bf16(scale · (2u - 1)), u uniform from Philox: test data made on the device.
__global__ void fill_kernel(bf16* out, std::int64_t n, std::uint64_t seed, float scale) {
  for (std::int64_t i = std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += std::int64_t{gridDim.x} * blockDim.x) {
    out[i] = bf16::from_float(scale * (2.0f * philox_uniform(seed, 0, static_cast<std::uint64_t>(i)) - 1.0f));
  }
}

qcuda::DeviceBuffer<bf16> random_device(std::int64_t n, std::uint64_t seed, float scale, cudaStream_t stream) {
  qcuda::DeviceBuffer<bf16> buffer(static_cast<std::size_t>(n), stream);
  fill_kernel<<<qcuda::grid_for(qcuda::ceil_div(n, 256)), 256, 0, stream>>>(buffer.data(), n, seed, scale);
  qcuda::check_launch("fill_kernel");
  return buffer;
}

TensorView device_view(const qcuda::DeviceBuffer<bf16>& buffer, std::int64_t rows, std::int64_t cols) {
  return {buffer.data(), DType::BF16, Shape{rows, cols}, Device::cuda};
}

/// Row-major C[m, n] (bf16) = A[m, k] · op(B) in bf16 with fp32 accumulation;
/// op(B) = Bᵀ for B stored [n, k] (transpose_b), else B stored [k, n].
void dense_gemm(cublasHandle_t handle, bool transpose_b, std::int64_t m, std::int64_t n, std::int64_t k, const bf16* a,
                const bf16* b, bf16* c) {
  const float one = 1.0f, zero = 0.0f;
  QLORA_CUBLAS_CHECK(cublasGemmEx(handle, transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n),
                                  static_cast<int>(m), static_cast<int>(k), &one, b, CUDA_R_16BF,
                                  static_cast<int>(transpose_b ? k : n), a, CUDA_R_16BF, static_cast<int>(k), &zero, c,
                                  CUDA_R_16BF, static_cast<int>(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void lora_linear_cuda_step(benchmark::State& state) {
  const std::int64_t out = state.range(0), in = state.range(1), r = state.range(2), tokens = state.range(3);
  const cudaStream_t stream = nullptr;

  // The base: a random bf16 weight, NF4 with double quantization (quantized on the GPU).
  const auto weight = bench::random_weight(out, in);
  const Quantized4bit quantized = qcuda::quantize_4bit_host<NF4, bf16>(std::span<const bf16>(weight), {out, in},
                                                                      {.blocksize = 64, .double_quant = true}, stream);
  LoraConfig config;
  config.r = static_cast<int>(r);
  config.lora_alpha = 2.0 * static_cast<double>(r);
  config.lora_dropout = 0.1;
  LoraLinear<NF4, bf16, Cuda> layer("proj", FrozenWeight<NF4, bf16>(quantized), TensorView{}, config, {},
                                    {.stream = stream});
  // A non-zero B so that the adapter's products are real work, not multiplications by zero.
  const auto b = bench::random_weight(out, r);
  const Tensor b_host(DType::BF16, Shape{out, r});
  std::ranges::copy(b, b_host.span<bf16>().begin());
  layer.set_adapter_weights(layer.download(layer.lora_A()).view(), b_host.view());

  const qcuda::DeviceBuffer<bf16> x = random_device(tokens * in, 1, 1.0f, stream);
  const qcuda::DeviceBuffer<bf16> dy = random_device(tokens * out, 2, 0.01f, stream);
  const qcuda::DeviceBuffer<bf16> y(static_cast<std::size_t>(tokens * out), stream);
  const qcuda::DeviceBuffer<bf16> dx(static_cast<std::size_t>(tokens * in), stream);
  // The baseline's weight: W̃ dequantized once, the same values the layer multiplies with.
  const qcuda::DeviceBuffer<bf16> dense(static_cast<std::size_t>(out * in), stream);
  qcuda::dequantize_4bit<bf16>(layer.device_base(), dense.span(), stream);
  const qcuda::DeviceBuffer<bf16> y_dense(y.size(), stream), dx_dense(dx.size(), stream);
  const qcuda::CublasHandle cublas = qcuda::CublasHandle::create();
  QLORA_CUBLAS_CHECK(cublasSetStream(cublas.get(), stream));

  std::size_t activation_bytes = 0;
  std::uint64_t call = 0;
  const auto step = [&] {
    const qcuda::LoraActivations saved =
        layer.forward_train(device_view(x, tokens, in), device_view(y, tokens, out), DropoutKey{.seed = 5, .call = call++});
    layer.backward(saved, device_view(dy, tokens, out), device_view(dx, tokens, in));
    activation_bytes = saved.bytes();
  };
  const auto baseline = [&] {
    dense_gemm(cublas.get(), true, tokens, out, in, x.data(), dense.data(), y_dense.data());    // y = x·Wᵀ
    dense_gemm(cublas.get(), false, tokens, in, out, dy.data(), dense.data(), dx_dense.data());  // dx = dy·W
  };
  step();  // warm-up: module load, workspaces, cuBLAS heuristics
  baseline();
  qcuda::synchronize(stream);

  bench::EventTimer events;
  double layer_seconds = 0.0, baseline_seconds = 0.0;
  for (auto _ : state) {
    bench::spin_kernel<<<1, 1, 0, stream>>>(1000000);  // ~0.5 ms: longer than enqueueing one step
    qcuda::check_launch("spin_kernel");
    QLORA_CUDA_CHECK(cudaEventRecord(events[0], stream));
    step();
    QLORA_CUDA_CHECK(cudaEventRecord(events[1], stream));
    baseline();
    QLORA_CUDA_CHECK(cudaEventRecord(events[2], stream));
    const double elapsed = events.seconds(0, 1);
    layer_seconds += elapsed;
    baseline_seconds += events.seconds(1, 2);
    state.SetIterationTime(elapsed);
  }
  state.counters["vs_dense_gemm"] = layer_seconds / baseline_seconds;
  state.counters["gemm_flops"] = benchmark::Counter(
      static_cast<double>(4 * tokens * in * out) * static_cast<double>(state.iterations()) / layer_seconds);
  state.counters["held_bytes"] = static_cast<double>(layer.bytes() + activation_bytes);
  state.counters["workspace_bytes"] = static_cast<double>(layer.workspace_bytes());
}

BENCHMARK(lora_linear_cuda_step)
    ->ArgsProduct({{4096}, {4096}, {64}, {1024, 8192}})
    ->ArgsProduct({{10240}, {2560}, {32}, {1024, 8192}})
    ->ArgNames({"out", "in", "r", "tokens"})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) { return qlora::bench::run_gpu_benchmarks(argc, argv); }
