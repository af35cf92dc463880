// CUDA plumbing shared by every launcher: QLORA_CUDA_CHECK (a failed runtime
// call becomes a qlora::Error "CudaError" naming the call, file:line and
// cudaGetErrorString), DeviceBuffer<T> (stream-ordered RAII device memory),
// stream-ordered copies, argument checks and launch-shape helpers.
//
// Host code only: kernels live in cuda/kernel/*.cuh. Everything here is
// inline or a template (header-only ODR rule, docs/architecture.md).
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/common.cuh needs nvcc (CUDA headers are compiled only by the CUDA compiler)"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#if defined(FMT_USE_CONSTEXPR) && !FMT_USE_CONSTEXPR
#error "fmt was included before any qlora header with its constexpr support off (fmt 9 does that under nvcc); include qlora headers first or define FMT_USE_CONSTEXPR=1"
#endif

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <utility>

#include <fmt/format.h>

#include <qlora/core/error.hpp>

namespace qlora::cuda {

namespace detail {
[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line) {
  throw Error("CudaError", fmt::format("{} failed at {}:{}: {} ({})", call, file, line, cudaGetErrorString(status),
                                       cudaGetErrorName(status)));
}
}  // namespace detail

}  // namespace qlora::cuda

/// Evaluates a CUDA runtime call; anything but cudaSuccess throws
/// qlora::Error("CudaError", "<call> failed at <file>:<line>: <message>").
#define QLORA_CUDA_CHECK(call)                                                          \
  do {                                                                                  \
    const cudaError_t qlora_cuda_status_ = (call);                                      \
    if (qlora_cuda_status_ != cudaSuccess) [[unlikely]] {                                \
      ::qlora::cuda::detail::throw_cuda_error(qlora_cuda_status_, #call, __FILE__, __LINE__); \
    }                                                                                   \
  } while (false)

namespace qlora::cuda {

// ---- device memory ---------------------------------------------------------

/// Device memory for `count` elements of T, allocated with cudaMallocAsync on
/// `stream` and freed with cudaFreeAsync on the same stream, so allocation,
/// use and release are ordered with the work on that stream. The stream must
/// still exist when the buffer is destroyed (or call reset() earlier). Move-only;
/// a buffer of zero elements holds no allocation and a null pointer.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(std::size_t count, cudaStream_t stream) : count_(count), stream_(stream) {
    if (count == 0) return;
    check(count <= std::numeric_limits<std::size_t>::max() / sizeof(T), "CudaError",
          "DeviceBuffer of {} elements of {} bytes overflows size_t", count, sizeof(T));
    void* pointer = nullptr;
    QLORA_CUDA_CHECK(cudaMallocAsync(&pointer, count * sizeof(T), stream));
    data_ = static_cast<T*>(pointer);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), count_(std::exchange(other.count_, 0)), stream_(other.stream_) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = std::exchange(other.data_, nullptr);
      count_ = std::exchange(other.count_, 0);
      stream_ = other.stream_;
    }
    return *this;
  }
  ~DeviceBuffer() { reset(); }

  /// Frees the memory (stream-ordered on the buffer's stream); the buffer becomes empty.
  void reset() noexcept {
    if (data_ != nullptr) {
      // A destructor cannot throw; a failing free (a destroyed stream, a
      // sticky device error) leaks rather than terminating the program.
      (void)cudaFreeAsync(data_, stream_);
    }
    data_ = nullptr;
    count_ = 0;
  }

  [[nodiscard]] T* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return count_; }
  [[nodiscard]] std::size_t size_bytes() const noexcept { return count_ * sizeof(T); }
  [[nodiscard]] bool empty() const noexcept { return count_ == 0; }
  [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }
  [[nodiscard]] std::span<T> span() const noexcept { return {data_, count_}; }

 private:
  T* data_ = nullptr;
  std::size_t count_ = 0;
  cudaStream_t stream_ = nullptr;
};

// ---- stream-ordered copies -------------------------------------------------

