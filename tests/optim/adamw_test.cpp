// AdamW against bitsandbytes.optim.AdamW (CPU backend), torch.optim.AdamW and a
// float32 emulation of bitsandbytes' CUDA kernel (tests/reference/optim.py,
// tests/data/optim/adamw.safetensors); bit-exact resume through
// save_state/load_state; named errors for bad input and bad state files.
#include <qlora/optim/adamw.hpp>

#include <qlora/io/safetensors_reader.hpp>
#include <qlora/io/safetensors_writer.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "io/test_support.hpp"
#include "support/bits.hpp"
#include "support/errors.hpp"
#include "support/tensors.hpp"

namespace {

using qlora::AdamW;
using qlora::AdamWOptions;
using qlora::DType;
using qlora::SafetensorsReader;
using qlora::Shape;
using qlora::Tensor;
using qlora::test::require_error;
using qlora::test::TempDir;

const std::filesystem::path fixture_path = std::filesystem::path(QLORA_TEST_DATA_DIR) / "optim" / "adamw.safetensors";
const std::vector<std::string> parameter_names = {"lora_A", "lora_B", "bias", "zero_grad"};

Shape shape_of(const qlora::SafetensorsTensor& t) { return Shape(std::span<const std::int64_t>(t.shape)); }

Tensor copy_of(const qlora::SafetensorsTensor& t) {
  Tensor out(DType::F32, shape_of(t));
  std::memcpy(out.view().raw_data(), t.data.data(), t.data.size());
  return out;
}

/// The fixture's parameters, gradient buffers, per-step gradients and learning rates.
struct Trajectory {
  SafetensorsReader file = SafetensorsReader::open(fixture_path);
  qlora::detail::Json cases = qlora::detail::Json::parse(std::string(*file.metadata_value("cases")));
  std::vector<std::string> no_decay =
      qlora::detail::Json::parse(std::string(*file.metadata_value("no_decay"))).get<std::vector<std::string>>();
  std::vector<double> lrs = file.read<double>("lr");
  std::map<std::string, Tensor> params;
  std::map<std::string, Tensor> grads;

  Trajectory() {
    for (const auto& name : parameter_names) {
      params.emplace(name, copy_of(file.tensor("init." + name)));
      grads.emplace(name, Tensor(DType::F32, params.at(name).shape()));
    }
  }

  AdamWOptions options(const std::string& case_name, unsigned threads = 1) const {
    const auto& c = cases.at(case_name);
    AdamWOptions o;
    o.beta1 = c.at("beta1").get<double>();
    o.beta2 = c.at("beta2").get<double>();
    o.eps = c.at("eps").get<double>();
    o.weight_decay = c.at("weight_decay").get<double>();
    o.decay_order = c.at("decay_order").get<std::string>() == "after_step" ? AdamWOptions::DecayOrder::after_step
                                                                           : AdamWOptions::DecayOrder::before_step;
    o.threads = threads;
    return o;
  }

  void add_all(AdamW& optimizer) {
    for (const auto& name : parameter_names) {
      const bool decay = std::ranges::find(no_decay, name) == no_decay.end();
      optimizer.add(name, params.at(name).view(), grads.at(name).view(), decay);
    }
  }

