// Ranks' shares of an epoch's order against torch's DistributedSampler
// (tests/reference/xtuner_packing.py records what it gives each rank for a
// given permutation, with and without drop_last).
#include <qlora/data/shard_layout.hpp>

#include <cstddef>
#include <vector>

#include <catch2/catch.hpp>

#include "data/packing_test_support.hpp"

using qlora::ShardPolicy;
using qlora::test::Json;
using qlora::test::require_error;

namespace {

std::vector<std::size_t> sizes(const Json& values) { return values.get<std::vector<std::size_t>>(); }

}  // namespace

TEST_CASE("shards match torch's DistributedSampler, repeating or dropping as it does") {
  const Json fixture = qlora::test::packing_fixture("distributed_sampler.json");
  for (const Json& sampler_case : fixture.at("cases")) {
    const std::vector<std::size_t> permutation = sizes(sampler_case.at("permutation"));
    const auto world = sampler_case.at("world_size").get<std::size_t>();
    const bool drop_last = sampler_case.at("drop_last").get<bool>();
    const ShardPolicy policy = drop_last ? ShardPolicy::drop_last : ShardPolicy::repeat;
    INFO("n " << permutation.size() << " world " << world << " drop_last " << drop_last);
    const qlora::ShardLayout layout = qlora::shard_layout(permutation.size(), world, policy);
    const auto per_rank = sampler_case.at("num_samples").get<std::size_t>();
    const auto total = sampler_case.at("total_size").get<std::size_t>();
    CHECK(layout.per_rank == per_rank);
    CHECK(layout.repeated == (total > permutation.size() ? total - permutation.size() : 0));
    CHECK(layout.dropped == (total < permutation.size() ? permutation.size() - total : 0));
    for (std::size_t rank = 0; rank < world; ++rank) {
      CHECK(qlora::shard(permutation, world, rank, policy) == sizes(sampler_case.at("ranks")[rank]));
    }
  }
}

TEST_CASE("shards of an impossible world are errors") {
  const std::vector<std::size_t> order{2, 0, 1};
  require_error([] { (void)qlora::shard_layout(3, 0, ShardPolicy::repeat); }, "InvalidShard", "world_size");
  require_error([&] { (void)qlora::shard(order, 2, 2, ShardPolicy::repeat); }, "InvalidShard", "rank 2",
                "world_size 2");
  CHECK(qlora::shard_policy_name(ShardPolicy::repeat) == "repeat");
  CHECK(qlora::shard_policy_name(ShardPolicy::drop_last) == "drop_last");
}
