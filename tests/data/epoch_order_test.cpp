// EpochSampler: epoch orders, ranks' shares of them, and resuming from a
// cursor. The permutations are checked against the independent implementation
// of the documented algorithm in tests/reference/xtuner_packing.py; resuming
// against the uninterrupted sequence itself. (The sharding arithmetic is
// checked against torch in shard_layout_test.cpp, the cursor's JSON in
// epoch_cursor_test.cpp.)
#include <qlora/data/epoch_order.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "data/packing_test_support.hpp"

using qlora::Cursor;
using qlora::EpochOrderOptions;
using qlora::EpochSampler;
using qlora::ShardPolicy;
using qlora::test::Json;
using qlora::test::require_error;

namespace {

constexpr const char* fingerprint = "fnv1a64:0123456789abcdef";

std::vector<std::size_t> sizes(const Json& values) { return values.get<std::vector<std::size_t>>(); }

EpochOrderOptions options_for(std::size_t world_size, std::size_t rank, ShardPolicy policy = ShardPolicy::repeat) {
  EpochOrderOptions options;
  options.seed = 1234;
  options.world_size = world_size;
  options.rank = rank;
  options.policy = policy;
  return options;
}

}  // namespace

TEST_CASE("epoch permutations follow the documented algorithm") {
  const Json fixture = qlora::test::packing_fixture("epoch_permutations.json");
  for (const Json& permutation_case : fixture.at("cases")) {
    const auto n = permutation_case.at("n").get<std::size_t>();
    const auto seed = permutation_case.at("seed").get<std::uint64_t>();
    const auto stream = permutation_case.at("stream").get<std::uint64_t>();
    INFO("n " << n << " seed " << seed << " stream " << stream);
    CHECK(qlora::epoch_permutation(n, seed, stream) == sizes(permutation_case.at("permutation")));
  }
}

TEST_CASE("epoch permutations are uniform") {
  // 24 000 epochs of a 4-sample dataset: each of the 24 orders is expected
  // 1000 times. Chi-square with 23 degrees of freedom exceeds 49.7 with
  // probability 0.001, so a fair shuffle fails this about once in a thousand
  // seeds (the seed is fixed, so the test is deterministic); a biased draw such
  // as a plain modulo shows up far above it.
  std::map<std::vector<std::size_t>, int> counts;
  constexpr int epochs = 24000;
  for (std::uint64_t epoch = 0; epoch < epochs; ++epoch) ++counts[qlora::epoch_permutation(4, 99, epoch)];
  REQUIRE(counts.size() == 24);
  double chi_square = 0.0;
  for (const auto& [order, count] : counts) chi_square += std::pow(count - 1000.0, 2) / 1000.0;
  CHECK(chi_square < 49.7);
}

TEST_CASE("ranks share an epoch: disjoint under drop_last, covering everything under repeat") {
  constexpr std::size_t n = 103, world = 4;
  for (const ShardPolicy policy : {ShardPolicy::repeat, ShardPolicy::drop_last}) {
    std::vector<int> seen(n, 0);
    const qlora::ShardLayout layout = qlora::shard_layout(n, world, policy);
    for (std::size_t rank = 0; rank < world; ++rank) {
      const EpochSampler sampler(n, fingerprint, options_for(world, rank, policy));
      const std::vector<std::size_t> share = sampler.epoch_indices(3);
      CHECK(share.size() == layout.per_rank);
      for (const std::size_t index : share) ++seen[index];
    }
    const auto twice = static_cast<std::size_t>(std::count(seen.begin(), seen.end(), 2));
    const auto never = static_cast<std::size_t>(std::count(seen.begin(), seen.end(), 0));
    CHECK(twice == layout.repeated);
    CHECK(never == layout.dropped);
    CHECK(layout.repeated + layout.dropped == (policy == ShardPolicy::repeat ? 1u : 3u));
  }
}

