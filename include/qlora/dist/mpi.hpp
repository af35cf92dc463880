// Mpi: the Communicator over MPI (OpenMPI from Debian, or any MPI-3 library)
// for CPU ranks started with `mpirun -np N program`. MpiSession owns
// MPI_Init_thread / MPI_Finalize for the program.
//
// No hangs. Every collective is MPI-3's non-blocking form (MPI_Iallreduce,
// ...) completed by polling MPI_Test against a deadline: a rank that does not
// arrive within MpiOptions::timeout (it died, hangs, or called another
// collective) makes the waiting ranks throw Error("CommunicatorTimeout")
// naming the collective and the wait. The request cannot be cancelled, so the
// job must not go on: MpiSession's destructor then calls MPI_Abort instead of
// MPI_Finalize (which would wait for the missing rank forever), and mpirun
// ends every rank. A rank that dies outright is noticed by mpirun itself,
// which ends the others. Calls return MPI errors instead of aborting
// (MPI_ERRORS_RETURN on our own duplicate of MPI_COMM_WORLD), and each
// becomes Error("MpiError") naming the call and MPI's message.
//
// Reductions: fp32 with MPI_SUM; bf16 as MPI_UINT16_T with our own MPI_Op
// that adds in fp32 and rounds back to bf16 after each addition (what NCCL's
// bf16 sum does; MPI has no bf16 type). Average divides the sum by size().
// Threads: MPI_THREAD_FUNNELED — collectives come from the thread that
// created the session; the worker threads of parallel_for never call MPI.
#pragma once

// Only MPI's C API is used: keep OpenMPI's (and MPICH's) deprecated C++ bindings out.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>

#include <fmt/format.h>

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/dist/communicator.hpp>
#include <qlora/dist/detail/collective_checks.hpp>

namespace qlora {

namespace detail {

/// Set when a collective gave up: MPI is then left with a pending request.
inline std::atomic<bool>& mpi_collective_abandoned() {
  static std::atomic<bool> abandoned{false};
  return abandoned;
}

inline std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return "error code " + std::to_string(code);
  return std::string(text, static_cast<std::size_t>(length));
}

inline void mpi_call(int status, std::string_view call, int rank) {
  if (status != MPI_SUCCESS) [[unlikely]] {
    throw Error("MpiError", fmt::format("{} failed on rank {}: {}", call, rank, mpi_error_text(status)));
  }
}

template <class T>
MPI_Datatype mpi_datatype() {
  if constexpr (std::is_same_v<T, float>) {
    return MPI_FLOAT;
  } else if constexpr (std::is_same_v<T, double>) {
    return MPI_DOUBLE;
  } else if constexpr (std::is_same_v<T, bf16>) {
    return MPI_UINT16_T;
  } else {
    static_assert(std::is_same_v<T, std::uint64_t>, "Mpi moves float, double, bf16 and std::uint64_t");
    return MPI_UINT64_T;
  }
}

template <class T>
constexpr std::string_view element_name() {
  if constexpr (std::is_same_v<T, float>) {
    return "float";
  } else if constexpr (std::is_same_v<T, double>) {
    return "double";
  } else if constexpr (std::is_same_v<T, bf16>) {
    return "bf16";
  } else {
    return "uint64";
  }
}

/// MPI_User_function: inout[i] = bf16(float(in[i]) + float(inout[i])).
inline void bf16_sum(void* in, void* inout, int* count, MPI_Datatype*) {
  const auto* a = static_cast<const bf16*>(in);
  auto* b = static_cast<bf16*>(inout);
  for (int i = 0; i < *count; ++i) b[i] = bf16::from_float(a[i].to_float() + b[i].to_float());
}

/// values /= ranks, in T's arithmetic (bf16: in fp32, rounded once; integers: truncated).
template <class T>
void divide_by(std::span<T> values, int ranks) {
  for (T& value : values) {
    if constexpr (std::is_same_v<T, bf16>) {
      value = bf16::from_float(value.to_float() / static_cast<float>(ranks));
    } else {
      value = static_cast<T>(value / static_cast<T>(ranks));
    }
  }
}

}  // namespace detail

