// A two-rank program that goes wrong on purpose, for the fault tests in
// tests/CMakeLists.txt (each must end the whole job quickly, with the named
// error, never hang):
//   late      rank 1 sleeps far past rank 0's 1 s timeout before its
//             all_reduce: rank 0 must throw CommunicatorTimeout, and its
//             MpiSession then aborts the job (rank 1 never gets to finish);
//   dead      rank 1 exits without a word before the all_reduce: mpirun
//             notices and ends rank 0 (whose 10 s timeout is the backstop);
//   mismatch  the ranks fingerprint different configs: every rank throws
//             RankMismatch at start.
// Prints "rank R: [Code] message" for an error and exits 1.
#include <qlora/dist/mpi.hpp>
#include <qlora/dist/rank_consistency.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string_view>
#include <thread>
#include <vector>

int main(int argc, char** argv) {
  qlora::MpiSession session(argc, argv);
  const std::string_view mode = argc > 1 ? argv[1] : "";
  int rank = -1;
  try {
    const auto timeout = mode == "late" ? std::chrono::milliseconds(1000) : std::chrono::milliseconds(10000);
    qlora::Mpi comm(qlora::MpiOptions{.timeout = timeout});
    rank = comm.rank();
    std::vector<float> values(16, 1.0f);
    if (mode == "late") {
      if (rank == 1) std::this_thread::sleep_for(std::chrono::seconds(60));
      comm.all_reduce(std::span<float>(values), qlora::ReduceOp::sum);
    } else if (mode == "dead") {
      if (rank == 1) std::_Exit(3);
      comm.all_reduce(std::span<float>(values), qlora::ReduceOp::sum);
    } else if (mode == "mismatch") {
      qlora::check_same_on_every_rank(comm, "config", rank == 1 ? 2 : 1);
    } else {
      std::fprintf(stderr, "usage: mpi_fault_probe late|dead|mismatch\n");
      return 2;
    }
    std::printf("rank %d: no fault happened\n", rank);
    return 0;
  } catch (const std::exception& error) {
    std::printf("rank %d: %s\n", rank, error.what());
    std::fflush(stdout);
    return 1;
  }
}
