// bf16/fp16 conversions against PyTorch: all 65,536 bit patterns of each type
// widened to float, and a float sweep (ties, NaN payloads, overflow,
// subnormals) narrowed, compared bit for bit with the tensors PyTorch wrote
// (tests/reference/dtype_conversions.py).
#include <qlora/core/dtype.hpp>
#include <qlora/io/safetensors_reader.hpp>

#include <catch2/catch.hpp>

#include <bit>
#include <cmath>
#include <limits>

using namespace qlora;

TEST_CASE("round trips are exact for every non-NaN pattern") {
  for (std::uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    const auto b = bf16{static_cast<std::uint16_t>(bits)};
    const auto h = fp16{static_cast<std::uint16_t>(bits)};
    if (!std::isnan(b.to_float())) REQUIRE(bf16::from_float(b.to_float()) == b);
    if (!std::isnan(h.to_float())) REQUIRE(fp16::from_float(h.to_float()) == h);
  }
}

TEST_CASE("hand-checked conversions") {
  CHECK(bf16::from_float(1.0f).bits == 0x3F80);
  CHECK(bf16::from_float(std::bit_cast<float>(0x3F808000u)).bits == 0x3F80);  // tie to even (down)
  CHECK(bf16::from_float(std::bit_cast<float>(0x3F818000u)).bits == 0x3F82);  // tie to even (up)
  CHECK(bf16::from_float(-std::numeric_limits<float>::quiet_NaN()).bits == 0xFFFF);
  CHECK(fp16::from_float(65504.0f).bits == 0x7BFF);
  CHECK(fp16::from_float(65519.996f).bits == 0x7BFF);
  CHECK(fp16::from_float(65520.0f).bits == 0x7C00);             // the tie rounds to even: Inf
  CHECK(fp16::from_float(std::ldexp(1.0f, -24)).bits == 0x0001);  // smallest subnormal
  CHECK(fp16::from_float(std::ldexp(1.0f, -25)).bits == 0x0000);  // tie to even: zero
  CHECK(fp16::from_float(std::ldexp(1.5f, -25)).bits == 0x0001);
  CHECK(fp16::from_float(std::ldexp(3.0f, -25)).bits == 0x0002);  // 1.5 units: tie to even (2)
  CHECK(fp16{0x0001}.to_float() == std::ldexp(1.0f, -24));
  CHECK(fp16{0x8400}.to_float() == -std::ldexp(1.0f, -14));
  CHECK(std::isinf(fp16{0x7C00}.to_float()));
}

TEST_CASE("DType names follow safetensors") {
  CHECK(dtype_name(DType::BF16) == "BF16");
  CHECK(dtype_from_name("F8_E4M3FNUZ") == DType::F8_E4M3FNUZ);
  CHECK(!dtype_from_name("bf16").has_value());
  CHECK(dtype_bits(DType::F4) == 4);
  CHECK(dtype_bits(DType::C64) == 64);
  STATIC_REQUIRE(dtype_of_v<bf16> == DType::BF16);
}

namespace {

const qlora::SafetensorsReader& fixture() {
  static const auto reader = qlora::SafetensorsReader::open(QLORA_TEST_DATA_DIR "/core/dtype_conversions.safetensors");
  return reader;
}

std::uint32_t bits(float value) { return std::bit_cast<std::uint32_t>(value); }

}  // namespace

TEST_CASE("widening all 65,536 patterns matches PyTorch bit for bit") {
  const auto bf16_widened = fixture().read<float>("bf16_all_bits_as_f32");
  const auto fp16_widened = fixture().read<float>("fp16_all_bits_as_f32");
  REQUIRE(bf16_widened.size() == 65536);
  REQUIRE(fp16_widened.size() == 65536);
  for (std::uint32_t pattern = 0; pattern < 65536; ++pattern) {
    const auto p16 = static_cast<std::uint16_t>(pattern);
    if (bits(bf16{p16}.to_float()) != bits(bf16_widened[pattern])) FAIL("bf16 pattern " << pattern);
    if (bits(fp16{p16}.to_float()) != bits(fp16_widened[pattern])) FAIL("fp16 pattern " << pattern);
  }
}

TEST_CASE("narrowing the float sweep matches PyTorch's tensor conversion bit for bit") {
  const auto sweep = fixture().read<float>("sweep_f32");
  const auto to_bf16 = fixture().read<bf16>("sweep_to_bf16");
  const auto to_fp16 = fixture().read<fp16>("sweep_to_fp16");
  REQUIRE(sweep.size() > 50000);
  REQUIRE(to_bf16.size() == sweep.size());
  REQUIRE(to_fp16.size() == sweep.size());
  std::size_t nans = 0;
  for (std::size_t i = 0; i < sweep.size(); ++i) {
    nans += std::isnan(sweep[i]);
    if (bf16::from_float(sweep[i]) != to_bf16[i]) FAIL("bf16 of float bits " << std::hex << bits(sweep[i]));
    if (fp16::from_float(sweep[i]) != to_fp16[i]) FAIL("fp16 of float bits " << std::hex << bits(sweep[i]));
  }
  CHECK(nans > 0);  // the sweep covers NaN payloads, so the NaN rule above was exercised
}
