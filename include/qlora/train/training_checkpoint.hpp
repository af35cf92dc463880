// Training checkpoints: what a run needs to continue exactly where it stopped,
// committed so that a kill or a full disk at any moment leaves the previous
// checkpoint usable.
//
//   <run>/checkpoint-<step>/
//     adapter_config.json, adapter_model.safetensors   the PEFT adapter (loadable by peft as it is)
//     optimizer.safetensors                            AdamW moments and step count
//     trainer_state.json                               TrainerState + the size of every file above
//   <run>/latest                                       "checkpoint-<step>\n"
//
// Commit protocol (design note reliability_ecosystem.md §3.2; HF Trainer writes
// in place and its auto-resume then trips on a half-written last checkpoint,
// transformers #35525): every file is written into a hidden
// `<run>/.checkpoint-<step>.tmp-XXXXXX/` and fsynced, trainer_state.json last;
// the directory is renamed to `checkpoint-<step>` and the run directory
// fsynced; then `latest` is replaced atomically; only then are checkpoints
// beyond `keep_last` deleted. Until the rename, nothing visible has changed;
// after it, the new checkpoint is complete. Hidden directories a killed save
// left behind are removed by the next save. One process saves into a run
// directory at a time.
//
// Resume: latest_checkpoint() takes the checkpoint `latest` names, after
// checking it (trainer_state.json parses, has the supported version, and every
// file it lists is there with its recorded size). When that fails it falls
// back to the newest valid `checkpoint-<step>` and reports what was wrong with
// each one it skipped, so the trainer can warn instead of dying or, worse,
// silently starting from scratch.
#pragma once

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/io/atomic_file.hpp>
#include <qlora/io/detail/json.hpp>
#include <qlora/io/detail/posix_file.hpp>
#include <qlora/lora/peft_adapter.hpp>
#include <qlora/optim/adamw.hpp>
#include <qlora/optim/lr_schedule.hpp>

namespace qlora {

inline constexpr std::string_view trainer_state_file_name = "trainer_state.json";
inline constexpr std::string_view optimizer_state_file_name = "optimizer.safetensors";
inline constexpr std::string_view latest_checkpoint_file_name = "latest";
/// The trainer_state.json layout this code writes and reads.
inline constexpr std::int64_t trainer_state_version = 1;

/// Everything of a run's progress besides the adapter and the optimizer.
struct TrainerState {
  std::int64_t step = 0;  ///< optimizer steps taken
  double epoch = 0;       ///< fractional epochs done, as the HF Trainer reports them
  /// The data position: a JSON value (Cursor::to_json of data/epoch_cursor.hpp),
  /// kept opaque; read back re-serialised with 2-space indents and sorted keys,
  /// which is the same text for Cursor::to_json's output.
  std::string data_cursor = "{}";
  std::uint64_t seed = 0;  ///< the run's RNG seed (dropout, data order)
  LrSchedule schedule;
  /// The run's settings as text, to compare on resume ("lora_r" -> "16", ...).
  std::map<std::string, std::string> hyper_parameters;
  /// Summary numbers ("loss", "eval_loss", "tokens_seen", ...); NaN is stored as null.
  std::map<std::string, double> metrics;
};

/// A checkpoint on disk that read_checkpoint found complete.
struct TrainingCheckpoint {
  std::filesystem::path dir;
  TrainerState state;

