// The job qlora-train runs in: one process, or one rank of `mpirun -np N
// qlora-train ...` (data parallel over MPI when the program was built with
// qlora::mpi, QLORA_TRAIN_WITH_MPI). A process started by mpirun finds
// OpenMPI's OMPI_COMM_WORLD_SIZE (or PMIx's / PMI's size) in its environment;
// only then is MPI initialised, so a plain `qlora-train` never touches MPI.
//
// Rank 0 is the leader: it alone prints, logs metrics, writes checkpoints and
// the adapter, and answers the eval prompts. The other ranks' standard output
// goes to /dev/null (their errors still reach standard error).
#pragma once

#include <qlora/dist/single_process.hpp>
#if QLORA_TRAIN_WITH_MPI
#include <qlora/dist/mpi.hpp>
#endif

#include <cstdio>
#include <cstdlib>
#include <optional>

namespace qlora::train_example {

class Job {
 public:
  Job(int& argc, char**& argv) {
#if QLORA_TRAIN_WITH_MPI
    if (launched_by_mpirun()) {
      session_.emplace(argc, argv);
      mpi_.emplace();
      if (mpi_->rank() != 0) (void)std::freopen("/dev/null", "w", stdout);
    }
#else
    (void)argc;
    (void)argv;
#endif
  }

  [[nodiscard]] int rank() const { return distributed() ? mpi_rank() : 0; }
  [[nodiscard]] int size() const { return distributed() ? mpi_size() : 1; }
  [[nodiscard]] bool leader() const { return rank() == 0; }

  /// Calls f with the job's Communicator (Mpi, or SingleProcess for one process).
  template <class F>
  decltype(auto) visit(F&& f) {
#if QLORA_TRAIN_WITH_MPI
    if (mpi_) return f(*mpi_);
#endif
    return f(single_);
  }

  /// Ends every rank after an error on this one (the others would wait at their next collective).
  void abort_after_error() {
#if QLORA_TRAIN_WITH_MPI
    if (distributed() && mpi_size() > 1) MpiSession::abort(1);
#endif
  }

 private:
#if QLORA_TRAIN_WITH_MPI
  static bool launched_by_mpirun() {
    for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"}) {
      if (std::getenv(name) != nullptr) return true;
    }
    return false;
  }
  [[nodiscard]] bool distributed() const { return mpi_.has_value(); }
  [[nodiscard]] int mpi_rank() const { return mpi_->rank(); }
  [[nodiscard]] int mpi_size() const { return mpi_->size(); }
  std::optional<MpiSession> session_;
  std::optional<Mpi> mpi_;  // destroyed before the session
#else
  [[nodiscard]] bool distributed() const { return false; }
  [[nodiscard]] int mpi_rank() const { return 0; }
  [[nodiscard]] int mpi_size() const { return 1; }
#endif
  SingleProcess single_;
};

}  // namespace qlora::train_example
