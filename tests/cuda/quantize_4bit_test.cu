// GPU 4-bit quantization (cuda/quantize_4bit.cuh) against the CPU reference
// quantize_4bit_ref, bit for bit: packed codes, absmax and, with double
// quantization, the nested codes, absmax2 and offset. Every policy x input
// dtype x blocksize x double-quant combination over awkward sizes, unaligned
// pointers, NaN/Inf and argument errors, and a > 2^31-element tensor when the
// device has the memory. Exits 77 (skipped) where there is no CUDA device.
// The umbrella header, so the whole library is compiled by nvcc at least once.
#include <qlora/qlora.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "cuda/support.cuh"

namespace {

using namespace qlora;
using test::error_of;
namespace qcuda = qlora::cuda;  // `cuda::` alone is ambiguous with CCCL's ::cuda under `using namespace qlora`
using qlora::test::describe_mismatch;
using qlora::test::test_values;

template <class Q_, class T_>
struct Case {
  using Q = Q_;
  using T = T_;
};
using Nf4Float = Case<NF4, float>;
using Nf4Bf16 = Case<NF4, bf16>;
using Nf4Fp16 = Case<NF4, fp16>;
using Fp4Float = Case<FP4, float>;
using Fp4Bf16 = Case<FP4, bf16>;
using Fp4Fp16 = Case<FP4, fp16>;

constexpr std::int64_t all_blocksizes[] = {32, 64, 128, 256, 512, 1024, 2048, 4096};

/// Element counts that hit every edge of the tiling: tiny, odd, one block
/// +-1, tile edges (4096 elements per CTA tile), more than 256 blocks (two
/// nested blocks, the second partial), full and partial last blocks.
std::vector<std::int64_t> awkward_sizes(std::int64_t blocksize) {
  std::vector<std::int64_t> sizes = {1,         2,         7,          31,           33,
                                     blocksize - 1, blocksize, blocksize + 1, 3 * blocksize + 17,
                                     4095,      4097,      8191,       8192 + 3,     257 * blocksize + 5,
                                     300 * blocksize, 600 * blocksize + 1};
  if (blocksize == 32) sizes.push_back(32 * 300000 + 7);  // > 1024 nested blocks: the offset's staged loop
  std::sort(sizes.begin(), sizes.end());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  return sizes;
}


}  // namespace

TEMPLATE_TEST_CASE("GPU quantize_4bit equals quantize_4bit_ref bit for bit", "[gpu][quantize]", Nf4Float, Nf4Bf16,
                   Nf4Fp16, Fp4Float, Fp4Bf16, Fp4Fp16) {
  using Q = typename TestType::Q;
  using T = typename TestType::T;
  for (const std::int64_t blocksize : all_blocksizes) {
    for (const std::int64_t n : awkward_sizes(blocksize)) {
      const std::vector<T> input = test_values<T>(n, blocksize, static_cast<std::uint64_t>(n * 7919 + blocksize));
      for (const bool nested : {false, true}) {
        CAPTURE(Q::name, dtype_name(dtype_of_v<T>), blocksize, n, nested);
        const Quantize4bitOptions options{.blocksize = blocksize, .double_quant = nested};
        const Quantized4bit cpu = quantize_4bit_ref<Q, T>(input, {n}, options);
        const Quantized4bit gpu = qcuda::quantize_4bit_host<Q, T>(input, {n}, options);
        REQUIRE(describe_mismatch(gpu, cpu) == "");
      }
    }
  }
}

TEMPLATE_TEST_CASE("GPU quantize_4bit: 2-D shapes whose rows do not divide into blocks", "[gpu][quantize]", Nf4Bf16,
                   Fp4Fp16) {
  using Q = typename TestType::Q;
  using T = typename TestType::T;
  const std::vector<std::vector<std::int64_t>> shapes = {{3, 5}, {7, 33}, {129, 65}, {640, 257}, {11, 4099}};
  for (const auto& shape : shapes) {
    const std::int64_t n = shape[0] * shape[1];
    for (const std::int64_t blocksize : {32, 64, 4096}) {
      const std::vector<T> input = test_values<T>(n, blocksize, 99);
      for (const bool nested : {false, true}) {
        CAPTURE(shape, blocksize, nested);
        const Quantize4bitOptions options{.blocksize = blocksize, .double_quant = nested};
        REQUIRE(describe_mismatch(qcuda::quantize_4bit_host<Q, T>(input, shape, options),
                                  quantize_4bit_ref<Q, T>(input, shape, options)) == "");
      }
    }
  }
}

