// The multi-threaded quantizer and dequantizer against the per-element
// reference, and the reference against independent vectors: nf4_spec.md §10
// TV-A here, bitsandbytes' own output in bnb_4bit_fixture_test.cpp.
#include <qlora/quant/blockwise_4bit.hpp>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <bit>
#include <cstring>
#include <string>

#include "support/splitmix.hpp"

#include "support/bits.hpp"

using namespace qlora;
using test::bits_of;

namespace {

std::string hex(std::span<const std::uint8_t> bytes) {
  std::string text;
  for (const auto byte : bytes) text += fmt::format("{:02x}", byte);
  return text;
}

template <class T>
std::vector<T> converted(const std::vector<float>& values) {
  std::vector<T> out(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) out[i] = from_float<T>(values[i]);
  return out;
}


}  // namespace

TEST_CASE("NF4 reference matches test vector TV-A (nf4_spec.md §10)") {
  const auto input = test::splitmix_values(70, 1.0);
  CHECK(std::bit_cast<std::uint32_t>(input[0]) == 0x3e9fd2b6u);
  CHECK(std::bit_cast<std::uint32_t>(input[1]) == 0xbf1ef42bu);
  const auto q = quantize_4bit_ref<NF4, float>(input, {70}, {.blocksize = 64});
  REQUIRE(q.state.absmax.size() == 2);
  CHECK(std::bit_cast<std::uint32_t>(q.state.absmax[0]) == 0x3fa69452u);
  CHECK(std::bit_cast<std::uint32_t>(q.state.absmax[1]) == 0x3f5ed8f6u);
  CHECK(hex(q.packed) == "a2aaad8d220aa3db2ce92941b690eb56d67671aec892a4c0276e4eb5957cb69343076e");
  std::vector<bf16> out(70);
  dequantize_4bit_ref<bf16>(q.packed, q.state, out);
  const std::uint16_t expected[] = {0x3ea4, 0xbf2f, 0x3ea4, 0x3ea4, 0x3ea4, 0x3f3b, 0x3dd4, 0x3f3b};
  for (int i = 0; i < 8; ++i) CHECK(out[static_cast<std::size_t>(i)].bits == expected[i]);
}

TEMPLATE_PRODUCT_TEST_CASE("threaded quantize/dequantize equal the reference bit for bit", "",
                           std::pair, ((NF4, float), (NF4, bf16), (NF4, fp16), (FP4, float), (FP4, bf16), (FP4, fp16))) {
  using Q = typename TestType::first_type;
  using T = typename TestType::second_type;
  const auto blocksize = GENERATE(as<std::int64_t>{}, 32, 64, 256, 4096);
  const auto n = GENERATE(as<std::int64_t>{}, 1, 63, 4096 * 3 + 77, 100000);
  const bool nested = GENERATE(false, true);
  auto values = test::splitmix_values(static_cast<std::size_t>(n), 0.05, 1000);
  if (n > 300) std::fill(values.begin() + 64, values.begin() + 128, 0.0f);  // an all-zero region
  const auto input = converted<T>(values);
  const Quantize4bitOptions options{.blocksize = blocksize, .double_quant = nested, .threads = 3};
  const auto ref = quantize_4bit_ref<Q, T>(input, {n}, options);
  const auto fast = quantize_4bit<Q, T>(input, {n}, options);
  REQUIRE(fast.packed == ref.packed);
  REQUIRE(fast.state.absmax == ref.state.absmax);
  REQUIRE(fast.state.nested.has_value() == nested);
  if (nested) {
    CHECK(fast.state.nested->codes == ref.state.nested->codes);
    CHECK(fast.state.nested->absmax == ref.state.nested->absmax);
  }
  std::vector<T> out_ref(static_cast<std::size_t>(n)), out_fast(static_cast<std::size_t>(n));
  dequantize_4bit_ref<T>(ref.packed, ref.state, out_ref);
  dequantize_4bit<T>(fast.packed, fast.state, out_fast, 3);
  for (std::size_t i = 0; i < out_ref.size(); ++i) {
    if (bits_of(out_ref[i]) != bits_of(out_fast[i])) FAIL("element " << i << " differs");
  }
}

