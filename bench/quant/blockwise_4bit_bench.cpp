// CPU 4-bit quantize and dequantize at real layer shapes (Llama-style 4096x4096,
// Phi-2's 2560x10240 MLP), bf16 weights, NF4, double quantization on and off.
// Throughput is reported in bytes/s of the dense side (the bf16 weight read by
// quantize, written by dequantize) and as `vs_memcpy`: a same-run memcpy of
// those bytes over the same threads, divided by our time.
#include <qlora/quant/blockwise_4bit.hpp>

#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "support/same_run_baseline.hpp"

namespace {

using namespace qlora;

std::vector<bf16> random_weight(std::int64_t rows, std::int64_t cols) {
  std::mt19937 generator(1234);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<bf16> weight(static_cast<std::size_t>(rows * cols));
  for (auto& value : weight) value = bf16::from_float(normal(generator));
  return weight;
}

void quantize_nf4(benchmark::State& state) {
  const std::int64_t rows = state.range(0), cols = state.range(1);
  const bool nested = state.range(2) != 0;
  const auto weight = random_weight(rows, cols);
  const unsigned threads = default_thread_count();
  bench::ParallelMemcpy memcpy_baseline(weight.size() * sizeof(bf16), threads);
  bench::time_against_baseline(
      state,
      [&] {
        auto q = quantize_4bit<NF4, bf16>(weight, {rows, cols}, {.blocksize = 64, .double_quant = nested, .threads = threads});
        benchmark::DoNotOptimize(q.packed.data());
      },
      memcpy_baseline, weight.size() * sizeof(bf16));
}

void dequantize_nf4(benchmark::State& state) {
  const std::int64_t rows = state.range(0), cols = state.range(1);
  const bool nested = state.range(2) != 0;
  const auto weight = random_weight(rows, cols);
  const unsigned threads = default_thread_count();
  const auto q = quantize_4bit<NF4, bf16>(weight, {rows, cols}, {.blocksize = 64, .double_quant = nested});
  std::vector<bf16> out(weight.size());
  bench::ParallelMemcpy memcpy_baseline(out.size() * sizeof(bf16), threads);
  bench::time_against_baseline(
      state,
      [&] {
        dequantize_4bit<bf16>(q.packed, q.state, std::span<bf16>(out), threads);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
      },
      memcpy_baseline, out.size() * sizeof(bf16));
}

void layer_shapes(benchmark::internal::Benchmark* b) {
  for (const auto nested : {0, 1}) {
    b->Args({4096, 4096, nested});
    b->Args({2560, 10240, nested});
  }
  b->ArgNames({"rows", "cols", "nested"})->UseManualTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(quantize_nf4)->Apply(layer_shapes);
BENCHMARK(dequantize_nf4)->Apply(layer_shapes);

}  // namespace

BENCHMARK_MAIN();
