// cuBLAS for qlora's CUDA code: QLORA_CUBLAS_CHECK (every failed call becomes
// a named qlora::Error) and CublasHandle (an owned or borrowed handle).
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/cublas.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cublas_v2.h>

#include <utility>

#include <fmt/format.h>

#include <qlora/core/error.hpp>

namespace qlora::cuda::detail {
[[noreturn]] inline void throw_cublas_error(cublasStatus_t status, const char* call, const char* file, int line) {
  throw Error("CublasError", fmt::format("{} failed at {}:{}: {} ({})", call, file, line, cublasGetStatusString(status),
                                         cublasGetStatusName(status)));
}
}  // namespace qlora::cuda::detail

/// Evaluates a cuBLAS call; anything but CUBLAS_STATUS_SUCCESS throws
/// qlora::Error("CublasError", "<call> failed at <file>:<line>: <message> (<name>)").
#define QLORA_CUBLAS_CHECK(call)                                                          \
  do {                                                                                    \
    const cublasStatus_t qlora_cublas_status_ = (call);                                   \
    if (qlora_cublas_status_ != CUBLAS_STATUS_SUCCESS) [[unlikely]] {                      \
      ::qlora::cuda::detail::throw_cublas_error(qlora_cublas_status_, #call, __FILE__, __LINE__); \
    }                                                                                     \
  } while (false)

namespace qlora::cuda {

/// A cuBLAS handle, owned (created here, destroyed with the object) or
/// borrowed from the caller. Move-only.
class CublasHandle {
 public:
  CublasHandle() = default;
  static CublasHandle create() {
    cublasHandle_t handle = nullptr;
    QLORA_CUBLAS_CHECK(cublasCreate(&handle));
    return CublasHandle(handle, true);
  }
  static CublasHandle borrow(cublasHandle_t handle) { return CublasHandle(handle, false); }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  CublasHandle(CublasHandle&& other) noexcept
      : handle_(std::exchange(other.handle_, nullptr)), owned_(std::exchange(other.owned_, false)) {}
  CublasHandle& operator=(CublasHandle&& other) noexcept {
    if (this != &other) {
      reset();
      handle_ = std::exchange(other.handle_, nullptr);
      owned_ = std::exchange(other.owned_, false);
    }
    return *this;
  }
  ~CublasHandle() { reset(); }

  [[nodiscard]] cublasHandle_t get() const noexcept { return handle_; }

 private:
  CublasHandle(cublasHandle_t handle, bool owned) : handle_(handle), owned_(owned) {}
  void reset() noexcept {
    if (owned_ && handle_ != nullptr) (void)cublasDestroy(handle_);  // a destructor cannot throw
    handle_ = nullptr;
    owned_ = false;
  }
  cublasHandle_t handle_ = nullptr;
  bool owned_ = false;
};

}  // namespace qlora::cuda
