// cuBLAS for qlora's CUDA code: QLORA_CUBLAS_CHECK (every failed call becomes
// a named qlora::Error), CublasHandle (an owned or borrowed handle) and
// gemm_row_major (our row-major GEMMs on cuBLAS's column-major ones).
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/cublas.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cublas_v2.h>

#include <climits>
#include <cstdint>
#include <initializer_list>
#include <string_view>
#include <type_traits>
#include <utility>

#include <fmt/format.h>

#include <qlora/core/dtype.hpp>
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

/// The cudaDataType cuBLAS calls T (a FloatStorage type, or double).
template <class T>
  requires FloatStorage<T> || std::is_same_v<T, double>
inline constexpr cudaDataType_t cuda_data_type = std::is_same_v<T, double>  ? CUDA_R_64F
                                                 : std::is_same_v<T, float> ? CUDA_R_32F
                                                 : std::is_same_v<T, bf16>  ? CUDA_R_16BF
                                                                            : CUDA_R_16F;

/// Row-major C[m, n] = alpha·op(A)·op(B) + beta·C, op(A) [m, k] (A stored [k, m] when
/// transpose_a), op(B) [k, n] (B stored [n, k] when transpose_b), lda/ldb/ldc the row strides.
/// cuBLAS is column-major, so it computes Cᵀ = op(B)ᵀ·op(A)ᵀ: the operands are swapped. fp32
/// and fp64 operands are computed pedantically (never TF32, even on a handle set to it); 16-bit
/// operands accumulate in fp32. Extents beyond cuBLAS's int are refused, naming `what`.
template <class T, class C>
void gemm_row_major(cublasHandle_t cublas, std::string_view what, bool transpose_a, bool transpose_b, std::int64_t m,
                    std::int64_t n, std::int64_t k, C alpha, const T* a, std::int64_t lda, const T* b,
                    std::int64_t ldb, C beta, C* c, std::int64_t ldc) {
  for (const std::int64_t extent : {m, n, k, lda, ldb, ldc}) {
    check(extent <= INT_MAX, "ShapeMismatch", "{}: a GEMM extent of {} exceeds cuBLAS's 32-bit int", what, extent);
  }
  constexpr bool is_double = std::is_same_v<T, double>;
  static_assert(std::is_same_v<C, double> == is_double, "double GEMMs have a double C, all others an fp32 C");
  constexpr cublasComputeType_t compute = is_double                    ? CUBLAS_COMPUTE_64F_PEDANTIC
                                          : std::is_same_v<T, float> ? CUBLAS_COMPUTE_32F_PEDANTIC
                                                                     : CUBLAS_COMPUTE_32F;
  QLORA_CUBLAS_CHECK(cublasGemmEx(cublas, transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                  transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                                  static_cast<int>(k), &alpha, b, cuda_data_type<T>, static_cast<int>(ldb), a,
                                  cuda_data_type<T>, static_cast<int>(lda), &beta, c, cuda_data_type<C>,
                                  static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT));
}

}  // namespace qlora::cuda