TEMPLATE_TEST_CASE("GPU quantize_4bit: unaligned input and output pointers take the scalar path",
                   "[gpu][quantize]", Nf4Float, Nf4Bf16, Fp4Fp16) {
  using Q = typename TestType::Q;
  using T = typename TestType::T;
  const cudaStream_t stream = nullptr;
  for (const std::int64_t blocksize : {32, 256, 4096}) {
    for (const std::int64_t n : {std::int64_t{1}, std::int64_t{4097}, std::int64_t{20001}, 70 * blocksize + 3}) {
      for (const bool nested : {false, true}) {
        CAPTURE(blocksize, n, nested);
        const std::vector<T> input = test_values<T>(n, blocksize, 5);
        const Quantize4bitOptions options{.blocksize = blocksize, .double_quant = nested};
        const Quantized4bit cpu = quantize_4bit_ref<Q, T>(input, {n}, options);

        // The input one element past a 256-byte aligned allocation.
        qcuda::DeviceBuffer<T> shifted(input.size() + 1, stream);
        qcuda::copy_to_device(shifted.data() + 1, std::span<const T>(input), stream);
        const qcuda::DeviceQuantized4bit device =
            qcuda::quantize_4bit<Q, T>(std::span<const T>(shifted.data() + 1, input.size()), {n}, options, stream);
        REQUIRE(describe_mismatch(qcuda::download(device, stream), cpu) == "");

        // Packed output one byte off (async level, caller-owned outputs).
        const std::int64_t blocks = cpu.state.block_count();
        const std::int64_t nested_blocks = (blocks + 255) / 256;
        qcuda::DeviceBuffer<std::uint8_t> packed(static_cast<std::size_t>(cpu.state.packed_bytes() + 1), stream);
        qcuda::DeviceBuffer<float> absmax(static_cast<std::size_t>(blocks), stream);
        qcuda::DeviceBuffer<qcuda::Quantize4bitStatus> status(1, stream);
        qcuda::DeviceBuffer<std::uint8_t> codes(static_cast<std::size_t>(blocks), stream);
        qcuda::DeviceBuffer<float> absmax2(static_cast<std::size_t>(nested_blocks), stream);
        qcuda::DeviceBuffer<float> offset(1, stream);
        qcuda::DeviceBuffer<double> run_sums(static_cast<std::size_t>(nested_blocks), stream);
        const qcuda::DeviceCodeLut lut(stream);
        qcuda::Quantize4bitOutputs outputs{packed.data() + 1, absmax.data(), status.data()};
        if (nested) outputs = {packed.data() + 1, absmax.data(), status.data(), codes.data(), absmax2.data(),
                               offset.data(), run_sums.data()};
        qcuda::quantize_4bit_async<Q, T>(shifted.data() + 1, n, blocksize, nested, outputs, &lut, stream);
        qcuda::check_quantize_status(status.data(), shifted.data() + 1, stream);
        std::vector<std::uint8_t> host_packed(static_cast<std::size_t>(cpu.state.packed_bytes()));
        qcuda::copy_to_host(std::span<std::uint8_t>(host_packed), packed.data() + 1, stream);
        qcuda::synchronize(stream);
        REQUIRE(describe_mismatch("packed", host_packed, cpu.packed) == "");
        if (nested) {
          std::vector<std::uint8_t> host_codes(static_cast<std::size_t>(blocks));
          qcuda::copy_to_host(std::span<std::uint8_t>(host_codes), codes.data(), stream);
          qcuda::synchronize(stream);
          REQUIRE(describe_mismatch("nested codes", host_codes, cpu.state.nested->codes) == "");
        }
      }
    }
  }
}

