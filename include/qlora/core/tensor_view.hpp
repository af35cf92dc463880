// TensorView: a non-owning, typed-at-run-time view of a strided tensor —
// data pointer, DType, shape, strides (in elements) and the device the memory
// lives on. Layers exchange TensorViews; `Tensor` (tensor.hpp) owns memory.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>

#include <fmt/format.h>

#include <qlora/core/device.hpp>
#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>

namespace qlora {

inline constexpr int max_tensor_rank = 8;

/// Up to max_tensor_rank extents, stored inline (no allocation).
class Shape {
 public:
  constexpr Shape() = default;
  Shape(std::initializer_list<std::int64_t> extents) : Shape(std::span<const std::int64_t>(extents.begin(), extents.size())) {}
  explicit Shape(std::span<const std::int64_t> extents) {
    check(extents.size() <= max_tensor_rank, "RankTooLarge", "rank {} exceeds qlora's maximum of {}",
          extents.size(), max_tensor_rank);
    for (const auto extent : extents) {
      check(extent >= 0, "ShapeMismatch", "negative extent {} in shape", extent);
      extents_[rank_++] = extent;
    }
  }

  [[nodiscard]] constexpr int rank() const noexcept { return rank_; }
  [[nodiscard]] constexpr std::int64_t operator[](int dim) const noexcept { return extents_[static_cast<std::size_t>(dim)]; }
  [[nodiscard]] constexpr std::int64_t numel() const noexcept {
    std::int64_t count = 1;
    for (int d = 0; d < rank_; ++d) count *= extents_[static_cast<std::size_t>(d)];
    return count;
  }
  [[nodiscard]] std::span<const std::int64_t> extents() const noexcept { return {extents_.data(), static_cast<std::size_t>(rank_)}; }
  [[nodiscard]] std::string to_string() const { return fmt::format("[{}]", fmt::join(extents(), ", ")); }
  friend constexpr bool operator==(const Shape& a, const Shape& b) noexcept {
    if (a.rank_ != b.rank_) return false;
    for (int d = 0; d < a.rank_; ++d) {
      if (a[d] != b[d]) return false;
    }
    return true;
  }

 private:
  std::array<std::int64_t, max_tensor_rank> extents_{};
  int rank_ = 0;
};

/// Row-major strides of `shape`, in elements.
inline std::array<std::int64_t, max_tensor_rank> contiguous_strides(const Shape& shape) noexcept {
  std::array<std::int64_t, max_tensor_rank> strides{};
  std::int64_t stride = 1;
  for (int d = shape.rank() - 1; d >= 0; --d) {
    strides[static_cast<std::size_t>(d)] = stride;
    stride *= shape[d];
  }
  return strides;
}

class TensorView {
 public:
  TensorView() = default;
  /// A contiguous row-major view of `data`.
  TensorView(void* data, DType dtype, Shape shape, Device device = Device::cpu)
      : data_(data), dtype_(dtype), shape_(shape), strides_(contiguous_strides(shape)), device_(device) {}

  [[nodiscard]] void* raw_data() const noexcept { return data_; }
  [[nodiscard]] DType dtype() const noexcept { return dtype_; }
  [[nodiscard]] const Shape& shape() const noexcept { return shape_; }
  [[nodiscard]] int rank() const noexcept { return shape_.rank(); }
  [[nodiscard]] std::int64_t numel() const noexcept { return shape_.numel(); }
  [[nodiscard]] std::int64_t stride(int dim) const noexcept { return strides_[static_cast<std::size_t>(dim)]; }
  [[nodiscard]] Device device() const noexcept { return device_; }
  /// Bytes spanned by the elements (for sub-byte dtypes, rounded up).
  [[nodiscard]] std::size_t byte_size() const noexcept {
    return static_cast<std::size_t>((numel() * static_cast<std::int64_t>(dtype_bits(dtype_)) + 7) / 8);
  }
  [[nodiscard]] bool is_contiguous() const noexcept { return strides_ == contiguous_strides(shape_); }

  /// The data as T*, checking that T is the view's dtype.
  template <class T>
  [[nodiscard]] T* data() const {
    check(dtype_of_v<std::remove_const_t<T>> == dtype_, "DTypeMismatch", "tensor holds {}, accessed as {}",
          dtype_name(dtype_), dtype_name(dtype_of_v<std::remove_const_t<T>>));
    return static_cast<T*>(data_);
  }
  /// The elements as a span: contiguous host tensors only.
  template <class T>
  [[nodiscard]] std::span<T> span() const {
    check(device_ == Device::cpu, "DeviceMismatch", "span() of a {} tensor; copy it to the host first",
          device_name(device_));
    check(is_contiguous(), "NotContiguous", "span() of a non-contiguous {} tensor", shape_.to_string());
    return {data<T>(), static_cast<std::size_t>(numel())};
  }

  /// The view with dimensions `a` and `b` swapped (no data movement).
  [[nodiscard]] TensorView transposed(int a, int b) const {
    check(a >= 0 && b >= 0 && a < rank() && b < rank(), "ShapeMismatch", "transpose({}, {}) of a rank-{} tensor", a,
          b, rank());
    TensorView result = *this;
    std::array<std::int64_t, max_tensor_rank> extents{};
    for (int d = 0; d < rank(); ++d) extents[static_cast<std::size_t>(d)] = shape_[d];
    std::swap(extents[static_cast<std::size_t>(a)], extents[static_cast<std::size_t>(b)]);
    std::swap(result.strides_[static_cast<std::size_t>(a)], result.strides_[static_cast<std::size_t>(b)]);
    result.shape_ = Shape(std::span<const std::int64_t>(extents.data(), static_cast<std::size_t>(rank())));
    return result;
  }

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::F32;
  Shape shape_;
  std::array<std::int64_t, max_tensor_rank> strides_{};
  Device device_ = Device::cpu;
};

}  // namespace qlora
