// Nccl: the Communicator (dist/communicator.hpp) over NCCL, for ranks that
// each drive one GPU. Buffers are device spans; every collective is enqueued
// on the communicator's stream and then waited for, so that buffers are safe
// to reuse when a call returns (the same contract as Mpi).
//
// Bootstrap: NCCL needs rank 0's ncclUniqueId on every rank; it travels by the
// broadcast of another Communicator (Mpi for a job started with mpirun, or
// SingleProcess for one rank), so NCCL never needs a transport of ours.
//
// No hangs: waiting polls the stream and ncclCommGetAsyncError against
// NcclOptions::timeout; on expiry or an asynchronous NCCL error the
// communicator is aborted (ncclCommAbort, which unblocks the stream) and
// Error("CommunicatorTimeout") / Error("NcclError") is thrown. Failed calls
// become Error("NcclError") naming the call and ncclGetErrorString.
//
// Reductions: fp32, fp64 and bf16 are NCCL's own (ncclBfloat16 sums in its
// ring order, rounding to bf16 as it goes); average is ncclAvg.
#pragma once

#if !defined(__CUDACC__)
#error "qlora/cuda/nccl.cuh needs nvcc"
#endif

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>

#include <fmt/format.h>

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/cuda/common.cuh>
#include <qlora/dist/communicator.hpp>
#include <qlora/dist/detail/collective_checks.hpp>

