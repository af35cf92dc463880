// ProgressBar: the one status line of a training run,
//
//   120/400 [######..............] 30% loss 2.314 | 12.3k tok/s | ETA 01:23
//
// On a terminal the line is redrawn in place (`\r`), at most every
// `min_redraw_seconds` so that a fast loop does not spend its time writing to
// the terminal; into a log file or CI output (not a TTY) it prints one plain
// line each time another tenth of the run is done, because carriage returns
// there turn into thousands of lines. tokens/s is an exponential moving average
// of each update's rate, so that it follows the current speed yet does not jump
// with every batch length; the ETA is the average time per step since the bar
// started (a resumed run counts from `start_step`) times the steps left.
// The clock is injectable so that tests see exact times.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>

#include <qlora/core/error.hpp>

namespace qlora {

/// What one update reports.
struct StepProgress {
  std::optional<double> loss;  ///< "loss -" when not given; a NaN or Inf shows as nan / inf
  std::int64_t tokens = 0;     ///< tokens processed since the previous update (for tokens/s)
  std::string extra;           ///< appended as one more `| ` field when not empty (e.g. "eval 2.101")
};

struct ProgressBarOptions {
  std::int64_t start_step = 0;      ///< the step a resumed run starts from
  int bar_width = 20;               ///< characters between the brackets
  double min_redraw_seconds = 0.1;  ///< TTY only: at most ~10 redraws per second
  double rate_smoothing = 0.1;      ///< EMA weight of the newest tokens/s sample, in (0, 1]
  /// Seconds on a monotonic clock; the steady clock unless a test injects one.
  std::function<double()> clock;
};

namespace detail {

inline double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// 950, 12.3k, 4.56M: a rate in three significant-ish digits.
inline std::string format_rate(double per_second) {
  if (per_second >= 1e6) return fmt::format("{:.2f}M", per_second / 1e6);
  if (per_second >= 1e3) return fmt::format("{:.1f}k", per_second / 1e3);
  return fmt::format("{:.0f}", per_second);
}

/// MM:SS, or H:MM:SS from an hour on.
inline std::string format_duration(double seconds) {
  const auto total = static_cast<std::int64_t>(std::llround(std::max(seconds, 0.0)));
  const std::int64_t hours = total / 3600;
  const std::int64_t minutes = total / 60 % 60;
  const std::int64_t secs = total % 60;
  return hours > 0 ? fmt::format("{}:{:02}:{:02}", hours, minutes, secs) : fmt::format("{:02}:{:02}", minutes, secs);
}

}  // namespace detail

class ProgressBar {
 public:
  /// Writes to `out` (not owned; flushed after every write). `is_tty` picks the
  /// in-place or the one-line-per-10 % mode: pass `isatty(fileno(out))`.
  /// Throws Error("InvalidArgument") for total_steps ≤ 0, a start_step outside
  /// [0, total_steps], a bar_width < 1 or a rate_smoothing outside (0, 1].
  ProgressBar(std::int64_t total_steps, std::FILE* out, bool is_tty, ProgressBarOptions options = {})
      : total_(total_steps), out_(out), is_tty_(is_tty), options_(std::move(options)) {
    check(total_ > 0, "InvalidArgument", "ProgressBar: total_steps {} must be > 0", total_);
    check(options_.start_step >= 0 && options_.start_step <= total_, "InvalidArgument",
          "ProgressBar: start_step {} is not in [0, {}]", options_.start_step, total_);
    check(options_.bar_width >= 1, "InvalidArgument", "ProgressBar: bar_width {} must be ≥ 1", options_.bar_width);
    check(options_.rate_smoothing > 0 && options_.rate_smoothing <= 1, "InvalidArgument",
          "ProgressBar: rate_smoothing {} is not in (0, 1]", options_.rate_smoothing);
    if (!options_.clock) options_.clock = detail::steady_seconds;
    start_time_ = last_update_time_ = options_.clock();
    step_ = options_.start_step;
    printed_tenths_ = tenths(step_);
  }

  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  /// Ends a TTY line left open (an exception unwound past finish()), so that
  /// what is printed next starts on a line of its own.
  ~ProgressBar() {
    if (is_tty_ && !finished_ && drawn_width_ > 0) {
      std::fputc('\n', out_);
      std::fflush(out_);
    }
  }

