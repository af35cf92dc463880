// lr_at against transformers.get_scheduler and warmup_steps_from_ratio against
// TrainingArguments.get_warmup_steps (tests/reference/optim.py,
// tests/data/optim/lr_schedule.safetensors).
#include <qlora/optim/lr_schedule.hpp>

#include <qlora/io/detail/json.hpp>
#include <qlora/io/safetensors_reader.hpp>

#include <catch2/catch.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "support/errors.hpp"

namespace {

using qlora::LrSchedule;
using qlora::test::require_error;

qlora::SafetensorsReader fixture() {
  return qlora::SafetensorsReader::open(std::filesystem::path(QLORA_TEST_DATA_DIR) / "optim" / "lr_schedule.safetensors");
}

}  // namespace

TEST_CASE("lr_at equals transformers' schedulers bit for bit", "[optim][lr_schedule]") {
  const auto file = fixture();
  const auto configs = qlora::detail::Json::parse(std::string(*file.metadata_value("configs")));
  for (std::size_t i = 0; i < configs.size(); ++i) {
    const auto& c = configs[i];
    LrSchedule schedule;
    schedule.kind = LrSchedule::parse(c.at("kind").get<std::string>());
    schedule.peak_lr = c.at("peak_lr").get<double>();
    schedule.warmup_steps = c.at("warmup_steps").get<std::int64_t>();
    schedule.total_steps = c.at("total_steps").get<std::int64_t>();
    schedule.num_cycles = c.at("num_cycles").get<double>();
    const auto expected = file.read<double>("lr." + std::to_string(i));
    for (std::size_t step = 0; step < expected.size(); ++step) {
      INFO("config " << c.dump() << ", step " << step);
      // The same double operations as optimization.py's lambdas times LambdaLR's base_lr; std::cos and
      // Python's math.cos are both the C library's cos.
      CHECK(qlora::lr_at(schedule, static_cast<std::int64_t>(step)) == expected[step]);
    }
  }
}

TEST_CASE("warmup_steps_from_ratio equals TrainingArguments.get_warmup_steps", "[optim][lr_schedule]") {
  const auto file = fixture();
  const auto ratios = file.read<double>("warmup.ratio");
  const auto totals = file.read<std::int64_t>("warmup.total");
  const auto steps = file.read<std::int64_t>("warmup.steps");
  for (std::size_t i = 0; i < ratios.size(); ++i) {
    INFO("ratio " << ratios[i] << ", total " << totals[i]);
    CHECK(qlora::warmup_steps_from_ratio(ratios[i], totals[i]) == steps[i]);
  }
  require_error([] { (void)qlora::warmup_steps_from_ratio(1.5, 10); }, "InvalidArgument", "1.5");
  require_error([] { (void)qlora::warmup_steps_from_ratio(0.1, -1); }, "InvalidArgument", "-1");
}

TEST_CASE("LrSchedule names and validation", "[optim][lr_schedule]") {
  for (const auto kind : {LrSchedule::Kind::constant, LrSchedule::Kind::constant_with_warmup, LrSchedule::Kind::linear,
                          LrSchedule::Kind::cosine}) {
    CHECK(LrSchedule::parse(LrSchedule::name(kind)) == kind);
  }
  require_error([] { (void)LrSchedule::parse("cosine_with_restarts"); }, "UnknownSchedule", "cosine_with_restarts",
                "constant, constant_with_warmup, linear, cosine");

  const auto lr = [](LrSchedule::Kind kind, std::int64_t warmup, std::int64_t total, std::int64_t step) {
    return qlora::lr_at({kind, 1e-3, warmup, total, 0.5}, step);
  };
  CHECK(lr(LrSchedule::Kind::constant, 0, 0, 7) == 1e-3);  // constant needs no total
  CHECK(lr(LrSchedule::Kind::constant_with_warmup, 4, 0, 2) == 1e-3 * 0.5);
  require_error([&] { (void)lr(LrSchedule::Kind::linear, 0, 0, 0); }, "InvalidSchedule", "linear", "total_steps 0");
  require_error([&] { (void)lr(LrSchedule::Kind::cosine, 11, 10, 0); }, "InvalidSchedule", "warmup_steps 11",
                "total_steps 10");
  require_error([&] { (void)lr(LrSchedule::Kind::constant_with_warmup, -1, 10, 0); }, "InvalidSchedule",
                "warmup_steps -1");
  require_error([&] { (void)lr(LrSchedule::Kind::linear, 0, 10, -1); }, "InvalidArgument", "step -1");
  require_error([] { (void)qlora::lr_at({LrSchedule::Kind::constant, -1e-3}, 0); }, "InvalidSchedule", "peak_lr");
}