namespace qlora::cuda {

namespace detail {

inline void nccl_call(ncclResult_t status, std::string_view call, int rank) {
  if (status != ncclSuccess) [[unlikely]] {
    throw Error("NcclError", fmt::format("{} failed on rank {}: {}", call, rank, ncclGetErrorString(status)));
  }
}

template <class T>
ncclDataType_t nccl_datatype() {
  if constexpr (std::is_same_v<T, float>) {
    return ncclFloat32;
  } else if constexpr (std::is_same_v<T, double>) {
    return ncclFloat64;
  } else if constexpr (std::is_same_v<T, bf16>) {
    return ncclBfloat16;
  } else {
    static_assert(std::is_same_v<T, std::uint64_t>, "Nccl moves float, double, bf16 and std::uint64_t");
    return ncclUint64;
  }
}

inline ncclRedOp_t nccl_op(ReduceOp op) { return op == ReduceOp::sum ? ncclSum : ncclAvg; }

}  // namespace detail

struct NcclOptions {
  /// How long a collective waits for the other ranks before the communicator is aborted.
  std::chrono::milliseconds timeout = std::chrono::minutes(10);
};

/// One rank's NCCL communicator on the current CUDA device. Move-only.
class Nccl {
 public:
  /// Collective over `bootstrap`'s ranks (which become this communicator's, same numbering):
  /// rank 0 makes the unique id and broadcasts it. `stream` carries every collective.
  template <Communicator Bootstrap>
  Nccl(Bootstrap& bootstrap, cudaStream_t stream, NcclOptions options = {})
      : options_(options), stream_(stream), rank_(bootstrap.rank()), size_(bootstrap.size()) {
    check(options.timeout.count() > 0, "InvalidArgument", "Nccl: timeout is {} ms, expected > 0",
          options.timeout.count());
    // ncclUniqueId is 128 opaque bytes: sent as 16 uint64 words.
    static_assert(sizeof(ncclUniqueId) % sizeof(std::uint64_t) == 0);
    ncclUniqueId id{};
    if (rank_ == 0) detail::nccl_call(ncclGetUniqueId(&id), "ncclGetUniqueId", rank_);
    std::uint64_t words[sizeof(ncclUniqueId) / sizeof(std::uint64_t)];
    std::memcpy(words, &id, sizeof id);
    bootstrap.broadcast(std::span<std::uint64_t>(words), 0);
    std::memcpy(&id, words, sizeof id);
    detail::nccl_call(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank", rank_);
    QLORA_CUDA_CHECK(cudaMallocAsync(&barrier_word_, sizeof(float), stream_));
  }
  Nccl(const Nccl&) = delete;
  Nccl& operator=(const Nccl&) = delete;
  Nccl(Nccl&& other) noexcept
      : options_(other.options_),
        stream_(other.stream_),
        comm_(std::exchange(other.comm_, nullptr)),
        barrier_word_(std::exchange(other.barrier_word_, nullptr)),
        rank_(other.rank_),
        size_(other.size_),
        aborted_(other.aborted_) {}
  Nccl& operator=(Nccl&&) = delete;
  ~Nccl() {
    if (barrier_word_ != nullptr) (void)cudaFreeAsync(barrier_word_, stream_);
    if (comm_ != nullptr && !aborted_) (void)ncclCommDestroy(comm_);
  }

  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int size() const noexcept { return size_; }
  [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }

  /// In place, on device memory.
  template <class T>
  void all_reduce(std::span<T> data, ReduceOp op) {
    detail::nccl_call(ncclAllReduce(data.data(), data.data(), data.size(), detail::nccl_datatype<T>(),
                                    detail::nccl_op(op), live(), stream_),
                      "ncclAllReduce", rank_);
    wait("all_reduce", data.size());
  }

  /// output (on rank r) = the reduction of input's block r. NCCL allows input and output to
  /// overlap only as output = input's own block; other overlaps are refused.
  template <class T>
  void reduce_scatter(std::span<const T> input, std::span<T> output, ReduceOp op) {
    qlora::detail::check_reduce_scatter_sizes("Nccl", input.size(), output.size(), size_);
    const bool in_place = input.data() + static_cast<std::size_t>(rank_) * output.size() == output.data();
    check(in_place || disjoint(input, output), "InvalidArgument",
          "Nccl reduce_scatter on rank {}: input and output overlap other than in place", rank_);
    detail::nccl_call(ncclReduceScatter(input.data(), output.data(), output.size(), detail::nccl_datatype<T>(),
                                        detail::nccl_op(op), live(), stream_),
                      "ncclReduceScatter", rank_);
    wait("reduce_scatter", input.size());
  }

  /// output = every rank's input, rank by rank; input may be this rank's own block of output.
  template <class T>
  void all_gather(std::span<const T> input, std::span<T> output) {
    qlora::detail::check_all_gather_sizes("Nccl", input.size(), output.size(), size_);
    const bool in_place = input.data() == output.data() + static_cast<std::size_t>(rank_) * input.size();
    check(in_place || disjoint(input, output), "InvalidArgument",
          "Nccl all_gather on rank {}: input and output overlap other than in place", rank_);
    detail::nccl_call(
        ncclAllGather(input.data(), output.data(), input.size(), detail::nccl_datatype<T>(), live(), stream_),
        "ncclAllGather", rank_);
    wait("all_gather", output.size());
  }

  /// In place: root's data on every rank.
  template <class T>
  void broadcast(std::span<T> data, int root) {
    qlora::detail::check_root("Nccl", root, size_);
    detail::nccl_call(
        ncclBroadcast(data.data(), data.data(), data.size(), detail::nccl_datatype<T>(), root, live(), stream_),
        "ncclBroadcast", rank_);
    wait("broadcast", data.size());
  }

  /// NCCL has no barrier: an all-reduce of one float does the same.
  void barrier() { all_reduce(std::span<float>(barrier_word_, 1), ReduceOp::sum); }

 private:
  template <class T>
  static bool disjoint(std::span<const T> a, std::span<T> b) {
    return a.data() + a.size() <= b.data() || b.data() + b.size() <= a.data();
  }

  ncclComm_t live() const {
    check(!aborted_, "NcclError", "Nccl rank {}: the communicator was aborted after an earlier failure", rank_);
    return comm_;
  }

  /// Waits for the stream, polling NCCL's asynchronous error, until `options_.timeout`.
  void wait(std::string_view collective, std::size_t elements) {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    for (;;) {
      const cudaError_t status = cudaStreamQuery(stream_);
      if (status == cudaSuccess) return;
      if (status != cudaErrorNotReady) QLORA_CUDA_CHECK(status);
      ncclResult_t async = ncclSuccess;
      detail::nccl_call(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError", rank_);
      const auto waited = clock::now() - start;
      if (async != ncclSuccess || waited >= options_.timeout) {
        (void)ncclCommAbort(comm_);  // unblocks the stream; the communicator is unusable from here
        aborted_ = true;
        check(async == ncclSuccess, "NcclError", "Nccl rank {} of {}: {} of {} elements failed: {}", rank_, size_,
              collective, elements, ncclGetErrorString(async));
        throw Error("CommunicatorTimeout",
                    fmt::format("Nccl rank {} of {}: {} of {} elements waited {} ms for the other ranks (one died, "
                                "hangs, or called a different collective); the communicator is aborted",
                                rank_, size_, collective, elements,
                                std::chrono::duration_cast<std::chrono::milliseconds>(waited).count()));
      }
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  NcclOptions options_;
  cudaStream_t stream_ = nullptr;
  ncclComm_t comm_ = nullptr;
  float* barrier_word_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
  bool aborted_ = false;
};

static_assert(Communicator<Nccl>);

}  // namespace qlora::cuda
