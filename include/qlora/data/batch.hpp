// Batch: what a collator hands the model for one forward pass, as flat
// row-major [batch_size, length] int32 arrays (the tensors transformers and
// XTuner build: input_ids, labels, attention_mask, position_ids), plus the
// segment boundaries of varlen attention when rows are packed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include <qlora/data/tokenizer.hpp>

namespace qlora {

struct Batch {
  std::size_t batch_size = 0;
  std::size_t length = 0;
  /// [batch_size, length], row-major.
  std::vector<TokenId> input_ids;
  /// [batch_size, length]; ignore_index on padding.
  std::vector<TokenId> labels;
  /// [batch_size, length]: 1 on real tokens, 0 on padding. Empty for varlen
  /// batches, where cu_seqlens says who attends to whom (XTuner passes None).
  std::vector<std::int32_t> attention_mask;
  /// [batch_size, length].
  std::vector<std::int32_t> position_ids;
  /// Varlen batches only: segment boundaries over the flattened tokens
  /// (flash-attn's cu_seqlens, XTuner's cumulative_len); empty otherwise.
  std::vector<std::int32_t> cu_seqlens;
  /// Varlen batches only: the longest segment; 0 otherwise.
  std::int32_t max_seqlen = 0;

  [[nodiscard]] bool varlen() const noexcept { return !cu_seqlens.empty(); }

  friend bool operator==(const Batch&, const Batch&) = default;

  /// Row `index` of one of the [batch_size, length] arrays above.
  template <class T>
  [[nodiscard]] std::span<const T> row(const std::vector<T>& values, std::size_t index) const {
    return std::span<const T>(values).subspan(index * length, length);
  }
};

}  // namespace qlora
