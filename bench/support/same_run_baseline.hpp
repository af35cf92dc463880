// Same-run baselines for Google Benchmark: the measured operation and a
// baseline (a memcpy of the same number of bytes, split over the same
// threads) alternate inside one benchmark loop, so machine drift hits both
// equally, and the ratio is reported as the counter `vs_memcpy`
// (baseline time / operation time: 1.0 means memcpy speed).
#pragma once

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstddef>
#include <cstring>
#include <vector>

#include <qlora/core/parallel.hpp>

namespace qlora::bench {

/// A memcpy of `bytes` split into `threads` contiguous chunks.
class ParallelMemcpy {
 public:
  ParallelMemcpy(std::size_t bytes, unsigned threads) : source_(bytes, std::byte{1}), target_(bytes), threads_(threads) {}
  void operator()() {
    const auto count = static_cast<std::int64_t>(source_.size());
    parallel_for(count, 1 << 20, [&](std::int64_t begin, std::int64_t end) {
      std::memcpy(target_.data() + begin, source_.data() + begin, static_cast<std::size_t>(end - begin));
    }, threads_);
    benchmark::DoNotOptimize(target_.data());
    benchmark::ClobberMemory();
  }

 private:
  std::vector<std::byte> source_, target_;
  unsigned threads_;
};

/// Runs `operation` and `baseline` alternately; reports the operation's time
/// (manual time), `bytes_per_iteration` as bytes/s and the `vs_memcpy` ratio.
template <class Operation, class Baseline>
void time_against_baseline(benchmark::State& state, Operation&& operation, Baseline&& baseline,
                           std::size_t bytes_per_iteration) {
  using clock = std::chrono::steady_clock;
  double operation_seconds = 0.0, baseline_seconds = 0.0;
  for (auto _ : state) {
    const auto start = clock::now();
    operation();
    const auto middle = clock::now();
    baseline();
    const auto end = clock::now();
    const double elapsed = std::chrono::duration<double>(middle - start).count();
    operation_seconds += elapsed;
    baseline_seconds += std::chrono::duration<double>(end - middle).count();
    state.SetIterationTime(elapsed);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(bytes_per_iteration));
  state.counters["vs_memcpy"] = baseline_seconds / operation_seconds;
}

}  // namespace qlora::bench
