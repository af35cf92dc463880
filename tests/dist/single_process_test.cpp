// SingleProcess: every collective is the identity on one rank, with the same
// size checks as the real transports (dist/detail/collective_checks.hpp).
#include <qlora/dist/rank_consistency.hpp>
#include <qlora/dist/single_process.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <span>
#include <vector>

#include "support/errors.hpp"

using namespace qlora;

TEST_CASE("SingleProcess: one rank, identity collectives", "[dist]") {
  SingleProcess comm;
  CHECK(comm.rank() == 0);
  CHECK(comm.size() == 1);
  std::vector<float> values{1.5f, -2.0f, 3.25f};
  const std::vector<float> original = values;
  comm.all_reduce(std::span<float>(values), ReduceOp::sum);
  CHECK(values == original);
  comm.all_reduce(std::span<float>(values), ReduceOp::average);
  CHECK(values == original);

  std::vector<float> out(3);
  comm.reduce_scatter(std::span<const float>(values), std::span<float>(out), ReduceOp::sum);
  CHECK(out == original);
  std::vector<float> gathered(3);
  comm.all_gather(std::span<const float>(values), std::span<float>(gathered));
  CHECK(gathered == original);
  comm.all_gather(std::span<const float>(gathered), std::span<float>(gathered));  // in place
  CHECK(gathered == original);

  std::vector<bf16> halves{bf16::from_float(1.0f), bf16::from_float(-0.5f)};
  comm.broadcast(std::span<bf16>(halves), 0);
  CHECK(halves[1].to_float() == -0.5f);
  comm.barrier();
  check_same_on_every_rank(comm, "config", 42);
}

TEST_CASE("SingleProcess: wrong sizes and roots are refused", "[dist]") {
  SingleProcess comm;
  std::vector<float> input(4), output(3);
  test::require_error(
      [&] { comm.reduce_scatter(std::span<const float>(input), std::span<float>(output), ReduceOp::sum); },
      "ShapeMismatch", "SingleProcess reduce_scatter: input has 4 elements", "1 ranks x output's 3 = 3");
  test::require_error([&] { comm.all_gather(std::span<const float>(input), std::span<float>(output)); },
                      "ShapeMismatch", "SingleProcess all_gather: output has 3 elements");
  test::require_error([&] { comm.broadcast(std::span<float>(input), 1); }, "InvalidArgument", "root 1",
                      "[0, 1)");
}