  /// The directory holds the adapter as peft saves it.
  [[nodiscard]] PeftAdapter adapter() const { return read_peft_adapter(dir); }
  /// For AdamW::load_state.
  [[nodiscard]] std::filesystem::path optimizer_state_file() const { return dir / optimizer_state_file_name; }
};

struct CheckpointOptions {
  /// Checkpoints to keep, the new one included (the HF Trainer's
  /// save_total_limit); 0 keeps all. Older ones are deleted after the new one
  /// is committed.
  int keep_last = 0;
};

/// Writes the optimizer state to the path it is given (e.g. AdamW::save_state).
using OptimizerStateWriter = std::function<void(const std::filesystem::path&)>;

/// What latest_checkpoint found.
struct ResumePoint {
  TrainingCheckpoint checkpoint;
  /// One line per checkpoint passed over, naming it and what is wrong with it.
  std::vector<std::string> skipped;
};

namespace detail {

inline constexpr std::string_view checkpoint_prefix = "checkpoint-";
/// Hidden work directories of a save: `.checkpoint-<step>.tmp-XXXXXX` and
/// `.checkpoint-<step>.replaced-XXXXXX`.
inline constexpr std::string_view checkpoint_work_prefix = ".checkpoint-";

inline std::string checkpoint_name(std::int64_t step) { return fmt::format("{}{}", checkpoint_prefix, step); }

/// The step of a directory named `checkpoint-<digits>`, else nothing.
inline std::optional<std::int64_t> checkpoint_step(std::string_view name) {
  if (!name.starts_with(checkpoint_prefix)) return std::nullopt;
  const std::string_view digits = name.substr(checkpoint_prefix.size());
  std::int64_t step = 0;
  const auto [end, error] = std::from_chars(digits.data(), digits.data() + digits.size(), step);
  if (digits.empty() || error != std::errc() || end != digits.data() + digits.size() || digits.front() == '-' ||
      checkpoint_name(step) != name) {  // no leading zeros or signs: one name per step
    return std::nullopt;
  }
  return step;
}

/// The checkpoint directories of `run_dir`, newest (highest step) first.
inline std::vector<std::pair<std::int64_t, std::filesystem::path>> checkpoint_dirs(
    const std::filesystem::path& run_dir) {
  std::vector<std::pair<std::int64_t, std::filesystem::path>> found;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(run_dir, error)) {
    const auto step = checkpoint_step(entry.path().filename().string());
    std::error_code ignored;
    if (step && entry.is_directory(ignored)) found.emplace_back(*step, entry.path());
  }
  check(!error, "IoError", "cannot list the run directory {}: {}", run_dir.string(), error.message());
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  return found;
}

/// fsync of a file or directory: the data (or the names in it) reach the disk.
inline void sync_path(const std::filesystem::path& path, int flags) {
  const UniqueFd fd = open_fd(path, flags);
  if (!fd.valid()) throw io_error("open", path, errno);
  // EINVAL: a file system that cannot sync directories; nothing more to do there.
  if (::fsync(fd.get()) != 0 && errno != EINVAL) throw io_error("sync", path, errno);
}

inline void rename_path(const std::filesystem::path& from, const std::filesystem::path& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) {
    throw Error("IoError", fmt::format("cannot rename {} to {}: {}", from.string(), to.string(),
                                       std::generic_category().message(errno)));
  }
}

/// Removes a directory tree, ignoring failures: used for cleanup only, where
/// a leftover is harmless (the next save removes it) and must not hide the
/// error that caused it.
inline void remove_quietly(const std::filesystem::path& path) noexcept {
  std::error_code ignored;
  std::filesystem::remove_all(path, ignored);
}

/// A fresh, empty hidden directory `.checkpoint-<step>.<kind>-XXXXXX` in `run_dir`.
inline std::filesystem::path make_work_dir(const std::filesystem::path& run_dir, std::int64_t step,
                                           std::string_view kind) {
  std::string pattern = (run_dir / fmt::format("{}{}.{}-XXXXXX", checkpoint_work_prefix, step, kind)).string();
  if (::mkdtemp(pattern.data()) == nullptr) throw io_error("create a directory in", run_dir, errno);
  return pattern;
}

/// Removes what earlier saves left behind when they were killed.
inline void remove_stale_work_dirs(const std::filesystem::path& run_dir) {
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(run_dir, error)) {
    std::error_code ignored;
    if (entry.path().filename().string().starts_with(checkpoint_work_prefix) && entry.is_directory(ignored)) {
      remove_quietly(entry.path());
    }
  }
}

