// MetricsLog: the exact JSON Lines it writes (key order, null for non-finite
// numbers, escapes, invalid UTF-8 replaced), and resume — a run interrupted
// after a checkpoint, killed mid-line and resumed writes a log byte-identical
// to the uninterrupted run's; malformed lines are refused, not dropped.
#include <qlora/train/metrics_log.hpp>

#include <cmath>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "io/test_support.hpp"
#include "support/errors.hpp"

using qlora::EvalMetrics;
using qlora::MetricsLog;
using qlora::SampleAnswer;
using qlora::TrainMetrics;
using qlora::test::read_text;
using qlora::test::require_error;
using qlora::test::TempDir;
using qlora::test::write_bytes;

namespace {

TrainMetrics train_record(std::int64_t step) {
  // Values with short exact decimal forms, so the expected text is plain.
  const double loss = 3.0 - 0.25 * static_cast<double>(step);
  return {step, 0.125 * static_cast<double>(step), loss, 0.0002, 0.5, 1024 * step, 2048.5};
}

/// What the trainer logs after step `step` of the test run: a train record
/// every step, eval every 2 steps, a sample answer every 4.
void log_step(MetricsLog& log, std::int64_t step) {
  log.log(train_record(step));
  if (step % 2 == 0) log.log(EvalMetrics{step, 2.0 - 0.125 * static_cast<double>(step)});
  if (step % 4 == 0) log.log(SampleAnswer{step, "Who are you?", "I am step " + std::to_string(step)});
}

std::vector<double> steps_of(std::span<const qlora::CurvePoint> points) {
  std::vector<double> steps;
  for (const auto& p : points) steps.push_back(p.step);
  return steps;
}

}  // namespace

TEST_CASE("records are one JSON object per line, keys in a fixed order") {
  TempDir dir;
  MetricsLog log = MetricsLog::create(dir / "metrics.jsonl");
  log.log(TrainMetrics{10, 0.25, 2.5, 0.0002, 0.75, 40960, 12345.5});
  log.log(EvalMetrics{10, 2.25});
  log.log(SampleAnswer{10, "Say \"hi\"\n", "héllo\t世界"});
  // Written through: readable before the log is closed.
  CHECK(read_text(dir / "metrics.jsonl") ==
        "{\"step\":10,\"epoch\":0.25,\"loss\":2.5,\"lr\":0.0002,\"grad_norm\":0.75,\"tokens\":40960,"
        "\"tokens_per_second\":12345.5}\n"
        "{\"step\":10,\"eval_loss\":2.25}\n"
        "{\"step\":10,\"prompt\":\"Say \\\"hi\\\"\\n\",\"answer\":\"héllo\\t世界\"}\n");
}

TEST_CASE("non-finite numbers are written as null and invalid UTF-8 as U+FFFD") {
  TempDir dir;
  MetricsLog log = MetricsLog::create(dir / "metrics.jsonl");
  log.log(TrainMetrics{3, 0.5, std::nan(""), 1e-4, INFINITY, 7, 0});
  log.log(SampleAnswer{3, "p", "cut \xE4\xB8"});  // a generation stopped inside a 3-byte character
  CHECK(read_text(dir / "metrics.jsonl") ==
        "{\"step\":3,\"epoch\":0.5,\"loss\":null,\"lr\":0.0001,\"grad_norm\":null,\"tokens\":7,\"tokens_per_second\":0.0}\n"
        "{\"step\":3,\"prompt\":\"p\",\"answer\":\"cut \xEF\xBF\xBD\"}\n");
}

TEST_CASE("create empties an existing log") {
  TempDir dir;
  write_bytes(dir / "metrics.jsonl", "{\"step\":1,\"loss\":1.0}\n");
  MetricsLog log = MetricsLog::create(dir / "metrics.jsonl");
  CHECK(read_text(dir / "metrics.jsonl").empty());
  CHECK(log.train_curve().empty());
}

TEST_CASE("a resumed run's log equals the uninterrupted run's") {
  TempDir dir;
  {
    MetricsLog log = MetricsLog::create(dir / "uninterrupted.jsonl");
    for (int step = 1; step <= 9; ++step) log_step(log, step);
  }
  const std::string uninterrupted = read_text(dir / "uninterrupted.jsonl");

  const std::filesystem::path path = dir / "metrics.jsonl";
  {
    MetricsLog log = MetricsLog::create(path);
    for (int step = 1; step <= 6; ++step) log_step(log, step);  // checkpoint at 4, killed during step 6
  }
  std::string killed = read_text(path);
  killed += "{\"step\":7,\"epoch\":0.8";  // the write the kill cut short
  write_bytes(path, killed);

  MetricsLog log = MetricsLog::resume(path, 4);
  CHECK(steps_of(log.train_curve()) == std::vector<double>{1, 2, 3, 4});
  CHECK(steps_of(log.eval_curve()) == std::vector<double>{2, 4});
  CHECK(log.train_curve()[3].loss == 2.0);
  CHECK(log.eval_curve()[1].loss == 1.5);
  for (int step = 5; step <= 9; ++step) log_step(log, step);
  CHECK(read_text(path) == uninterrupted);
  CHECK(steps_of(log.train_curve()) == std::vector<double>{1, 2, 3, 4, 5, 6, 7, 8, 9});
  CHECK(steps_of(log.eval_curve()) == std::vector<double>{2, 4, 6, 8});
}

TEST_CASE("resume drops a partial last line even when every record is kept") {
  TempDir dir;
  const std::filesystem::path path = dir / "metrics.jsonl";
  write_bytes(path, "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":null}\n{\"step\":3,\"lo");
  MetricsLog log = MetricsLog::resume(path, 100);
  CHECK(read_text(path) == "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":null}\n");
  REQUIRE(log.train_curve().size() == 2);
  CHECK(std::isnan(log.train_curve()[1].loss));  // null reads back as NaN
  log.log(EvalMetrics{3, 1.0});
  CHECK(read_text(path).ends_with("{\"step\":2,\"loss\":null}\n{\"step\":3,\"eval_loss\":1.0}\n"));
}

TEST_CASE("resume of a missing log starts an empty one") {
  TempDir dir;
  MetricsLog log = MetricsLog::resume(dir / "metrics.jsonl", 5);
  CHECK(read_text(dir / "metrics.jsonl").empty());
}

TEST_CASE("a malformed complete line is refused with InvalidMetricsLog, the file left as it is") {
  TempDir dir;
  const std::filesystem::path path = dir / "metrics.jsonl";
  const std::string cases[] = {
      "{\"step\":1}\nnot json\n",
      "{\"step\":1}\n[1,2]\n",
      "{\"step\":1}\n{\"loss\":2.0}\n",
      "{\"step\":1}\n{\"step\":-2}\n",
      "{\"step\":1}\n{\"step\":2.5}\n",
  };
  for (const std::string& text : cases) {
    INFO(text);
    write_bytes(path, text);
    require_error([&] { (void)MetricsLog::resume(path, 1); }, "InvalidMetricsLog", path.string() + ":2");
    CHECK(read_text(path) == text);
  }
  write_bytes(path, "{\"step\":1,\"step\":2}\n");
  require_error([&] { (void)MetricsLog::resume(path, 1); }, "DuplicateKey", path.string() + ":1");
}

TEST_CASE("bad arguments and unwritable paths are named errors") {
  TempDir dir;
  require_error([&] { (void)MetricsLog::resume(dir / "metrics.jsonl", -1); }, "InvalidArgument", "step -1");
  require_error([&] { (void)MetricsLog::create(dir / "missing" / "metrics.jsonl"); }, "IoError", "missing");
}
