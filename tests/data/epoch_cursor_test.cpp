// Cursor's JSON: what to_json writes from_json reads back, and from_json is as
// strict as the library's other JSON readers (io/detail/json.hpp): every error
// names the source it was read from and the field, and a key given twice is
// refused rather than silently resolved to one of its values.
#include <qlora/data/epoch_cursor.hpp>

#include <cstdint>
#include <limits>
#include <string>

#include <catch2/catch.hpp>

#include "data/packing_test_support.hpp"

using qlora::Cursor;
using qlora::ShardPolicy;
using qlora::test::Json;
using qlora::test::require_error;

namespace {

constexpr const char* source = "run/checkpoint-200/data_cursor.json";

Cursor mid_epoch() {
  return Cursor{.seed = 1234,
                .epoch = 3,
                .position = 17,
                .world_size = 4,
                .rank = 2,
                .dataset_size = 103,
                .dataset_fingerprint = "fnv1a64:0123456789abcdef",
                .shuffle = true,
                .policy = ShardPolicy::drop_last};
}

}  // namespace

TEST_CASE("a cursor reads back what it wrote") {
  const Cursor cursor = mid_epoch();
  const std::string json = cursor.to_json();
  CHECK(Cursor::from_json(json, source) == cursor);
  CHECK(Cursor::from_json(json, source).to_json() == json);
  // The field names are the file format: a checkpoint written today must read tomorrow.
  const Json parsed = Json::parse(json);
  CHECK(parsed.at("shard_policy") == "drop_last");
  CHECK(parsed.at("dataset_fingerprint") == "fnv1a64:0123456789abcdef");
  CHECK(parsed.size() == 9);

  Cursor extreme = cursor;
  extreme.seed = std::numeric_limits<std::uint64_t>::max();
  extreme.shuffle = false;
  extreme.policy = ShardPolicy::repeat;
  CHECK(Cursor::from_json(extreme.to_json(), source) == extreme);
}

TEST_CASE("cursor JSON errors name the source and the field") {
  const Json json = Json::parse(mid_epoch().to_json());
  const auto with = [&json](const char* key, const Json& value) {
    Json changed = json;
    changed[key] = value;
    return changed.dump();
  };
  Json missing = json;
  missing.erase("rank");
  require_error([] { (void)Cursor::from_json("{\"seed\": ", source); }, "InvalidCursor", source, "invalid JSON");
  require_error([] { (void)Cursor::from_json("[1, 2]", source); }, "InvalidCursor", source, "JSON object", "array");
  require_error([&] { (void)Cursor::from_json(missing.dump(), source); }, "InvalidCursor", source,
                "no field \"rank\"");
  require_error([&] { (void)Cursor::from_json(with("epoch", -1), source); }, "InvalidCursor", source, "\"epoch\"",
                "-1");
  require_error([&] { (void)Cursor::from_json(with("seed", "7"), source); }, "InvalidCursor", source, "\"seed\"");
  require_error([&] { (void)Cursor::from_json(with("shuffle", 1), source); }, "InvalidCursor", source, "\"shuffle\"");
  require_error([&] { (void)Cursor::from_json(with("shard_policy", "pad"), source); }, "InvalidCursor", source,
                "\"pad\"");
  require_error([&] { (void)Cursor::from_json(with("dataset_fingerprint", 3), source); }, "InvalidCursor", source,
                "dataset_fingerprint");
  require_error([&] { (void)Cursor::from_json(with("samples", 3), source); }, "InvalidCursor", source,
                "unknown field \"samples\"");
}

TEST_CASE("a key given twice is refused, not resolved to one of its values") {
  // nlohmann's DOM alone would keep one "position" and resume at it without a word.
  std::string json = mid_epoch().to_json();
  const std::string position = "\"position\": 17,";
  REQUIRE(json.find(position) != std::string::npos);
  json.insert(json.find(position), "\"position\": 0,\n  ");
  require_error([&] { (void)Cursor::from_json(json, source); }, "DuplicateKey", source, "`position`");
}
