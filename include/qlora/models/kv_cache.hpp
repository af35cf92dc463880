// KvCache: the keys and values of every token a model has seen so far, per
// layer, so that generating the next token costs one token's forward rather
// than the whole sequence's (transformers' DynamicCache).
//
// Each layer keeps K and V as F32 [capacity, kv_heads, head_dim] — after
// rotary, exactly what attention reads — and the cache the ids of the tokens
// they belong to. The ids let a caller keep the longest prefix a new context
// shares with the cache (a chat's next turn re-sends the whole conversation;
// only the new part runs through the model).
//
// A decode step writes through Slot::append, layer by layer, at the rows after
// the cached tokens, and then commit()s the step's ids; until the commit the
// cache still holds its old tokens, so a step that throws halfway leaves it as
// it was. Storage grows geometrically (amortised O(1) per token), or is sized
// up front by the capacity given to the constructor. The shape (kv_heads,
// head_dim) is taken from the first append; a later one that differs is
// Error("ShapeMismatch") (a cache used with another model).
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/core/tensor_view.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace qlora {

class KvCache {
 public:
  /// Every cached row of one layer so far, cached and new: F32 [length, kv_heads, head_dim].
  struct Rows {
    TensorView key;
    TensorView value;
  };

  /// One layer's place in the cache, as a layer's decode step sees it.
  class Slot {
   public:
    /// Stores k and v [n, kv_heads, head_dim] of the step's n new tokens after the cached ones
    /// and returns every row up to them (what cached_attention_forward reads).
    Rows append(const TensorView& key, const TensorView& value) const { return cache_->append(layer_, key, value); }

   private:
    friend class KvCache;
    Slot(KvCache* cache, std::size_t layer) : cache_(cache), layer_(layer) {}
    KvCache* cache_;
    std::size_t layer_;
  };

  /// An empty cache with room for `capacity` tokens before it first grows.
  explicit KvCache(std::int64_t capacity = 0) : capacity_(std::max<std::int64_t>(capacity, 0)) {}

  /// The number of cached tokens.
  [[nodiscard]] std::int64_t size() const noexcept { return static_cast<std::int64_t>(tokens_.size()); }
  [[nodiscard]] std::span<const std::int32_t> tokens() const noexcept { return tokens_; }
  [[nodiscard]] std::int64_t capacity() const noexcept { return capacity_; }

  [[nodiscard]] Slot layer(std::size_t index) { return Slot(this, index); }

  /// Records the ids of the step whose rows every layer has appended.
  void commit(std::span<const std::int32_t> new_tokens) {
    const std::int64_t length = size() + static_cast<std::int64_t>(new_tokens.size());
    for (const Layer& layer : layers_) {
      check(layer.rows >= length, "InvalidKvCache", "kv_cache.commit: {} tokens, but a layer holds only {} rows",
            length, layer.rows);
    }
    tokens_.insert(tokens_.end(), new_tokens.begin(), new_tokens.end());
  }

  /// Keeps the first `length` tokens (no-op when it holds fewer).
  void truncate(std::int64_t length) {
    check(length >= 0, "InvalidArgument", "kv_cache.truncate: length {} is negative", length);
    if (length < size()) tokens_.resize(static_cast<std::size_t>(length));
    for (Layer& layer : layers_) layer.rows = std::min(layer.rows, size());
  }

  /// Forgets every token (storage kept for the next sequence).
  void clear() { truncate(0); }

 private:
  struct Layer {
    Tensor key, value;           ///< F32 [allocated, kv_heads, head_dim]
    std::int64_t allocated = 0;  ///< 0 until the layer's first append
    std::int64_t rows = 0;       ///< rows written: size(), or more during a step
  };

  Rows append(std::size_t index, const TensorView& key, const TensorView& value) {
    check(key.dtype() == DType::F32 && value.dtype() == DType::F32 && key.rank() == 3 && key.shape() == value.shape() &&
              key.shape()[0] > 0,
          "ShapeMismatch", "kv_cache.append: key is {} {} and value {} {}, expected two F32 [n > 0, kv_heads, head_dim]",
          dtype_name(key.dtype()), key.shape().to_string(), dtype_name(value.dtype()), value.shape().to_string());
    if (index >= layers_.size() || layers_[index].allocated == 0) {
      check(size() == 0, "InvalidKvCache", "kv_cache.append: layer {} has no rows, but the cache holds {} tokens "
            "(a cache filled by another model?)", index, size());
      if (index >= layers_.size()) layers_.resize(index + 1);
    }
    Layer& layer = layers_[index];
    const std::int64_t n = key.shape()[0], width = key.shape()[1] * key.shape()[2];
    if (layer.allocated > 0) {
      check(layer.key.shape()[1] == key.shape()[1] && layer.key.shape()[2] == key.shape()[2], "ShapeMismatch",
            "kv_cache.append: layer {} caches rows of [{}, {}], the new key is {} (a cache of another model?)", index,
            layer.key.shape()[1], layer.key.shape()[2], key.shape().to_string());
    }
    const std::int64_t length = size() + n;
    reserve(layer, length, key.shape()[1], key.shape()[2]);
    const auto write = [&](Tensor& rows, const TensorView& source) {
      const float* from = source.data<const float>();
      std::copy(from, from + n * width, rows.view().data<float>() + size() * width);
    };
    write(layer.key, key);
    write(layer.value, value);
    layer.rows = length;
    const Shape shape{length, key.shape()[1], key.shape()[2]};
    return {TensorView(layer.key.view().raw_data(), DType::F32, shape),
            TensorView(layer.value.view().raw_data(), DType::F32, shape)};
  }

  /// Grows `layer` to hold `length` rows: to the cache's capacity, else by doubling.
  void reserve(Layer& layer, std::int64_t length, std::int64_t heads, std::int64_t head_dim) {
    const std::int64_t held = layer.allocated;
    if (length <= held) return;
    capacity_ = std::max({capacity_, length, 2 * held});
    const Shape shape{capacity_, heads, head_dim};
    for (Tensor* rows : {&layer.key, &layer.value}) {
      Tensor grown(DType::F32, shape);
      if (held > 0) {
        const float* from = rows->view().data<const float>();
        std::copy(from, from + size() * heads * head_dim, grown.view().data<float>());
      }
      *rows = std::move(grown);
    }
    layer.allocated = capacity_;
  }

  std::int64_t capacity_;
  std::vector<Layer> layers_;
  std::vector<std::int32_t> tokens_;
};

}  // namespace qlora
