// What the 4-bit benchmarks run on: real layer shapes (Llama-style 4096x4096,
// Phi-2's 2560x10240 MLP), with double quantization off and on, and a
// N(0, 0.02) bf16 weight like an initialised linear layer's.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include <qlora/core/dtype.hpp>

namespace qlora::bench {

inline std::vector<bf16> random_weight(std::int64_t rows, std::int64_t cols) {
  std::mt19937 generator(1234);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<bf16> weight(static_cast<std::size_t>(rows * cols));
  for (auto& value : weight) value = bf16::from_float(normal(generator));
  return weight;
}

/// Registers {rows, cols, nested} for both shapes; times are manual (the
/// benchmark measures its own operation, apart from the baseline).
inline void layer_shapes(benchmark::internal::Benchmark* b, benchmark::TimeUnit unit) {
  for (const auto nested : {0, 1}) {
    b->Args({4096, 4096, nested});
    b->Args({2560, 10240, nested});
  }
  b->ArgNames({"rows", "cols", "nested"})->UseManualTime()->Unit(unit);
}

}  // namespace qlora::bench