  /// Records that `step` (in [start_step, total_steps], not going back) is done
  /// and redraws when due. Throws Error("InvalidArgument") for a step outside that range.
  void update(std::int64_t step, const StepProgress& progress) {
    check(step >= step_ && step <= total_, "InvalidArgument", "ProgressBar: step {} is not in [{}, {}]", step, step_,
          total_);
    const double now = options_.clock();
    const double elapsed = now - last_update_time_;
    if (elapsed > 0 && progress.tokens > 0) {
      const double rate = static_cast<double>(progress.tokens) / elapsed;
      tokens_per_second_ = has_rate_ ? options_.rate_smoothing * rate + (1 - options_.rate_smoothing) * tokens_per_second_
                                     : rate;
      has_rate_ = true;
    }
    last_update_time_ = now;
    step_ = step;
    latest_ = progress;
    if (is_tty_) {
      if (step_ == total_ || now - last_draw_time_ >= options_.min_redraw_seconds) draw_in_place(now);
    } else if (tenths(step_) > printed_tenths_) {
      printed_tenths_ = tenths(step_);
      print_line(now);
    }
  }

  /// Prints `line` (e.g. an eval result) on its own line above the bar.
  void message(std::string_view line) {
    if (is_tty_ && drawn_width_ > 0) {
      fmt::print(out_, "\r{:{}}\r{}\n", "", drawn_width_, line);
      drawn_width_ = 0;
      draw_in_place(last_update_time_);
    } else {
      fmt::print(out_, "{}\n", line);
      std::fflush(out_);
    }
  }

  /// Ends the bar: draws the last state (the TTY line, or a plain line unless
  /// the last one printed already shows it) and ends the line. Idempotent.
  void finish() {
    if (finished_) return;
    finished_ = true;
    if (is_tty_) {
      draw_in_place(last_update_time_);
      fmt::print(out_, "\n");
      std::fflush(out_);
    } else if (printed_step_ != step_) {
      print_line(last_update_time_);
    }
  }

  /// The line as it would be drawn now (without `\r` or padding).
  [[nodiscard]] std::string render() const { return render_at(last_update_time_); }

  /// The smoothed tokens/s (0 before the first update that reported tokens).
  [[nodiscard]] double tokens_per_second() const noexcept { return tokens_per_second_; }

 private:
  [[nodiscard]] std::int64_t tenths(std::int64_t step) const { return step * 10 / total_; }

  [[nodiscard]] std::string render_at(double now) const {
    const double fraction = static_cast<double>(step_) / static_cast<double>(total_);
    const auto filled = static_cast<int>(fraction * options_.bar_width);
    std::string line = fmt::format("{}/{} [{:#<{}}{:.<{}}] {}%", step_, total_, "", filled, "",
                                   options_.bar_width - filled, step_ * 100 / total_);
    line += latest_.loss ? fmt::format(" loss {:.3f}", *latest_.loss) : std::string(" loss -");
    if (has_rate_) line += fmt::format(" | {} tok/s", detail::format_rate(tokens_per_second_));
    const std::int64_t done = step_ - options_.start_step;
    if (step_ == total_) {
      line += fmt::format(" | {} total", detail::format_duration(now - start_time_));
    } else if (done > 0) {
      const double seconds_per_step = (now - start_time_) / static_cast<double>(done);
      line += fmt::format(" | ETA {}", detail::format_duration(seconds_per_step * static_cast<double>(total_ - step_)));
    } else {
      line += " | ETA --:--";
    }
    if (!latest_.extra.empty()) line += fmt::format(" | {}", latest_.extra);
    return line;
  }

  void draw_in_place(double now) {
    const std::string line = render_at(now);
    // Spaces over what is left of a longer previous line.
    const std::size_t padding = drawn_width_ > line.size() ? drawn_width_ - line.size() : 0;
    fmt::print(out_, "\r{}{:{}}", line, "", padding);
    std::fflush(out_);
    drawn_width_ = line.size();
    last_draw_time_ = now;
    printed_step_ = step_;
  }

  void print_line(double now) {
    fmt::print(out_, "{}\n", render_at(now));
    std::fflush(out_);
    printed_step_ = step_;
  }

  std::int64_t total_;
  std::FILE* out_;
  bool is_tty_;
  ProgressBarOptions options_;
  double start_time_ = 0;
  double last_update_time_ = 0;
  double last_draw_time_ = -1e300;  // the first update always draws
  std::int64_t step_ = 0;
  std::int64_t printed_tenths_ = 0;
  std::int64_t printed_step_ = -1;
  StepProgress latest_;
  double tokens_per_second_ = 0;
  bool has_rate_ = false;
  std::size_t drawn_width_ = 0;
  bool finished_ = false;
};

}  // namespace qlora