inline std::string trainer_state_json(const TrainerState& state,
                                      const std::map<std::string, std::uintmax_t>& file_sizes) {
  Json cursor;
  try {
    cursor = Json::parse(state.data_cursor);
  } catch (const Json::exception& e) {
    throw Error("InvalidArgument", fmt::format("TrainerState.data_cursor is not valid JSON: {}", e.what()));
  }
  Json metrics = Json::object();
  for (const auto& [name, value] : state.metrics) metrics[name] = value;  // NaN and Inf dump as null
  const Json json = {
      {"version", trainer_state_version},
      {"step", state.step},
      {"epoch", state.epoch},
      {"seed", state.seed},
      {"data_cursor", std::move(cursor)},
      {"lr_schedule",
       {{"kind", std::string(LrSchedule::name(state.schedule.kind))},
        {"peak_lr", state.schedule.peak_lr},
        {"warmup_steps", state.schedule.warmup_steps},
        {"total_steps", state.schedule.total_steps},
        {"num_cycles", state.schedule.num_cycles}}},
      {"hyper_parameters", state.hyper_parameters},
      {"metrics", std::move(metrics)},
      {"files", file_sizes},
  };
  return json.dump(2) + "\n";
}

/// Reads trainer_state.json of `dir`; throws Error("InvalidCheckpoint") naming
/// the file and the field, Error("UnsupportedCheckpoint") for another version.
inline std::pair<TrainerState, std::map<std::string, std::uintmax_t>> parse_trainer_state(
    const std::filesystem::path& dir) {
  const std::filesystem::path path = dir / trainer_state_file_name;
  const std::string source = path.string();
  std::ifstream in(path, std::ios::binary);
  check(in.is_open(), "InvalidCheckpoint", "{}: missing (the checkpoint was not completed)", source);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  check(!in.bad(), "InvalidCheckpoint", "{}: cannot be read", source);
  const Json json = parse_json_rejecting_duplicates(text, "InvalidCheckpoint", source);
  check(json.is_object(), "InvalidCheckpoint", "{}: expected a JSON object; got {}", source, json.type_name());

  const auto field = [&](const Json& object, std::string_view where, const char* key, auto is_type,
                         std::string_view type) -> const Json& {
    check(object.contains(key), "InvalidCheckpoint", "{}: {}has no \"{}\"", source, where, key);
    const Json& value = object.at(key);
    check(is_type(value), "InvalidCheckpoint", "{}: {}\"{}\" must be {}; got {}", source, where, key, type,
          value.dump().substr(0, 100));
    return value;
  };
  const auto is_integer = [](const Json& v) { return v.is_number_integer(); };
  const auto is_unsigned = [](const Json& v) { return v.is_number_unsigned(); };
  const auto is_number = [](const Json& v) { return v.is_number(); };
  const auto is_string = [](const Json& v) { return v.is_string(); };
  const auto is_object = [](const Json& v) { return v.is_object(); };
  const auto is_any = [](const Json&) { return true; };

  const auto version = field(json, "", "version", is_integer, "an integer").get<std::int64_t>();
  check(version == trainer_state_version, "UnsupportedCheckpoint",
        "{}: version {}; this qlora reads version {} (written by another qlora release?)", source, version,
        trainer_state_version);

  TrainerState state;
  state.step = field(json, "", "step", is_unsigned, "an integer ≥ 0").get<std::int64_t>();
  state.epoch = field(json, "", "epoch", is_number, "a number").get<double>();
  state.seed = field(json, "", "seed", is_unsigned, "an integer ≥ 0").get<std::uint64_t>();
  state.data_cursor = field(json, "", "data_cursor", is_any, "JSON").dump(2);

  const Json& schedule = field(json, "", "lr_schedule", is_object, "an object");
  const std::string_view in_schedule = "\"lr_schedule\" ";
  const auto kind = field(schedule, in_schedule, "kind", is_string, "a string").get<std::string>();
  try {
    state.schedule.kind = LrSchedule::parse(kind);
  } catch (const Error& e) {
    throw Error("InvalidCheckpoint", fmt::format("{}: {}", source, e.message()));
  }
  state.schedule.peak_lr = field(schedule, in_schedule, "peak_lr", is_number, "a number").get<double>();
  state.schedule.warmup_steps = field(schedule, in_schedule, "warmup_steps", is_integer, "an integer").get<std::int64_t>();
  state.schedule.total_steps = field(schedule, in_schedule, "total_steps", is_integer, "an integer").get<std::int64_t>();
  state.schedule.num_cycles = field(schedule, in_schedule, "num_cycles", is_number, "a number").get<double>();

  for (const auto& [name, value] : field(json, "", "hyper_parameters", is_object, "an object").items()) {
    check(value.is_string(), "InvalidCheckpoint", "{}: hyper_parameters \"{}\" must be a string; got {}", source, name,
          value.dump());
    state.hyper_parameters.emplace(name, value.get<std::string>());
  }
  for (const auto& [name, value] : field(json, "", "metrics", is_object, "an object").items()) {
    check(value.is_number() || value.is_null(), "InvalidCheckpoint", "{}: metrics \"{}\" must be a number or null; got {}",
          source, name, value.dump());
    state.metrics.emplace(name, value.is_null() ? std::nan("") : value.get<double>());
  }
  std::map<std::string, std::uintmax_t> file_sizes;
  for (const auto& [name, value] : field(json, "", "files", is_object, "an object").items()) {
    check(value.is_number_unsigned(), "InvalidCheckpoint", "{}: files \"{}\" must be a size in bytes; got {}", source,
          name, value.dump());
    file_sizes.emplace(name, value.get<std::uintmax_t>());
  }
  return {std::move(state), std::move(file_sizes)};
}

