// ZeroOptimizer under `mpirun -np N` (tests/mpi_test_list.txt: N = 2 and 4),
// stages 1 and 2, against a single-process AdamW that every rank runs beside
// it on the summed gradients, and against torch + peft + bitsandbytes (the
// tiny Phi's 20-step curve of tests/reference/phi_model.py):
//   * toy parameters of awkward sizes (shards cut parameters; one rank's
//     shard can be short or empty), both decay groups, clipping active;
//   * per-rank optimizer-state bytes = 8 x its shard, shards summing to P;
//   * state files: saved by N ranks and resumed by N ranks (bit-exact), and
//     a single AdamW's file resumed by N ranks;
//   * the tiny Phi trained data-parallel (window of 2 micro-batches split
//     over the ranks) follows torch's loss curve within 1e-3 and ends where
//     one process ends.
// Tolerances: one process sums a parameter's gradient over micro-batches as
// the backward accumulates it, the transport sums the ranks' in its own order
// (fp32), and the clipping norm's double sums are grouped differently; Adam
// turns a gradient difference δ/|g| into an update difference of about
// lr·δ/|g|. Toy: 1e-6 absolute on parameters of size ~1 after 5 steps at
// lr 1e-2 (differences seen: ~1e-8); model: see the test.
#define CATCH_CONFIG_RUNNER
#include <qlora/dist/mpi.hpp>
#include <qlora/models/phi.hpp>
#include <qlora/optim/zero_optimizer.hpp>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>
#include <unistd.h>

#include "models/model_fixture.hpp"
#include "support/errors.hpp"
#include "support/splitmix.hpp"

using namespace qlora;

namespace {

Mpi* the_communicator = nullptr;
Mpi& communicator() { return *the_communicator; }

/// A set of trainable tensors: sizes that no rank count divides, a no-decay one, a scalar.
struct ToyParameters {
  static constexpr std::int64_t sizes[] = {37, 1, 130, 6};
  static constexpr bool decays[] = {true, false, true, true};
  std::vector<Tensor> values, grads;

  ToyParameters() {
    for (std::size_t i = 0; i < std::size(sizes); ++i) {
      values.emplace_back(DType::F32, Shape{sizes[i]});
      grads.emplace_back(DType::F32, Shape{sizes[i]});
      const std::vector<float> start = test::normalish(static_cast<std::size_t>(sizes[i]), 50 + i, 1.0);
      std::ranges::copy(start, values.back().span<float>().begin());
    }
  }
  template <class Optimizer>
  void register_with(Optimizer& optimizer) {
    for (std::size_t i = 0; i < values.size(); ++i)
      optimizer.add(fmt::format("p{}", i), values[i].view(), grads[i].view(), decays[i]);
  }
  /// Rank `rank`'s gradient of step `step` into grads (scaled so that the clipping at 1 acts).
  void set_rank_gradient(int rank, std::int64_t step) {
    for (std::size_t i = 0; i < grads.size(); ++i) {
      const std::vector<float> g = test::normalish(static_cast<std::size_t>(sizes[i]),
                                                   1000 * static_cast<std::uint64_t>(step) + 10 * i +
                                                       static_cast<std::uint64_t>(rank),
                                                   0.3);
      std::ranges::copy(g, grads[i].span<float>().begin());
    }
  }
  /// Σ over `ranks` of set_rank_gradient, added in rank order (the single-process reference).
  void set_summed_gradient(int ranks, std::int64_t step) {
    ToyParameters part;
    for (Tensor& g : grads) std::ranges::fill(g.span<float>(), 0.0f);
    for (int r = 0; r < ranks; ++r) {
      part.set_rank_gradient(r, step);
      for (std::size_t i = 0; i < grads.size(); ++i) {
        const auto from = part.grads[i].span<const float>();
        auto to = grads[i].span<float>();
        for (std::size_t e = 0; e < to.size(); ++e) to[e] += from[e];
      }
    }
  }
  std::vector<TensorView> grad_views() {
    std::vector<TensorView> views;
    for (Tensor& g : grads) views.push_back(g.view());
    return views;
  }
};

const AdamWOptions toy_options{.weight_decay = 0.01};
constexpr double toy_lr = 1e-2, toy_max_norm = 1.0;

/// One ZeRO step of the toy: this rank's gradient, then the optimizer's reduce/clip/step.
template <class Zero>
void zero_step(Zero& zero, ToyParameters& toy, std::int64_t step) {
  toy.set_rank_gradient(communicator().rank(), step);
  zero.reduce_gradients();
  zero.clip_gradients(toy_max_norm, zero.gradient_norm());
  zero.step(toy_lr);
}

/// The single-process reference step.
void reference_step(AdamW& adamw, ToyParameters& toy, std::int64_t step) {
  toy.set_summed_gradient(communicator().size(), step);
  const std::vector<TensorView> grads = toy.grad_views();
  (void)clip_grad_norm(grads, toy_max_norm);
  adamw.step(toy_lr);
}

void check_same_values(const ToyParameters& actual, const ToyParameters& expected, double tolerance) {
  for (std::size_t i = 0; i < actual.values.size(); ++i) {
    const auto a = actual.values[i].span<const float>(), b = expected.values[i].span<const float>();
    double worst = 0;
    for (std::size_t e = 0; e < a.size(); ++e) worst = std::max(worst, std::abs(double(a[e]) - b[e]));
    INFO("parameter p" << i << ": max difference " << worst);
    CHECK(worst <= tolerance);
  }
}

/// A folder every rank agrees on (rank 0's process id), emptied first.
std::filesystem::path shared_folder(const std::string& name) {
  std::uint64_t id[] = {static_cast<std::uint64_t>(::getpid())};
  communicator().broadcast(std::span<std::uint64_t>(id), 0);
  const auto folder = std::filesystem::temp_directory_path() / ("qlora_zero_" + std::to_string(id[0])) / name;
  communicator().barrier();  // every rank is done with the files of the previous run (a broadcast's root may run ahead)
  if (communicator().rank() == 0) {
    std::filesystem::remove_all(folder);
    std::filesystem::create_directories(folder);
  }
  communicator().barrier();
  return folder;
}

}  // namespace

