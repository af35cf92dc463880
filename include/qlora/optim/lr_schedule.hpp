// LrSchedule and lr_at: the learning rate of every optimizer step, with the
// semantics of transformers' get_scheduler (optimization.py) for the four
// schedules fine-tuning recipes use. lr_at(schedule, k) is the rate LambdaLR
// hands the optimizer after k optimizer steps (its last_epoch = k), i.e. the
// rate of step k+1; it is peak_lr times the same lambda, evaluated in double
// with the same operations, so the values are identical to Python's.
#pragma once

#include <qlora/core/error.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string_view>

namespace qlora {

struct LrSchedule {
  enum class Kind {
    constant,              ///< peak_lr throughout; warmup_steps is ignored, as transformers does
    constant_with_warmup,  ///< linear 0 -> peak_lr over warmup_steps, then peak_lr
    linear,                ///< warmup, then linear peak_lr -> 0 at total_steps (the Trainer's default)
    cosine,                ///< warmup, then 0.5·(1 + cos(2π·num_cycles·progress))·peak_lr
  };

  Kind kind = Kind::constant;
  double peak_lr = 0;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 0;  ///< needed by linear and cosine
  double num_cycles = 0.5;       ///< cosine only

  /// transformers' name of a kind (SchedulerType values).
  [[nodiscard]] static constexpr std::string_view name(Kind kind) noexcept {
    return names[static_cast<std::size_t>(kind)];
  }

  /// The kind called `name` in transformers ("constant", "constant_with_warmup",
  /// "linear", "cosine"); throws Error("UnknownSchedule") listing those for any other.
  [[nodiscard]] static Kind parse(std::string_view name) {
    for (std::size_t i = 0; i < names.size(); ++i) {
      if (names[i] == name) return static_cast<Kind>(i);
    }
    throw Error("UnknownSchedule", fmt::format("unknown learning-rate schedule `{}`; the supported ones are {}", name,
                                               fmt::join(names, ", ")));
  }

  /// Throws Error("InvalidSchedule") for a negative or non-finite peak_lr, a
  /// negative warmup, and — for linear and cosine, which need them — a
  /// total_steps ≤ 0, a warmup longer than total_steps, or a non-finite num_cycles.
  void validate() const {
    check(std::isfinite(peak_lr) && peak_lr >= 0, "InvalidSchedule", "{} schedule: peak_lr {} is not a finite value ≥ 0",
          name(kind), peak_lr);
    check(warmup_steps >= 0, "InvalidSchedule", "{} schedule: warmup_steps {} is negative", name(kind), warmup_steps);
    if (kind == Kind::linear || kind == Kind::cosine) {
      check(total_steps > 0, "InvalidSchedule", "{} schedule: total_steps {} must be > 0", name(kind), total_steps);
      check(warmup_steps <= total_steps, "InvalidSchedule", "{} schedule: warmup_steps {} exceeds total_steps {}",
            name(kind), warmup_steps, total_steps);
    }
    check(kind != Kind::cosine || std::isfinite(num_cycles), "InvalidSchedule", "cosine schedule: num_cycles {} is not finite",
          num_cycles);
  }

 private:
  static constexpr std::array<std::string_view, 4> names = {"constant", "constant_with_warmup", "linear", "cosine"};
};

/// The learning rate after `step` optimizer steps (0 for the first step's rate).
/// Past total_steps, linear stays at 0 and cosine goes on along its cosine, as
/// in transformers. Throws Error("InvalidSchedule") (see validate()) and
/// Error("InvalidArgument") for a negative step.
inline double lr_at(const LrSchedule& schedule, std::int64_t step) {
  schedule.validate();
  check(step >= 0, "InvalidArgument", "learning rate asked for step {}; steps count from 0", step);
  using Kind = LrSchedule::Kind;
  if (schedule.kind == Kind::constant) return schedule.peak_lr;
  const auto warmup = schedule.warmup_steps;
  // float(step) / float(max(1, warmup)): exact conversions, one rounding, as in Python.
  if (step < warmup) return schedule.peak_lr * (static_cast<double>(step) / static_cast<double>(warmup));
  double factor = 1.0;
  const auto decay_span = static_cast<double>(std::max<std::int64_t>(1, schedule.total_steps - warmup));
  if (schedule.kind == Kind::linear) {
    factor = std::max(0.0, static_cast<double>(schedule.total_steps - step) / decay_span);
  } else if (schedule.kind == Kind::cosine) {
    const double progress = static_cast<double>(step - warmup) / decay_span;
    factor = std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * schedule.num_cycles * 2.0 * progress)));
  }
  return schedule.peak_lr * factor;
}

/// The warmup length for a warmup given as a fraction of the run:
/// ceil(ratio · total_steps), as TrainingArguments.get_warmup_steps does for a
/// warmup_steps value below 1. Throws Error("InvalidArgument") unless
/// 0 ≤ ratio ≤ 1 and total_steps ≥ 0.
inline std::int64_t warmup_steps_from_ratio(double ratio, std::int64_t total_steps) {
  check(ratio >= 0 && ratio <= 1, "InvalidArgument", "warmup ratio {} is not in [0, 1]", ratio);
  check(total_steps >= 0, "InvalidArgument", "total_steps {} is negative", total_steps);
  return static_cast<std::int64_t>(std::ceil(static_cast<double>(total_steps) * ratio));
}

}  // namespace qlora