/// Owns MPI for the program: MPI_Init_thread(FUNNELED) on construction (unless
/// MPI is already initialized, in which case the session owns nothing) and,
/// on destruction, MPI_Finalize — or MPI_Abort when a collective gave up
/// (see the header comment), so that no rank is left waiting.
class MpiSession {
 public:
  MpiSession(int& argc, char**& argv) {
    int initialized = 0;
    detail::mpi_call(MPI_Initialized(&initialized), "MPI_Initialized", -1);
    if (initialized != 0) return;
    int provided = 0;
    detail::mpi_call(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread", -1);
    owner_ = true;
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  ~MpiSession() {
    if (!owner_) return;
    if (detail::mpi_collective_abandoned()) {
      MPI_Abort(MPI_COMM_WORLD, 1);
    } else {
      MPI_Finalize();
    }
  }

  /// Ends every rank of the job with `exit_code` (after an error on this rank that the others
  /// cannot know of: without it they would wait in their next collective until the timeout).
  [[noreturn]] static void abort(int exit_code) {
    MPI_Abort(MPI_COMM_WORLD, exit_code);
    std::abort();  // MPI_Abort does not return; this satisfies [[noreturn]] if it ever did
  }

 private:
  bool owner_ = false;
};

struct MpiOptions {
  /// How long a collective waits for the other ranks before it throws CommunicatorTimeout.
  /// Generous by default: one rank may be busy alone (writing a checkpoint, evaluating).
  std::chrono::milliseconds timeout = std::chrono::minutes(10);
};

/// The Communicator over MPI_COMM_WORLD (a duplicate of it: our traffic never mixes with the
/// application's). Needs an MpiSession (or MPI initialized by the application). Move-only.
class Mpi {
 public:
  explicit Mpi(MpiOptions options = {}) : options_(options) {
    int initialized = 0;
    detail::mpi_call(MPI_Initialized(&initialized), "MPI_Initialized", -1);
    check(initialized != 0, "MpiError", "Mpi: MPI is not initialized; create an MpiSession in main first");
    check(options.timeout.count() > 0, "InvalidArgument", "Mpi: timeout is {} ms, expected > 0",
          options.timeout.count());
    detail::mpi_call(MPI_Comm_dup(MPI_COMM_WORLD, &comm_), "MPI_Comm_dup", -1);
    detail::mpi_call(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler", -1);
    detail::mpi_call(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank", -1);
    detail::mpi_call(MPI_Comm_size(comm_, &size_), "MPI_Comm_size", rank_);
    detail::mpi_call(MPI_Op_create(&detail::bf16_sum, 1, &bf16_sum_), "MPI_Op_create", rank_);
  }
  Mpi(const Mpi&) = delete;
  Mpi& operator=(const Mpi&) = delete;
  Mpi(Mpi&& other) noexcept
      : options_(other.options_),
        comm_(std::exchange(other.comm_, MPI_COMM_NULL)),
        bf16_sum_(std::exchange(other.bf16_sum_, MPI_OP_NULL)),
        rank_(other.rank_),
        size_(other.size_) {}
  Mpi& operator=(Mpi&&) = delete;
  ~Mpi() {
    // After an abandoned collective the communicator still has a request pending: leave it to MPI_Abort.
    if (detail::mpi_collective_abandoned()) return;
    if (bf16_sum_ != MPI_OP_NULL) MPI_Op_free(&bf16_sum_);
    if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int size() const noexcept { return size_; }
  [[nodiscard]] std::chrono::milliseconds timeout() const noexcept { return options_.timeout; }

  /// In place: every rank ends with the element-wise sum (or average) over the ranks.
  template <class T>
  void all_reduce(std::span<T> data, ReduceOp op) {
    MPI_Request request = MPI_REQUEST_NULL;
    detail::mpi_call(MPI_Iallreduce(MPI_IN_PLACE, data.data(), count_of(data.size(), "all_reduce"),
                                    detail::mpi_datatype<T>(), sum_op<T>(), comm_, &request),
                     "MPI_Iallreduce", rank_);
    wait(request, "all_reduce", data.size(), detail::element_name<T>());
    if (op == ReduceOp::average) detail::divide_by(data, size_);
  }

  /// output (on rank r) = the reduction over the ranks of input's block r. input and output
  /// must not overlap.
  template <class T>
  void reduce_scatter(std::span<const T> input, std::span<T> output, ReduceOp op) {
    detail::check_reduce_scatter_sizes("Mpi", input.size(), output.size(), size_);
    check_disjoint(input.data(), input.size(), output.data(), output.size(), "reduce_scatter");
    MPI_Request request = MPI_REQUEST_NULL;
    detail::mpi_call(MPI_Ireduce_scatter_block(input.data(), output.data(), count_of(output.size(), "reduce_scatter"),
                                               detail::mpi_datatype<T>(), sum_op<T>(), comm_, &request),
                     "MPI_Ireduce_scatter_block", rank_);
    wait(request, "reduce_scatter", input.size(), detail::element_name<T>());
    if (op == ReduceOp::average) detail::divide_by(output, size_);
  }

  /// output = every rank's input, rank by rank. input may be this rank's own block of output
  /// (in place); otherwise the two must not overlap.
  template <class T>
  void all_gather(std::span<const T> input, std::span<T> output) {
    detail::check_all_gather_sizes("Mpi", input.size(), output.size(), size_);
    const bool in_place = input.data() == output.data() + static_cast<std::size_t>(rank_) * input.size();
    if (!in_place) check_disjoint(input.data(), input.size(), output.data(), output.size(), "all_gather");
    const int count = count_of(input.size(), "all_gather");
    const MPI_Datatype type = detail::mpi_datatype<T>();
    MPI_Request request = MPI_REQUEST_NULL;
    detail::mpi_call(MPI_Iallgather(in_place ? MPI_IN_PLACE : input.data(), count, type, output.data(), count, type,
                                    comm_, &request),
                     "MPI_Iallgather", rank_);
    wait(request, "all_gather", output.size(), detail::element_name<T>());
  }

  /// In place: root's data on every rank.
  template <class T>
  void broadcast(std::span<T> data, int root) {
    detail::check_root("Mpi", root, size_);
    MPI_Request request = MPI_REQUEST_NULL;
    detail::mpi_call(
        MPI_Ibcast(data.data(), count_of(data.size(), "broadcast"), detail::mpi_datatype<T>(), root, comm_, &request),
        "MPI_Ibcast", rank_);
    wait(request, "broadcast", data.size(), detail::element_name<T>());
  }

  void barrier() {
    MPI_Request request = MPI_REQUEST_NULL;
    detail::mpi_call(MPI_Ibarrier(comm_, &request), "MPI_Ibarrier", rank_);
    wait(request, "barrier", 0, "");
  }

 private:
  template <class T>
  MPI_Op sum_op() const {
    return std::is_same_v<T, bf16> ? bf16_sum_ : MPI_SUM;
  }

  int count_of(std::size_t elements, std::string_view collective) const {
    check(elements <= static_cast<std::size_t>(INT_MAX), "ShapeMismatch",
          "Mpi {} on rank {}: {} elements exceed MPI's int count ({}); send it in parts", collective, rank_, elements,
          INT_MAX);
    return static_cast<int>(elements);
  }

  template <class T>
  void check_disjoint(const T* a, std::size_t a_size, const T* b, std::size_t b_size,
                      std::string_view collective) const {
    const bool disjoint = a + a_size <= b || b + b_size <= a;
    check(disjoint || a_size == 0 || b_size == 0, "InvalidArgument",
          "Mpi {} on rank {}: input and output overlap (only all_gather from this rank's own block is in place)",
          collective, rank_);
  }

  /// Completes `request` by polling (MPI progresses inside MPI_Test), busy at first, then
  /// sleeping briefly so that oversubscribed ranks leave the cores to the others.
  void wait(MPI_Request& request, std::string_view collective, std::size_t elements, std::string_view type) {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    const auto deadline = start + options_.timeout;
    for (long polls = 0;; ++polls) {
      int done = 0;
      detail::mpi_call(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "MPI_Test", rank_);
      if (done != 0) return;
      if (polls < 1000) continue;
      const auto now = clock::now();
      if (now >= deadline) {
        detail::mpi_collective_abandoned() = true;
        throw Error("CommunicatorTimeout",
                    fmt::format("Mpi rank {} of {}: {} of {} {} elements waited {} ms for the other ranks (one died, "
                                "hangs, or called a different collective); the job cannot continue",
                                rank_, size_, collective, elements, type,
                                std::chrono::duration_cast<std::chrono::milliseconds>(now - start).count()));
      }
      if (now - start < std::chrono::milliseconds(10)) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
    }
  }

  MpiOptions options_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Op bf16_sum_ = MPI_OP_NULL;
  int rank_ = 0;
  int size_ = 1;
};

static_assert(Communicator<Mpi>);

}  // namespace qlora