/// Everything of a save up to the rename: the work directory holds a complete checkpoint.
inline void write_checkpoint_files(const std::filesystem::path& work_dir, const PeftAdapter& adapter,
                                   const OptimizerStateWriter& write_optimizer_state, const TrainerState& state) {
  write_peft_adapter(work_dir, adapter);
  const std::filesystem::path optimizer_file = work_dir / optimizer_state_file_name;
  write_optimizer_state(optimizer_file);
  std::error_code missing;
  check(std::filesystem::is_regular_file(optimizer_file, missing), "IoError",
        "the optimizer-state writer did not create {}", optimizer_file.string());
  sync_path(optimizer_file, O_RDONLY);  // the writer may not have synced it
  std::map<std::string, std::uintmax_t> file_sizes;
  for (const std::string_view name : {peft_config_file_name, peft_weights_file_name, optimizer_state_file_name}) {
    file_sizes.emplace(name, std::filesystem::file_size(work_dir / name));
  }
  // Last, so that a directory holding trainer_state.json holds everything.
  const std::string text = trainer_state_json(state, file_sizes);
  write_file_atomically(work_dir / trainer_state_file_name, [&](AtomicFile& file) { file.write(text); });
}

/// Makes `work_dir` the checkpoint directory `final_dir`. A directory already
/// there (the same step saved again after a resume) is moved aside first and
/// deleted once the new one is in place.
inline void install_checkpoint_dir(const std::filesystem::path& run_dir, std::int64_t step,
                                   const std::filesystem::path& work_dir, const std::filesystem::path& final_dir) {
  std::error_code ignored;
  std::optional<std::filesystem::path> replaced;
  if (std::filesystem::exists(final_dir, ignored)) {
    replaced = make_work_dir(run_dir, step, "replaced");
    const std::filesystem::path aside = *replaced / final_dir.filename();
    rename_path(final_dir, aside);
    try {
      rename_path(work_dir, final_dir);
    } catch (...) {
      ::rename(aside.c_str(), final_dir.c_str());  // best effort: put the old one back
      throw;
    }
  } else {
    rename_path(work_dir, final_dir);
  }
  sync_path(run_dir, O_RDONLY | O_DIRECTORY);
  if (replaced) remove_quietly(*replaced);
}