/// Copies host `source` to device `destination` (stream-ordered; with pageable
/// host memory the call returns once the source has been staged).
template <class T>
void copy_to_device(T* destination, std::span<const T> source, cudaStream_t stream) {
  if (source.empty()) return;
  QLORA_CUDA_CHECK(cudaMemcpyAsync(destination, source.data(), source.size_bytes(), cudaMemcpyHostToDevice, stream));
}

/// Copies `destination.size()` elements from device `source` to host memory
/// (stream-ordered: synchronize the stream before reading pinned memory).
template <class T>
void copy_to_host(std::span<T> destination, const T* source, cudaStream_t stream) {
  if (destination.empty()) return;
  QLORA_CUDA_CHECK(cudaMemcpyAsync(destination.data(), source, destination.size_bytes(), cudaMemcpyDeviceToHost, stream));
}

/// A new device buffer holding a copy of `source`.
template <class T>
DeviceBuffer<T> to_device(std::span<const T> source, cudaStream_t stream) {
  DeviceBuffer<T> buffer(source.size(), stream);
  copy_to_device(buffer.data(), source, stream);
  return buffer;
}

/// Waits for all work on `stream`.
inline void synchronize(cudaStream_t stream) { QLORA_CUDA_CHECK(cudaStreamSynchronize(stream)); }

// ---- argument checks -------------------------------------------------------

/// Throws Error("NullPointer") naming `argument` when `pointer` is null.
inline void check_not_null(const void* pointer, const char* function, const char* argument) {
  check(pointer != nullptr, "NullPointer", "{}: device pointer `{}` is null", function, argument);
}

/// True when `pointer` is a multiple of `alignment` bytes.
inline bool is_aligned(const void* pointer, std::size_t alignment) noexcept {
  return reinterpret_cast<std::uintptr_t>(pointer) % alignment == 0;
}

// ---- launch shapes ---------------------------------------------------------

/// ceil(a / b) for positive b.
constexpr std::int64_t ceil_div(std::int64_t a, std::int64_t b) noexcept { return (a + b - 1) / b; }

/// Properties a launcher sizes its grid by, for the current device.
struct DeviceLimits {
  int device = 0;
  int multiprocessors = 0;
  bool cooperative_launch = false;
};

inline DeviceLimits current_device_limits() {
  DeviceLimits limits;
  QLORA_CUDA_CHECK(cudaGetDevice(&limits.device));
  QLORA_CUDA_CHECK(cudaDeviceGetAttribute(&limits.multiprocessors, cudaDevAttrMultiProcessorCount, limits.device));
  int cooperative = 0;
  QLORA_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, limits.device));
  limits.cooperative_launch = cooperative != 0;
  return limits;
}

/// A 1-D grid of `work_items` CTAs, capped at the largest x dimension a grid
/// may have; kernels loop (grid-stride) over what does not fit.
inline unsigned grid_for(std::int64_t work_items) noexcept {
  constexpr std::int64_t max_grid_x = 2147483647;  // cudaDeviceProp::maxGridSize[0] on every sm_30+ device
  return static_cast<unsigned>(std::clamp<std::int64_t>(work_items, 1, max_grid_x));
}

namespace detail {
/// Turns a run-time flag into a compile-time one: calls f(std::true_type{}) or
/// f(std::false_type{}). The one place launchers convert flags to template
/// arguments (flash-attention's BOOL_SWITCH, without the macro).
template <class F>
decltype(auto) dispatch_bool(bool flag, F&& f) {
  if (flag) return std::forward<F>(f)(std::true_type{});
  return std::forward<F>(f)(std::false_type{});
}
}  // namespace detail

/// Throws CudaError if the last launch failed (bad configuration, no kernel
/// image for this device): the check every launcher does after `<<<...>>>`.
inline void check_launch(const char* kernel_name) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) [[unlikely]] {
    throw Error("CudaError", fmt::format("launching {} failed: {} ({})", kernel_name, cudaGetErrorString(status),
                                         cudaGetErrorName(status)));
  }
}

}  // namespace qlora::cuda
