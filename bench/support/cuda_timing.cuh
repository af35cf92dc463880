// GPU timing for the CUDA benchmarks: CUDA events for the operation and its
// same-run baseline, and a spin kernel that queues them behind it.
#pragma once

#include <qlora/cuda/common.cuh>

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstdio>

namespace qlora::bench {

/// Three events: start, end of the operation, end of the baseline.
class EventTimer {
 public:
  EventTimer() {
    for (auto*& event : events_) QLORA_CUDA_CHECK(cudaEventCreate(&event));
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  ~EventTimer() {
    for (auto* event : events_) (void)cudaEventDestroy(event);
  }
  cudaEvent_t operator[](int i) const { return events_[i]; }
  /// Seconds between events a and b (after synchronizing on b).
  double seconds(int a, int b) const {
    QLORA_CUDA_CHECK(cudaEventSynchronize(events_[b]));
    float milliseconds = 0.0f;
    QLORA_CUDA_CHECK(cudaEventElapsedTime(&milliseconds, events_[a], events_[b]));
    return static_cast<double>(milliseconds) * 1e-3;
  }

 private:
  cudaEvent_t events_[3]{};
};

/// Keeps the GPU busy for about `cycles` clock cycles, so that the events and
/// launches enqueued behind it run back to back: without it the host's
/// launch overhead would be timed as GPU time (the stream is idle after each
/// iteration's synchronization).
template <class = void>  // a template, so that every .cu including this has its own kernel (no ODR clash)
__global__ void spin_kernel(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

/// The main of a GPU benchmark program: exits 77 (skipped) without a usable
/// device, otherwise runs the registered benchmarks.
inline int run_gpu_benchmarks(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "SKIPPED: no usable CUDA device; this benchmark needs one\n");
    return 77;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace qlora::bench
