// CheckpointTensors: a Hugging Face model folder's weights (model.safetensors
// or sharded with model.safetensors.index.json), handed out by name with the
// shape the model's config implies, each taken at most once, so that after
// loading the model can say what the checkpoint had and the config did not
// explain.
//
// Config and weights that disagree are refused with the tensor named:
//   - MissingTensor: a tensor the config implies is absent;
//   - TensorShapeMismatch: present with another shape (both shapes named);
//   - UnexpectedTensor: tensors no part of the model took (all listed);
//   - DTypeMismatch: a weight that is not a float tensor (or bnb 4-bit).
// Linear weights load either from float tensors (quantized on load,
// bit-exact with bitsandbytes) or as stored when the checkpoint is already a
// bitsandbytes 4-bit one (weight + absmax/quant_map/quant_state companions).
#pragma once

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/io/sharded_checkpoint.hpp>
#include <qlora/lora/frozen_weight.hpp>
#include <qlora/quant/bnb_format.hpp>
#include <qlora/quant/quant_policy.hpp>

#include <fmt/ranges.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace qlora {

class CheckpointTensors {
 public:
  explicit CheckpointTensors(const std::filesystem::path& folder) : checkpoint_(ShardedCheckpoint::open(folder)) {}

  [[nodiscard]] const ShardedCheckpoint& checkpoint() const noexcept { return checkpoint_; }
  [[nodiscard]] bool contains(std::string_view name) const { return checkpoint_.find(name) != nullptr; }

  /// Rows [row_begin, row_end) of the float tensor `name` of shape `shape`
  /// (rank 1 or 2), as F32 (from F32, F16 or BF16: exact).
  [[nodiscard]] Tensor dense_rows(std::string_view name, const Shape& shape, std::int64_t row_begin,
                                  std::int64_t row_end) {
    const SafetensorsTensor& tensor = take(name, shape);
    const std::int64_t row_size = shape.rank() == 2 ? shape[1] : 1;
    std::vector<std::int64_t> extents(shape.extents().begin(), shape.extents().end());
    extents[0] = row_end - row_begin;
    Tensor out(DType::F32, Shape(std::span<const std::int64_t>(extents)));
    const auto destination = out.span<float>();
    visit_float_dtype(tensor.dtype, [&]<class T>(T) {
      const std::size_t offset = static_cast<std::size_t>(row_begin * row_size);
      for (std::size_t i = 0; i < destination.size(); ++i) {
        T value;
        std::memcpy(&value, tensor.data.data() + (offset + i) * sizeof(T), sizeof(T));
        destination[i] = to_float(value);
      }
    }, fmt::format("{}: tensor `{}`", source(), name));
    return out;
  }
  /// The whole float tensor `name`, as F32.
  [[nodiscard]] Tensor dense(std::string_view name, const Shape& shape) { return dense_rows(name, shape, 0, shape[0]); }

  /// Rows [row_begin, row_end) of the linear weight `name` [out, in] as a
  /// frozen base: quantized to Quant on load from a float tensor, or, for a
  /// bitsandbytes 4-bit checkpoint, the stored codes (whole tensors only: a
  /// 4-bit block can straddle the rows of a fused projection).
  template <QuantPolicy Quant, FloatStorage Compute>
  [[nodiscard]] FrozenWeight<Quant, Compute> linear_rows(std::string_view name, std::int64_t out, std::int64_t in,
                                                         std::int64_t row_begin, std::int64_t row_end,
                                                         const Quantize4bitOptions& options = {}) {
    if (const auto type = bnb_4bit_type(checkpoint_, name)) {
      check(row_begin == 0 && row_end == out, "UnsupportedCheckpoint",
            "{}: `{}` is a 4-bit weight; slicing rows [{}, {}) out of it is not supported", source(), name, row_begin,
            row_end);
      if constexpr (std::is_same_v<Quant, NoQuant>) {
        throw Error("QuantTypeMismatch", fmt::format("{}: `{}` is stored 4-bit ({}); the model was asked for dense "
                                                     "base weights", source(), name, quant_type_name(*type)));
      } else {
        Quantized4bit weight = read_bnb_4bit(checkpoint_, name);
        check(weight.state.shape == std::vector<std::int64_t>{out, in}, "TensorShapeMismatch",
              "{}: `{}` is [{}] (from its quant_state), the config implies [{}, {}]", source(), name,
              fmt::join(weight.state.shape, ", "), out, in);
        const Bnb4bitKeys keys = Bnb4bitKeys::of(name, *type);
        for (const std::string* key : {&keys.weight, &keys.absmax, &keys.quant_map, &keys.nested_absmax,
                                       &keys.nested_quant_map, &keys.quant_state}) {
          if (contains(*key)) used_.insert(*key);
        }
        return FrozenWeight<Quant, Compute>(std::move(weight));
      }
    }
    const Tensor dense = dense_rows(name, Shape{out, in}, row_begin, row_end);
    if constexpr (std::is_same_v<Quant, NoQuant>) {
      return FrozenWeight<Quant, Compute>(dense.view());
    } else {
      return FrozenWeight<Quant, Compute>::quantize(dense.view(), options);
    }
  }
  template <QuantPolicy Quant, FloatStorage Compute>
  [[nodiscard]] FrozenWeight<Quant, Compute> linear(std::string_view name, std::int64_t out, std::int64_t in,
                                                    const Quantize4bitOptions& options = {}) {
    return linear_rows<Quant, Compute>(name, out, in, 0, out, options);
  }

  /// Throws UnexpectedTensor naming every tensor that nothing took.
  void expect_all_used() const {
    std::vector<std::string_view> unused;
    for (const SafetensorsReader& shard : checkpoint_.shards()) {
      for (const SafetensorsTensor& tensor : shard.tensors()) {
        if (!used_.contains(tensor.name)) unused.push_back(tensor.name);
      }
    }
    check(unused.empty(), "UnexpectedTensor", "{}: {} tensor(s) the config does not explain: {}", source(),
          unused.size(), fmt::join(unused, ", "));
  }

 private:
  [[nodiscard]] std::string source() const { return checkpoint_.folder().string(); }

  const SafetensorsTensor& take(std::string_view name, const Shape& shape) {
    const SafetensorsTensor* tensor = checkpoint_.find(name);
    check(tensor != nullptr, "MissingTensor", "{}: tensor `{}` ({}) is missing", source(), name, shape.to_string());
    const Shape stored(std::span<const std::int64_t>(tensor->shape));
    check(stored == shape, "TensorShapeMismatch", "{}: tensor `{}` is {}, the config implies {}", source(), name,
          stored.to_string(), shape.to_string());
    used_.insert(std::string(name));
    return *tensor;
  }

  ShardedCheckpoint checkpoint_;
  std::set<std::string, std::less<>> used_;
};

}  // namespace qlora
