// ProgressBar: the exact text it writes, with an injected clock — the line's
// fields, the TTY redraw rate limit and padding, the one-line-per-10 % log
// mode, the tokens/s moving average, the ETA, resume, messages and bad input.
#include <qlora/train/progress_bar.hpp>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>

#include <catch2/catch.hpp>

#include "support/errors.hpp"

using qlora::ProgressBar;
using qlora::ProgressBarOptions;
using qlora::StepProgress;

namespace {

/// An in-memory FILE* whose text the test reads back.
class CapturedOutput {
 public:
  CapturedOutput() : file_(std::tmpfile()) { REQUIRE(file_ != nullptr); }
  CapturedOutput(const CapturedOutput&) = delete;
  CapturedOutput& operator=(const CapturedOutput&) = delete;
  ~CapturedOutput() { std::fclose(file_); }
  [[nodiscard]] std::FILE* get() const { return file_; }
  [[nodiscard]] std::string text() const {
    std::fflush(file_);
    std::rewind(file_);
    std::string out;
    for (int c; (c = std::fgetc(file_)) != EOF;) out.push_back(static_cast<char>(c));
    std::fseek(file_, 0, SEEK_END);
    return out;
  }

 private:
  std::FILE* file_;
};

/// A clock the test moves by hand.
struct ManualClock {
  std::shared_ptr<double> now = std::make_shared<double>(1000.0);
  ProgressBarOptions options(std::int64_t start_step = 0) const {
    ProgressBarOptions o;
    o.start_step = start_step;
    o.bar_width = 10;
    o.clock = [now = now] { return *now; };
    return o;
  }
  void advance(double seconds) const { *now += seconds; }
};

StepProgress progress(double loss, std::int64_t tokens) { return {loss, tokens, ""}; }

}  // namespace

TEST_CASE("the line shows step, bar, percent, loss, tokens/s and ETA") {
  CapturedOutput out;
  ManualClock clock;
  ProgressBar bar(20, out.get(), false, clock.options());
  CHECK(bar.render() == "0/20 [..........] 0% loss - | ETA --:--");
  clock.advance(2.0);
  bar.update(9, progress(2.31449, 24600));
  // 9 steps in 2 s -> 2/9 s per step, 11 left: 2.44 s -> 00:02; 24600 tokens / 2 s.
  CHECK(bar.render() == "9/20 [####......] 45% loss 2.314 | 12.3k tok/s | ETA 00:02");
}

TEST_CASE("the ETA is the average step time times the steps left, in MM:SS or H:MM:SS") {
  CapturedOutput out;
  ManualClock clock;
  ProgressBar bar(1000, out.get(), false, clock.options());
  clock.advance(83.0);  // 1 step in 83 s: 999 * 83 s = 23:01:57
  bar.update(1, progress(1.0, 0));
  CHECK(bar.render() == "1/1000 [..........] 0% loss 1.000 | ETA 23:01:57");
  clock.advance(83.0 * 499);  // 500 steps in 41500 s: 500 * 83 s = 11:31:40
  bar.update(500, progress(1.0, 0));
  CHECK(bar.render() == "500/1000 [#####.....] 50% loss 1.000 | ETA 11:31:40");
}

