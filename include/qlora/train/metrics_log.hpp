// MetricsLog: the run's metrics as JSON Lines (metrics.jsonl), one object per
// record, keys in this order:
//
//   {"step":10,"epoch":0.25,"loss":2.31,"lr":0.0002,"grad_norm":0.83,"tokens":40960,"tokens_per_second":12345.6}
//   {"step":10,"eval_loss":2.2}
//   {"step":10,"prompt":"Who are you?","answer":"I am ..."}
//
// A non-finite number is written as null (JSON has no NaN). Each line is
// written with one write(2) and no user-space buffer, so what a crash leaves is
// every complete record plus at most one partial last line.
//
// Resume makes the log of an interrupted run equal to that of an uninterrupted
// one: it drops the partial last line and every record with a step after the
// checkpoint's (those steps will run again and log again). For that to hold,
// the trainer logs everything of step N before it saves checkpoint N.
// The log also keeps the loss points for the loss-curve picture, those read
// back on resume included.
#pragma once

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/io/atomic_file.hpp>
#include <qlora/io/detail/json.hpp>
#include <qlora/io/detail/posix_file.hpp>
#include <qlora/train/loss_curve.hpp>

namespace qlora {

/// One optimizer step.
struct TrainMetrics {
  std::int64_t step = 0;
  double epoch = 0;                ///< fractional: epochs done so far
  double loss = 0;                 ///< the step's loss
  double lr = 0;                   ///< the learning rate the step used
  double grad_norm = 0;            ///< before clipping
  std::int64_t tokens = 0;         ///< input tokens seen since the start of the run
  double tokens_per_second = 0;
};

/// An evaluation pass.
struct EvalMetrics {
  std::int64_t step = 0;
  double eval_loss = 0;
};

/// A generated answer to an eval prompt.
struct SampleAnswer {
  std::int64_t step = 0;
  std::string prompt;
  std::string answer;
};

class MetricsLog {
 public:
  /// Starts a new log at `path`, emptying any previous one. Throws Error("IoError").
  static MetricsLog create(const std::filesystem::path& path) {
    write_file_atomically(path, [](AtomicFile&) {});
    MetricsLog log(path);
    log.open_for_append();
    return log;
  }

  /// Continues the log at `path` after resuming from the checkpoint of `step`:
  /// keeps the records with step ≤ `step`, drops the later ones and a partial
  /// last line (the file is rewritten atomically when anything is dropped); a
  /// missing file starts empty. A complete line that is not a JSON object with
  /// an integer "step" ≥ 0 throws Error("InvalidMetricsLog") naming the file
  /// and the line: the file is not ours, or damaged, and is left as it is.
  static MetricsLog resume(const std::filesystem::path& path, std::int64_t step) {
    check(step >= 0, "InvalidArgument", "MetricsLog::resume({}): step {} is negative", path.string(), step);
    std::error_code missing;
    if (!std::filesystem::exists(path, missing)) return create(path);
    const std::string text = read_all(path);
    std::string kept;
    MetricsLog log(path);
    std::size_t line_number = 0;
    for (std::size_t begin = 0; begin < text.size();) {
      const std::size_t end = text.find('\n', begin);
      if (end == std::string::npos) break;  // a partial last line: the write a kill interrupted
      ++line_number;
      const std::string_view line = std::string_view(text).substr(begin, end - begin);
      begin = end + 1;
      const std::string source = fmt::format("{}:{}", path.string(), line_number);
      const detail::Json record = detail::parse_json_rejecting_duplicates(line, "InvalidMetricsLog", source);
      check(record.is_object() && record.contains("step") && record["step"].is_number_integer() &&
                record["step"].get<std::int64_t>() >= 0,
            "InvalidMetricsLog", "{}: expected a JSON object with an integer \"step\" ≥ 0; got {}", source,
            line.substr(0, 200));
      const auto record_step = record["step"].get<std::int64_t>();
      if (record_step > step) continue;
      kept.append(line).push_back('\n');
      log.remember_losses(record, record_step);
    }
    if (kept.size() != text.size()) write_file_atomically(path, [&](AtomicFile& file) { file.write(kept); });
    log.open_for_append();
    return log;
  }

  /// Appends one record and hands it to the kernel before returning.
  void log(const TrainMetrics& m) {
    append({{"step", m.step},
            {"epoch", m.epoch},
            {"loss", m.loss},
            {"lr", m.lr},
            {"grad_norm", m.grad_norm},
            {"tokens", m.tokens},
            {"tokens_per_second", m.tokens_per_second}});
    train_curve_.push_back({static_cast<double>(m.step), m.loss});
  }
  void log(const EvalMetrics& m) {
    append({{"step", m.step}, {"eval_loss", m.eval_loss}});
    eval_curve_.push_back({static_cast<double>(m.step), m.eval_loss});
  }
  void log(const SampleAnswer& m) { append({{"step", m.step}, {"prompt", m.prompt}, {"answer", m.answer}}); }

  /// (step, loss) of every train record, in log order; a null loss reads as NaN.
  [[nodiscard]] std::span<const CurvePoint> train_curve() const noexcept { return train_curve_; }
  /// (step, eval_loss) of every eval record.
  [[nodiscard]] std::span<const CurvePoint> eval_curve() const noexcept { return eval_curve_; }
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }

 private:
  /// Opens nothing yet: resume may still replace the file.
  explicit MetricsLog(std::filesystem::path path) : path_(std::move(path)) {}

  static std::string read_all(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    check(in.is_open(), "IoError", "cannot open the metrics log {}", path.string());
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    check(!in.bad(), "IoError", "cannot read the metrics log {}", path.string());
    return text;
  }

  void open_for_append() {
    fd_ = detail::open_fd(path_, O_WRONLY | O_APPEND | O_CREAT, 0666);
    if (!fd_.valid()) throw detail::io_error("open the metrics log", path_, errno);
  }

  void remember_losses(const detail::Json& record, std::int64_t step) {
    const auto value = [&](const char* key) {
      const detail::Json& v = record[key];
      return v.is_number() ? v.get<double>() : std::nan("");
    };
    if (record.contains("loss")) train_curve_.push_back({static_cast<double>(step), value("loss")});
    if (record.contains("eval_loss")) eval_curve_.push_back({static_cast<double>(step), value("eval_loss")});
  }

  void append(const nlohmann::ordered_json& record) {
    // Invalid UTF-8 (a generation cut inside a character) becomes U+FFFD
    // rather than a line no JSON reader accepts.
    std::string line = record.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
    line.push_back('\n');
    std::string_view rest = line;
    while (!rest.empty()) {
      const ::ssize_t written = ::write(fd_.get(), rest.data(), rest.size());
      if (written < 0) {
        if (errno == EINTR) continue;
        throw detail::io_error("append to the metrics log", path_, errno);
      }
      rest.remove_prefix(static_cast<std::size_t>(written));
    }
  }

  std::filesystem::path path_;
  detail::UniqueFd fd_;
  std::vector<CurvePoint> train_curve_;
  std::vector<CurvePoint> eval_curve_;
};

}  // namespace qlora
