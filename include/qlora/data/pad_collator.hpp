// Collation: turning a list of rows into one Batch.
//
// PadCollator is the unpacked path of the Phi-2 tutorial's `collate` and of
// XTuner's default_collate_fn(use_varlen_attn=False): every row is padded to
// the longest of the batch (optionally rounded up to a multiple, as
// transformers' pad_to_multiple_of) with the pad id, labels ignore_index and
// attention_mask 0; position_ids are 0..length-1 on every row, padding
// included, as XTuner builds them and as transformers' models default to. Rows
// may be samples or packed rows; packed rows then attend across their
// segments, which is what XTuner does without varlen attention.
//
// varlen_batch is XTuner's default_collate_fn(use_varlen_attn=True): no
// padding and no attention mask, the packed position_ids and cu_seqlens
// (cumulative_len) and max_seqlen. XTuner requires exactly one packed row per
// batch; several rows are laid end to end in one row here, which gives the
// same attention (segments never see each other) without padding.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/batch.hpp>
#include <qlora/data/detail/sample_checks.hpp>
#include <qlora/data/encoded_sample.hpp>
#include <qlora/data/packed_sequence.hpp>
#include <qlora/data/tokenizer.hpp>

namespace qlora {

namespace detail {

inline void check_row(const EncodedSample& sample, std::size_t index) { check_sample(sample, index); }

inline void check_row(const PackedSequence& row, std::size_t index) {
  try {
    row.validate();
  } catch (const Error& e) {
    throw e.with_context(fmt::format("packed row {}", index));
  }
}

}  // namespace detail

class PadCollator {
 public:
  /// `pad_id` is the tokenizer's pad token (Tokenizer::special_ids().pad).
  /// Without one there is nothing to pad with: an Error, as in transformers.
  explicit PadCollator(std::optional<TokenId> pad_id, std::size_t pad_to_multiple_of = 1)
      : pad_to_multiple_of_(pad_to_multiple_of) {
    check(pad_id.has_value(), "MissingPadToken",
          "Asking to pad but the tokenizer does not have a padding token. Set one with "
          "set_special_token(SpecialRole::pad, ...): the EOS token, or an added token such as \"<PAD>\"");
    check(pad_to_multiple_of > 0, "InvalidPadMultiple", "pad_to_multiple_of must be at least 1 (1: no rounding)");
    pad_id_ = *pad_id;
  }

  [[nodiscard]] Batch operator()(std::span<const EncodedSample> samples) const { return pad(samples); }
  [[nodiscard]] Batch operator()(std::span<const PackedSequence> rows) const { return pad(rows); }

  [[nodiscard]] TokenId pad_id() const noexcept { return pad_id_; }

 private:
  template <class Row>
  [[nodiscard]] Batch pad(std::span<const Row> rows) const {
    check(!rows.empty(), "EmptyBatch", "cannot collate an empty batch");
    std::size_t longest = 0;
    for (std::size_t index = 0; index < rows.size(); ++index) {
      detail::check_row(rows[index], index);
      longest = std::max(longest, rows[index].input_ids.size());
    }
    const std::size_t length = (longest + pad_to_multiple_of_ - 1) / pad_to_multiple_of_ * pad_to_multiple_of_;
    check(length <= PackedSequence::max_tokens, "BatchTooLong",
          "rows padded to {} tokens do not fit int32 position_ids (at most {})", length, PackedSequence::max_tokens);
    Batch batch;
    batch.batch_size = rows.size();
    batch.length = length;
    const std::size_t cells = rows.size() * length;
    batch.input_ids.assign(cells, pad_id_);
    batch.labels.assign(cells, ignore_index);
    batch.attention_mask.assign(cells, 0);
    batch.position_ids.resize(cells);
    for (std::size_t r = 0; r < rows.size(); ++r) {
      const Row& row = rows[r];
      const std::size_t start = r * length;
      std::copy(row.input_ids.begin(), row.input_ids.end(), batch.input_ids.begin() + static_cast<std::ptrdiff_t>(start));
      std::copy(row.labels.begin(), row.labels.end(), batch.labels.begin() + static_cast<std::ptrdiff_t>(start));
      std::fill_n(batch.attention_mask.begin() + static_cast<std::ptrdiff_t>(start), row.input_ids.size(), 1);
      for (std::size_t t = 0; t < length; ++t) batch.position_ids[start + t] = static_cast<std::int32_t>(t);
    }
    return batch;
  }

  TokenId pad_id_ = 0;
  std::size_t pad_to_multiple_of_;
};

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
    batch.position_ids.insert(batch.position_ids.end(), row.position_ids.begin(), row.position_ids.end());
    for (std::size_t s = 1; s < row.cu_seqlens.size(); ++s) batch.cu_seqlens.push_back(offset + row.cu_seqlens[s]);
    batch.max_seqlen = std::max(batch.max_seqlen, row.max_seqlen());
    batch.length += row.size();
  }
  return batch;
}

}  // namespace qlora
