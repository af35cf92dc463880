// GPU 4-bit dequantization (cuda/dequantize_4bit.cuh) against the CPU
// reference dequantize_4bit_ref, bit for bit: NF4 and FP4, fp32/bf16/fp16
// output, every blocksize, plain and double-quantized states, awkward sizes,
// hand-made states with every byte value, extreme and non-finite scales,
// random nested codes and maps, unaligned pointers and mismatched states.
// Exits 77 (skipped) where there is no CUDA device.
#include <qlora/cuda/dequantize_4bit.cuh>
#include <qlora/quant/blockwise_4bit.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cuda/support.cuh"

namespace {

using namespace qlora;
using test::error_of;
namespace qcuda = qlora::cuda;  // `cuda::` alone is ambiguous with CCCL's ::cuda under `using namespace qlora`
using qlora::test::describe_mismatch;
using qlora::test::splitmix64;
using qlora::test::test_values;

constexpr std::int64_t all_blocksizes[] = {32, 64, 128, 256, 512, 1024, 2048, 4096};

std::vector<std::int64_t> awkward_sizes(std::int64_t blocksize) {
  return {1, 2, 7, 31, blocksize - 1, blocksize + 1, 4095, 4097, 8191, 8193, 16384 + 5, 257 * blocksize + 5,
          300 * blocksize};
}


/// GPU (host-data convenience path) and CPU reference outputs must be bit-identical.
template <class Out>
std::string compare_dequantize(const std::vector<std::uint8_t>& packed, const QuantState& state) {
  const auto n = static_cast<std::size_t>(state.numel());
  std::vector<Out> cpu(n), gpu(n);
  dequantize_4bit_ref<Out>(packed, state, std::span<Out>(cpu));
  qcuda::dequantize_4bit_host<Out>(packed, state, std::span<Out>(gpu));
  return describe_mismatch("dequantized", gpu, cpu);
}

template <class Out>
std::string compare_dequantize(const Quantized4bit& q) {
  return compare_dequantize<Out>(q.packed, q.state);
}

/// A state with random packed bytes and chosen absmax values (not produced by
/// a quantizer): covers every byte value and scales a quantizer never writes.
Quantized4bit handmade(QuantType type, std::int64_t n, std::int64_t blocksize, const std::vector<float>& scales,
                       std::uint64_t seed) {
  Quantized4bit q;
  q.state.quant_type = type;
  q.state.blocksize = blocksize;
  q.state.dtype = DType::F32;
  q.state.shape = {n};
  q.packed.resize(static_cast<std::size_t>(q.state.packed_bytes()));
  for (std::size_t k = 0; k < q.packed.size(); ++k) {
    q.packed[k] = k < 256 ? static_cast<std::uint8_t>(k) : static_cast<std::uint8_t>(splitmix64(seed + k));
  }
  q.state.absmax.resize(static_cast<std::size_t>(q.state.block_count()));
  for (std::size_t b = 0; b < q.state.absmax.size(); ++b) q.state.absmax[b] = scales[b % scales.size()];
  return q;
}

}  // namespace