TEST_CASE("next walks epoch after epoch; orders are pure functions of (seed, epoch)") {
  EpochSampler sampler(10, fingerprint, options_for(3, 1));
  const EpochSampler twin(10, fingerprint, options_for(3, 1));
  std::vector<std::size_t> expected;
  for (std::uint64_t epoch = 0; epoch < 4; ++epoch) {
    const std::vector<std::size_t> share = twin.epoch_indices(epoch);
    expected.insert(expected.end(), share.begin(), share.end());
  }
  std::vector<std::size_t> taken;
  for (std::size_t i = 0; i < expected.size(); ++i) taken.push_back(sampler.next());
  CHECK(taken == expected);
  CHECK(twin.epoch_indices(0) != twin.epoch_indices(1));

  EpochOrderOptions in_order = options_for(2, 0);
  in_order.shuffle = false;
  CHECK(EpochSampler(5, fingerprint, in_order).epoch_indices(7) == std::vector<std::size_t>{0, 2, 4});
}

TEST_CASE("a restored cursor yields exactly the rest of the sequence") {
  constexpr std::size_t n = 11;
  const EpochOrderOptions options = options_for(2, 1, ShardPolicy::drop_last);
  EpochSampler reference(n, fingerprint, options);
  std::vector<std::size_t> sequence;
  std::vector<std::string> cursors;  // cursors[k]: the JSON after taking k samples
  for (std::size_t k = 0; k < 4 * reference.layout().per_rank; ++k) {
    cursors.push_back(reference.cursor().to_json());
    sequence.push_back(reference.next());
  }
  for (std::size_t k = 0; k < cursors.size(); ++k) {
    INFO("resumed after " << k << " samples");
    const Cursor cursor = Cursor::from_json(cursors[k], "cursor.json");
    CHECK(cursor.to_json() == cursors[k]);
    EpochSampler resumed(n, fingerprint, options);
    resumed.restore(cursor);
    CHECK(resumed.cursor() == cursor);
    for (std::size_t i = k; i < sequence.size(); ++i) REQUIRE(resumed.next() == sequence[i]);
  }
  // The end of an epoch and the start of the next resume alike.
  Cursor end_of_epoch = Cursor::from_json(cursors[0], "cursor.json");
  end_of_epoch.position = reference.layout().per_rank;
  EpochSampler resumed(n, fingerprint, options);
  resumed.restore(end_of_epoch);
  CHECK(resumed.next() == sequence[reference.layout().per_rank]);
}

TEST_CASE("a cursor from another run is refused, naming what differs") {
  const EpochSampler original(20, fingerprint, options_for(4, 2));
  const Cursor saved = original.cursor();
  const auto refused_by = [&saved](std::size_t size, const std::string& data, const EpochOrderOptions& options,
                                   const char* field) {
    EpochSampler other(size, data, options);
    require_error([&] { other.restore(saved); }, "CursorMismatch", field);
  };
  refused_by(20, "fnv1a64:fedcba9876543210", options_for(4, 2), "dataset_fingerprint");
  refused_by(21, fingerprint, options_for(4, 2), "dataset_size");
  refused_by(20, fingerprint, options_for(2, 0), "world_size is 4 but this run's is 2");
  refused_by(20, fingerprint, options_for(4, 1), "rank");
  refused_by(20, fingerprint, options_for(4, 2, ShardPolicy::drop_last), "shard_policy");
  EpochOrderOptions other_seed = options_for(4, 2);
  other_seed.seed = 4321;
  refused_by(20, fingerprint, other_seed, "seed");
  EpochOrderOptions unshuffled = options_for(4, 2);
  unshuffled.shuffle = false;
  refused_by(20, fingerprint, unshuffled, "shuffle");

  Cursor too_far = saved;
  too_far.position = 6;
  EpochSampler same(20, fingerprint, options_for(4, 2));
  require_error([&] { same.restore(too_far); }, "CursorMismatch", "position 6", "5 samples");
}

TEST_CASE("samplers that cannot produce a sequence are errors") {
  require_error([] { EpochSampler sampler(0, fingerprint, options_for(1, 0)); }, "EmptyDataset", "empty dataset");
  require_error([] { EpochSampler sampler(3, fingerprint, options_for(4, 0, ShardPolicy::drop_last)); }, "EmptyShard",
                "3 samples", "4 ranks");
  require_error([] { EpochSampler sampler(3, fingerprint, options_for(0, 0)); }, "InvalidShard", "world_size");
  require_error([] { EpochSampler sampler(3, fingerprint, options_for(2, 2)); }, "InvalidShard", "rank 2");
  // With repetition even a dataset smaller than the world gives each rank a sample.
  CHECK(EpochSampler(3, fingerprint, options_for(4, 3)).layout().per_rank == 1);
}
