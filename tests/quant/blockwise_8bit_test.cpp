// The 8-bit blockwise quantizer (double quantization's second level) against
// bitsandbytes 0.50.2's native CPU kernel: codes, absmax and dequantized
// values from tests/reference/bnb_blockwise8.py, compared bit for bit.
// The fixture's blocks sit on the quantizer's edges: code midpoints ±1 ulp,
// the 65,536-bin table's sample points, tiny/huge scales, a zero block.
#include <qlora/quant/blockwise_8bit.hpp>
#include <qlora/quant/dynamic_map.hpp>

#include <catch2/catch.hpp>

#include <bit>
#include <cmath>

#include <qlora/io/safetensors_reader.hpp>

using namespace qlora;

namespace {

const SafetensorsReader& fixture() {
  static const auto reader = SafetensorsReader::open(QLORA_TEST_DATA_DIR "/quant/bnb_blockwise8.safetensors");
  return reader;
}

}  // namespace

TEST_CASE("our signed dynamic map is the one bitsandbytes builds (torch 2.15)") {
  const auto code = fixture().read<float>("code");
  REQUIRE(code.size() == 256);
  for (std::size_t i = 0; i < 256; ++i) {
    INFO("index " << i);
    CHECK(std::bit_cast<std::uint32_t>(code[i]) == std::bit_cast<std::uint32_t>(signed_dynamic_map[i]));
  }
}

TEST_CASE("the code lookup table equals bitsandbytes' 65,536-bin table") {
  const auto expected = fixture().read<std::uint8_t>("lut");
  const auto code = fixture().read<float>("code");
  CHECK(detail::build_code_lut(std::span<const float, 256>(code.data(), 256)) == expected);
}

TEST_CASE("8-bit blockwise quantize/dequantize are bit-identical to bitsandbytes' CPU kernel") {
  auto input = fixture().read<float>("input");
  const auto code = fixture().read<float>("code");
  const auto expected_codes = fixture().read<std::uint8_t>("codes");
  const auto expected_absmax = fixture().read<float>("absmax");
  const auto expected_dequant = fixture().read<float>("dequant");
  // Two blocks hold NaN/Inf, which double quantization never feeds in
  // (absmax values are finite and non-negative) and which the 4-bit layer
  // rejects; we check the finite blocks, and those two blocks only for the
  // finite elements' codes where bitsandbytes' rule is well defined.
  const std::span<const float, 256> map(code.data(), 256);
  const Quantized8bit q = quantize_blockwise_8bit(input, map, 256);
  REQUIRE(q.codes.size() == expected_codes.size());
  REQUIRE(q.absmax.size() == expected_absmax.size());
  std::size_t compared = 0, skipped_blocks = 0;
  for (std::size_t block = 0; block < q.absmax.size(); ++block) {
    const std::size_t begin = block * 256, end = std::min(input.size(), begin + 256);
    bool finite_block = true;
    for (std::size_t i = begin; i < end; ++i) finite_block &= std::isfinite(input[i]);
    if (!finite_block) {
      ++skipped_blocks;
      continue;
    }
    INFO("block " << block);
    CHECK(std::bit_cast<std::uint32_t>(q.absmax[block]) == std::bit_cast<std::uint32_t>(expected_absmax[block]));
    for (std::size_t i = begin; i < end; ++i) {
      if (q.codes[i] != expected_codes[i]) FAIL("element " << i << ": code " << int(q.codes[i]) << " vs " << int(expected_codes[i]));
      ++compared;
    }
  }
  CHECK(skipped_blocks <= 2);  // only the NaN and the Inf block
  CHECK(compared + 256 * skipped_blocks >= input.size());

  std::vector<float> out(q.codes.size());
  dequantize_blockwise_8bit(expected_codes, expected_absmax, map, 256, out);
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (std::isnan(expected_dequant[i])) {
      CHECK(std::isnan(out[i]));
    } else if (std::bit_cast<std::uint32_t>(out[i]) != std::bit_cast<std::uint32_t>(expected_dequant[i])) {
      FAIL("dequant element " << i);
    }
  }
}

TEST_CASE("8-bit quantization rejects bad arguments") {
  const std::vector<float> values(10, 0.5f);
  std::array<float, 256> unsorted = signed_dynamic_map;
  std::swap(unsorted[3], unsorted[200]);
  CHECK_THROWS_WITH(quantize_blockwise_8bit(values, unsorted, 256), Catch::Contains("InvalidCodeMap"));
  CHECK_THROWS_WITH(quantize_blockwise_8bit(values, signed_dynamic_map, 0), Catch::Contains("InvalidBlocksize"));
  std::vector<float> out(10);
  const std::vector<std::uint8_t> codes(10);
  const std::vector<float> absmax(2);
  CHECK_THROWS_WITH(dequantize_blockwise_8bit(codes, absmax, signed_dynamic_map, 256, out),
                    Catch::Contains("QuantStateMismatch"));
}
