// SingleProcess: the Communicator of a run with one rank. Every collective is
// the identity (reduce_scatter and all_gather copy; average divides by one),
// so code written for N ranks runs unchanged, and without MPI, on one.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>

#include <qlora/core/dtype.hpp>
#include <qlora/dist/communicator.hpp>
#include <qlora/dist/detail/collective_checks.hpp>

namespace qlora {

class SingleProcess {
 public:
  [[nodiscard]] int rank() const noexcept { return 0; }
  [[nodiscard]] int size() const noexcept { return 1; }

  template <class T>
  void all_reduce(std::span<T>, ReduceOp) {}

  template <class T>
  void reduce_scatter(std::span<const T> input, std::span<T> output, ReduceOp) {
    detail::check_reduce_scatter_sizes("SingleProcess", input.size(), output.size(), 1);
    if (input.data() != output.data()) std::ranges::copy(input, output.begin());
  }

  template <class T>
  void all_gather(std::span<const T> input, std::span<T> output) {
    detail::check_all_gather_sizes("SingleProcess", input.size(), output.size(), 1);
    if (input.data() != output.data()) std::ranges::copy(input, output.begin());
  }

  template <class T>
  void broadcast(std::span<T>, int root) {
    detail::check_root("SingleProcess", root, 1);
  }

  void barrier() {}
};

static_assert(Communicator<SingleProcess>);

}  // namespace qlora
