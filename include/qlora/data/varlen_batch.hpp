// varlen_batch: packed rows to one Batch for varlen attention, as XTuner's
// default_collate_fn(use_varlen_attn=True) builds it: no padding and no
// attention mask, the packed position_ids, cu_seqlens (XTuner's cumulative_len)
// and max_seqlen. XTuner requires exactly one packed row per batch; several
// rows are laid end to end in one row here, which gives the same attention
// (segments never see each other) without padding. The loss is what B rows
// stacked [B, L] give too: a causal LM's targets are shifted within each row,
// so the last token of a row predicts nothing; laid end to end it would
// predict the next row's first token, so that token's label becomes -100
// (it is never a target inside its own row either). (Padded batches:
// pad_collator.hpp.)
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>

#include <qlora/core/error.hpp>
#include <qlora/data/batch.hpp>
#include <qlora/data/detail/row_checks.hpp>
#include <qlora/data/packed_sequence.hpp>
#include <qlora/data/tokenizer.hpp>

namespace qlora {

/// XTuner's varlen collation: the packed rows end to end in one unpadded row.
[[nodiscard]] inline Batch varlen_batch(std::span<const PackedSequence> rows) {
  check(!rows.empty(), "EmptyBatch", "cannot collate an empty batch");
  Batch batch;
  batch.batch_size = 1;
  batch.cu_seqlens.push_back(0);
  for (std::size_t index = 0; index < rows.size(); ++index) {
    const PackedSequence& row = rows[index];
    detail::check_row(row, index);
    check(row.size() <= PackedSequence::max_tokens - batch.length, "BatchTooLong",
          "packed row {} ({} tokens) does not fit after {} tokens: cu_seqlens are int32, at most {} tokens", index,
          row.size(), batch.length, PackedSequence::max_tokens);
    const auto offset = static_cast<std::int32_t>(batch.length);
    batch.input_ids.insert(batch.input_ids.end(), row.input_ids.begin(), row.input_ids.end());
    batch.labels.insert(batch.labels.end(), row.labels.begin(), row.labels.end());
    if (index > 0 && !row.labels.empty()) batch.labels[batch.length] = ignore_index;
    batch.position_ids.insert(batch.position_ids.end(), row.position_ids.begin(), row.position_ids.end());
    for (std::size_t s = 1; s < row.cu_seqlens.size(); ++s) batch.cu_seqlens.push_back(offset + row.cu_seqlens[s]);
    batch.max_seqlen = std::max(batch.max_seqlen, row.max_seqlen());
    batch.length += row.size();
  }
  return batch;
}

}  // namespace qlora