/// Deletes the oldest checkpoints beyond `keep_last`, never `current`.
inline void rotate_checkpoints(const std::filesystem::path& run_dir, const std::filesystem::path& current,
                               int keep_last) {
  if (keep_last <= 0) return;
  int kept = 1;  // current
  for (const auto& [step, dir] : checkpoint_dirs(run_dir)) {
    if (dir.filename() == current.filename()) continue;
    if (kept < keep_last) {
      ++kept;
    } else {
      std::error_code error;
      std::filesystem::remove_all(dir, error);
      check(!error, "IoError", "cannot delete the old checkpoint {}: {}", dir.string(), error.message());
    }
  }
}

}  // namespace detail

/// Reads and checks the checkpoint in `dir`: trainer_state.json parses, has the
/// supported version and every field; each file it lists is there with its
/// recorded size; a directory named checkpoint-<N> holds step N. Throws
/// Error("InvalidCheckpoint") naming the file and what is wrong, or
/// Error("UnsupportedCheckpoint") for a trainer_state.json of another version.
/// The adapter and optimizer files are read later (adapter(), AdamW::load_state),
/// which validate their contents.
inline TrainingCheckpoint read_checkpoint(const std::filesystem::path& dir) {
  std::error_code ignored;
  check(std::filesystem::is_directory(dir, ignored), "InvalidCheckpoint", "{}: not a directory", dir.string());
  auto [state, file_sizes] = detail::parse_trainer_state(dir);
  for (const std::string_view name :
       {peft_config_file_name, peft_weights_file_name, optimizer_state_file_name}) {
    check(file_sizes.contains(std::string(name)), "InvalidCheckpoint", "{}: \"files\" does not list {}",
          (dir / trainer_state_file_name).string(), name);
  }
  for (const auto& [name, size] : file_sizes) {
    const std::filesystem::path file = dir / name;
    std::error_code error;
    const std::uintmax_t found = std::filesystem::file_size(file, error);
    check(!error, "InvalidCheckpoint", "{}: missing ({})", file.string(), error.message());
    check(found == size, "InvalidCheckpoint", "{}: {} bytes; trainer_state.json recorded {} (truncated or replaced)",
          file.string(), found, size);
  }
  const auto named_step = detail::checkpoint_step(dir.filename().string());
  check(!named_step || *named_step == state.step, "InvalidCheckpoint", "{}: holds step {}, but the directory is named {}",
        (dir / trainer_state_file_name).string(), state.step, dir.filename().string());
  return {dir, std::move(state)};
}