TEST_CASE("tokens/s is an exponential moving average of each update's rate") {
  CapturedOutput out;
  ManualClock clock;
  ProgressBar bar(100, out.get(), false, clock.options());
  CHECK(bar.tokens_per_second() == 0.0);
  clock.advance(1.0);
  bar.update(1, progress(1.0, 1000));  // the first sample is taken as it is
  CHECK(bar.tokens_per_second() == 1000.0);
  clock.advance(1.0);
  bar.update(2, progress(1.0, 3000));  // 0.1 * 3000 + 0.9 * 1000
  // Two roundings of double products and a sum: a few ulps at most.
  CHECK(bar.tokens_per_second() == Approx(1200.0).epsilon(1e-12));
  clock.advance(0.5);
  bar.update(3, progress(1.0, 500'000));  // 1e6 tok/s: 0.1 * 1e6 + 0.9 * 1200 = 101080
  CHECK(bar.tokens_per_second() == Approx(101080.0).epsilon(1e-12));
  CHECK(bar.render().find("| 101.1k tok/s |") != std::string::npos);
  clock.advance(1.0);
  bar.update(4, progress(1.0, 30'000'000));  // 0.1 * 3e7 + 0.9 * 101080 = 3090972
  CHECK(bar.render().find("| 3.09M tok/s |") != std::string::npos);
  clock.advance(1.0);
  bar.update(5, progress(1.0, 0));  // an update without tokens leaves the rate alone
  CHECK(bar.tokens_per_second() == Approx(3090972.0).epsilon(1e-12));
}

TEST_CASE("on a TTY the line is redrawn in place at most every min_redraw_seconds") {
  CapturedOutput out;
  ManualClock clock;
  ProgressBar bar(4, out.get(), true, clock.options());
  // Steps 1/16 s apart (exact in binary) against a 0.1 s redraw interval.
  clock.advance(0.0625);
  bar.update(1, progress(2.5, 100));  // the first update draws; 100 tokens / 0.0625 s
  clock.advance(0.0625);
  bar.update(2, progress(2.25, 100));  // 0.0625 s after the last draw: skipped
  clock.advance(0.0625);
  bar.update(3, {2.0, 100, "eval 1.900"});  // 0.125 s: drawn
  clock.advance(0.0625);
  bar.update(4, progress(1.5, 100));  // the last step always draws
  bar.finish();
  bar.finish();  // idempotent

  const std::string line1 = "1/4 [##........] 25% loss 2.500 | 1.6k tok/s | ETA 00:00";
  const std::string line3 = "3/4 [#######...] 75% loss 2.000 | 1.6k tok/s | ETA 00:00 | eval 1.900";
  const std::string line4 = "4/4 [##########] 100% loss 1.500 | 1.6k tok/s | 00:00 total";
  REQUIRE(line3.size() > line4.size());
  // The shorter last line is padded with spaces over the rest of the longer one.
  const std::string padding(line3.size() - line4.size(), ' ');
  CHECK(out.text() == "\r" + line1 + "\r" + line3 + "\r" + line4 + padding + "\r" + line4 + "\n");
}

TEST_CASE("on a TTY a message goes on its own line above the bar") {
  CapturedOutput out;
  ManualClock clock;
  ProgressBar bar(10, out.get(), true, clock.options());
  clock.advance(1.0);
  bar.update(5, progress(1.25, 0));
  const std::string line = "5/10 [#####.....] 50% loss 1.250 | ETA 00:01";
  bar.message("eval loss 1.100");
  CHECK(out.text() == "\r" + line + "\r" + std::string(line.size(), ' ') + "\reval loss 1.100\n\r" + line);
}

TEST_CASE("a bar unwound without finish() ends its TTY line") {
  CapturedOutput out;
  ManualClock clock;
  {
    ProgressBar bar(10, out.get(), true, clock.options());
    bar.update(1, progress(1.0, 0));
  }
  const std::string text = out.text();
  REQUIRE(!text.empty());
  CHECK(text.back() == '\n');
}

TEST_CASE("into a log, one plain line each tenth of the run") {
  CapturedOutput out;
  ManualClock clock;
  ProgressBar bar(20, out.get(), false, clock.options());
  for (int step = 1; step <= 20; ++step) {
    clock.advance(1.0);
    bar.update(step, progress(1.0, 0));
  }
  bar.finish();  // the last line printed already shows step 20
  const std::string text = out.text();
  CHECK(std::count(text.begin(), text.end(), '\n') == 10);
  CHECK(text.find('\r') == std::string::npos);
  CHECK(text.starts_with("2/20 [#.........] 10% loss 1.000 | ETA 00:18\n"
                         "4/20 [##........] 20% loss 1.000 | ETA 00:16\n"));
  CHECK(text.ends_with("18/20 [#########.] 90% loss 1.000 | ETA 00:02\n"
                       "20/20 [##########] 100% loss 1.000 | 00:20 total\n"));
}

TEST_CASE("finish prints the last state into a log when no line showed it") {
  CapturedOutput out;
  ManualClock clock;
  ProgressBar bar(100, out.get(), false, clock.options());
  for (int step = 1; step <= 15; ++step) {
    clock.advance(2.0);
    bar.update(step, progress(0.5, 0));
  }
  bar.finish();
  CHECK(out.text() == "10/100 [#.........] 10% loss 0.500 | ETA 03:00\n"
                      "15/100 [#.........] 15% loss 0.500 | ETA 02:50\n");
}

TEST_CASE("a resumed bar counts its ETA from the start step") {
  CapturedOutput out;
  ManualClock clock;
  ProgressBar bar(100, out.get(), false, clock.options(50));
  CHECK(bar.render() == "50/100 [#####.....] 50% loss - | ETA --:--");
  clock.advance(10.0);
  bar.update(60, progress(0.75, 0));  // 10 steps in 10 s, 40 left
  CHECK(out.text() == "60/100 [######....] 60% loss 0.750 | ETA 00:40\n");
}

TEST_CASE("a non-finite loss shows as nan or inf") {
  CapturedOutput out;
  ManualClock clock;
  ProgressBar bar(10, out.get(), false, clock.options());
  bar.update(1, progress(std::numeric_limits<double>::infinity(), 0));
  CHECK(bar.render().find(" loss inf |") != std::string::npos);
}

TEST_CASE("bad arguments are refused with InvalidArgument") {
  CapturedOutput out;
  ManualClock clock;
  using qlora::test::require_error;
  require_error([&] { ProgressBar(0, out.get(), false, clock.options()); }, "InvalidArgument", "total_steps 0");
  require_error([&] { ProgressBar(10, out.get(), false, clock.options(11)); }, "InvalidArgument", "start_step 11");
  ProgressBarOptions zero_smoothing = clock.options();
  zero_smoothing.rate_smoothing = 0;
  require_error([&] { ProgressBar(10, out.get(), false, zero_smoothing); }, "InvalidArgument", "rate_smoothing");
  ProgressBar bar(10, out.get(), false, clock.options());
  bar.update(5, progress(1.0, 0));
  require_error([&] { bar.update(11, progress(1.0, 0)); }, "InvalidArgument", "step 11 is not in [5, 10]");
  require_error([&] { bar.update(4, progress(1.0, 0)); }, "InvalidArgument", "step 4 is not in [5, 10]");
}