TEST_CASE("GPU quantize_4bit: the first NaN or Inf is reported as the CPU path reports it", "[gpu][quantize][errors]") {
  const std::int64_t n = 5000;
  const std::vector<float> clean = test_values<float>(n, 64, 17);
  struct Poison {
    std::vector<std::int64_t> indices;
    std::vector<float> values;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<Poison> poisons = {
      {{0}, {nan}}, {{n - 1}, {inf}}, {{4096}, {-inf}}, {{1234, 77}, {nan, inf}}, {{3001, 3000, 4999}, {inf, -nan, nan}}};
  for (const auto& poison : poisons) {
    std::vector<float> input = clean;
    for (std::size_t k = 0; k < poison.indices.size(); ++k) input[static_cast<std::size_t>(poison.indices[k])] = poison.values[k];
    for (const bool nested : {false, true}) {
      for (const std::int64_t blocksize : {32, 64, 4096}) {
        CAPTURE(poison.indices, nested, blocksize);
        const Quantize4bitOptions options{.blocksize = blocksize, .double_quant = nested};
        const Error cpu = error_of([&] { (void)quantize_4bit_ref<NF4, float>(input, {n}, options); });
        const Error gpu = error_of([&] { (void)qcuda::quantize_4bit_host<NF4, float>(input, {n}, options); });
        CHECK(gpu.code() == "NonFiniteInput");
        CHECK(std::string(gpu.what()) == std::string(cpu.what()));
      }
    }
  }
  // The same through bf16 and fp16 input (Inf and NaN survive the conversion).
  std::vector<bf16> bf16_input = test_values<bf16>(n, 64, 3);
  bf16_input[2222] = bf16::from_float(inf);
  const Error bf16_error = error_of([&] { (void)qcuda::quantize_4bit_host<FP4, bf16>(bf16_input, {n}); });
  CHECK(std::string(bf16_error.what()) == "[NonFiniteInput] input element 2222 is inf; 4-bit quantization needs finite values");
  std::vector<fp16> fp16_input = test_values<fp16>(n, 64, 3);
  fp16_input[4321] = fp16::from_float(nan);
  const Error fp16_error = error_of([&] { (void)qcuda::quantize_4bit_host<NF4, fp16>(fp16_input, {n}, {.double_quant = true}); });
  CHECK(fp16_error.code() == "NonFiniteInput");
  CHECK_THAT(fp16_error.what(), Catch::Contains("input element 4321 is"));
}

TEST_CASE("GPU quantize_4bit: the status word is re-armed by every launch", "[gpu][quantize][errors]") {
  const cudaStream_t stream = nullptr;
  const std::int64_t n = 1000;
  std::vector<float> input = test_values<float>(n, 64, 8);
  const std::vector<float> clean = input;
  input[500] = std::numeric_limits<float>::quiet_NaN();
  qcuda::DeviceBuffer<float> device_input = qcuda::to_device(std::span<const float>(input), stream);
  qcuda::DeviceBuffer<std::uint8_t> packed(static_cast<std::size_t>((n + 1) / 2), stream);
  qcuda::DeviceBuffer<float> absmax(static_cast<std::size_t>((n + 63) / 64), stream);
  qcuda::DeviceBuffer<qcuda::Quantize4bitStatus> status(1, stream);
  const qcuda::Quantize4bitOutputs outputs{packed.data(), absmax.data(), status.data()};
  qcuda::quantize_4bit_async<NF4, float>(device_input.data(), n, 64, false, outputs, nullptr, stream);
  CHECK(error_of([&] { qcuda::check_quantize_status(status.data(), device_input.data(), stream); }).code() == "NonFiniteInput");
  qcuda::copy_to_device(device_input.data(), std::span<const float>(clean), stream);
  qcuda::quantize_4bit_async<NF4, float>(device_input.data(), n, 64, false, outputs, nullptr, stream);
  CHECK_NOTHROW(qcuda::check_quantize_status(status.data(), device_input.data(), stream));
}

TEST_CASE("GPU quantize_4bit: argument errors are named before anything runs", "[gpu][quantize][errors]") {
  const std::vector<bf16> input = test_values<bf16>(256, 64, 1);
  for (const std::int64_t blocksize : {0, -64, 16, 48, 96, 8192}) {
    CAPTURE(blocksize);
    const Error cpu = error_of([&] { (void)quantize_4bit_ref<NF4, bf16>(input, {256}, {.blocksize = blocksize}); });
    const Error gpu = error_of([&] { (void)qcuda::quantize_4bit_host<NF4, bf16>(input, {256}, {.blocksize = blocksize}); });
    CHECK(gpu.code() == "InvalidBlocksize");
    CHECK(std::string(gpu.what()) == std::string(cpu.what()));
    const Error async = error_of([&] {
      qcuda::quantize_4bit_async<NF4, bf16>(reinterpret_cast<const bf16*>(16), 256, blocksize, false,
                                           {reinterpret_cast<std::uint8_t*>(16), reinterpret_cast<float*>(16),
                                            reinterpret_cast<qcuda::Quantize4bitStatus*>(16)},
                                           nullptr, nullptr);
    });
    CHECK(async.code() == "InvalidBlocksize");
  }
  for (const auto& shape : std::vector<std::vector<std::int64_t>>{{255}, {16, 17}, {}, {0, 256}, {-1, -256}}) {
    CAPTURE(shape);
    const Error cpu = error_of([&] { (void)quantize_4bit_ref<NF4, bf16>(input, shape); });
    const Error gpu = error_of([&] { (void)qcuda::quantize_4bit_host<NF4, bf16>(input, shape); });
    CHECK(gpu.code() == "ShapeMismatch");
    CHECK(std::string(gpu.what()) == std::string(cpu.what()));
  }
  const auto* fake = reinterpret_cast<std::uint8_t*>(256);
  const qcuda::Quantize4bitOutputs no_packed{nullptr, reinterpret_cast<float*>(256),
                                            reinterpret_cast<qcuda::Quantize4bitStatus*>(256)};
  const Error null_packed = error_of([&] {
    qcuda::quantize_4bit_async<NF4, float>(reinterpret_cast<const float*>(fake), 64, 64, false, no_packed, nullptr, nullptr);
  });
  CHECK(null_packed.code() == "NullPointer");
  CHECK_THAT(null_packed.what(), Catch::Contains("outputs.packed"));
  const qcuda::Quantize4bitOutputs plain{const_cast<std::uint8_t*>(fake), reinterpret_cast<float*>(256),
                                        reinterpret_cast<qcuda::Quantize4bitStatus*>(256)};
  const Error no_nested = error_of([&] {
    qcuda::quantize_4bit_async<NF4, float>(reinterpret_cast<const float*>(fake), 64, 64, true, plain, nullptr, nullptr);
  });
  CHECK(no_nested.code() == "NullPointer");
  CHECK_THAT(no_nested.what(), Catch::Contains("outputs.nested_codes"));
  const Error null_input = error_of([&] {
    qcuda::quantize_4bit_async<NF4, float>(nullptr, 64, 64, false, plain, nullptr, nullptr);
  });
  CHECK(null_input.code() == "NullPointer");
  CHECK(error_of([&] {
          qcuda::quantize_4bit_async<NF4, float>(reinterpret_cast<const float*>(fake), 0, 64, false, plain, nullptr, nullptr);
        }).code() == "ShapeMismatch");
}

TEST_CASE("GPU quantize then dequantize stays on the device and matches the CPU round trip", "[gpu][quantize]") {
  const cudaStream_t stream = nullptr;
  const std::int64_t rows = 300, cols = 1000;  // 300,000 elements: 4,688 blocks of 64, 19 nested blocks
  const std::vector<bf16> input = test_values<bf16>(rows * cols, 64, 42);
  for (const bool nested : {false, true}) {
    CAPTURE(nested);
    const Quantize4bitOptions options{.blocksize = 64, .double_quant = nested};
    const Quantized4bit cpu = quantize_4bit_ref<NF4, bf16>(input, {rows, cols}, options);
    std::vector<bf16> cpu_out(input.size());
    dequantize_4bit_ref<bf16>(cpu.packed, cpu.state, std::span<bf16>(cpu_out));

    const qcuda::DeviceBuffer<bf16> device_input = qcuda::to_device(std::span<const bf16>(input), stream);
    const qcuda::DeviceCodeLut lut(stream);
    const qcuda::DeviceQuantized4bit device = qcuda::quantize_4bit<NF4, bf16>(
        std::span<const bf16>(device_input.data(), device_input.size()), {rows, cols}, options, stream, &lut);
    qcuda::DeviceBuffer<bf16> device_out(input.size(), stream);
    qcuda::dequantize_4bit<bf16>(device, device_out.span(), stream);
    std::vector<bf16> gpu_out(input.size());
    qcuda::copy_to_host(std::span<bf16>(gpu_out), device_out.data(), stream);
    qcuda::synchronize(stream);
    REQUIRE(describe_mismatch("dequantized", gpu_out, cpu_out) == "");
  }
}

namespace {

/// Host memory available for new allocations (MemAvailable, which counts
/// reclaimable page cache), in bytes; 0 if unknown.
std::uint64_t available_host_bytes() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  std::uint64_t kilobytes = 0;
  std::string unit;
  while (meminfo >> key >> kilobytes >> unit) {
    if (key == "MemAvailable:") return kilobytes * 1024;
  }
  return 0;
}

}  // namespace

