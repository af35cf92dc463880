// Mpi against arithmetic: each rank contributes values that depend on its
// rank, and every collective's result is known in closed form (sums of small
// integers and halves are exact in fp32, so those checks are bit-exact).
// Run by CTest under `mpirun -np 2` and `-np 4` (tests/mpi_test_list.txt);
// every rank runs every test case, and a failure on any rank fails the job.
// The timeout and dead-rank behaviour is tests/dist/mpi_fault_probe.cpp's.
#define CATCH_CONFIG_RUNNER
#include <qlora/dist/mpi.hpp>
#include <qlora/dist/rank_consistency.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "support/errors.hpp"
#include "support/splitmix.hpp"

using namespace qlora;

namespace {

/// The communicator main() makes after the session (and destroys before MPI_Finalize).
Mpi* the_communicator = nullptr;

Mpi& communicator() { return *the_communicator; }

}  // namespace

TEST_CASE("Mpi: all_reduce sums and averages fp32 exactly", "[dist][mpi]") {
  Mpi& comm = communicator();
  const int n = comm.size(), r = comm.rank();
  REQUIRE(n >= 2);
  const std::size_t count = GENERATE(1, 7, 100000);
  std::vector<float> values(count), averaged(count);
  for (std::size_t i = 0; i < count; ++i) values[i] = averaged[i] = static_cast<float>((r + 1) * (i % 1000)) * 0.5f;
  comm.all_reduce(std::span<float>(values), ReduceOp::sum);
  comm.all_reduce(std::span<float>(averaged), ReduceOp::average);
  const float ranks_sum = static_cast<float>(n * (n + 1) / 2);  // Σ (rank + 1)
  for (std::size_t i = 0; i < count; ++i) {
    const float expected = ranks_sum * static_cast<float>(i % 1000) * 0.5f;
    REQUIRE(values[i] == expected);
    REQUIRE(averaged[i] == expected / static_cast<float>(n));
  }
}

TEST_CASE("Mpi: bf16 all_reduce adds in fp32 and rounds after each addition", "[dist][mpi]") {
  Mpi& comm = communicator();
  const int n = comm.size(), r = comm.rank();
  const std::size_t count = 4096;
  // Every rank can compute every rank's contribution: the sum is known here.
  std::vector<double> exact(count, 0.0), magnitude(count, 0.0);  // Σ terms and Σ |terms|
  std::vector<bf16> values(count);
  for (int rank = 0; rank < n; ++rank) {
    const std::vector<float> theirs = test::normalish(count, 100 + static_cast<std::uint64_t>(rank), 1.0);
    for (std::size_t i = 0; i < count; ++i) {
      const bf16 term = bf16::from_float(theirs[i]);
      if (rank == r) values[i] = term;
      exact[i] += term.to_float();
      magnitude[i] += std::abs(term.to_float());
    }
  }
  comm.all_reduce(std::span<bf16>(values), ReduceOp::sum);
  for (std::size_t i = 0; i < count; ++i) {
    INFO("element " << i);
    if (n == 2) {
      // One addition, rounded once: the order cannot matter.
      REQUIRE(values[i] == bf16::from_float(static_cast<float>(exact[i])));
    } else {
      // n − 1 additions in the transport's order, each rounded to bf16: at most half an ulp,
      // and bf16's 8 significant bits make that 2^-8 of the partial sum, which never exceeds
      // Σ |terms|.
      REQUIRE(std::abs(values[i].to_float() - exact[i]) <= (n - 1) * std::ldexp(magnitude[i], -8));
    }
  }
}

TEST_CASE("Mpi: reduce_scatter gives rank r the reduction of block r", "[dist][mpi]") {
  Mpi& comm = communicator();
  const int n = comm.size(), r = comm.rank();
  const std::size_t block = 5;
  std::vector<float> input(block * static_cast<std::size_t>(n));
  for (std::size_t b = 0; b < static_cast<std::size_t>(n); ++b)
    for (std::size_t i = 0; i < block; ++i) input[b * block + i] = static_cast<float>(r * 1000 + b * 10 + i);
  std::vector<float> summed(block), averaged(block);
  comm.reduce_scatter(std::span<const float>(input), std::span<float>(summed), ReduceOp::sum);
  comm.reduce_scatter(std::span<const float>(input), std::span<float>(averaged), ReduceOp::average);
  for (std::size_t i = 0; i < block; ++i) {
    const float expected = static_cast<float>(1000 * (n * (n - 1) / 2) + n * (r * 10 + static_cast<int>(i)));
    CHECK(summed[i] == expected);
    CHECK(averaged[i] == expected / static_cast<float>(n));
  }
}