TEMPLATE_TEST_CASE("GPU dequantize_4bit equals dequantize_4bit_ref bit for bit", "[gpu][dequantize]", float, bf16,
                   fp16) {
  using Out = TestType;
  for (const QuantType type : {QuantType::nf4, QuantType::fp4}) {
    for (const std::int64_t blocksize : all_blocksizes) {
      for (const std::int64_t n : awkward_sizes(blocksize)) {
        const std::vector<float> input = test_values<float>(n, blocksize, static_cast<std::uint64_t>(n + blocksize));
        for (const bool nested : {false, true}) {
          CAPTURE(quant_type_name(type), dtype_name(dtype_of_v<Out>), blocksize, n, nested);
          const Quantize4bitOptions options{.blocksize = blocksize, .double_quant = nested};
          const Quantized4bit q = visit_quant_type(type, [&]<class Q>(Q) { return quantize_4bit_ref<Q, float>(input, {n}, options); });
          REQUIRE(compare_dequantize<Out>(q) == "");
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("GPU dequantize_4bit: every byte value and extreme or non-finite scales", "[gpu][dequantize]", float,
                   bf16, fp16) {
  using Out = TestType;
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // 0, -0, subnormal, tiny normal, ordinary, the fp16 overflow edge, the
  // float maximum, Inf and NaN: each rounds and converts differently.
  const std::vector<float> scales = {0.0f,     -0.0f,  1e-40f,   1e-38f,  1.17549435e-38f, 0.0123f, 1.0f,
                                     65504.0f, 65520.0f, 1e30f, 3.4028235e38f, inf, nan, -1.5f};
  for (const QuantType type : {QuantType::nf4, QuantType::fp4}) {
    for (const std::int64_t blocksize : {32, 64, 4096}) {
      for (const std::int64_t n : {std::int64_t{513}, std::int64_t{100000}, 14 * blocksize * 3 + 1}) {
        CAPTURE(quant_type_name(type), blocksize, n);
        REQUIRE(compare_dequantize<Out>(handmade(type, n, blocksize, scales, 11)) == "");
      }
    }
  }
}

TEMPLATE_TEST_CASE("GPU dequantize_4bit: nested states with arbitrary codes, scales, maps and offsets",
                   "[gpu][dequantize]", float, bf16, fp16) {
  using Out = TestType;
  for (const std::int64_t blocksize : {32, 256, 4096}) {
    const std::int64_t n = 700 * blocksize + 9;  // 700 blocks: three nested blocks, the last partial
    Quantized4bit q = handmade(QuantType::nf4, n, blocksize, {1.0f}, 23);
    const std::int64_t blocks = q.state.block_count();
    for (const bool random_map : {false, true}) {
      for (const float offset : {0.0f, 0.037f, -2.5f, 1e-39f}) {
        NestedAbsmax nested;
        nested.codes.resize(static_cast<std::size_t>(blocks));
        for (std::size_t b = 0; b < nested.codes.size(); ++b) nested.codes[b] = static_cast<std::uint8_t>(splitmix64(b + 5) >> 56);
        nested.absmax = {0.5f, 1e-3f, 7.0f};
        nested.code_map.assign(signed_dynamic_map.begin(), signed_dynamic_map.end());
        if (random_map) {
          for (std::size_t c = 0; c < 256; ++c) nested.code_map[c] = qlora::test::splitmix_value(c + 1000, 3.0);
        }
        nested.offset = offset;
        q.state.absmax.clear();
        q.state.nested = nested;
        CAPTURE(blocksize, random_map, offset);
        REQUIRE(compare_dequantize<Out>(q) == "");
      }
    }
  }
}

TEMPLATE_TEST_CASE("GPU dequantize_4bit: unaligned packed and output pointers", "[gpu][dequantize]", float, bf16, fp16) {
  using Out = TestType;
  const cudaStream_t stream = nullptr;
  for (const std::int64_t blocksize : {32, 1024}) {
    for (const std::int64_t n : {std::int64_t{3}, std::int64_t{8193}, 40 * blocksize + 1}) {
      for (const bool nested : {false, true}) {
        CAPTURE(blocksize, n, nested);
        const std::vector<float> input = test_values<float>(n, blocksize, 77);
        const Quantized4bit q = quantize_4bit_ref<NF4, float>(input, {n}, {.blocksize = blocksize, .double_quant = nested});
        std::vector<Out> cpu(static_cast<std::size_t>(n));
        dequantize_4bit_ref<Out>(q.packed, q.state, std::span<Out>(cpu));

        const qcuda::DeviceQuantized4bit device = qcuda::upload(q, stream);
        for (const int packed_shift : {0, 1, 2}) {
          for (const int out_shift : {0, 1, 3}) {
            CAPTURE(packed_shift, out_shift);
            qcuda::DeviceBuffer<std::uint8_t> packed(q.packed.size() + 2, stream);
            qcuda::copy_to_device(packed.data() + packed_shift, std::span<const std::uint8_t>(q.packed), stream);
            qcuda::DeviceBuffer<Out> out(cpu.size() + 3, stream);
            qcuda::dequantize_4bit<Out>(std::span<const std::uint8_t>(packed.data() + packed_shift, q.packed.size()),
                                       device.view(), std::span<Out>(out.data() + out_shift, cpu.size()), stream);
            std::vector<Out> gpu(cpu.size());
            qcuda::copy_to_host(std::span<Out>(gpu), out.data() + out_shift, stream);
            qcuda::synchronize(stream);
            REQUIRE(describe_mismatch("dequantized", gpu, cpu) == "");
          }
        }
      }
    }
  }
}

TEST_CASE("GPU dequantize_4bit: a mismatched state is refused with the CPU path's error", "[gpu][dequantize][errors]") {
  const std::vector<float> input = test_values<float>(1000, 64, 4);
  const Quantized4bit plain = quantize_4bit_ref<NF4, float>(input, {1000}, {.blocksize = 64});
  const Quantized4bit nested = quantize_4bit_ref<NF4, float>(input, {1000}, {.blocksize = 64, .double_quant = true});
  std::vector<float> out(1000);

  const auto same_error = [&](const std::vector<std::uint8_t>& packed, const QuantState& state, std::span<float> output,
                              const char* code) {
    const Error cpu = error_of([&] { dequantize_4bit_ref<float>(packed, state, output); });
    const Error gpu = error_of([&] { qcuda::dequantize_4bit_host<float>(packed, state, output); });
    CHECK(gpu.code() == code);
    CHECK(std::string(gpu.what()) == std::string(cpu.what()));
  };
  {
    QuantState state = plain.state;
    state.absmax.pop_back();
    same_error(plain.packed, state, out, "QuantStateMismatch");
  }
  {
    std::vector<std::uint8_t> packed = plain.packed;
    packed.push_back(0);
    same_error(packed, plain.state, out, "QuantStateMismatch");
  }
  {
    QuantState state = plain.state;
    state.blocksize = 96;
    same_error(plain.packed, state, out, "InvalidBlocksize");
  }
  {
    QuantState state = nested.state;
    state.nested->codes.pop_back();
    same_error(nested.packed, state, out, "QuantStateMismatch");
  }
  {
    QuantState state = nested.state;
    state.nested->code_map.resize(255);
    same_error(nested.packed, state, out, "QuantStateMismatch");
  }
  {
    QuantState state = nested.state;
    state.absmax = {1.0f};
    same_error(nested.packed, state, out, "QuantStateMismatch");
  }
  same_error(plain.packed, plain.state, std::span<float>(out).first(999), "ShapeMismatch");

  // The device-view level checks what it can see.
  const cudaStream_t stream = nullptr;
  const qcuda::DeviceQuantized4bit device = qcuda::upload(nested, stream);
  qcuda::DeviceBuffer<float> device_out(1000, stream);
  const std::span<const std::uint8_t> device_packed(device.packed.data(), device.packed.size());
  CHECK(error_of([&] { qcuda::dequantize_4bit<float>(device_packed.first(499), device.view(), device_out.span(), stream); })
            .code() == "QuantStateMismatch");
  CHECK(error_of([&] { qcuda::dequantize_4bit<float>(device_packed, device.view(), device_out.span().first(10), stream); })
            .code() == "ShapeMismatch");
  qcuda::DeviceQuantState broken = device.view();
  broken.nested_offset = nullptr;
  const Error null_offset = error_of([&] { qcuda::dequantize_4bit<float>(device_packed, broken, device_out.span(), stream); });
  CHECK(null_offset.code() == "NullPointer");
  CHECK_THAT(null_offset.what(), Catch::Contains("state.nested_offset"));
  broken = device.view();
  broken.blocksize = 8192;
  CHECK(error_of([&] { qcuda::dequantize_4bit<float>(device_packed, broken, device_out.span(), stream); }).code() ==
        "InvalidBlocksize");
  broken = device.view();
  broken.nested = false;  // plain state without absmax
  CHECK(error_of([&] { qcuda::dequantize_4bit<float>(device_packed, broken, device_out.span(), stream); }).code() ==
        "NullPointer");
}
