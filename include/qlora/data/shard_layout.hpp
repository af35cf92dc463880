// Splitting one epoch's order among the ranks of a data-parallel run, with
// torch's DistributedSampler arithmetic: rank r of world w takes positions r,
// r + w, r + 2w, ... of the order, so that shares are disjoint and
// equal-sized. Equal sizes are made either by repeating the beginning of the
// order (ShardPolicy::repeat: DistributedSampler(drop_last=False), also
// mmengine's DefaultSampler, XTuner's sampler, with round_up=True) or by leaving
// out its end (ShardPolicy::drop_last); ShardLayout says how many samples were
// repeated or left out. Equal shares matter: every rank must take the same
// number of steps, or the collective ops of the last step hang.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include <qlora/core/error.hpp>

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

}  // namespace qlora