/// Saves a checkpoint of step `state.step` into `run_dir` (created if needed)
/// with the commit protocol above, and returns its directory. On any failure
/// (a throwing writer, a full disk) the previous checkpoints and `latest` are
/// as they were, the work directory is removed, and the error is rethrown with
/// the checkpoint named: a qlora::Error keeps its code, another std::exception
/// becomes Error("WriteAborted"). Throws Error("InvalidArgument") for a
/// negative step or keep_last, or a data_cursor that is not JSON.
inline std::filesystem::path save_checkpoint(const std::filesystem::path& run_dir, const PeftAdapter& adapter,
                                             const OptimizerStateWriter& write_optimizer_state,
                                             const TrainerState& state, const CheckpointOptions& options = {}) {
  check(state.step >= 0, "InvalidArgument", "save_checkpoint: step {} is negative", state.step);
  check(options.keep_last >= 0, "InvalidArgument", "save_checkpoint: keep_last {} is negative", options.keep_last);
  const std::string name = detail::checkpoint_name(state.step);
  const std::string context = fmt::format("saving {} in {}", name, run_dir.string());
  std::error_code error;
  std::filesystem::create_directories(run_dir, error);
  check(!error && std::filesystem::is_directory(run_dir, error), "IoError", "{}: cannot create the run directory: {}", context,
        error ? error.message() : "a file of that name exists");
  detail::remove_stale_work_dirs(run_dir);

  const std::filesystem::path final_dir = run_dir / name;
  const std::filesystem::path work_dir = detail::make_work_dir(run_dir, state.step, "tmp");
  try {
    detail::write_checkpoint_files(work_dir, adapter, write_optimizer_state, state);
    detail::install_checkpoint_dir(run_dir, state.step, work_dir, final_dir);
  } catch (const Error& e) {
    detail::remove_quietly(work_dir);
    throw e.with_context(context);
  } catch (const std::exception& e) {
    detail::remove_quietly(work_dir);
    throw Error("WriteAborted", fmt::format("{}: {}", context, e.what()));
  }
  try {
    write_file_atomically(run_dir / latest_checkpoint_file_name,
                          [&](AtomicFile& file) { file.write(fmt::format("{}\n", name)); });
    detail::rotate_checkpoints(run_dir, final_dir, options.keep_last);
  } catch (const Error& e) {
    throw e.with_context(context);
  }
  return final_dir;
}

/// save_checkpoint with `optimizer.save_state` as the optimizer-state writer.
inline std::filesystem::path save_checkpoint(const std::filesystem::path& run_dir, const PeftAdapter& adapter,
                                             const AdamW& optimizer, const TrainerState& state,
                                             const CheckpointOptions& options = {}) {
  return save_checkpoint(
      run_dir, adapter, [&](const std::filesystem::path& file) { optimizer.save_state(file); }, state, options);
}

/// The checkpoint to resume `run_dir` from: the one `latest` names when it is
/// valid (read_checkpoint), else the newest valid checkpoint-<step>, with each
/// one passed over listed in `skipped`. Nothing when the run has no
/// checkpoint at all (a fresh run); Error("NoValidCheckpoint"), listing what is
/// wrong with each, when it has some but none is valid.
inline std::optional<ResumePoint> latest_checkpoint(const std::filesystem::path& run_dir) {
  std::error_code ignored;
  if (!std::filesystem::is_directory(run_dir, ignored)) return std::nullopt;
  std::vector<std::string> skipped;
  std::optional<std::filesystem::path> named_by_latest;
  const std::filesystem::path latest_file = run_dir / latest_checkpoint_file_name;
  if (std::filesystem::exists(latest_file, ignored)) {
    std::ifstream in(latest_file, std::ios::binary);
    std::string name;
    std::getline(in, name);
    if (detail::checkpoint_step(name)) {
      named_by_latest = run_dir / name;
    } else {
      skipped.push_back(fmt::format("{}: does not name a checkpoint directory (\"{}\")", latest_file.string(),
                                    name.substr(0, 100)));
    }
  }
  std::vector<std::filesystem::path> candidates;
  if (named_by_latest) candidates.push_back(*named_by_latest);
  for (const auto& [step, dir] : detail::checkpoint_dirs(run_dir)) {
    if (dir != named_by_latest) candidates.push_back(dir);
  }
  for (const std::filesystem::path& dir : candidates) {
    try {
      return ResumePoint{read_checkpoint(dir), std::move(skipped)};
    } catch (const Error& e) {
      skipped.push_back(e.what());
    }
  }
  if (skipped.empty()) return std::nullopt;
  throw Error("NoValidCheckpoint", fmt::format("{} has no valid checkpoint to resume from:\n  {}", run_dir.string(),
                                               fmt::join(skipped, "\n  ")));
}

}  // namespace qlora
