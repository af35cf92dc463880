// The Communicator concept: what ZeroOptimizer and the data-parallel trainer
// need from a transport, and nothing more. Models: SingleProcess
// (dist/single_process.hpp), Mpi (dist/mpi.hpp, OpenMPI), Nccl (cuda/nccl.cuh,
// bootstrapped over Mpi). We never implement a transport of our own: each model
// forwards to a library that already moves bytes between processes well.
//
// The contract every model keeps (the MPI and NCCL one):
//   * every rank calls the same collectives, in the same order, with the same
//     element type, sizes and root; a rank that does not arrive is reported as
//     Error("CommunicatorTimeout") on the others after the communicator's
//     timeout, never a hang (dist/mpi.hpp says how the job then ends);
//   * buffers are host spans for SingleProcess and Mpi and device spans for
//     Nccl; input and output may be the same span where a call says so;
//   * sizes: reduce_scatter's input has size() x output.size() elements, rank
//     r receiving the reduction of block r; all_gather's output has size() x
//     input.size(), block r being rank r's input;
//   * ReduceOp::average is the sum divided by size(), in the element type's
//     arithmetic after the sum (fp32 sums then one division; bf16 sums in
//     fp32 pairwise as the transport orders them, rounded to bf16 after each
//     addition, as NCCL does).
//
// Elements: float and bf16 everywhere (the dtypes of gradients and weights);
// double and std::uint64_t for all_reduce (loss sums, token counts), and
// std::uint64_t for all_gather and broadcast (fingerprints, flags).
#pragma once

#include <concepts>
#include <cstdint>
#include <span>
#include <string_view>

#include <qlora/core/dtype.hpp>

namespace qlora {

enum class ReduceOp { sum, average };

inline constexpr std::string_view reduce_op_name(ReduceOp op) noexcept {
  return op == ReduceOp::sum ? "sum" : "average";
}

/// A transport of collectives among size() ranks (see the header comment for the contract).
template <class C>
concept Communicator = requires(C& comm, std::span<float> f32, std::span<bf16> b16, std::span<double> f64,
                                std::span<std::uint64_t> u64, std::span<const float> cf32,
                                std::span<const bf16> cb16, std::span<const std::uint64_t> cu64, ReduceOp op,
                                int root) {
  { comm.rank() } -> std::convertible_to<int>;
  { comm.size() } -> std::convertible_to<int>;
  comm.all_reduce(f32, op);  // in place
  comm.all_reduce(b16, op);
  comm.all_reduce(f64, op);
  comm.all_reduce(u64, op);
  comm.reduce_scatter(cf32, f32, op);
  comm.reduce_scatter(cb16, b16, op);
  comm.all_gather(cf32, f32);
  comm.all_gather(cb16, b16);
  comm.all_gather(cu64, u64);
  comm.broadcast(f32, root);  // in place: root's values everywhere
  comm.broadcast(b16, root);
  comm.broadcast(u64, root);
  comm.barrier();
};

}  // namespace qlora
