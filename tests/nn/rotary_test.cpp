// RotaryEmbedding against transformers: tests/reference/nn_attention.py ran
// PhiRotaryEmbedding + apply_rotary_pos_emb (partial rotary, 32 of 80 dims) and
// InternLM2's dynamic-NTK rotary (written in torch from its remote code, with
// transformers' apply_rotary_pos_emb) in fp32, and recorded y = RoPE(x) and the
// autograd gradient dx for a given dy.
//
// Tolerances: both sides do the same fp32 operations in the same order (fp32
// angle, then x·cos and rotate_half(x)·sin rounded separately and added), so
// the only difference is cos/sin themselves: ours are correctly rounded, torch's
// (SLEEF, 1-ulp) may be an ulp off. One ulp of cos or sin (≤ 2^-24 relative,
// values ≤ 1) moves y by at most (|x1| + |x2|)·2^-24, and that can flip the
// final rounding by one ulp of y: a bound of (|x1| + |x2| + |y|)·2^-23 per
// element. A wrong pairing, sign or frequency errs by order |x|.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/io/safetensors_reader.hpp>
#include <qlora/nn/rotary.hpp>
#include <string>
#include <vector>

#include "support/errors.hpp"

using namespace qlora;
using nlohmann::json;

namespace {

const SafetensorsReader& fixture() {
  static const SafetensorsReader reader = SafetensorsReader::open(QLORA_TEST_DATA_DIR "/nn/rotary.safetensors");
  return reader;
}

json case_metadata(const std::string& name) { return json::parse(std::string(*fixture().metadata_value(name))); }

Tensor load(const std::string& name) {
  const SafetensorsTensor& stored = fixture().tensor(name);
  Tensor t(DType::F32, Shape(std::span<const std::int64_t>(stored.shape)));
  const std::vector<float> values = fixture().read<float>(name);
  std::copy(values.begin(), values.end(), t.span<float>().begin());
  return t;
}

std::vector<std::int32_t> load_positions(const std::string& name) { return fixture().read<std::int32_t>(name); }

RotaryConfig config_of(const json& meta) {
  RotaryConfig config;
  config.head_dim = meta["head_dim"].get<int>();
  config.rotary_dim = meta["rotary_dim"].get<int>();
  config.theta = meta["theta"].get<double>();
  if (meta.contains("factor")) {
    config.dynamic_ntk_factor = meta["factor"].get<double>();
    config.max_position_embeddings = meta["max_position_embeddings"].get<std::int64_t>();
  }
  return config;
}

/// |ours - ref| ≤ (|x1| + |x2| + |ref|)·2^-23 for each rotated element (see the header comment); pass-through dims
/// exact.
void require_rotation_matches(const TensorView& ours, const TensorView& ref, const TensorView& input, int rotary_dim,
                              double relative = std::ldexp(1.0, -23)) {
  const auto a = ours.span<const float>();
  const auto b = ref.span<const float>();
  const auto x = input.span<const float>();
  const std::int64_t head_dim = ours.shape()[2];
  const int half = rotary_dim / 2;
  double worst = 0;
  for (std::size_t e = 0; e < a.size(); ++e) {
    const auto dim = static_cast<std::int64_t>(e) % head_dim;
    if (dim >= rotary_dim) {
      REQUIRE(a[e] == b[e]);
      continue;
    }
    const std::size_t head_start = e - static_cast<std::size_t>(dim);
    const std::size_t pair = head_start + static_cast<std::size_t>((dim + half) % rotary_dim);
    const double bound = (std::fabs(x[e]) + std::fabs(x[pair]) + std::fabs(b[e])) * relative;
    const double error = std::fabs(double(a[e]) - double(b[e]));
    worst = std::max(worst, error / bound);
    INFO("element " << e << ": ours " << a[e] << ", reference " << b[e]);
    REQUIRE(error <= bound);
  }
  INFO("worst error / bound " << worst);
  SUCCEED();
}

Tensor copy_of(const Tensor& t) {
  Tensor c(DType::F32, t.shape());
  std::copy(t.span<float>().begin(), t.span<float>().end(), c.span<float>().begin());
  return c;
}

}  // namespace

TEST_CASE("rotary: forward and backward match transformers", "[nn][rotary]") {
  for (const std::string name : {"phi", "ntk_long", "ntk_short"}) {
    SECTION(name) {
      const json meta = case_metadata(name);
      const RotaryConfig config = config_of(meta);
      const RotaryEmbedding rope(config);
      const auto seq_len = meta["seq_len"].get<std::int64_t>();

      // inv_freq: the same fp32 formula as transformers; pow may differ by an ulp from torch's.
      const std::vector<float> ref_inv_freq = fixture().read<float>(name + ".inv_freq");
      const std::vector<float> inv_freq = rope.inverse_frequencies(seq_len);
      REQUIRE(inv_freq.size() == ref_inv_freq.size());
      for (std::size_t i = 0; i < inv_freq.size(); ++i) {
        CHECK(std::fabs(inv_freq[i] - ref_inv_freq[i]) <= std::ldexp(std::fabs(ref_inv_freq[i]), -23));
      }

      const Tensor x = load(name + ".x");
      const std::vector<std::int32_t> positions = load_positions(name + ".positions");
      for (const unsigned threads : {1u, 2u}) {
        Tensor y = copy_of(x);
        rope.apply(y.view(), positions, seq_len, threads);
        require_rotation_matches(y.view(), load(name + ".y").view(), x.view(), config.rotary_dim);

        const Tensor dy = load(name + ".dy");
        Tensor dx = copy_of(dy);
        rope.apply_backward(dx.view(), positions, seq_len, threads);
        require_rotation_matches(dx.view(), load(name + ".dx").view(), dy.view(), config.rotary_dim);
      }
    }
  }
}

