// Cursor: where a rank is in its sequence of samples (epoch_order.hpp's
// EpochSampler), and what that sequence is: (seed, epoch, position in this
// rank's share, world size, rank, dataset size and fingerprint, shuffle, shard
// policy). It is saved as JSON with each checkpoint; restoring it yields exactly
// the rest of the sequence the original run would have seen. The fields beyond
// (epoch, position) are there to be compared: a cursor written for another
// dataset or another sharding is refused (CursorMismatch), because skipping
// "the first N samples" of the wrong order would silently train on the wrong
// data. The JSON reader is as strict as the library's other ones: duplicate
// keys, unknown fields, missing fields and wrong types are errors naming the
// source and the field.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/shard_layout.hpp>
#include <qlora/io/detail/json.hpp>

namespace qlora {

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

  /// Reads to_json's output; `source_name` (the file it came from) names it in
  /// errors. Every field is required; invalid JSON, unknown fields, wrong types
  /// and unknown policies are InvalidCursor, a key given twice is DuplicateKey.
  [[nodiscard]] static Cursor from_json(std::string_view text, std::string_view source_name) {
    const detail::Json json = detail::parse_json_rejecting_duplicates(text, "InvalidCursor", source_name);
    check(json.is_object(), "InvalidCursor", "{}: a cursor must be a JSON object; got {}", source_name,
          json.type_name());
    for (const auto& [key, value] : json.items()) {
      check(key == "seed" || key == "epoch" || key == "position" || key == "world_size" || key == "rank" ||
                key == "dataset_size" || key == "dataset_fingerprint" || key == "shuffle" || key == "shard_policy",
            "InvalidCursor", "{}: cursor has an unknown field \"{}\"", source_name, key);
    }
    const auto field = [&](const char* key) -> const detail::Json& {
      check(json.contains(key), "InvalidCursor", "{}: cursor has no field \"{}\"", source_name, key);
      return json.at(key);
    };
    const auto unsigned_field = [&](const char* key) {
      const detail::Json& value = field(key);
      check(value.is_number_unsigned(), "InvalidCursor",
            "{}: cursor field \"{}\" must be a non-negative integer; got {}", source_name, key, value.dump());
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
    check(fingerprint.is_string(), "InvalidCursor", "{}: cursor field \"dataset_fingerprint\" must be a string; got {}",
          source_name, fingerprint.dump());
    cursor.dataset_fingerprint = fingerprint.get<std::string>();
    const detail::Json& shuffle = field("shuffle");
    check(shuffle.is_boolean(), "InvalidCursor", "{}: cursor field \"shuffle\" must be true or false; got {}",
          source_name, shuffle.dump());
    cursor.shuffle = shuffle.get<bool>();
    const detail::Json& policy = field("shard_policy");
    const std::string policy_name = policy.is_string() ? policy.get<std::string>() : std::string();
    check(policy_name == shard_policy_name(ShardPolicy::repeat) || policy_name == shard_policy_name(ShardPolicy::drop_last),
          "InvalidCursor", "{}: cursor field \"shard_policy\" must be \"repeat\" or \"drop_last\"; got {}", source_name,
          policy.dump());
    cursor.policy = policy_name == shard_policy_name(ShardPolicy::repeat) ? ShardPolicy::repeat : ShardPolicy::drop_last;
    return cursor;
  }
};

}  // namespace qlora
