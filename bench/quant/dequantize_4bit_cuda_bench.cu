// GPU 4-bit dequantize and quantize at real layer shapes (Llama-style
// 4096x4096, Phi-2's 2560x10240 MLP): NF4, blocksize 64, bf16 weights, double
// quantization on and off. Timed with CUDA events (manual time), each
// iteration followed by a same-run baseline: a device-to-device
// cudaMemcpyAsync of the same number of bytes the operation moves.
//
// Counters:
//  - bytes_per_second: bytes the operation moves (dequantize: packed codes +
//    statistics read + output written; quantize: input read + packed codes +
//    statistics written) per second of kernel time;
//  - memcpy_bytes_per_second: the baseline's DRAM traffic (it reads and
//    writes its byte count, so 2x bytes) per second;
//  - vs_memcpy: the ratio of the two, i.e. the fraction of the bandwidth a
//    plain copy reaches on this device in this run (goal for dequantize on
//    an H100: >= 0.9).
// Run: build-cuda/bench/quant_dequantize_4bit_cuda_bench (needs a GPU; exits 77 without one).
#include <qlora/cuda/dequantize_4bit.cuh>
#include <qlora/cuda/quantize_4bit.cuh>
#include <qlora/quant/blockwise_4bit.hpp>

#include <benchmark/benchmark.h>

#include "support/cuda_timing.cuh"
#include "support/layer_shapes.hpp"

#include <cstdlib>
#include <vector>

namespace {

using namespace qlora;
namespace qcuda = qlora::cuda;  // `cuda::` alone is ambiguous with CCCL's ::cuda under `using namespace qlora`

/// Times `operation` and a device-to-device copy of `bytes` alternately on `stream`.
template <class Operation>
void time_against_memcpy(benchmark::State& state, cudaStream_t stream, Operation&& operation, std::size_t bytes) {
  qcuda::DeviceBuffer<std::byte> source(bytes, stream), target(bytes, stream);
  QLORA_CUDA_CHECK(cudaMemsetAsync(source.data(), 1, bytes, stream));
  operation();  // warm-up: module load, caches
  QLORA_CUDA_CHECK(cudaMemcpyAsync(target.data(), source.data(), bytes, cudaMemcpyDeviceToDevice, stream));
  qcuda::synchronize(stream);
  bench::EventTimer timer;
  double operation_seconds = 0.0, copy_seconds = 0.0;
  for (auto _ : state) {
    bench::spin_kernel<<<1, 1, 0, stream>>>(200000);  // ~0.1 ms: longer than enqueueing what follows
    QLORA_CUDA_CHECK(cudaGetLastError());
    QLORA_CUDA_CHECK(cudaEventRecord(timer[0], stream));
    operation();
    QLORA_CUDA_CHECK(cudaEventRecord(timer[1], stream));
    QLORA_CUDA_CHECK(cudaMemcpyAsync(target.data(), source.data(), bytes, cudaMemcpyDeviceToDevice, stream));
    QLORA_CUDA_CHECK(cudaEventRecord(timer[2], stream));
    const double elapsed = timer.seconds(0, 1);
    operation_seconds += elapsed;
    copy_seconds += timer.seconds(1, 2);
    state.SetIterationTime(elapsed);
  }
  const auto iterations = static_cast<double>(state.iterations());
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(bytes));
  const double operation_rate = iterations * static_cast<double>(bytes) / operation_seconds;
  const double copy_rate = iterations * 2.0 * static_cast<double>(bytes) / copy_seconds;
  state.counters["memcpy_bytes_per_second"] = copy_rate;
  state.counters["vs_memcpy"] = operation_rate / copy_rate;
}

std::size_t state_bytes(const qcuda::DeviceQuantized4bit& q) {
  return q.absmax.size_bytes() + q.nested_codes.size_bytes() + q.nested_absmax.size_bytes() +
         q.nested_code_map.size_bytes() + q.nested_offset.size_bytes();
}

void dequantize_nf4_cuda(benchmark::State& state) {
  const std::int64_t rows = state.range(0), cols = state.range(1);
  const bool nested = state.range(2) != 0;
  const cudaStream_t stream = nullptr;
  const auto weight = bench::random_weight(rows, cols);
  const qcuda::DeviceBuffer<bf16> device_weight = qcuda::to_device(std::span<const bf16>(weight), stream);
  const qcuda::DeviceQuantized4bit q = qcuda::quantize_4bit<NF4, bf16>(
      std::span<const bf16>(device_weight.data(), device_weight.size()), {rows, cols},
      {.blocksize = 64, .double_quant = nested}, stream);
  qcuda::DeviceBuffer<bf16> out(weight.size(), stream);
  const std::size_t bytes = q.packed.size_bytes() + state_bytes(q) + out.size_bytes();
  time_against_memcpy(state, stream, [&] { qcuda::dequantize_4bit<bf16>(q, out.span(), stream); }, bytes);
}

void quantize_nf4_cuda(benchmark::State& state) {
  const std::int64_t rows = state.range(0), cols = state.range(1);
  const bool nested = state.range(2) != 0;
  const cudaStream_t stream = nullptr;
  const std::int64_t n = rows * cols, blocksize = 64;
  const std::int64_t blocks = n / blocksize, nested_blocks = (blocks + 255) / 256;
  const auto weight = bench::random_weight(rows, cols);
  const qcuda::DeviceBuffer<bf16> input = qcuda::to_device(std::span<const bf16>(weight), stream);
  qcuda::DeviceBuffer<std::uint8_t> packed(static_cast<std::size_t>(n / 2), stream);
  qcuda::DeviceBuffer<float> absmax(static_cast<std::size_t>(blocks), stream);
  qcuda::DeviceBuffer<qcuda::Quantize4bitStatus> status(1, stream);
  qcuda::DeviceBuffer<std::uint8_t> codes(static_cast<std::size_t>(blocks), stream);
  qcuda::DeviceBuffer<float> absmax2(static_cast<std::size_t>(nested_blocks), stream), offset(1, stream);
  qcuda::DeviceBuffer<double> run_sums(static_cast<std::size_t>(nested_blocks), stream);
  const qcuda::DeviceCodeLut lut(stream);
  const qcuda::Quantize4bitOutputs outputs{packed.data(), absmax.data(), status.data(), codes.data(),
                                          absmax2.data(), offset.data(),  run_sums.data()};
  // Written: packed codes and the state a checkpoint stores.
  const std::size_t state_size = nested ? codes.size_bytes() + absmax2.size_bytes() + offset.size_bytes() : absmax.size_bytes();
  const std::size_t bytes = input.size_bytes() + packed.size_bytes() + state_size;
  time_against_memcpy(
      state, stream,
      [&] { qcuda::quantize_4bit_async<NF4, bf16>(input.data(), n, blocksize, nested, outputs, &lut, stream); }, bytes);
  qcuda::check_quantize_status(status.data(), input.data(), stream);
}

BENCHMARK(dequantize_nf4_cuda)->Apply([](auto* b) { bench::layer_shapes(b, benchmark::kMicrosecond); });
BENCHMARK(quantize_nf4_cuda)->Apply([](auto* b) { bench::layer_shapes(b, benchmark::kMicrosecond); });

}  // namespace

int main(int argc, char** argv) { return qlora::bench::run_gpu_benchmarks(argc, argv); }
