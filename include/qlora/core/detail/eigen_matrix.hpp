// IWYU pragma: private
// Row-major float matrices over raw buffers, for the CPU GEMMs of lora/ and nn/.
// Eigen does the blocking and SIMD of every product; we only describe where
// the operands live (a pointer, rows, cols and the row stride).
#pragma once

#include <Eigen/Core>

#include <cstdint>

namespace qlora::detail {

using RowMajorMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixRef = Eigen::Map<RowMajorMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;
using ConstMatrixRef = Eigen::Map<const RowMajorMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;

/// The rows x cols matrix at `data` whose rows are `row_stride` floats apart.
inline MatrixRef matrix(float* data, std::int64_t rows, std::int64_t cols, std::int64_t row_stride) {
  return MatrixRef(data, rows, cols, Eigen::OuterStride<>(row_stride));
}
inline ConstMatrixRef matrix(const float* data, std::int64_t rows, std::int64_t cols, std::int64_t row_stride) {
  return ConstMatrixRef(data, rows, cols, Eigen::OuterStride<>(row_stride));
}

}  // namespace qlora::detail