  /// Steps [first, last) with the recorded gradients and learning rates.
  void run(AdamW& optimizer, std::size_t first, std::size_t last) {
    for (std::size_t step = first; step < last; ++step) {
      for (const auto& name : parameter_names) {
        const auto& recorded = file.tensor("grad." + name);
        const std::size_t bytes = grads.at(name).byte_size();
        std::memcpy(grads.at(name).view().raw_data(), recorded.data.data() + step * bytes, bytes);
      }
      optimizer.step(lrs[step]);
    }
  }
};

/// ulp of |x| as a float.
double ulp(float x) {
  const float magnitude = std::abs(x);
  return static_cast<double>(std::nextafter(magnitude, std::numeric_limits<float>::infinity())) - magnitude;
}

/// max_i |actual_i − expected_i| / ulp(max(|expected_i|, floor_i)): the error in ulps
/// of the value, or of `floor` where the value is smaller and its own ulps say nothing.
double max_scaled_error(const qlora::TensorView& actual, const qlora::SafetensorsTensor& expected,
                        const std::vector<float>& floor) {
  const auto values = actual.span<const float>();
  const auto reference = expected.read<float>();
  REQUIRE(values.size() == reference.size());
  double worst = 0;
  for (std::size_t i = 0; i < values.size(); ++i) {
    const double scale = ulp(std::max(std::abs(reference[i]), floor[i]));
    worst = std::max(worst, std::abs(static_cast<double>(values[i]) - reference[i]) / scale);
  }
  return worst;
}

struct Errors {
  double param = 0, exp_avg = 0, exp_avg_sq = 0;
};

/// Runs the whole recorded trajectory under `case_name` and measures it
/// against `reference_case`. Floors of the error scales:
///  * parameters: Σ lr_t, the size of the movement, so the rounding of the
///    updates counts against ulps of what moved, not of a p near 0;
///  * m: (1−β1)·max_t |g_t|, the size of its largest term (m cancels when g
///    changes sign, and the cancelled bits were never there);
///  * v: (1−β2)·max_t g_t², likewise (v has no cancellation; this only guards v ≈ 0).
Errors run_case(const std::string& case_name, const std::string& reference_case) {
  Trajectory t;
  const AdamWOptions options = t.options(case_name);
  AdamW optimizer(options);
  t.add_all(optimizer);
  t.run(optimizer, 0, t.lrs.size());
  CHECK(optimizer.steps() == static_cast<std::int64_t>(t.lrs.size()));
  double lr_sum = 0;
  for (const double lr : t.lrs) lr_sum += lr;
  Errors errors;
  for (const auto& name : parameter_names) {
    const auto grads = t.file.read<float>("grad." + name);
    const std::size_t n = static_cast<std::size_t>(t.params.at(name).numel());
    std::vector<float> param_floor(n, static_cast<float>(lr_sum)), m_floor(n, 0), v_floor(n, 0);
    for (std::size_t k = 0; k < grads.size(); ++k) {
      const double g = std::abs(grads[k]);
      m_floor[k % n] = std::max(m_floor[k % n], static_cast<float>((1 - options.beta1) * g));
      v_floor[k % n] = std::max(v_floor[k % n], static_cast<float>((1 - options.beta2) * g * g));
    }
    const auto reference = [&](const std::string& what) { return t.file.tensor(reference_case + what + name); };
    errors.param = std::max(errors.param, max_scaled_error(t.params.at(name).view(), reference(".param."), param_floor));
    errors.exp_avg = std::max(errors.exp_avg, max_scaled_error(optimizer.exp_avg(name), reference(".exp_avg."), m_floor));
    errors.exp_avg_sq =
        std::max(errors.exp_avg_sq, max_scaled_error(optimizer.exp_avg_sq(name), reference(".exp_avg_sq."), v_floor));
  }
  UNSCOPED_INFO(case_name << " vs " << reference_case << ": param " << errors.param << ", exp_avg " << errors.exp_avg
                 << ", exp_avg_sq " << errors.exp_avg_sq << " (scaled ulps)");
  return errors;
}

}  // namespace

// Tolerances, in the scaled ulps of run_case. Against bitsandbytes' CPU backend
// and torch: their AVX2 loops fuse p + α·u and β·m + (1−β)·g into FMAs (and
// addcmul multiplies (s·g)·g), where we round each product as the CUDA kernel's
// source reads; each such op is ≤ 1 ulp apart, so 1 ulp on p and 2–3 on the
// states. Against the kernel emulation the scalars differ: it subtracts fp32
// betas (1 − 0.999f = 0.00099998713, 1.3e-5 from 0.001 ≈ 220 ulps of v) and takes
// powf/sqrtf corrections, where we round the double values once; the
// corrections compensate in the update, which stays within a few ulps.
TEST_CASE("AdamW matches bitsandbytes' 32-bit AdamW without weight decay", "[optim][adamw]") {
  for (const std::string name : {"bnb_default", "bnb_betas"}) {
    INFO("case " << name);
    const Errors e = run_case(name, name);
    CHECK(e.param <= 1);
    CHECK(e.exp_avg <= 2);
    CHECK(e.exp_avg_sq <= 2);
  }
}

TEST_CASE("AdamW decays before the step as torch.optim.AdamW and bitsandbytes' CPU backend", "[optim][adamw]") {
  const Errors bnb = run_case("bnb_wd", "bnb_wd");
  CHECK(bnb.param <= 1);
  CHECK(bnb.exp_avg <= 2);
  CHECK(bnb.exp_avg_sq <= 2);
  const Errors torch = run_case("bnb_wd", "torch_wd");
  CHECK(torch.param <= 1);
  CHECK(torch.exp_avg <= 3);
  CHECK(torch.exp_avg_sq <= 2);
}

