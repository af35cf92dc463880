// Which samples a rank trains on, in which order, and where to pick up after a
// restart.
//
// - The order of epoch e is a permutation that is a pure function of (seed, e)
//   (Fisher-Yates on the Philox stream (seed, e)): every rank computes the same
//   one without communicating, and a resumed run recomputes epoch e directly.
// - Sharding is torch's DistributedSampler arithmetic on that order: rank r of
//   world w takes positions r, r + w, r + 2w, ... so that shares are disjoint
//   and equal-sized. Equal sizes are made either by repeating the beginning of
//   the order (drop_last = False; also mmengine's DefaultSampler, XTuner's
//   sampler, with round_up = True) or by leaving out its end (drop_last = True);
//   ShardLayout says how many samples were repeated or left out.
// - A Cursor records (seed, epoch, position in this rank's share, world size,
//   rank, dataset size and fingerprint, shuffle, policy) as JSON; restoring it
//   yields exactly the rest of the sequence the original run would have seen.
//   A cursor written for another dataset or another sharding is refused
//   (CursorMismatch): skipping "the first N samples" of the wrong order would
//   silently train on the wrong data.
#pragma once

#include <cstddef>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/detail/seeded_permutation.hpp>
#include <qlora/io/detail/json.hpp>

namespace qlora {

/// How shares are made equal when the dataset size is not a multiple of the world size.
enum class ShardPolicy : std::uint8_t {
  /// DistributedSampler(drop_last=False): the order continues with its own
  /// beginning until every rank has ceil(n / world) samples.
  repeat,
  /// DistributedSampler(drop_last=True): the order is cut to floor(n / world) per rank.
  drop_last,
};

[[nodiscard]] constexpr std::string_view shard_policy_name(ShardPolicy policy) noexcept {
  return policy == ShardPolicy::repeat ? "repeat" : "drop_last";
}

struct ShardLayout {
  std::size_t per_rank = 0;
  /// Samples seen twice in an epoch (repeat).
  std::size_t repeated = 0;
  /// Samples not seen in an epoch (drop_last).
  std::size_t dropped = 0;
};

[[nodiscard]] inline ShardLayout shard_layout(std::size_t dataset_size, std::size_t world_size, ShardPolicy policy) {
  check(world_size > 0, "InvalidShard", "world_size must be at least 1");
  ShardLayout layout;
  if (policy == ShardPolicy::drop_last) {
    layout.per_rank = dataset_size / world_size;
    layout.dropped = dataset_size - layout.per_rank * world_size;
  } else {
    layout.per_rank = (dataset_size + world_size - 1) / world_size;
    layout.repeated = layout.per_rank * world_size - dataset_size;
  }
  return layout;
}

/// Rank `rank`'s share of `order`: positions rank, rank + world, ... of the
/// order, extended cyclically (repeat) or cut (drop_last) to per_rank * world.
[[nodiscard]] inline std::vector<std::size_t> shard(std::span<const std::size_t> order, std::size_t world_size,
                                                    std::size_t rank, ShardPolicy policy) {
  const ShardLayout layout = shard_layout(order.size(), world_size, policy);
  check(rank < world_size, "InvalidShard", "rank {} is out of range for world_size {}", rank, world_size);
  std::vector<std::size_t> share;
  share.reserve(layout.per_rank);
  for (std::size_t position = rank; position < layout.per_rank * world_size; position += world_size) {
    share.push_back(order[position % order.size()]);
  }
  return share;
}

/// The order of `dataset_size` samples in epoch `epoch` under `seed`.
[[nodiscard]] inline std::vector<std::size_t> epoch_permutation(std::size_t dataset_size, std::uint64_t seed,
                                                                std::uint64_t epoch) {
  return detail::seeded_permutation(dataset_size, seed, epoch);
}

/// Where a rank is in its sequence of samples, and what that sequence is.
struct Cursor {
  std::uint64_t seed = 0;
  std::uint64_t epoch = 0;
  /// Samples of this rank's share of `epoch` already taken.
  std::uint64_t position = 0;
  std::uint64_t world_size = 1;
  std::uint64_t rank = 0;
  std::uint64_t dataset_size = 0;
  std::string dataset_fingerprint;
  bool shuffle = true;
  ShardPolicy policy = ShardPolicy::repeat;

