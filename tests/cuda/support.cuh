// Shared pieces of the GPU tests: the no-device skip (exit code 77, which
// CTest reports as "Skipped" through SKIP_RETURN_CODE), bit-exact comparison
// helpers with a readable first-mismatch report, and test inputs with the
// awkward cases (all-zero blocks, subnormals, one-hot blocks, -0.0).
#pragma once

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <qlora/core/dtype.hpp>
#include <qlora/quant/quant_state.hpp>

#include "support/splitmix.hpp"

namespace qlora::test {

/// Exit code CTest's SKIP_RETURN_CODE maps to "Skipped" (tests/CMakeLists.txt).
inline constexpr int skip_exit_code = 77;

/// Runs before main: without a usable CUDA device the test executable says
/// so and exits with 77, so that it is reported as skipped, never as passed.
[[maybe_unused]] static const bool cuda_device_present = [] {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    std::fprintf(stderr, "SKIPPED: no usable CUDA device (%s); this GPU test needs one\n",
                 status != cudaSuccess ? cudaGetErrorString(status) : "device count is 0");
    std::exit(skip_exit_code);
  }
  return true;
}();

/// Index of the first element whose bytes differ, or -1.
template <class T>
std::int64_t first_bit_mismatch(std::span<const T> a, std::span<const T> b) {
  if (a.size() != b.size()) return static_cast<std::int64_t>(a.size() < b.size() ? a.size() : b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return static_cast<std::int64_t>(i);
  }
  return -1;
}

template <class T>
std::uint64_t bits_of(const T& value) {
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

/// "" when `gpu` and `cpu` are bit-identical, else a description of the first difference.
template <class T>
std::string describe_mismatch(const char* what, const std::vector<T>& gpu, const std::vector<T>& cpu) {
  const std::int64_t i = first_bit_mismatch(std::span<const T>(gpu), std::span<const T>(cpu));
  if (i < 0) return {};
  if (gpu.size() != cpu.size()) return fmt::format("{}: gpu has {} entries, cpu {}", what, gpu.size(), cpu.size());
  const auto k = static_cast<std::size_t>(i);
  return fmt::format("{}: first difference at {} of {}: gpu bits {:#x}, cpu bits {:#x}", what, i, gpu.size(),
                     bits_of(gpu[k]), bits_of(cpu[k]));
}

/// Every field of two 4-bit tensors, bit for bit; "" when identical.
inline std::string describe_mismatch(const Quantized4bit& gpu, const Quantized4bit& cpu) {
  const QuantState& g = gpu.state;
  const QuantState& c = cpu.state;
  if (g.quant_type != c.quant_type || g.blocksize != c.blocksize || g.dtype != c.dtype || g.shape != c.shape) {
    return "quant state metadata (type, blocksize, dtype or shape) differs";
  }
  if (auto m = describe_mismatch("packed", gpu.packed, cpu.packed); !m.empty()) return m;
  if (auto m = describe_mismatch("absmax", g.absmax, c.absmax); !m.empty()) return m;
  if (g.nested.has_value() != c.nested.has_value()) return "one state is nested, the other is not";
  if (g.nested) {
    if (bits_of(g.nested->offset) != bits_of(c.nested->offset)) {
      return fmt::format("nested offset: gpu {} ({:#x}), cpu {} ({:#x})", g.nested->offset, bits_of(g.nested->offset),
                         c.nested->offset, bits_of(c.nested->offset));
    }
    if (auto m = describe_mismatch("nested codes", g.nested->codes, c.nested->codes); !m.empty()) return m;
    if (auto m = describe_mismatch("nested absmax", g.nested->absmax, c.nested->absmax); !m.empty()) return m;
    if (auto m = describe_mismatch("nested code map", g.nested->code_map, c.nested->code_map); !m.empty()) return m;
  }
  return {};
}

/// Test values for `n` elements in blocks of `blocksize`, as T. Most blocks
/// hold sums of uniforms (nf4_spec.md §10's generator) at a scale that changes
/// from block to block (2^-6 .. 2^4); every 7th block is all zero, every 11th
/// subnormal-sized (flushed to 0 in fp16), every 13th has a single non-zero
/// element, and every 5th element of every 17th block is -0.0.
template <class T>
std::vector<T> test_values(std::int64_t n, std::int64_t blocksize, std::uint64_t seed) {
  std::vector<T> values(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t block = i / blocksize;
    float value;
    if (block % 7 == 3) {
      value = 0.0f;
    } else if (block % 13 == 5) {
      value = (i % blocksize == (block * 31) % blocksize) ? splitmix_value(seed + static_cast<std::uint64_t>(i), 1.0) : 0.0f;
    } else if (block % 11 == 4) {
      value = splitmix_value(seed + static_cast<std::uint64_t>(i), 1e-39);
    } else if (block % 17 == 9 && i % 5 == 0) {
      value = -0.0f;
    } else {
      value = splitmix_value(seed + static_cast<std::uint64_t>(i), std::ldexp(1.0, static_cast<int>(block % 11) - 6));
    }
    values[static_cast<std::size_t>(i)] = from_float<T>(value);
  }
  return values;
}

/// Runs `f` and returns the qlora::Error it throws (fails the test if none).
template <class F>
qlora::Error error_of(F&& f) {
  try {
    f();
  } catch (const qlora::Error& error) {
    return error;
  }
  FAIL("expected a qlora::Error");
  throw std::logic_error("unreachable");
}

}  // namespace qlora::test
