// ShardedCheckpoint and write_sharded_checkpoint against huggingface_hub's
// save_torch_state_dict: its folders read back to the recorded values, our
// writer reproduces its shards and index byte for byte from the same state dict,
// and inconsistent folders are refused with named errors.
#include <qlora/io/sharded_checkpoint.hpp>

#include <cstddef>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "io/test_support.hpp"

using qlora::Error;
using qlora::SafetensorsWriter;
using qlora::ShardedCheckpoint;
using qlora::test::fixture;
using qlora::test::Json;
using qlora::test::TempDir;
using Names = std::vector<std::string>;

namespace {

const Json& folder_record(const Json& manifest, std::string_view folder) {
  for (const Json& f : manifest["folders"]) {
    if (f["folder"] == folder) return f;
  }
  FAIL("no folder record " << folder);
  return manifest;
}

std::string error_code_of(auto&& action) {
  try {
    action();
  } catch (const Error& e) {
    return std::string(e.code());
  }
  return "no error";
}

/// A scratch copy of tests/data/io/sharded whose index can be edited.
struct ShardedCopy {
  TempDir dir;
  ShardedCopy() { std::filesystem::copy(fixture("sharded"), dir.path(), std::filesystem::copy_options::recursive); }
  std::filesystem::path index() const { return dir / "model.safetensors.index.json"; }
  /// Replaces the first occurrence of `from` in the index by `to`.
  void edit_index(std::string_view from, std::string_view to) const {
    std::string text = qlora::test::read_text(index());
    const std::size_t at = text.find(from);
    REQUIRE(at != std::string::npos);
    text.replace(at, from.size(), to);
    qlora::test::write_bytes(index(), text);
  }
  std::string open_error() const {
    return error_code_of([&] { (void)ShardedCheckpoint::open(dir.path()); });
  }
};

}  // namespace

TEST_CASE("huggingface_hub's sharded and single-file folders read back with the recorded values") {
  const Json manifest = qlora::test::load_json(fixture("manifest.json"));
  for (const std::string folder : {"sharded", "single"}) {
    const Json& record = folder_record(manifest, folder);
    INFO("folder " << folder << ", max_shard_size " << record["max_shard_size"].get<std::uint64_t>());
    const auto checkpoint = ShardedCheckpoint::open(fixture(folder));
    CHECK(checkpoint.size() == record["tensors"].size());
    CHECK(checkpoint.shards().size() == (folder == "sharded" ? 4u : 1u));
    for (const Json& t : record["tensors"]) {
      qlora::test::check_recorded_tensor(checkpoint.tensor(t["name"].get<std::string>()), t);
    }
    CHECK(checkpoint.find("no.such.tensor") == nullptr);
    CHECK(error_code_of([&] { (void)checkpoint.tensor("no.such.tensor"); }) == "TensorNotFound");
  }
}

TEST_CASE("the same state dict and max_shard_size give huggingface_hub's files byte for byte") {
  const Json manifest = qlora::test::load_json(fixture("manifest.json"));
  for (const std::string folder : {"sharded", "single"}) {
    const Json& record = folder_record(manifest, folder);
    INFO("folder " << folder);
    const auto python = ShardedCheckpoint::open(fixture(folder));
    SafetensorsWriter state_dict;  // in the state dict's order, which decides the split
    for (const Json& name : record["state_dict_order"]) state_dict.add(python.tensor(name.get<std::string>()));
    TempDir dir;
    qlora::write_sharded_checkpoint(dir.path(), state_dict, record["max_shard_size"].get<std::uint64_t>());
    CHECK(dir.listing() == record["files"].get<Names>());
    for (const std::string& file : dir.listing()) {
      INFO("file " << file);
      CHECK(qlora::test::read_bytes(dir / file) == qlora::test::read_bytes(fixture(folder) / file));
    }
  }
}

TEST_CASE("a new save removes the weight files of an earlier one and nothing else") {
  const auto python = ShardedCheckpoint::open(fixture("sharded"));
  SafetensorsWriter weights;
  for (const auto& shard : python.shards()) {
    for (const auto& t : shard.tensors()) weights.add(t);
  }
  TempDir dir;
  for (const char* keep : {"config.json", "model.safetensors.backup", "model-1-of-2.safetensors"}) {
    qlora::test::write_bytes(dir / keep, "keep");
  }
  qlora::write_sharded_checkpoint(dir.path(), weights, 64);
  CHECK(ShardedCheckpoint::open(dir.path()).size() == weights.tensors().size());
  qlora::write_sharded_checkpoint(dir.path(), weights);  // now fits one file
  CHECK(dir.listing() ==
        Names{"config.json", "model-1-of-2.safetensors", "model.safetensors", "model.safetensors.backup"});
  qlora::write_sharded_checkpoint(dir.path(), weights, 100);
  const auto reread = ShardedCheckpoint::open(dir.path());
  CHECK(reread.shards().size() > 1);
  CHECK_FALSE(std::filesystem::exists(dir / "model.safetensors"));
  CHECK(reread.tensor("lm_head.weight").read<float>() == python.tensor("lm_head.weight").read<float>());
}

