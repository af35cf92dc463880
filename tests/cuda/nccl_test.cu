// The NCCL communicator with one rank (bootstrapped over SingleProcess): every
// collective on device buffers gives the one-rank result, bit for bit (sums
// of one term and averages over one rank change no value), and bad sizes are
// refused before NCCL sees them. Multi-rank runs need one GPU per rank under
// mpirun (Mpi as the bootstrap); that is not in the suite. Without a GPU the
// test exits 77 (skipped, tests/cuda/support.cuh).
#include <qlora/cuda/nccl.cuh>
#include <qlora/dist/single_process.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <span>
#include <vector>

#include "cuda/device_tensors.cuh"
#include "cuda/support.cuh"
#include "support/errors.hpp"

using namespace qlora;
namespace qcuda = qlora::cuda;  // `cuda::` alone is ambiguous with CCCL's ::cuda under `using namespace qlora`

namespace {

template <class T>
std::vector<T> to_host(const qcuda::DeviceBuffer<T>& buffer) {
  std::vector<T> host(buffer.size());
  qcuda::copy_to_host(std::span<T>(host), buffer.data(), nullptr);
  qcuda::synchronize(nullptr);
  return host;
}

}  // namespace

TEST_CASE("Nccl with one rank: every collective is the identity on device memory", "[cuda][dist][nccl]") {
  SingleProcess bootstrap;
  qcuda::Nccl nccl(bootstrap, nullptr);
  CHECK(nccl.rank() == 0);
  CHECK(nccl.size() == 1);
  const std::vector<float> values = test::normalish(1000, 7, 1.0);

  qcuda::DeviceBuffer<float> data = qcuda::to_device(std::span<const float>(values), nullptr);
  nccl.all_reduce(data.span(), ReduceOp::sum);
  CHECK(to_host(data) == values);
  nccl.all_reduce(data.span(), ReduceOp::average);
  CHECK(to_host(data) == values);

  std::vector<bf16> halves;
  for (const float v : values) halves.push_back(bf16::from_float(v));
  qcuda::DeviceBuffer<bf16> half_data = qcuda::to_device(std::span<const bf16>(halves), nullptr);
  nccl.all_reduce(half_data.span(), ReduceOp::sum);
  CHECK(to_host(half_data) == halves);

  qcuda::DeviceBuffer<float> out(values.size(), nullptr);
  nccl.reduce_scatter(std::span<const float>(data.span()), out.span(), ReduceOp::sum);
  CHECK(to_host(out) == values);
  nccl.all_gather(std::span<const float>(out.span()), out.span());  // in place: rank 0's block is everything
  CHECK(to_host(out) == values);
  std::vector<std::uint64_t> words{1, 2, 3};
  qcuda::DeviceBuffer<std::uint64_t> word_data = qcuda::to_device(std::span<const std::uint64_t>(words), nullptr);
  nccl.broadcast(word_data.span(), 0);
  CHECK(to_host(word_data) == words);
  nccl.barrier();

  qcuda::DeviceBuffer<float> short_out(values.size() - 1, nullptr);
  test::require_error([&] { nccl.reduce_scatter(std::span<const float>(data.span()), short_out.span(), ReduceOp::sum); },
                      "ShapeMismatch", "Nccl reduce_scatter: input has 1000 elements");
  test::require_error([&] { nccl.broadcast(data.span(), 1); }, "InvalidArgument", "root 1");
}
