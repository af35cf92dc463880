// GPU timing for the CUDA benchmarks: CUDA events for the operation and its
// same-run baseline, and a spin kernel that queues them behind it.
#pragma once

#include <qlora/cuda/common.cuh>

#include <cuda_runtime.h>

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

}  // namespace qlora::bench
