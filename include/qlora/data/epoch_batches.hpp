// EpochBatches: the resumable loader a trainer draws batches from. It owns the
// packed rows of a dataset (xtuner_pack or bin_pack output), orders them epoch
// by epoch with an EpochSampler (seed, shuffle, this rank's share) and collates
// rows_per_batch of them at a time into a Batch, either end to end for varlen
// attention (varlen_batch) or padded (PadCollator). cursor() is what a
// checkpoint saves and restore() continues from it with exactly the batches the
// uninterrupted run would have drawn; the cursor carries the fingerprint of the
// rows (dataset_fingerprint.hpp), so a cursor saved over other rows (other data,
// tokenizer, template, max_length or packing) is refused instead of skipping
// the wrong rows.
//
// A batch never crosses an epoch: the last batch of an epoch has the rows left
// (per_rank % rows_per_batch when that is not 0). Every rank's share has the
// same size (shard_layout.hpp), so every rank draws the same number of batches
// per epoch, as data-parallel training needs.
#pragma once

#include <algorithm>
#include <cstddef>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include <qlora/core/error.hpp>
#include <qlora/data/batch.hpp>
#include <qlora/data/dataset_fingerprint.hpp>
#include <qlora/data/detail/row_checks.hpp>
#include <qlora/data/epoch_cursor.hpp>
#include <qlora/data/epoch_order.hpp>
#include <qlora/data/packed_sequence.hpp>
#include <qlora/data/pad_collator.hpp>
#include <qlora/data/varlen_batch.hpp>

namespace qlora {

struct EpochBatchesOptions {
  /// Seed, shuffle, world size, rank and shard policy of the epoch orders.
  EpochOrderOptions order;
  std::size_t rows_per_batch = 1;
  /// How a batch's rows become one Batch: nullopt lays them end to end
  /// (varlen_batch, for varlen attention); a PadCollator pads them to the longest.
  std::optional<PadCollator> padding;
};

class EpochBatches {
 public:
  /// Checks every row up front (a broken row is an error naming it now, not
  /// hours into training) and fingerprints them for the cursor.
  EpochBatches(std::vector<PackedSequence> rows, EpochBatchesOptions options)
      : rows_(std::move(rows)),
        options_(std::move(options)),
        sampler_(rows_.size(), dataset_fingerprint(std::span<const PackedSequence>(rows_)), options_.order) {
    check(options_.rows_per_batch > 0, "InvalidArgument", "EpochBatchesOptions::rows_per_batch must be at least 1");
    for (std::size_t index = 0; index < rows_.size(); ++index) detail::check_row(rows_[index], index);
  }

  /// The next batch of this rank; after the last batch of an epoch comes the
  /// first of the next.
  [[nodiscard]] Batch next() {
    const std::size_t per_rank = sampler_.layout().per_rank;
    const auto position = static_cast<std::size_t>(sampler_.cursor().position);
    const std::size_t left_in_epoch = position == per_rank ? per_rank : per_rank - position;
    batch_rows_.clear();
    for (std::size_t r = std::min(options_.rows_per_batch, left_in_epoch); r > 0; --r) {
      batch_rows_.push_back(rows_[sampler_.next()]);
    }
    const std::span<const PackedSequence> rows(batch_rows_);
    return options_.padding ? (*options_.padding)(rows) : varlen_batch(rows);
  }

  /// The batches of one whole epoch (the last one may be short).
  [[nodiscard]] std::size_t batches_per_epoch() const noexcept {
    return (sampler_.layout().per_rank + options_.rows_per_batch - 1) / options_.rows_per_batch;
  }

  /// Where this rank is, for a checkpoint.
  [[nodiscard]] Cursor cursor() const { return sampler_.cursor(); }

  /// Continues where `saved` stopped. A cursor saved over other rows or with
  /// another seed, shuffle, shard policy, world size or rank is a
  /// CursorMismatch naming the field (EpochSampler::restore).
  void restore(const Cursor& saved) { sampler_.restore(saved); }

  [[nodiscard]] std::span<const PackedSequence> rows() const noexcept { return rows_; }

 private:
  std::vector<PackedSequence> rows_;
  EpochBatchesOptions options_;
  EpochSampler sampler_;
  /// The rows of the batch being collated (the collators take contiguous rows).
  std::vector<PackedSequence> batch_rows_;
};

}  // namespace qlora