TEST_CASE("AdamW decays after the step as bitsandbytes' CUDA kernel", "[optim][adamw]") {
  const Errors kernel = run_case("kernel_wd", "kernel_wd");
  CHECK(kernel.param <= 8);
  CHECK(kernel.exp_avg <= 8);
  CHECK(kernel.exp_avg_sq <= 256);
  // The order shows in the results: the before-step reference is far outside that tolerance.
  CHECK(run_case("kernel_wd", "bnb_wd").param > 1000);
}

namespace {

/// Bit patterns of every parameter of a trajectory.
std::vector<std::uint32_t> parameter_bits(const Trajectory& t) {
  std::vector<std::uint32_t> bits;
  for (const auto& name : parameter_names) {
    for (const float v : t.params.at(name).span<const float>()) bits.push_back(qlora::test::bits_of(v));
  }
  return bits;
}

}  // namespace

TEST_CASE("AdamW resumes bit-exactly from a saved state", "[optim][adamw]") {
  for (const std::string name : {"bnb_default", "kernel_wd", "bnb_wd"}) {
    INFO("case " << name);
    Trajectory uninterrupted;
    AdamW straight(uninterrupted.options(name));
    uninterrupted.add_all(straight);
    uninterrupted.run(straight, 0, uninterrupted.lrs.size());

    TempDir dir;
    Trajectory first;
    AdamW before_crash(first.options(name, 2));
    first.add_all(before_crash);
    first.run(before_crash, 0, 3);
    before_crash.save_state(dir / "optimizer.safetensors");

    // A new process: the parameters come back from their own checkpoint, the moments from the state file.
    Trajectory resumed;
    for (const auto& p : parameter_names) {
      std::memcpy(resumed.params.at(p).view().raw_data(), first.params.at(p).view().raw_data(),
                  first.params.at(p).byte_size());
    }
    AdamW after_crash(resumed.options(name, 3));
    resumed.add_all(after_crash);
    after_crash.load_state(dir / "optimizer.safetensors");
    CHECK(after_crash.steps() == 3);
    resumed.run(after_crash, 3, resumed.lrs.size());
    CHECK(after_crash.steps() == straight.steps());
    CHECK(parameter_bits(resumed) == parameter_bits(uninterrupted));
    for (const auto& p : parameter_names) {
      CHECK(qlora::test::same_bits(after_crash.exp_avg_sq(p).span<const float>(), straight.exp_avg_sq(p).span<const float>()));
    }
  }
}

TEST_CASE("AdamW gives the same bits for any thread count", "[optim][adamw]") {
  // 3 chunks of 2^14 and a tail, so several threads share one parameter.
  const Shape shape{3 * (1 << 14) + 77};
  std::vector<std::vector<std::uint32_t>> results;
  for (const unsigned threads : {1u, 2u, 3u}) {
    Tensor param = qlora::test::filled<float>(shape, 0, 1.0);
    Tensor grad = qlora::test::filled<float>(shape, 1 << 20, 0.1);
    AdamWOptions options;
    options.weight_decay = 0.01;
    options.threads = threads;
    AdamW optimizer(options);
    optimizer.add("w", param.view(), grad.view());
    for (int step = 0; step < 3; ++step) optimizer.step(1e-3);
    std::vector<std::uint32_t> bits;
    for (const float v : param.span<const float>()) bits.push_back(qlora::test::bits_of(v));
    results.push_back(std::move(bits));
    CHECK(optimizer.state_bytes() == 2 * sizeof(float) * static_cast<std::size_t>(shape.numel()));
  }
  CHECK(results[1] == results[0]);
  CHECK(results[2] == results[0]);
}