  friend bool operator==(const Cursor&, const Cursor&) = default;

  [[nodiscard]] std::string to_json() const {
    const detail::Json json = {
        {"seed", seed},
        {"epoch", epoch},
        {"position", position},
        {"world_size", world_size},
        {"rank", rank},
        {"dataset_size", dataset_size},
        {"dataset_fingerprint", dataset_fingerprint},
        {"shuffle", shuffle},
        {"shard_policy", std::string(shard_policy_name(policy))},
    };
    return json.dump(2);
  }

  /// Reads to_json's output; every field is required, and unknown fields,
  /// wrong types and unknown policies are errors (InvalidCursor) naming them.
  [[nodiscard]] static Cursor from_json(std::string_view text) {
    detail::Json json;
    try {
      json = detail::Json::parse(text);
    } catch (const detail::Json::parse_error& e) {
      throw Error("InvalidCursor", fmt::format("cursor is not valid JSON: {}", e.what()));
    }
    check(json.is_object(), "InvalidCursor", "cursor must be a JSON object; got {}", json.type_name());
    for (const auto& [key, value] : json.items()) {
      check(key == "seed" || key == "epoch" || key == "position" || key == "world_size" || key == "rank" ||
                key == "dataset_size" || key == "dataset_fingerprint" || key == "shuffle" || key == "shard_policy",
            "InvalidCursor", "cursor has an unknown field \"{}\"", key);
    }
    const auto field = [&json](const char* key) -> const detail::Json& {
      check(json.contains(key), "InvalidCursor", "cursor has no field \"{}\"", key);
      return json.at(key);
    };
    const auto unsigned_field = [&field](const char* key) {
      const detail::Json& value = field(key);
      check(value.is_number_unsigned(), "InvalidCursor", "cursor field \"{}\" must be a non-negative integer; got {}",
            key, value.dump());
      return value.get<std::uint64_t>();
    };
    Cursor cursor;
    cursor.seed = unsigned_field("seed");
    cursor.epoch = unsigned_field("epoch");
    cursor.position = unsigned_field("position");
    cursor.world_size = unsigned_field("world_size");
    cursor.rank = unsigned_field("rank");
    cursor.dataset_size = unsigned_field("dataset_size");
    const detail::Json& fingerprint = field("dataset_fingerprint");
    check(fingerprint.is_string(), "InvalidCursor", "cursor field \"dataset_fingerprint\" must be a string; got {}",
          fingerprint.dump());
    cursor.dataset_fingerprint = fingerprint.get<std::string>();
    const detail::Json& shuffle = field("shuffle");
    check(shuffle.is_boolean(), "InvalidCursor", "cursor field \"shuffle\" must be true or false; got {}",
          shuffle.dump());
    cursor.shuffle = shuffle.get<bool>();
    const detail::Json& policy = field("shard_policy");
    const std::string policy_name = policy.is_string() ? policy.get<std::string>() : std::string();
    check(policy_name == shard_policy_name(ShardPolicy::repeat) || policy_name == shard_policy_name(ShardPolicy::drop_last),
          "InvalidCursor", "cursor field \"shard_policy\" must be \"repeat\" or \"drop_last\"; got {}", policy.dump());
    cursor.policy = policy_name == shard_policy_name(ShardPolicy::repeat) ? ShardPolicy::repeat : ShardPolicy::drop_last;
    return cursor;
  }
};

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
    std::vector<std::size_t> order(dataset_size_);
    if (options_.shuffle) {
      order = epoch_permutation(dataset_size_, options_.seed, epoch);
    } else {
      std::iota(order.begin(), order.end(), std::size_t{0});
    }
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