TEMPLATE_TEST_CASE("ZeroOptimizer: N ranks step as one AdamW on the summed gradients", "[optim][zero]", ZeroStage1,
                   ZeroStage2) {
  Mpi& comm = communicator();
  ToyParameters sharded, reference;
  ZeroOptimizer<AdamW, TestType, Mpi> zero(comm, toy_options);
  AdamW adamw(toy_options);
  sharded.register_with(zero);
  reference.register_with(adamw);
  for (std::int64_t step = 0; step < 5; ++step) {
    zero_step(zero, sharded, step);
    reference_step(adamw, reference, step);
  }
  check_same_values(sharded, reference, 1e-6);
  CHECK(zero.steps() == 5);

  // Optimizer state: 8 bytes per element of this rank's shard; the shards tile the parameters.
  const std::int64_t total = 37 + 1 + 130 + 6;
  CHECK(zero.total_elements() == total);
  CHECK(zero.state_bytes() == 8 * static_cast<std::size_t>(zero.shard_elements()));
  CHECK(zero.shard_elements() <= (total + comm.size() - 1) / comm.size());
  std::uint64_t covered[] = {static_cast<std::uint64_t>(zero.shard_elements())};
  comm.all_reduce(std::span<std::uint64_t>(covered), ReduceOp::sum);
  CHECK(covered[0] == static_cast<std::uint64_t>(total));
  CHECK(adamw.state_bytes() == 8 * static_cast<std::size_t>(total));
}

