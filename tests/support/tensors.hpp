// Small host tensors for tests: filled from the portable splitmix generator,
// and read back as doubles for comparisons.
#pragma once

#include <qlora/core/dtype.hpp>
#include <qlora/core/tensor.hpp>

#include <cstdint>
#include <vector>

#include "support/splitmix.hpp"

namespace qlora::test {

/// A T tensor holding `values` (rounded to T), of `shape`.
template <class T>
Tensor tensor_of(const std::vector<float>& values, Shape shape) {
  Tensor t(dtype_of_v<T>, shape);
  auto out = t.span<T>();
  for (std::size_t i = 0; i < values.size(); ++i) out[i] = from_float<T>(values[i]);
  return t;
}

/// A T tensor of `shape` filled with splitmix_values(numel, scale, first_index).
template <class T>
Tensor filled(Shape shape, std::uint64_t first_index, double scale) {
  return tensor_of<T>(splitmix_values(static_cast<std::size_t>(shape.numel()), scale, first_index), shape);
}

/// The elements of a host T tensor, widened to double.
template <class T>
std::vector<double> as_double(const TensorView& t) {
  std::vector<double> out;
  for (const T v : t.span<const T>()) out.push_back(to_float(v));
  return out;
}

}  // namespace qlora::test