TEST_CASE("AdamW refuses bad parameters, options and learning rates", "[optim][adamw]") {
  Tensor a(DType::F32, Shape{2, 3}), ga(DType::F32, Shape{2, 3}), wrong(DType::F32, Shape{3, 2});
  Tensor half(DType::BF16, Shape{2, 3});
  AdamW optimizer;
  require_error([&] { optimizer.add("a", a.view(), wrong.view()); }, "ShapeMismatch", "`a`", "[2, 3]", "[3, 2]");
  require_error([&] { optimizer.add("a", half.view(), ga.view()); }, "DTypeMismatch", "`a`", "BF16");
  require_error([&] { optimizer.add("a", a.view(), a.view().transposed(0, 1)); }, "NotContiguous", "`a`");
  optimizer.add("a", a.view(), ga.view());
  require_error([&] { optimizer.add("a", a.view(), ga.view()); }, "DuplicateParameter", "`a`");
  require_error([&] { optimizer.step(-1e-3); }, "InvalidArgument", "learning rate");
  require_error([&] { optimizer.step(std::nan("")); }, "InvalidArgument", "learning rate");
  CHECK(optimizer.steps() == 0);
  optimizer.step(1e-3);
  Tensor b(DType::F32, Shape{4}), gb(DType::F32, Shape{4});
  require_error([&] { optimizer.add("b", b.view(), gb.view()); }, "InvalidArgument", "`b`", "after 1 steps");
  require_error([&] { (void)optimizer.exp_avg("b"); }, "UnknownParameter", "`b`");

  const auto with = [](auto change) {
    AdamWOptions options;
    change(options);
    return options;
  };
  require_error([&] { AdamW bad(with([](AdamWOptions& o) { o.beta1 = 1.0; })); }, "InvalidArgument", "beta1");
  require_error([&] { AdamW bad(with([](AdamWOptions& o) { o.beta2 = -0.1; })); }, "InvalidArgument", "beta2");
  require_error([&] { AdamW bad(with([](AdamWOptions& o) { o.eps = -1; })); }, "InvalidArgument", "eps");
  require_error([&] { AdamW bad(with([](AdamWOptions& o) { o.weight_decay = std::nan(""); })); }, "InvalidArgument",
                "weight_decay");
}

namespace {

/// An optimizer over parameters "a" [2, 3] and "b" [4] ("b" without decay), stepped twice.
struct SmallRun {
  Tensor a = qlora::test::filled<float>(Shape{2, 3}, 0, 1.0), ga = qlora::test::filled<float>(Shape{2, 3}, 100, 1.0);
  Tensor b = qlora::test::filled<float>(Shape{4}, 200, 1.0), gb = qlora::test::filled<float>(Shape{4}, 300, 1.0);
  AdamW optimizer;

  explicit SmallRun(AdamWOptions options = {}, bool b_decays = false, bool with_b = true) : optimizer(options) {
    optimizer.add("a", a.view(), ga.view());
    if (with_b) optimizer.add("b", b.view(), gb.view(), b_decays);
  }
  void steps(int count) {
    for (int i = 0; i < count; ++i) optimizer.step(1e-2);
  }
};

std::vector<std::uint32_t> state_bits(const AdamW& optimizer, const std::string& name) {
  std::vector<std::uint32_t> bits;
  for (const float v : optimizer.exp_avg(name).span<const float>()) bits.push_back(qlora::test::bits_of(v));
  for (const float v : optimizer.exp_avg_sq(name).span<const float>()) bits.push_back(qlora::test::bits_of(v));
  return bits;
}

}  // namespace

