// parallel_for: split an index range over std::threads. Header-only and free
// of OpenMP so that consumers need no extra compiler flag; the work items we
// hand it (quantization blocks, rows) are coarse, so thread start-up cost is
// small next to the work.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace qlora {

/// Number of worker threads parallel_for uses by default (hardware threads, at least 1).
inline unsigned default_thread_count() noexcept {
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1u : hw;
}

/// Calls `body(begin, end)` on disjoint chunks covering [0, count), using up to
/// `threads` threads, with chunks of at least `min_chunk` items so that tiny
/// ranges run inline. The first exception thrown by any chunk is rethrown
/// after every thread has joined.
template <class Body>
void parallel_for(std::int64_t count, std::int64_t min_chunk, Body&& body,
                  unsigned threads = default_thread_count()) {
  if (count <= 0) return;
  const std::int64_t max_workers = std::max<std::int64_t>(1, count / std::max<std::int64_t>(1, min_chunk));
  const auto workers = static_cast<unsigned>(std::min<std::int64_t>(threads, max_workers));
  if (workers <= 1) {
    body(std::int64_t{0}, count);
    return;
  }
  std::vector<std::exception_ptr> errors(workers);
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  const auto chunk_bounds = [&](unsigned worker) {
    return std::int64_t(worker) * count / std::int64_t(workers);
  };
  const auto run = [&](unsigned worker) {
    try {
      body(chunk_bounds(worker), chunk_bounds(worker + 1));
    } catch (...) {
      errors[worker] = std::current_exception();
    }
  };
  for (unsigned worker = 1; worker < workers; ++worker) pool.emplace_back(run, worker);
  run(0);
  for (auto& thread : pool) thread.join();
  for (auto& error : errors) {
    if (error) std::rethrow_exception(error);
  }
}

}  // namespace qlora