TEMPLATE_TEST_CASE("ZeroOptimizer: state files resume on any number of ranks", "[optim][zero]", ZeroStage1,
                   ZeroStage2) {
  Mpi& comm = communicator();
  const std::filesystem::path folder = shared_folder(std::string("state_") + std::to_string(TestType::number));

  SECTION("saved by N ranks, resumed by N ranks: the same bits as going on") {
    ToyParameters straight, resumed;
    ZeroOptimizer<AdamW, TestType, Mpi> first(comm, toy_options);
    straight.register_with(first);
    for (std::int64_t step = 0; step < 3; ++step) zero_step(first, straight, step);
    first.save_state(folder / "zero.safetensors");
    for (std::size_t i = 0; i < straight.values.size(); ++i)  // the parameters, as a checkpoint holds them
      std::ranges::copy(straight.values[i].span<const float>(), resumed.values[i].span<float>().begin());
    ZeroOptimizer<AdamW, TestType, Mpi> second(comm, toy_options);
    resumed.register_with(second);
    second.load_state(folder / "zero.safetensors");
    CHECK(second.steps() == 3);
    for (std::int64_t step = 3; step < 5; ++step) {
      zero_step(first, straight, step);
      zero_step(second, resumed, step);
    }
    check_same_values(resumed, straight, 0.0);

    // The same file is an AdamW state file: a single process loads it too.
    ToyParameters single;
    AdamW adamw(toy_options);
    single.register_with(adamw);
    adamw.load_state(folder / "zero.safetensors");
    CHECK(adamw.steps() == 3);
  }
  SECTION("a single AdamW's state resumed by N ranks") {
    ToyParameters single, sharded;
    AdamW adamw(toy_options);
    single.register_with(adamw);
    for (std::int64_t step = 0; step < 3; ++step) reference_step(adamw, single, step);
    if (comm.rank() == 0) adamw.save_state(folder / "adamw.safetensors");
    comm.barrier();
    for (std::size_t i = 0; i < single.values.size(); ++i)
      std::ranges::copy(single.values[i].span<const float>(), sharded.values[i].span<float>().begin());
    ZeroOptimizer<AdamW, TestType, Mpi> zero(comm, toy_options);
    sharded.register_with(zero);
    zero.load_state(folder / "adamw.safetensors");
    for (std::int64_t step = 3; step < 5; ++step) {
      reference_step(adamw, single, step);
      zero_step(zero, sharded, step);
    }
    check_same_values(sharded, single, 1e-6);
  }
  SECTION("a state file of other parameters is refused on every rank, and nothing changes") {
    ToyParameters toy;
    ZeroOptimizer<AdamW, TestType, Mpi> zero(comm, toy_options);
    toy.register_with(zero);
    zero.save_state(folder / "four.safetensors");
    ToyParameters fewer;
    ZeroOptimizer<AdamW, TestType, Mpi> other(comm, toy_options);
    other.add("p0", fewer.values[0].view(), fewer.grads[0].view(), true);
    test::require_error([&] { other.load_state(folder / "four.safetensors"); }, "OptimizerStateMismatch",
                        "saved with no_decay = [\"p1\"], this optimizer has []");
    CHECK(other.steps() == 0);
  }
}

TEST_CASE("ZeroOptimizer: bad parameters are refused as AdamW refuses them", "[optim][zero]") {
  Mpi& comm = communicator();
  ZeroOptimizer<AdamW, ZeroStage2, Mpi> zero(comm);
  Tensor value(DType::F32, Shape{4}), grad(DType::F32, Shape{4}), short_grad(DType::F32, Shape{3});
  Tensor half(DType::BF16, Shape{4});
  zero.add("w", value.view(), grad.view());
  test::require_error([&] { zero.add("w", value.view(), grad.view()); }, "DuplicateParameter", "`w` was added twice");
  test::require_error([&] { zero.add("v", value.view(), short_grad.view()); }, "ShapeMismatch", "`v` is [4]");
  test::require_error([&] { zero.add("h", half.view(), half.view()); }, "DTypeMismatch", "the parameter of `h`");
  test::require_error([&] { zero.step(-1.0); }, "InvalidArgument", "learning rate -1");
  test::require_error([&] { (void)ZeroOptimizer<AdamW, ZeroStage1, Mpi>(comm, AdamWOptions{.beta1 = 1.0}); },
                      "InvalidArgument", "beta1");
}

TEMPLATE_TEST_CASE("ZeroOptimizer: the tiny Phi trained on N ranks follows torch's curve and ends as one process does",
                   "[optim][zero][model]", ZeroStage1, ZeroStage2) {
  Mpi& comm = communicator();
  if (2 % comm.size() != 0) {
    WARN("the fixture's window has 2 micro-batches: no data-parallel split for " << comm.size() << " ranks");
    return;
  }
  const test::ModelFixture fixture("tiny_phi");
  ZeroOptimizer<AdamW, TestType, Mpi> zero(comm, AdamWOptions{});
  const auto sharded = test::check_training_curve<Phi<NF4, float>>(fixture, "tiny_phi", zero, comm.rank(), comm.size());
  const auto single = test::check_training_curve<Phi<NF4, float>>(fixture, "tiny_phi");
  REQUIRE(sharded.size() == single.size());
  for (std::size_t i = 0; i < single.size(); ++i) {
    INFO("trainable tensor " << i);
    // The two runs differ only by fp32 summation order of the window's gradients (see the
    // header); after 20 Adam steps at lr 1e-3 that measured at most 4e-7 of a tensor's range
    // (2 ranks, both stages). 1e-5 leaves room for other transports' orders and is still 100x
    // tighter than the agreement with torch that check_training_curve demands.
    CHECK(test::relative_error(sharded[i], single[i]) < 1e-5);
  }
}

int main(int argc, char** argv) {
  MpiSession session(argc, argv);
  int failed = 0;
  {
    Mpi comm(MpiOptions{.timeout = std::chrono::seconds(120)});
    the_communicator = &comm;
    failed = Catch::Session().run(argc, argv);
    the_communicator = nullptr;
  }
  return failed == 0 ? 0 : 1;
}
