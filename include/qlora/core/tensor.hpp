// Tensor: an owning, contiguous host tensor (64-byte aligned, zero-filled)
// that hands out TensorViews. Move-only, so ownership is always clear.
#pragma once

#include <cstddef>
#include <cstring>
#include <memory>
#include <new>

#include <qlora/core/tensor_view.hpp>

namespace qlora {

class Tensor {
 public:
  static constexpr std::size_t alignment = 64;  // a cache line; enough for any SIMD load

  Tensor() = default;
  Tensor(DType dtype, Shape shape) : view_(nullptr, dtype, shape) {
    const std::size_t bytes = view_.byte_size();
    storage_.reset(static_cast<std::byte*>(::operator new[](bytes == 0 ? 1 : bytes, std::align_val_t{alignment})));
    std::memset(storage_.get(), 0, bytes);
    view_ = TensorView(storage_.get(), dtype, shape);
  }

  [[nodiscard]] const TensorView& view() const noexcept { return view_; }
  [[nodiscard]] DType dtype() const noexcept { return view_.dtype(); }
  [[nodiscard]] const Shape& shape() const noexcept { return view_.shape(); }
  [[nodiscard]] std::int64_t numel() const noexcept { return view_.numel(); }
  [[nodiscard]] std::size_t byte_size() const noexcept { return view_.byte_size(); }
  template <class T>
  [[nodiscard]] std::span<T> span() const {
    return view_.span<T>();
  }

 private:
  struct AlignedDelete {
    void operator()(std::byte* p) const noexcept { ::operator delete[](p, std::align_val_t{alignment}); }
  };
  std::unique_ptr<std::byte[], AlignedDelete> storage_;
  TensorView view_;
};

}  // namespace qlora