TEST_CASE("bad input gives named errors") {
  const std::vector<float> ok(128, 0.5f);
  const auto code_of = [](auto&& call) -> std::string {
    try {
      call();
    } catch (const Error& e) {
      return std::string(e.code());
    }
    return "no error";
  };
  for (const std::int64_t bad : {0, 16, 48, 100, 8192, -64}) {
    CHECK(code_of([&] { quantize_4bit<NF4, float>(ok, {128}, {.blocksize = bad}); }) == "InvalidBlocksize");
  }
  CHECK(code_of([&] { quantize_4bit<NF4, float>(ok, {127}); }) == "ShapeMismatch");
  CHECK(code_of([&] { quantize_4bit<NF4, float>(ok, {2, 0, 64}); }) == "ShapeMismatch");
  CHECK(code_of([&] { quantize_4bit<NF4, float>(std::span<const float>{}, {}); }) == "ShapeMismatch");
  for (const float poison : {std::nanf(""), INFINITY, -INFINITY}) {
    auto input = ok;
    input[77] = poison;
    CHECK(code_of([&] { quantize_4bit<NF4, float>(input, {128}); }) == "NonFiniteInput");
    CHECK(code_of([&] { quantize_4bit_ref<FP4, float>(input, {128}); }) == "NonFiniteInput");
  }

  auto q = quantize_4bit<NF4, float>(ok, {128}, {.double_quant = true});
  std::vector<float> out(128);
  CHECK(code_of([&] { dequantize_4bit<float>(std::span(q.packed).first(63), q.state, out); }) == "QuantStateMismatch");
  std::vector<float> short_out(127);
  CHECK(code_of([&] { dequantize_4bit<float>(q.packed, q.state, std::span<float>(short_out)); }) == "ShapeMismatch");
  auto broken = q.state;
  broken.nested->codes.pop_back();
  CHECK(code_of([&] { dequantize_4bit<float>(q.packed, broken, std::span<float>(out)); }) == "QuantStateMismatch");
  broken = q.state;
  broken.nested->code_map.resize(16);
  CHECK(code_of([&] { dequantize_4bit_ref<float>(q.packed, broken, std::span<float>(out)); }) == "QuantStateMismatch");
  broken = q.state;
  broken.absmax = {1.0f, 1.0f};
  CHECK(code_of([&] { dequantize_4bit<float>(q.packed, broken, std::span<float>(out)); }) == "QuantStateMismatch");
  broken = q.state;
  broken.blocksize = 96;
  CHECK(code_of([&] { dequantize_4bit<float>(q.packed, broken, std::span<float>(out)); }) == "InvalidBlocksize");
}

TEST_CASE("SIMD and scalar nibble expansion give the same values") {
  std::uint16_t table[16];
  for (int c = 0; c < 16; ++c) table[c] = static_cast<std::uint16_t>(0x3F00 + c * 0x0101);
  std::vector<std::uint8_t> bytes(77);
  for (std::size_t k = 0; k < bytes.size(); ++k) bytes[k] = static_cast<std::uint8_t>(test::splitmix64(k));
  std::vector<std::uint16_t> scalar(2 * bytes.size()), dispatched(2 * bytes.size());
  detail::expand_nibbles_scalar(bytes.data(), 77, table, scalar.data());
  detail::expand_nibbles(bytes.data(), 77, table, dispatched.data());
  CHECK(scalar == dispatched);
  for (std::size_t k = 0; k < bytes.size(); ++k) {
    REQUIRE(scalar[2 * k] == table[bytes[k] >> 4]);
    REQUIRE(scalar[2 * k + 1] == table[bytes[k] & 0xF]);
  }
}