TEST_CASE("Mpi: all_gather, out of place and in place; broadcast; barrier", "[dist][mpi]") {
  Mpi& comm = communicator();
  const int n = comm.size(), r = comm.rank();
  const std::size_t block = 3;
  std::vector<float> mine(block), gathered(block * static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < block; ++i) mine[i] = static_cast<float>(r * 100 + static_cast<int>(i));
  comm.all_gather(std::span<const float>(mine), std::span<float>(gathered));
  for (std::size_t j = 0; j < gathered.size(); ++j)
    CHECK(gathered[j] == static_cast<float>(static_cast<int>(j / block) * 100 + static_cast<int>(j % block)));

  // In place: this rank's block already sits in the output (ZeRO's parameter all-gather).
  // Values r·4 + i: small integers, exact in bf16.
  std::vector<bf16> shards(block * static_cast<std::size_t>(n), bf16::from_float(-1.0f));
  for (std::size_t i = 0; i < block; ++i)
    shards[static_cast<std::size_t>(r) * block + i] = bf16::from_float(static_cast<float>(r * 4 + static_cast<int>(i)));
  const std::span<bf16> all(shards);
  comm.all_gather(std::span<const bf16>(all.subspan(static_cast<std::size_t>(r) * block, block)), all);
  for (std::size_t j = 0; j < shards.size(); ++j)
    CHECK(shards[j].to_float() == static_cast<float>(static_cast<int>(j / block) * 4 + static_cast<int>(j % block)));

  std::vector<std::uint64_t> words{static_cast<std::uint64_t>(r), 0xFFFFFFFFFFFFFFFFull - static_cast<std::uint64_t>(r)};
  comm.broadcast(std::span<std::uint64_t>(words), n - 1);
  CHECK(words[0] == static_cast<std::uint64_t>(n - 1));
  CHECK(words[1] == 0xFFFFFFFFFFFFFFFFull - static_cast<std::uint64_t>(n - 1));
  comm.barrier();
}

TEST_CASE("Mpi: ranks that start differently are told so, every one of them", "[dist][mpi]") {
  Mpi& comm = communicator();
  check_same_on_every_rank(comm, "config", 0x1234);
  const std::uint64_t fingerprint = comm.rank() == 1 ? 0xbad : 0x1234;
  test::require_error([&] { check_same_on_every_rank(comm, "dataset", fingerprint); }, "RankMismatch",
                      "dataset differs between ranks: rank 0 has 0000000000001234", "rank 1 has 0000000000000bad");
}

TEST_CASE("Mpi: wrong sizes, roots and overlapping buffers are refused before any traffic", "[dist][mpi]") {
  Mpi& comm = communicator();
  std::vector<float> input(7), output(3);
  test::require_error(
      [&] { comm.reduce_scatter(std::span<const float>(input), std::span<float>(output), ReduceOp::sum); },
      "ShapeMismatch", "Mpi reduce_scatter: input has 7 elements");
  test::require_error([&] { comm.broadcast(std::span<float>(input), comm.size()); }, "InvalidArgument",
                      "root " + std::to_string(comm.size()));
  std::vector<float> both(3 * static_cast<std::size_t>(comm.size()));
  const std::span<float> all(both);
  test::require_error(
      [&] { comm.reduce_scatter(std::span<const float>(all), all.subspan(0, 3), ReduceOp::sum); }, "InvalidArgument",
      "overlap");
  // A timeout must be positive.
  test::require_error([] { (void)Mpi(MpiOptions{.timeout = std::chrono::milliseconds(0)}); }, "InvalidArgument",
                      "timeout is 0 ms");
}

int main(int argc, char** argv) {
  MpiSession session(argc, argv);
  int failed = 0;
  {
    Mpi comm(MpiOptions{.timeout = std::chrono::seconds(60)});
    the_communicator = &comm;
    failed = Catch::Session().run(argc, argv);
    the_communicator = nullptr;
  }
  // Every rank reports; one rank's failure fails the job (mpirun returns non-zero).
  return failed == 0 ? 0 : 1;
}