TEST_CASE("GPU quantize/dequantize of more than 2^31 elements (64-bit indexing)", "[gpu][quantize][large]") {
  const cudaStream_t stream = nullptr;
  const std::int64_t n = (std::int64_t{1} << 31) + 4099;  // odd, and the last block of 64 is partial
  const auto bytes = static_cast<std::uint64_t>(n) * sizeof(bf16);
  std::size_t free_device = 0, total_device = 0;
  QLORA_CUDA_CHECK(cudaMemGetInfo(&free_device, &total_device));
  const std::uint64_t device_needed = 2 * bytes + bytes / 2 + (std::uint64_t{1} << 30);  // in, out, packed, state
  const std::uint64_t host_needed = 3 * bytes + bytes / 2 + (std::uint64_t{4} << 30);
  if (free_device < device_needed || available_host_bytes() < host_needed) {
    WARN(fmt::format("not run: needs {} GiB free device memory (have {}) and {} GiB free host memory (have {})",
                     device_needed >> 30, free_device >> 30, host_needed >> 30, available_host_bytes() >> 30));
    return;
  }
  // A cheap deterministic pattern (the full generator would take minutes here).
  std::vector<bf16> input(static_cast<std::size_t>(n));
  parallel_for(n, 1 << 22, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) {
      const std::uint64_t h = qlora::test::splitmix64(static_cast<std::uint64_t>(i));
      const float value = static_cast<float>(static_cast<std::int64_t>(h >> 40) - (std::int64_t{1} << 23)) *
                          std::ldexp(1.0f, static_cast<int>((i >> 6) % 9) - 30);
      input[static_cast<std::size_t>(i)] = bf16::from_float(value);
    }
  });
  const Quantize4bitOptions options{.blocksize = 64, .double_quant = true};
  // The CPU's threaded path; tests/quant holds it bit-identical to quantize_4bit_ref.
  const Quantized4bit cpu = quantize_4bit<NF4, bf16>(input, {n}, options);

  qcuda::DeviceBuffer<bf16> device_input = qcuda::to_device(std::span<const bf16>(input), stream);
  {
    const qcuda::DeviceQuantized4bit device =
        qcuda::quantize_4bit<NF4, bf16>(std::span<const bf16>(device_input.data(), device_input.size()), {n}, options, stream);
    REQUIRE(describe_mismatch(qcuda::download(device, stream), cpu) == "");

    qcuda::DeviceBuffer<bf16> device_out(static_cast<std::size_t>(n), stream);
    qcuda::dequantize_4bit<bf16>(device, device_out.span(), stream);
    std::vector<bf16> gpu_out(static_cast<std::size_t>(n));
    qcuda::copy_to_host(std::span<bf16>(gpu_out), device_out.data(), stream);
    qcuda::synchronize(stream);
    device_out.reset();
    std::vector<bf16>().swap(input);  // make room for the CPU output
    std::vector<bf16> cpu_out(static_cast<std::size_t>(n));
    dequantize_4bit<bf16>(cpu.packed, cpu.state, std::span<bf16>(cpu_out));
    REQUIRE(describe_mismatch("dequantized", gpu_out, cpu_out) == "");
  }
  // A NaN past 2^31 is found and named by its 64-bit index.
  const std::int64_t poisoned = (std::int64_t{1} << 31) + 17;
  const bf16 nan = bf16::from_float(std::numeric_limits<float>::quiet_NaN());
  qcuda::copy_to_device(device_input.data() + poisoned, std::span<const bf16>(&nan, 1), stream);
  const Error error = error_of([&] {
    (void)qcuda::quantize_4bit<NF4, bf16>(std::span<const bf16>(device_input.data(), device_input.size()), {n}, options, stream);
  });
  CHECK(error.code() == "NonFiniteInput");
  CHECK_THAT(error.what(), Catch::Contains("input element 2147483665 is"));
}
