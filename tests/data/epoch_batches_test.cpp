// EpochBatches, the resumable loader: its batches are the sampler's rows
// (EpochSampler, itself checked against torch's DistributedSampler and the
// reference permutations) collated by varlen_batch or PadCollator (checked
// against XTuner and transformers); a restored cursor continues with exactly
// the batches of the uninterrupted run; ranks' shares are disjoint and cover
// the epoch as shard_layout says; a cursor saved over other rows is refused.
#include <qlora/data/epoch_batches.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <qlora/data/dataset_fingerprint.hpp>
#include <qlora/data/epoch_cursor.hpp>
#include <qlora/data/epoch_order.hpp>
#include <qlora/data/pad_collator.hpp>
#include <qlora/data/shard_layout.hpp>
#include <qlora/data/varlen_batch.hpp>

#include "data/packing_test_support.hpp"

using qlora::Batch;
using qlora::Cursor;
using qlora::EpochBatches;
using qlora::EpochBatchesOptions;
using qlora::PackedSequence;
using qlora::PadCollator;
using qlora::ShardPolicy;
using qlora::TokenId;
using qlora::test::require_error;

namespace {

constexpr TokenId pad_id = -1;

/// The first token of row k is 1000 k, so that a padded batch row says which
/// dataset row it is. Rows have one or two segments and different lengths.
TokenId row_marker(std::size_t k) { return static_cast<TokenId>(1000 * k); }

std::vector<PackedSequence> rows_of(std::size_t count) {
  std::vector<PackedSequence> rows;
  for (std::size_t k = 0; k < count; ++k) {
    PackedSequence row;
    std::vector<TokenId> first(1 + k % 4), first_labels;
    for (std::size_t t = 0; t < first.size(); ++t) first[t] = row_marker(k) + static_cast<TokenId>(t);
    first_labels.assign(first.size(), qlora::ignore_index);
    row.append_segment(first, first_labels);
    if (k % 2 == 0) {
      const std::vector<TokenId> second{row_marker(k) + 500, row_marker(k) + 501};
      row.append_segment(second, second);
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

EpochBatchesOptions options_for(std::size_t world_size, std::size_t rank, ShardPolicy policy, bool padded,
                                std::size_t rows_per_batch) {
  EpochBatchesOptions options;
  options.order.seed = 77;
  options.order.world_size = world_size;
  options.order.rank = rank;
  options.order.policy = policy;
  options.rows_per_batch = rows_per_batch;
  if (padded) options.padding.emplace(pad_id);
  return options;
}

/// The dataset rows of a padded batch, by their first tokens.
std::vector<std::size_t> rows_in(const Batch& padded) {
  std::vector<std::size_t> indices;
  for (std::size_t r = 0; r < padded.batch_size; ++r) {
    indices.push_back(static_cast<std::size_t>(padded.row(padded.input_ids, r)[0] / 1000));
  }
  return indices;
}

}  // namespace

TEST_CASE("a restored cursor continues with exactly the same batches") {
  // 11 rows, 2 ranks, repeat: 6 rows per rank and epoch, batches of 4 and 2.
  constexpr std::size_t n = 11;
  for (const bool padded : {false, true}) {
    INFO((padded ? "padded" : "varlen"));
    const EpochBatchesOptions options = options_for(2, 1, ShardPolicy::repeat, padded, 4);
    EpochBatches reference(rows_of(n), options);
    REQUIRE(reference.batches_per_epoch() == 2);
    std::vector<Batch> batches;
    std::vector<std::string> cursors;  // cursors[k]: the checkpoint after k batches
    for (std::size_t k = 0; k < 3 * reference.batches_per_epoch(); ++k) {
      cursors.push_back(reference.cursor().to_json());
      batches.push_back(reference.next());
    }
    // The epoch's last batch takes only the rows the epoch has left.
    CHECK(Cursor::from_json(cursors[1], "cursor").position == 4);
    CHECK(Cursor::from_json(cursors[2], "cursor").position == 6);
    CHECK(Cursor::from_json(cursors[3], "cursor").epoch == 1);
    CHECK(Cursor::from_json(cursors[3], "cursor").position == 4);
    if (padded) CHECK(batches[1].batch_size == 2);
    CHECK(batches[0] != batches[2]);  // another epoch, another order

    for (std::size_t k = 0; k < cursors.size(); ++k) {
      INFO("resumed after " << k << " batches");
      EpochBatches resumed(rows_of(n), options);
      resumed.restore(Cursor::from_json(cursors[k], "cursor"));
      CHECK(resumed.cursor().to_json() == cursors[k]);
      for (std::size_t i = k; i < batches.size(); ++i) REQUIRE(resumed.next() == batches[i]);
    }
  }
}

TEST_CASE("ranks' batches are the sampler's shares: disjoint, and covering the epoch as the layout says") {
  struct Case {
    std::size_t rows, world;
    ShardPolicy policy;
  };
  for (const Case& c : {Case{12, 3, ShardPolicy::repeat}, Case{11, 2, ShardPolicy::repeat},
                        Case{11, 2, ShardPolicy::drop_last}}) {
    INFO(c.rows << " rows, world " << c.world << ", " << qlora::shard_policy_name(c.policy));
    const std::vector<PackedSequence> rows = rows_of(c.rows);
    const qlora::ShardLayout layout = qlora::shard_layout(c.rows, c.world, c.policy);
    for (std::uint64_t epoch = 0; epoch < 2; ++epoch) {
      std::vector<int> seen(c.rows, 0);
      for (std::size_t rank = 0; rank < c.world; ++rank) {
        const EpochBatchesOptions padded_options = options_for(c.world, rank, c.policy, true, 2);
        const EpochBatchesOptions varlen_options = options_for(c.world, rank, c.policy, false, 2);
        EpochBatches padded(rows, padded_options), varlen(rows, varlen_options);
        const qlora::EpochSampler sampler(c.rows, qlora::dataset_fingerprint(std::span<const PackedSequence>(rows)),
                                          padded_options.order);
        for (std::uint64_t skipped = 0; skipped < epoch * padded.batches_per_epoch(); ++skipped) {
          (void)padded.next();
          (void)varlen.next();
        }
        std::vector<std::size_t> taken;
        for (std::size_t b = 0; b < padded.batches_per_epoch(); ++b) {
          const std::vector<std::size_t> in_batch = rows_in(padded.next());
          // The varlen batch is the same rows end to end.
          std::vector<PackedSequence> batch_rows;
          for (const std::size_t k : in_batch) batch_rows.push_back(rows[k]);
          CHECK(varlen.next() == qlora::varlen_batch(batch_rows));
          taken.insert(taken.end(), in_batch.begin(), in_batch.end());
        }
        CHECK(taken == sampler.epoch_indices(epoch));
        for (const std::size_t k : taken) ++seen[k];
      }
      const auto count = [&seen](int times) { return static_cast<std::size_t>(std::count(seen.begin(), seen.end(), times)); };
      CHECK(count(2) == layout.repeated);
      CHECK(count(0) == layout.dropped);
      CHECK(count(1) == c.rows - layout.repeated - layout.dropped);
    }
  }
}

TEST_CASE("a cursor saved over other rows is refused") {
  const std::vector<PackedSequence> rows = rows_of(9);
  const EpochBatchesOptions options = options_for(1, 0, ShardPolicy::repeat, false, 2);
  EpochBatches original(rows, options);
  (void)original.next();
  const Cursor saved = original.cursor();
  CHECK(saved.dataset_fingerprint == qlora::dataset_fingerprint(std::span<const PackedSequence>(rows)));
  CHECK(saved.dataset_size == 9);

  std::vector<PackedSequence> relabelled = rows;  // one label learned that was not
  relabelled[4].labels[0] = relabelled[4].input_ids[0];
  EpochBatches other(relabelled, options);
  require_error([&] { other.restore(saved); }, "CursorMismatch", "dataset_fingerprint");

  // The same tokens and labels with another segment boundary: row 3 is one
  // segment of 4 tokens, here 1 + 3.
  std::vector<PackedSequence> repacked = rows;
  REQUIRE(rows[3].cu_seqlens == std::vector<std::int32_t>{0, 4});
  const std::span<const TokenId> ids(rows[3].input_ids), labels(rows[3].labels);
  repacked[3] = PackedSequence{};
  repacked[3].append_segment(ids.first(1), labels.first(1));
  repacked[3].append_segment(ids.subspan(1), labels.subspan(1));
  REQUIRE(repacked[3].input_ids == rows[3].input_ids);
  REQUIRE(repacked[3].labels == rows[3].labels);
  EpochBatches other_packing(repacked, options);
  require_error([&] { other_packing.restore(saved); }, "CursorMismatch", "dataset_fingerprint");

  EpochBatches other_rank(rows, options_for(2, 0, ShardPolicy::repeat, false, 2));
  require_error([&] { other_rank.restore(saved); }, "CursorMismatch", "world_size");

  // The same rows with another batch size or collation resume: the cursor counts rows.
  EpochBatches padded(rows, options_for(1, 0, ShardPolicy::repeat, true, 3));
  padded.restore(saved);
  CHECK(padded.cursor() == saved);
  CHECK(padded.rows().size() == 9);
}

TEST_CASE("loaders that cannot produce batches are errors") {
  require_error([] { EpochBatches none({}, options_for(1, 0, ShardPolicy::repeat, false, 1)); }, "EmptyDataset",
                "empty dataset");
  require_error([] { EpochBatches no_rows(rows_of(3), options_for(1, 0, ShardPolicy::repeat, false, 0)); },
                "InvalidArgument", "rows_per_batch");
  std::vector<PackedSequence> rows = rows_of(4);
  rows[2].position_ids[0] = 5;
  require_error([&] { EpochBatches broken(rows, options_for(1, 0, ShardPolicy::repeat, true, 1)); },
                "InvalidPositionIds", "packed row 2");
}
