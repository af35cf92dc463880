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

/// Seconds spent in the operation and in the baseline over a whole run.
struct AlternatingTimes {
  double operation_seconds = 0.0;
  double baseline_seconds = 0.0;
};

/// Runs `operation` and `baseline` alternately, reporting the operation's
/// time as the iteration time (manual time); returns both totals.
template <class Operation, class Baseline>
AlternatingTimes time_alternating(benchmark::State& state, Operation&& operation, Baseline&& baseline) {
  using clock = std::chrono::steady_clock;
  AlternatingTimes times;
  for (auto _ : state) {
    const auto start = clock::now();
    operation();
    const auto middle = clock::now();
    baseline();
    const auto end = clock::now();
    const double elapsed = std::chrono::duration<double>(middle - start).count();
    times.operation_seconds += elapsed;
    times.baseline_seconds += std::chrono::duration<double>(end - middle).count();
    state.SetIterationTime(elapsed);
  }
  return times;
}

/// time_alternating against a memcpy-like baseline: reports
/// `bytes_per_iteration` as bytes/s and the `vs_memcpy` ratio.
template <class Operation, class Baseline>
void time_against_baseline(benchmark::State& state, Operation&& operation, Baseline&& baseline,
                           std::size_t bytes_per_iteration) {
  const AlternatingTimes times = time_alternating(state, operation, baseline);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(bytes_per_iteration));
  state.counters["vs_memcpy"] = times.baseline_seconds / times.operation_seconds;
}

}  // namespace qlora::bench
