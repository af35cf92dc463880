// EpochSampler: which samples a rank trains on, in which order, epoch after
// epoch, and where to pick up after a restart.
//
// - The order of epoch e is a permutation that is a pure function of (seed, e)
//   (Fisher-Yates on the Philox stream (seed, e)): every rank computes the same
//   one without communicating, and a resumed run recomputes epoch e directly.
// - Each rank takes its share of that order (shard_layout.hpp: torch's
//   DistributedSampler arithmetic, repeating or dropping to equal shares).
// - cursor() says where the rank is (epoch_cursor.hpp); restore() continues
//   from a saved cursor, refusing one written for another dataset or another
//   sharding (CursorMismatch).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <qlora/core/error.hpp>
#include <qlora/data/detail/seeded_permutation.hpp>
#include <qlora/data/epoch_cursor.hpp>
#include <qlora/data/shard_layout.hpp>

namespace qlora {

/// The order of `dataset_size` samples in epoch `epoch` under `seed`.
[[nodiscard]] inline std::vector<std::size_t> epoch_permutation(std::size_t dataset_size, std::uint64_t seed,
                                                                std::uint64_t epoch) {
  return detail::seeded_permutation(dataset_size, seed, epoch);
}

struct EpochOrderOptions {
  std::uint64_t seed = 0;
  /// false: every epoch in dataset order (still sharded).
  bool shuffle = true;
  std::size_t world_size = 1;
  std::size_t rank = 0;
  ShardPolicy policy = ShardPolicy::repeat;
};

/// One rank's endless sequence of sample indices, epoch after epoch.
class EpochSampler {
 public:
  /// `dataset_fingerprint` identifies the data (dataset_fingerprint.hpp, or any
  /// string that changes when the data does); cursors carry it.
  EpochSampler(std::size_t dataset_size, std::string dataset_fingerprint, const EpochOrderOptions& options)
      : dataset_size_(dataset_size),
        fingerprint_(std::move(dataset_fingerprint)),
        options_(options),
        layout_(shard_layout(dataset_size, options.world_size, options.policy)) {
    check(dataset_size > 0, "EmptyDataset", "cannot sample from an empty dataset");
    check(options.rank < options.world_size, "InvalidShard", "rank {} is out of range for world_size {}",
          options.rank, options.world_size);
    check(layout_.per_rank > 0, "EmptyShard",
          "{} samples leave nothing for each of {} ranks under drop_last; use ShardPolicy::repeat or more data",
          dataset_size, options.world_size);
    share_ = epoch_indices(0);
  }

  [[nodiscard]] const ShardLayout& layout() const noexcept { return layout_; }

  /// This rank's samples in epoch `epoch`, in order.
  [[nodiscard]] std::vector<std::size_t> epoch_indices(std::uint64_t epoch) const {
    const std::vector<std::size_t> order =
        detail::shuffled_or_identity(dataset_size_, options_.shuffle, options_.seed, epoch);
    return shard(order, options_.world_size, options_.rank, options_.policy);
  }

  /// The next sample index; after the last one of an epoch comes the first of the next.
  [[nodiscard]] std::size_t next() {
    if (position_ == share_.size()) {
      ++epoch_;
      position_ = 0;
      share_ = epoch_indices(epoch_);
    }
    return share_[position_++];
  }

  [[nodiscard]] Cursor cursor() const {
    return Cursor{.seed = options_.seed,
                  .epoch = epoch_,
                  .position = position_,
                  .world_size = options_.world_size,
                  .rank = options_.rank,
                  .dataset_size = dataset_size_,
                  .dataset_fingerprint = fingerprint_,
                  .shuffle = options_.shuffle,
                  .policy = options_.policy};
  }

  /// Continues where `saved` stopped. It must come from a sampler over the same
  /// dataset with the same options; each difference is a CursorMismatch naming
  /// the field and both values.
  void restore(const Cursor& saved) {
    const Cursor ours = cursor();
    const auto same = [](const char* field, const auto& saved_value, const auto& our_value) {
      check(saved_value == our_value, "CursorMismatch",
            "the cursor's {} is {} but this run's is {}; a cursor resumes only a run over the same dataset with the "
            "same seed, shuffle, shard policy, world size and rank",
            field, saved_value, our_value);
    };
    same("dataset_fingerprint", saved.dataset_fingerprint, ours.dataset_fingerprint);
    same("dataset_size", saved.dataset_size, ours.dataset_size);
    same("world_size", saved.world_size, ours.world_size);
    same("rank", saved.rank, ours.rank);
    same("seed", saved.seed, ours.seed);
    same("shuffle", saved.shuffle, ours.shuffle);
    same("shard_policy", shard_policy_name(saved.policy), shard_policy_name(ours.policy));
    check(saved.position <= layout_.per_rank, "CursorMismatch",
          "the cursor's position {} is past the {} samples of each rank's epoch", saved.position, layout_.per_rank);
    epoch_ = saved.epoch;
    position_ = static_cast<std::size_t>(saved.position);
    share_ = epoch_indices(epoch_);
  }

 private:
  std::size_t dataset_size_;
  std::string fingerprint_;
  EpochOrderOptions options_;
  ShardLayout layout_;
  std::uint64_t epoch_ = 0;
  std::size_t position_ = 0;
  /// This rank's samples of epoch_.
  std::vector<std::size_t> share_;
};

}  // namespace qlora
