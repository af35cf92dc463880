// PadCollator: a list of rows to one padded Batch. It is the unpacked path of
// the Phi-2 tutorial's `collate` and of XTuner's
// default_collate_fn(use_varlen_attn=False): every row is padded to the longest
// of the batch (optionally rounded up to a multiple, as transformers'
// pad_to_multiple_of) with the pad id, labels ignore_index and attention_mask
// 0; position_ids are 0..length-1 on every row, padding included, as XTuner
// builds them and as transformers' models default to. Rows may be samples or
// packed rows; packed rows then attend across their segments, which is what
// XTuner does without varlen attention (with it: varlen_batch.hpp).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>

#include <qlora/core/error.hpp>
#include <qlora/data/batch.hpp>
#include <qlora/data/detail/row_checks.hpp>
#include <qlora/data/encoded_sample.hpp>
#include <qlora/data/packed_sequence.hpp>
#include <qlora/data/tokenizer.hpp>

namespace qlora {

class PadCollator {
 public:
  /// `pad_id` is the tokenizer's pad token (Tokenizer::special_ids().pad).
  /// Without one there is nothing to pad with: an Error, as in transformers.
  /// `pad_to_multiple_of` is 1 (no rounding) up to PackedSequence::max_tokens,
  /// the longest row int32 position_ids allow.
  explicit PadCollator(std::optional<TokenId> pad_id, std::size_t pad_to_multiple_of = 1)
      : pad_to_multiple_of_(pad_to_multiple_of) {
    check(pad_id.has_value(), "MissingPadToken",
          "Asking to pad but the tokenizer does not have a padding token. Set one with "
          "set_special_token(SpecialRole::pad, ...): the EOS token, or an added token such as \"<PAD>\"");
    check(pad_to_multiple_of > 0 && pad_to_multiple_of <= PackedSequence::max_tokens, "InvalidPadMultiple",
          "pad_to_multiple_of {} is out of range; expected 1 (no rounding) to {} (int32 position_ids)",
          pad_to_multiple_of, PackedSequence::max_tokens);
    pad_id_ = *pad_id;
  }

  [[nodiscard]] Batch operator()(std::span<const EncodedSample> samples) const { return pad(samples); }
  [[nodiscard]] Batch operator()(std::span<const PackedSequence> rows) const { return pad(rows); }

  [[nodiscard]] TokenId pad_id() const noexcept { return pad_id_; }

  /// The row length of a batch whose longest row has `longest` tokens: `longest`
  /// rounded up to a multiple of pad_to_multiple_of. A length int32
  /// position_ids cannot count is an Error (BatchTooLong).
  [[nodiscard]] std::size_t padded_length(std::size_t longest) const {
    check(longest <= PackedSequence::max_tokens, "BatchTooLong",
          "a row of {} tokens does not fit int32 position_ids (at most {} tokens)", longest,
          PackedSequence::max_tokens);
    // longest and the multiple are both below 2^31 here, so the sum cannot wrap.
    const std::size_t length = (longest + pad_to_multiple_of_ - 1) / pad_to_multiple_of_ * pad_to_multiple_of_;
    check(length <= PackedSequence::max_tokens, "BatchTooLong",
          "rows of {} tokens padded to a multiple of {} are {} tokens long, more than int32 position_ids allow ({})",
          longest, pad_to_multiple_of_, length, PackedSequence::max_tokens);
    return length;
  }

 private:
  template <class Row>
  [[nodiscard]] Batch pad(std::span<const Row> rows) const {
    check(!rows.empty(), "EmptyBatch", "cannot collate an empty batch");
    std::size_t longest = 0;
    for (std::size_t index = 0; index < rows.size(); ++index) {
      detail::check_row(rows[index], index);
      longest = std::max(longest, rows[index].input_ids.size());
    }
    const std::size_t length = padded_length(longest);
    check(rows.size() <= std::numeric_limits<std::size_t>::max() / length, "BatchTooLong",
          "{} rows of {} tokens are more cells than a std::size_t counts", rows.size(), length);
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

}  // namespace qlora