TEST_CASE("rotary: positions past the cache are computed the same way", "[nn][rotary]") {
  // max_position_embeddings 16 caches positions 0..15 only; the fixture's 2047 and 7 are then computed per call.
  RotaryConfig config = config_of(case_metadata("phi"));
  config.max_position_embeddings = 16;
  const RotaryEmbedding rope(config);
  const Tensor x = load("phi.x");
  Tensor y = copy_of(x);
  rope.apply(y.view(), load_positions("phi.positions"), 8, 1);
  require_rotation_matches(y.view(), load("phi.y").view(), x.view(), config.rotary_dim);
}

TEST_CASE("rotary: InternLM2's NTK base is within an ulp of inv_freq of transformers' fp32 one", "[nn][rotary]") {
  // transformers evaluates the NTK base in fp32 (inv_freq then differs by about an ulp); an ulp of
  // inv_freq at positions up to 99 moves the angle by ~100 ulps of inv_freq·pos, so y moves by up to
  // |x|·100·2^-24: compare with 2^-16 relative.
  const json meta = case_metadata("ntk_long_transformers");
  const RotaryEmbedding rope(config_of(meta));
  const Tensor x = load("ntk_long_transformers.x");
  Tensor y = copy_of(x);
  rope.apply(y.view(), load_positions("ntk_long_transformers.positions"), meta["seq_len"].get<std::int64_t>(), 1);
  require_rotation_matches(y.view(), load("ntk_long_transformers.y").view(), x.view(), 16, std::ldexp(1.0, -16));
}

TEST_CASE("rotary: backward undoes forward", "[nn][rotary]") {
  // The rotation is orthogonal: applying the backward to the forward's output gives x back up to rounding.
  const RotaryEmbedding rope(config_of(case_metadata("ntk_long")));
  const Tensor x = load("ntk_long.x");
  Tensor y = copy_of(x);
  const std::vector<std::int32_t> positions = load_positions("ntk_long.positions");
  rope.apply(y.view(), positions, 100, 1);
  rope.apply_backward(y.view(), positions, 100, 1);
  const auto a = y.span<const float>();
  const auto b = x.span<const float>();
  for (std::size_t i = 0; i < a.size(); ++i) REQUIRE(std::fabs(a[i] - b[i]) <= 1e-6);  // a few ulps of values < 2
}

TEST_CASE("rotary: bad input is refused", "[nn][rotary]") {
  const RotaryEmbedding rope(RotaryConfig{.head_dim = 8, .rotary_dim = 4});
  Tensor x(DType::F32, Shape{3, 2, 8});
  const std::vector<std::int32_t> positions{0, 1, 2};
  test::require_error(
      [&] {
        rope.apply(x.view(), std::vector<std::int32_t>{0, -1, 2}, 3);
      },
      "InvalidPositionIds", "position -1 of token 1");
  test::require_error(
      [&] {
        rope.apply(x.view(), std::vector<std::int32_t>{0, 1}, 3);
      },
      "ShapeMismatch", "2 positions for 3 tokens");
  Tensor wrong_dim(DType::F32, Shape{3, 2, 6});
  test::require_error([&] { rope.apply(wrong_dim.view(), positions, 3); }, "ShapeMismatch", "x is [3, 2, 6]",
                      "[tokens, heads, 8]");
  Tensor half_precision(DType::BF16, Shape{3, 2, 8});
  test::require_error([&] { rope.apply_backward(half_precision.view(), positions, 3); }, "DTypeMismatch", "dx is BF16");
  test::require_error([&] { rope.apply(x.view(), positions, 0); }, "InvalidArgument", "seq_len 0");

  test::require_error([] { RotaryEmbedding(RotaryConfig{.head_dim = 8, .rotary_dim = 5}); }, "InvalidArgument",
                      "rotary_dim 5");
  test::require_error([] { RotaryEmbedding(RotaryConfig{.head_dim = 8, .rotary_dim = 10}); }, "InvalidArgument",
                      "rotary_dim 10");
  test::require_error([] { RotaryEmbedding(RotaryConfig{.head_dim = 8, .rotary_dim = 8, .theta = -1.0}); },
                      "InvalidArgument", "theta");
  test::require_error([] { RotaryEmbedding(RotaryConfig{.head_dim = 8, .rotary_dim = 8, .dynamic_ntk_factor = 0.5}); },
                      "InvalidArgument", "dynamic_ntk_factor 0.5");
}