TEST_CASE("AdamW state files: layout and refusals that leave the optimizer unchanged", "[optim][adamw]") {
  TempDir dir;
  const auto file = dir / "state.safetensors";
  SmallRun saved;
  saved.steps(2);
  saved.optimizer.save_state(file);

  const SafetensorsReader reader = SafetensorsReader::open(file);
  CHECK(reader.tensors().size() == 4);
  CHECK(reader.tensor("a.exp_avg").shape == std::vector<std::int64_t>{2, 3});
  CHECK(reader.tensor("b.exp_avg_sq").shape == std::vector<std::int64_t>{4});
  CHECK(reader.metadata_value("step") == "2");
  CHECK(reader.metadata_value("decay_order") == "after_step");
  CHECK(reader.metadata_value("no_decay") == R"(["b"])");
  CHECK(dir.listing() == std::vector<std::string>{"state.safetensors"});  // no temporary file left

  // The target: one step in, so that an accidental partial load would show.
  SmallRun target;
  target.steps(1);
  const auto a_before = state_bits(target.optimizer, "a");
  const auto b_before = state_bits(target.optimizer, "b");
  const auto unchanged = [&] {
    CHECK(target.optimizer.steps() == 1);
    CHECK(state_bits(target.optimizer, "a") == a_before);
    CHECK(state_bits(target.optimizer, "b") == b_before);
  };

  SECTION("another parameter set") {
    Tensor a(DType::F32, Shape{2, 3}), b(DType::F32, Shape{4}), c(DType::F32, Shape{5});
    AdamW more;  // one parameter more
    more.add("a", a.view(), a.view());
    more.add("b", b.view(), b.view(), false);
    more.add("c", c.view(), c.view());
    more.save_state(dir / "more.safetensors");
    require_error([&] { target.optimizer.load_state(dir / "more.safetensors"); }, "OptimizerStateMismatch",
                  "more.safetensors", "6 tensors, expected 4");
    AdamW renamed;  // as many, one named differently
    renamed.add("a2", a.view(), a.view());
    renamed.add("b", b.view(), b.view(), false);
    renamed.save_state(dir / "renamed.safetensors");
    require_error([&] { target.optimizer.load_state(dir / "renamed.safetensors"); }, "OptimizerStateMismatch",
                  "renamed.safetensors", "no `a.exp_avg`");
    unchanged();
  }
  SECTION("a parameter of another shape") {
    Tensor a(DType::F32, Shape{3, 2}), ga(DType::F32, Shape{3, 2}), b(DType::F32, Shape{4}), gb(DType::F32, Shape{4});
    AdamW other;
    other.add("a", a.view(), ga.view());
    other.add("b", b.view(), gb.view(), false);
    other.save_state(dir / "other.safetensors");
    require_error([&] { target.optimizer.load_state(dir / "other.safetensors"); }, "OptimizerStateMismatch",
                  "other.safetensors", "`a.exp_avg`", "[3, 2]", "parameter `a`", "[2, 3]");
    unchanged();
  }
  SECTION("another decay group") {
    SmallRun decaying({}, /*b_decays=*/true);
    decaying.optimizer.save_state(dir / "decaying.safetensors");
    require_error([&] { target.optimizer.load_state(dir / "decaying.safetensors"); }, "OptimizerStateMismatch",
                  "decaying.safetensors", "no_decay");
    unchanged();
  }
  SECTION("other options") {
    AdamWOptions options;
    options.beta2 = 0.99;
    SmallRun other(options);
    other.optimizer.save_state(dir / "beta2.safetensors");
    require_error([&] { target.optimizer.load_state(dir / "beta2.safetensors"); }, "OptimizerStateMismatch",
                  "beta2.safetensors", "beta2 = 0.99", "0.999");
    options = {};
    options.decay_order = AdamWOptions::DecayOrder::before_step;
    SmallRun torch_order(options);
    torch_order.optimizer.save_state(dir / "order.safetensors");
    require_error([&] { target.optimizer.load_state(dir / "order.safetensors"); }, "OptimizerStateMismatch",
                  "decay_order = before_step");
    unchanged();
  }
  SECTION("a safetensors file that is not an optimizer state") {
    qlora::SafetensorsWriter writer;
    const std::vector<float> values(6, 1.0f);
    writer.add("a.exp_avg", {2, 3}, values);
    writer.write(dir / "plain.safetensors");
    require_error([&] { target.optimizer.load_state(dir / "plain.safetensors"); }, "OptimizerStateMismatch",
                  "plain.safetensors", "not an AdamW state file");
    unchanged();
  }
  SECTION("a truncated file") {
    const auto bytes = qlora::test::read_bytes(file);
    std::ofstream(dir / "torn.safetensors", std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size() - 5));
    require_error([&] { target.optimizer.load_state(dir / "torn.safetensors"); }, "MetadataIncompleteBuffer",
                  "torn.safetensors");
    unchanged();
  }
  SECTION("a missing file") {
    const qlora::Error error = qlora::test::thrown_by([&] { target.optimizer.load_state(dir / "absent.safetensors"); });
    CHECK(std::string(error.what()).find("absent.safetensors") != std::string::npos);
    unchanged();
  }
  SECTION("the right file loads") {
    target.optimizer.load_state(file);
    CHECK(target.optimizer.steps() == 2);
    CHECK(state_bits(target.optimizer, "a") == state_bits(saved.optimizer, "a"));
    CHECK(state_bits(target.optimizer, "b") == state_bits(saved.optimizer, "b"));
  }
}

TEST_CASE("AdamW save_state writes atomically", "[optim][adamw]") {
  TempDir dir;
  SmallRun run;
  run.steps(1);
  require_error([&] { run.optimizer.save_state(dir / "missing_dir" / "state.safetensors"); }, "IoError", "missing_dir");
  run.optimizer.save_state(dir / "state.safetensors");
  const auto first = qlora::test::read_bytes(dir / "state.safetensors");
  run.steps(1);
  run.optimizer.save_state(dir / "state.safetensors");  // replaces the file whole
  CHECK(qlora::test::read_bytes(dir / "state.safetensors") != first);
  CHECK(dir.listing() == std::vector<std::string>{"state.safetensors"});
}
