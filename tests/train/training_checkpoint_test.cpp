// Training checkpoints: a save reads back whole (the adapter as peft's own
// bytes, the AdamW state bit for bit, the trainer state field for field); a
// save that fails midway — a writer that throws, a full disk (simulated by
// Error("IoError") from the writer), a kill (its leftover work directory) —
// leaves the previous checkpoint and `latest` as they were; resume passes over
// damaged checkpoints, naming what is wrong; keep_last rotates.
#include <qlora/train/training_checkpoint.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <qlora/data/epoch_cursor.hpp>

#include "io/test_support.hpp"
#include "support/errors.hpp"

using qlora::AdamW;
using qlora::PeftAdapter;
using qlora::TrainerState;
using qlora::TrainingCheckpoint;
using qlora::test::Json;
using qlora::test::read_bytes;
using qlora::test::read_text;
using qlora::test::require_error;
using qlora::test::TempDir;
using qlora::test::write_bytes;
using Names = std::vector<std::string>;
namespace fs = std::filesystem;

namespace {

const fs::path peft_fixture = fs::path(QLORA_TEST_DATA_DIR) / "lora" / "peft_written";

/// A small optimizer with one step taken, so its moments are not zero.
struct Optimizer {
  qlora::Tensor param{qlora::DType::F32, qlora::Shape{4}};
  qlora::Tensor grad{qlora::DType::F32, qlora::Shape{4}};
  AdamW adamw;
  Optimizer() {
    const float values[] = {0.5f, -1.25f, 2.0f, 0.125f};
    const float grads[] = {0.1f, -0.2f, 0.3f, -0.4f};
    std::memcpy(param.view().raw_data(), values, sizeof values);
    std::memcpy(grad.view().raw_data(), grads, sizeof grads);
    adamw.add("lora_A", param.view(), grad.view());
  }
  void step() { adamw.step(1e-3); }
};

std::vector<std::byte> bytes_of(const qlora::TensorView& view) {
  const auto* data = static_cast<const std::byte*>(view.raw_data());
  return {data, data + view.byte_size()};
}

TrainerState state_at(std::int64_t step) {
  qlora::Cursor cursor;
  cursor.seed = 42;
  cursor.epoch = 1;
  cursor.position = static_cast<std::uint64_t>(step) * 8;
  cursor.dataset_size = 1000;
  cursor.dataset_fingerprint = "sha256:ab12";
  TrainerState state;
  state.step = step;
  state.epoch = 1.0 + static_cast<double>(step) / 125.0;
  state.data_cursor = cursor.to_json();
  state.seed = 1234;
  state.schedule = {qlora::LrSchedule::Kind::cosine, 2e-4, 10, 500, 0.5};
  state.hyper_parameters = {{"lora_r", "4"}, {"model", "tiny_phi"}};
  state.metrics = {{"loss", 1.75}, {"eval_loss", std::nan("")}};
  return state;
}

/// A run directory and what a trainer saves into it.
struct Run {
  TempDir dir;
  PeftAdapter adapter = qlora::read_peft_adapter(peft_fixture);
  Optimizer optimizer;
  fs::path save(std::int64_t step, qlora::CheckpointOptions options = {}) {
    return qlora::save_checkpoint(dir.path(), adapter, optimizer.adamw, state_at(step), options);
  }
  /// Saves `step` with an optimizer-state writer that fails after writing part of its file.
  void fail_to_save(std::int64_t step, const std::exception_ptr& failure) {
    const auto failing_writer = [&](const fs::path& file) {
      write_bytes(file, "partial optimizer st");
      std::rethrow_exception(failure);
    };
    qlora::save_checkpoint(dir.path(), adapter, failing_writer, state_at(step));
  }
  [[nodiscard]] std::string latest() const { return read_text(dir / "latest"); }
  [[nodiscard]] std::int64_t resumed_step() {
    const auto found = qlora::latest_checkpoint(dir.path());
    REQUIRE(found.has_value());
    return found->checkpoint.state.step;
  }
};

Names listing(const fs::path& dir) {
  Names names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

/// Rewrites checkpoint `dir`'s trainer_state.json through `edit`.
template <class Edit>
void edit_trainer_state(const fs::path& dir, Edit edit) {
  Json json = Json::parse(read_text(dir / "trainer_state.json"));
  edit(json);
  write_bytes(dir / "trainer_state.json", json.dump(2));
}

}  // namespace

TEST_CASE("a checkpoint reads back whole") {
  Run run;
  run.optimizer.step();
  const fs::path saved = run.save(10);
  CHECK(saved == run.dir / "checkpoint-10");
  CHECK(run.dir.listing() == Names{"checkpoint-10", "latest"});
  CHECK(run.latest() == "checkpoint-10\n");
  CHECK(listing(saved) ==
        Names{"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"});
  // The adapter is peft's own file, byte for byte (safetensors.torch.save_file of the same tensors).
  CHECK(read_bytes(saved / "adapter_model.safetensors") == read_bytes(peft_fixture / "adapter_model.safetensors"));

  const auto found = qlora::latest_checkpoint(run.dir.path());
  REQUIRE(found.has_value());
  CHECK(found->skipped.empty());
  const TrainingCheckpoint& checkpoint = found->checkpoint;
  CHECK(checkpoint.dir == saved);
  const TrainerState expected = state_at(10);
  const TrainerState& state = checkpoint.state;
  CHECK(state.step == 10);
  CHECK(state.epoch == expected.epoch);
  CHECK(state.seed == 1234);
  CHECK(state.data_cursor == expected.data_cursor);  // Cursor::to_json's text comes back unchanged
  CHECK(qlora::Cursor::from_json(state.data_cursor, "cursor") == qlora::Cursor::from_json(expected.data_cursor, "x"));
  CHECK(state.schedule.kind == qlora::LrSchedule::Kind::cosine);
  CHECK(state.schedule.peak_lr == 2e-4);
  CHECK(state.schedule.warmup_steps == 10);
  CHECK(state.schedule.total_steps == 500);
  CHECK(state.schedule.num_cycles == 0.5);
  CHECK(state.hyper_parameters == expected.hyper_parameters);
  CHECK(state.metrics.at("loss") == 1.75);
  CHECK(std::isnan(state.metrics.at("eval_loss")));  // stored as null

  const PeftAdapter adapter = checkpoint.adapter();
  REQUIRE(adapter.modules.size() == run.adapter.modules.size());
  CHECK(adapter.config.lora.r == run.adapter.config.lora.r);
  CHECK(bytes_of(adapter.modules[0].lora_B.view()) == bytes_of(run.adapter.modules[0].lora_B.view()));

  Optimizer restored;
  restored.adamw.load_state(checkpoint.optimizer_state_file());
  CHECK(restored.adamw.steps() == 1);
  CHECK(bytes_of(restored.adamw.exp_avg("lora_A")) == bytes_of(run.optimizer.adamw.exp_avg("lora_A")));
  CHECK(bytes_of(restored.adamw.exp_avg_sq("lora_A")) == bytes_of(run.optimizer.adamw.exp_avg_sq("lora_A")));
}

TEST_CASE("a run without checkpoints resumes from nothing") {
  TempDir dir;
  CHECK_FALSE(qlora::latest_checkpoint(dir / "not-yet-created").has_value());
  CHECK_FALSE(qlora::latest_checkpoint(dir.path()).has_value());
}

TEST_CASE("a save that fails midway leaves the previous checkpoint and latest intact") {
  Run run;
  run.save(10);
  const std::vector<std::byte> previous_state = read_bytes(run.dir / "checkpoint-10" / "trainer_state.json");

  SECTION("a writer that throws") {
    require_error([&] { run.fail_to_save(20, std::make_exception_ptr(std::runtime_error("writer bug"))); },
                  "WriteAborted", "checkpoint-20", "writer bug");
  }
  SECTION("a full disk") {
    const qlora::Error full("IoError", "cannot write optimizer.safetensors: No space left on device");
    require_error([&] { run.fail_to_save(20, std::make_exception_ptr(full)); }, "IoError", "saving checkpoint-20",
                  "No space left on device");
  }
  SECTION("a writer that creates no file") {
    require_error([&] { qlora::save_checkpoint(run.dir.path(), run.adapter, [](const fs::path&) {}, state_at(20)); },
                  "IoError", "did not create", "optimizer.safetensors");
  }
  SECTION("a data cursor that is not JSON") {
    TrainerState state = state_at(20);
    state.data_cursor = "{epoch: 1";
    require_error([&] { qlora::save_checkpoint(run.dir.path(), run.adapter, run.optimizer.adamw, state); },
                  "InvalidArgument", "data_cursor");
  }
  CHECK(run.dir.listing() == Names{"checkpoint-10", "latest"});  // and no work directory left
  CHECK(run.latest() == "checkpoint-10\n");
  CHECK(read_bytes(run.dir / "checkpoint-10" / "trainer_state.json") == previous_state);
  CHECK(run.resumed_step() == 10);
}

TEST_CASE("a save killed midway leaves a hidden work directory that resume ignores and the next save removes") {
  Run run;
  run.save(10);
  const fs::path killed = run.dir / ".checkpoint-20.tmp-a1b2c3";
  fs::create_directory(killed);
  write_bytes(killed / "adapter_model.safetensors", "torn");
  CHECK(run.resumed_step() == 10);
  run.save(20);
  CHECK(run.dir.listing() == Names{"checkpoint-10", "checkpoint-20", "latest"});
  CHECK(run.resumed_step() == 20);
}

TEST_CASE("resume passes over a damaged checkpoint to the newest valid one, naming the damage") {
  Run run;
  run.save(10);
  const fs::path newest = run.save(20);
  const fs::path state_file = newest / "trainer_state.json";

  const auto damaged = [&](auto damage, std::string_view code, std::string_view what) {
    damage();
    require_error([&] { (void)qlora::read_checkpoint(newest); }, code, what);
    const auto found = qlora::latest_checkpoint(run.dir.path());
    REQUIRE(found.has_value());
    CHECK(found->checkpoint.state.step == 10);
    REQUIRE(found->skipped.size() == 1);
    CHECK(found->skipped[0].find(std::string(what)) != std::string::npos);
    CHECK(found->skipped[0].find(std::string(code)) != std::string::npos);
  };
  SECTION("trainer_state.json is not JSON") {
    damaged([&] { write_bytes(state_file, "{\"step\": 2"); }, "InvalidCheckpoint", state_file.string());
  }
  SECTION("trainer_state.json is missing") {
    damaged([&] { fs::remove(state_file); }, "InvalidCheckpoint", "missing (the checkpoint was not completed)");
  }
  SECTION("another version") {
    damaged([&] { edit_trainer_state(newest, [](Json& j) { j["version"] = 2; }); }, "UnsupportedCheckpoint",
            "version 2");
  }
  SECTION("a field is missing") {
    damaged([&] { edit_trainer_state(newest, [](Json& j) { j.erase("seed"); }); }, "InvalidCheckpoint",
            "has no \"seed\"");
  }
  SECTION("a field has the wrong type") {
    damaged([&] { edit_trainer_state(newest, [](Json& j) { j["lr_schedule"]["kind"] = "warm"; }); },
            "InvalidCheckpoint", "unknown learning-rate schedule `warm`");
  }
  SECTION("a file is truncated") {
    damaged([&] { fs::resize_file(newest / "adapter_model.safetensors", 100); }, "InvalidCheckpoint",
            "adapter_model.safetensors: 100 bytes; trainer_state.json recorded");
  }
  SECTION("a file is missing") {
    damaged([&] { fs::remove(newest / "optimizer.safetensors"); }, "InvalidCheckpoint", "optimizer.safetensors: missing");
  }
  SECTION("the directory holds another step") {
    damaged([&] { edit_trainer_state(newest, [](Json& j) { j["step"] = 21; }); }, "InvalidCheckpoint",
            "holds step 21, but the directory is named checkpoint-20");
  }
}

TEST_CASE("latest naming no checkpoint is passed over; with nothing valid, NoValidCheckpoint lists each") {
  Run run;
  run.save(10);
  write_bytes(run.dir / "latest", "../../etc\n");
  const auto found = qlora::latest_checkpoint(run.dir.path());
  REQUIRE(found.has_value());
  CHECK(found->checkpoint.state.step == 10);
  REQUIRE(found->skipped.size() == 1);
  CHECK(found->skipped[0].find("does not name a checkpoint directory (\"../../etc\")") != std::string::npos);

  fs::remove(run.dir / "checkpoint-10" / "trainer_state.json");
  require_error([&] { (void)qlora::latest_checkpoint(run.dir.path()); }, "NoValidCheckpoint", "../../etc",
                "checkpoint-10/trainer_state.json: missing");
}

TEST_CASE("keep_last deletes the oldest checkpoints once the new one is in place") {
  Run run;
  run.save(10, {.keep_last = 2});
  run.save(20, {.keep_last = 2});
  CHECK(run.dir.listing() == Names{"checkpoint-10", "checkpoint-20", "latest"});
  run.save(30, {.keep_last = 2});
  CHECK(run.dir.listing() == Names{"checkpoint-20", "checkpoint-30", "latest"});
  run.save(40);  // 0: keep all
  CHECK(run.dir.listing() == Names{"checkpoint-20", "checkpoint-30", "checkpoint-40", "latest"});
  run.save(50, {.keep_last = 1});
  CHECK(run.dir.listing() == Names{"checkpoint-50", "latest"});
  CHECK(run.latest() == "checkpoint-50\n");
}

TEST_CASE("saving a step again (after resuming from an older checkpoint) replaces its directory") {
  Run run;
  run.save(10);
  run.save(20);
  run.optimizer.step();
  run.save(20);
  CHECK(run.dir.listing() == Names{"checkpoint-10", "checkpoint-20", "latest"});
  Optimizer restored;
  restored.adamw.load_state(qlora::latest_checkpoint(run.dir.path())->checkpoint.optimizer_state_file());
  CHECK(restored.adamw.steps() == 1);  // the second save's state
}

TEST_CASE("bad arguments are refused before anything is written") {
  Run run;
  require_error([&] { run.save(-1); }, "InvalidArgument", "step -1");
  require_error([&] { run.save(10, {.keep_last = -1}); }, "InvalidArgument", "keep_last -1");
  CHECK(run.dir.listing().empty());
  require_error([&] { (void)qlora::read_checkpoint(run.dir / "checkpoint-3"); }, "InvalidCheckpoint", "not a directory");
}
