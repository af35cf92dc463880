// CPU 4-bit quantize and dequantize at real layer shapes (Llama-style 4096x4096,
// Phi-2's 2560x10240 MLP), bf16 weights, NF4, double quantization on and off.
// Throughput is reported in bytes/s of the dense side (the bf16 weight read by
// quantize, written by dequantize) and as `vs_memcpy`: a same-run memcpy of
// those bytes over the same threads, divided by our time.
#include <qlora/quant/blockwise_4bit.hpp>

#include <benchmark/benchmark.h>

#include <vector>

#include "support/layer_shapes.hpp"
#include "support/same_run_baseline.hpp"

namespace {

using namespace qlora;

void quantize_nf4(benchmark::State& state) {
  const std::int64_t rows = state.range(0), cols = state.range(1);
  const bool nested = state.range(2) != 0;
  const auto weight = bench::random_weight(rows, cols);
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
  const auto weight = bench::random_weight(rows, cols);
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

BENCHMARK(quantize_nf4)->Apply([](auto* b) { bench::layer_shapes(b, benchmark::kMillisecond); });
BENCHMARK(dequantize_nf4)->Apply([](auto* b) { bench::layer_shapes(b, benchmark::kMillisecond); });

}  // namespace

BENCHMARK_MAIN();
