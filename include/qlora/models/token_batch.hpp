// TokenBatch: what a model's forward reads — flat token arrays of `rows`
// rows of `row_length` tokens, their positions, and which tokens may attend
// to which (cu_seqlens: contiguous segments over the flattened tokens, each
// attended causally on its own, as flash-attention's varlen kernels do).
//
// A packed row (XTuner's pack_to_max_length) has one segment per sample; a
// padded batch (transformers' collators) has, per row, one segment of real
// tokens and one of padding — attention_segments() derives them from the
// attention mask. Causal attention inside a row's real segment is exactly
// what transformers computes with the mask; what padding computes is never
// read (its labels are ignored).
#pragma once

#include <qlora/core/error.hpp>

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

namespace qlora {

struct TokenBatch {
  std::span<const std::int32_t> input_ids;     ///< [rows · row_length]
  std::span<const std::int32_t> labels;        ///< same size, ignore_index (-100) where no loss; empty: no loss
  std::span<const std::int32_t> position_ids;  ///< same size
  std::span<const std::int32_t> cu_seqlens;    ///< segment boundaries: 0, ..., tokens
  std::int64_t row_length = 0;

  [[nodiscard]] std::int64_t tokens() const noexcept { return static_cast<std::int64_t>(input_ids.size()); }
  /// max(position_ids) + 1: the length dynamic-NTK rotary scales by (transformers
  /// and InternLM2's remote code both take it from the positions, so a packed
  /// row of short samples does not switch the scaling on).
  [[nodiscard]] std::int64_t rope_length() const noexcept {
    std::int32_t longest = 0;
    for (const std::int32_t position : position_ids) longest = std::max(longest, position);
    return std::int64_t{longest} + 1;
  }

  /// Errors (InvalidBatch) name the array and what is wrong.
  void validate() const {
    const std::size_t count = input_ids.size();
    check(row_length > 0 && count % static_cast<std::size_t>(row_length) == 0, "InvalidBatch",
          "{} tokens are not whole rows of {}", count, row_length);
    check(position_ids.size() == count, "InvalidBatch", "position_ids has {} entries, input_ids {}",
          position_ids.size(), count);
    check(labels.empty() || labels.size() == count, "InvalidBatch", "labels has {} entries, input_ids {}",
          labels.size(), count);
    check(cu_seqlens.size() >= 2 && cu_seqlens.front() == 0 &&
              static_cast<std::size_t>(cu_seqlens.back()) == count,
          "InvalidBatch", "cu_seqlens must run from 0 to {} tokens", count);
    for (std::size_t i = 1; i < cu_seqlens.size(); ++i) {
      check(cu_seqlens[i] > cu_seqlens[i - 1], "InvalidBatch", "cu_seqlens[{}] = {} does not exceed cu_seqlens[{}] = {}",
            i, cu_seqlens[i], i - 1, cu_seqlens[i - 1]);
    }
    for (std::size_t i = 0; i < count; ++i) {
      check(position_ids[i] >= 0, "InvalidBatch", "position_ids[{}] = {} is negative", i, position_ids[i]);
    }
  }
};

/// Segments of a padded batch: within each row, every run of tokens with the
/// same attention-mask value is one segment (real tokens never see padding).
inline std::vector<std::int32_t> attention_segments(std::span<const std::int32_t> attention_mask,
                                                    std::int64_t row_length) {
  check(row_length > 0 && attention_mask.size() % static_cast<std::size_t>(row_length) == 0, "InvalidBatch",
        "attention_mask of {} entries is not whole rows of {}", attention_mask.size(), row_length);
  std::vector<std::int32_t> cu_seqlens{0};
  for (std::size_t i = 1; i <= attention_mask.size(); ++i) {
    const bool row_start = i % static_cast<std::size_t>(row_length) == 0;
    if (i == attention_mask.size() || row_start || attention_mask[i] != attention_mask[i - 1]) {
      cu_seqlens.push_back(static_cast<std::int32_t>(i));
    }
  }
  return cu_seqlens;
}

}  // namespace qlora