TEST_CASE("shard planning follows huggingface_hub at the edges") {
  const std::vector<std::uint8_t> four(4), two(2);
  SafetensorsWriter weights;
  weights.add("a", {4}, four).add("b", {2}, two).add("c", {2}, two).add("d", {4}, four);
  const auto plan = qlora::detail::plan_shards(weights.tensors(), 4);
  // 4 fills a shard exactly; 2+2 fill the next; a tensor of exactly the limit does not get its own.
  CHECK(plan == std::vector<std::vector<std::size_t>>{{0}, {1, 2}, {3}});
  // Over the limit, a tensor's own shard goes before the shard being filled ("c" after "d"),
  // as split_torch_state_dict_into_shards does for these sizes.
  CHECK(qlora::detail::plan_shards(weights.tensors(), 3) == std::vector<std::vector<std::size_t>>{{0}, {1}, {3}, {2}});

  TempDir dir;
  qlora::write_sharded_checkpoint(dir.path(), SafetensorsWriter());
  CHECK(dir.listing() == Names{"model.safetensors"});
  CHECK(ShardedCheckpoint::open(dir.path()).size() == 0);
}

TEST_CASE("inconsistent folders are refused with named errors") {
  {
    TempDir empty;
    CHECK(error_code_of([&] { (void)ShardedCheckpoint::open(empty.path()); }) == "CheckpointNotFound");
  }
  {
    ShardedCopy copy;
    std::filesystem::remove(copy.dir / "model-00002-of-00004.safetensors");
    CHECK(copy.open_error() == "ShardNotFound");
  }
  {
    ShardedCopy copy;  // a tensor placed in a shard that does not hold it
    copy.edit_index(R"("lm_head.weight": "model-00003-of-00004.safetensors")",
                    R"("lm_head.weight": "model-00004-of-00004.safetensors")");
    CHECK(copy.open_error() == "TensorNotInShard");
  }
  {
    ShardedCopy copy;  // a tensor the index does not list
    copy.edit_index(R"("lm_head.weight": "model-00003-of-00004.safetensors",)", "");
    CHECK(copy.open_error() == "UnlistedTensor");
  }
  {
    ShardedCopy copy;  // listed twice: JSON keeps one, we see both
    copy.edit_index(
        R"("lm_head.weight": "model-00003-of-00004.safetensors",)",
        R"("lm_head.weight": "model-00003-of-00004.safetensors",)"
        R"( "lm_head.weight": "model-00001-of-00004.safetensors",)");
    CHECK(copy.open_error() == "DuplicateKey");
  }
  for (const char* bad : {"../model-00001-of-00004.safetensors", "/tmp/x.safetensors", "sub\\\\..\\\\x.safetensors",
                          "C:x.safetensors", "model-00001-of-00004.bin"}) {
    ShardedCopy copy;
    INFO("shard name " << bad);
    copy.edit_index(R"("model-00001-of-00004.safetensors")", fmt::format("\"{}\"", bad));
    CHECK(copy.open_error() == "InvalidShardName");
  }
  {
    ShardedCopy copy;
    copy.edit_index(R"("weight_map")", R"("weights")");
    CHECK(copy.open_error() == "InvalidIndex");
  }
  {
    ShardedCopy copy;
    copy.edit_index(R"("model-00001-of-00004.safetensors")", "7");
    CHECK(copy.open_error() == "InvalidIndex");
  }
  {
    ShardedCopy copy;
    copy.edit_index("}\n}", "}");
    CHECK(copy.open_error() == "InvalidIndex");
  }
  {
    ShardedCopy copy;  // a broken shard: the reader's error, naming the shard
    qlora::test::write_bytes(copy.dir / "model-00003-of-00004.safetensors", "short");
    try {
      (void)ShardedCheckpoint::open(copy.dir.path());
      FAIL("a broken shard opened");
    } catch (const Error& e) {
      CHECK(e.code() == "HeaderTooSmall");
      CHECK_THAT(e.what(), Catch::Contains("model-00003-of-00004.safetensors"));
    }
  }
}
