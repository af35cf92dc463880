// Philox4x32-10 against Random123's known-answer vectors (kat_vectors:
// "philox4x32 10 <counter x4> <key x2> <expected x4>").
#include <qlora/core/rng.hpp>

#include <catch2/catch.hpp>

#include <set>

using namespace qlora;

TEST_CASE("Philox4x32-10 matches Random123's known answers") {
  CHECK(philox4x32<10>({0, 0, 0, 0}, {0, 0}) == PhiloxCounter{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8});
  CHECK(philox4x32<10>({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}) ==
        PhiloxCounter{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd});
  CHECK(philox4x32<10>({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}) ==
        PhiloxCounter{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1});
}

TEST_CASE("philox_random lays seed, subsequence and offset out like cuRAND") {
  const std::uint64_t seed = 0x299f31d0a4093822ull;
  CHECK(philox_random(seed, 0x0370734413198a2eull, 0x85a308d3243f6a88ull) ==
        PhiloxCounter{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1});
}

TEST_CASE("uniform values are in [0, 1), distinct across streams and roughly uniform") {
  double sum = 0.0;
  std::set<float> first_of_stream;
  constexpr int count = 40000;
  for (int i = 0; i < count; ++i) {
    const float u = philox_uniform(42, 7, static_cast<std::uint64_t>(i));
    REQUIRE(u >= 0.0f);
    REQUIRE(u < 1.0f);
    sum += u;
  }
  // Mean of 40k uniforms: standard error 1/sqrt(12*40000) ~ 0.0014; 5 sigma.
  CHECK(std::abs(sum / count - 0.5) < 0.0075);
  for (std::uint64_t stream = 0; stream < 100; ++stream) first_of_stream.insert(philox_uniform(42, stream, 0));
  CHECK(first_of_stream.size() > 95);
  CHECK(uniform_from_bits(0xFFFFFFFFu) == 1.0f - 0x1p-24f);
}
