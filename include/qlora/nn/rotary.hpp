// RotaryEmbedding: rotary position embedding (RoPE) of queries or keys, in
// place, in the NeoX "rotate_half" layout that Phi-2 and InternLM2 use: in
// each head, dim i of the first rotary_dim dims is paired with dim
// i + rotary_dim/2 and the pair is turned by the angle position·inv_freq[i];
// the remaining head_dim - rotary_dim dims pass through (Phi-2 rotates 32 of
// 80, InternLM2 all 128).
//
// Numerics follow transformers step by step in fp32, so results match it to
// about an ulp: inv_freq = 1/(base ** (float(2i)/dim)), angle = float(pos) ·
// inv_freq (one fp32 product), cos and sin of the fp32 angle (here in double,
// rounded once, i.e. correctly rounded), then y = x·cos + rotate_half(x)·sin
// with a rounding after each product and the sum, as torch's separate ops do.
//
// Dynamic NTK (InternLM2's rope_scaling {"type": "dynamic", "factor": f}): for
// a row whose length seq_len exceeds max_position_embeddings, the base becomes
//   theta · ((f·seq_len/max_pos) - (f-1)) ** (dim/(dim-2))
// evaluated in double as InternLM2's remote code does (transformers' own
// "dynamic" rope evaluates it in fp32 and can differ by an ulp of inv_freq).
//
// The backward is the rotation by the opposite angle (the map is orthogonal).
// cos/sin rows of the unscaled base are cached for positions below
// max_position_embeddings (the hot path: every layer's q and k of every step
// reuse them); other positions and NTK-scaled rows are computed per call.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <qlora/core/error.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/tensor_view.hpp>
#include <qlora/nn/detail/f32_arguments.hpp>
#include <qlora/nn/detail/row_reduction.hpp>
#include <span>
#include <utility>
#include <vector>

namespace qlora {

struct RotaryConfig {
  int head_dim = 0;
  int rotary_dim = 0;               ///< leading dims of each head that rotate (even)
  double theta = 10000.0;           ///< rope_theta
  double dynamic_ntk_factor = 0.0;  ///< rope_scaling "dynamic" factor; 0: off
  std::int64_t max_position_embeddings = 2048;
};

class RotaryEmbedding {
 public:
  explicit RotaryEmbedding(RotaryConfig config) : config_(checked(config)), cache_(std::make_unique<Cache>()) {}

  [[nodiscard]] const RotaryConfig& config() const noexcept { return config_; }

  /// The base of a row of `seq_len` tokens: theta, or the NTK-scaled base beyond max_position_embeddings.
  [[nodiscard]] double base(std::int64_t seq_len) const noexcept {
    const double f = config_.dynamic_ntk_factor;
    if (f == 0.0 || seq_len <= config_.max_position_embeddings) return config_.theta;
    const double dim = config_.rotary_dim;
    return config_.theta *
           std::pow(
               (f * static_cast<double>(seq_len) / static_cast<double>(config_.max_position_embeddings)) - (f - 1.0),
               dim / (dim - 2.0));
  }

  /// inv_freq [rotary_dim/2] of a row of `seq_len` tokens, in fp32 as transformers computes it.
  [[nodiscard]] std::vector<float> inverse_frequencies(std::int64_t seq_len) const {
    const auto base_f = static_cast<float>(base(seq_len));
    std::vector<float> inv_freq(static_cast<std::size_t>(half()));
    for (int i = 0; i < half(); ++i) {
      const float exponent = static_cast<float>(2 * i) / static_cast<float>(config_.rotary_dim);
      inv_freq[static_cast<std::size_t>(i)] =
          1.0f / static_cast<float>(std::pow(static_cast<double>(base_f), static_cast<double>(exponent)));
    }
    return inv_freq;
  }

  /// Rotates x [T, heads, head_dim] in place; token t sits at positions[t] of a row of seq_len tokens.
  void apply(const TensorView& x, std::span<const std::int32_t> positions, std::int64_t seq_len,
             unsigned threads = default_thread_count()) const {
    rotate(x, positions, seq_len, 1.0f, "rotary_embedding.apply", "x", threads);
  }

  /// Turns dy (the gradient at apply's output) in place into the gradient at its input.
  void apply_backward(const TensorView& dx, std::span<const std::int32_t> positions, std::int64_t seq_len,
                      unsigned threads = default_thread_count()) const {
    rotate(dx, positions, seq_len, -1.0f, "rotary_embedding.apply_backward", "dx", threads);
  }

  /// cos and sin [tokens, rotary_dim/2] of each token's angles, the values apply() turns it by
  /// (for a backend that rotates elsewhere: cuda/rotary.cuh uploads them).
  struct TokenAngles {
    std::vector<float> cos, sin;
  };
  [[nodiscard]] TokenAngles token_angles(std::span<const std::int32_t> positions, std::int64_t seq_len,
                                         const char* op) const {
    const std::int32_t max_position = checked_positions(positions, seq_len, op);
    const AngleSource source = angle_source(max_position, seq_len);
    const auto width = static_cast<std::size_t>(half());
    TokenAngles out{std::vector<float>(positions.size() * width), std::vector<float>(positions.size() * width)};
    std::vector<float> cos_buffer(width), sin_buffer(width);
    for (std::size_t t = 0; t < positions.size(); ++t) {
      const auto [cos_row, sin_row] = source.rows(*this, positions[t], cos_buffer.data(), sin_buffer.data());
      std::copy(cos_row, cos_row + width, out.cos.begin() + static_cast<std::ptrdiff_t>(t * width));
      std::copy(sin_row, sin_row + width, out.sin.begin() + static_cast<std::ptrdiff_t>(t * width));
    }
    return out;
  }

 private:
  /// cos and sin of the unscaled base for positions [0, positions), row-major [position, rotary_dim/2].
  struct AngleTable {
    std::int64_t positions = 0;
    std::vector<float> cos, sin;
  };
  /// Grown under the mutex, read through immutable snapshots, so apply() may run on several threads.
  struct Cache {
    std::mutex mutex;
    std::shared_ptr<const AngleTable> table = std::make_shared<AngleTable>();
  };

  static RotaryConfig checked(const RotaryConfig& c) {
    check(c.head_dim > 0, "InvalidArgument", "rotary_embedding: head_dim {} must be positive", c.head_dim);
    check(c.rotary_dim > 0 && c.rotary_dim % 2 == 0 && c.rotary_dim <= c.head_dim, "InvalidArgument",
          "rotary_embedding: rotary_dim {} must be even and in [2, head_dim = {}]", c.rotary_dim, c.head_dim);
    check(std::isfinite(c.theta) && c.theta > 0.0, "InvalidArgument", "rotary_embedding: theta {} must be positive",
          c.theta);
    check(c.max_position_embeddings > 0, "InvalidArgument",
          "rotary_embedding: max_position_embeddings {} must be positive", c.max_position_embeddings);
    check(c.dynamic_ntk_factor == 0.0 || (std::isfinite(c.dynamic_ntk_factor) && c.dynamic_ntk_factor >= 1.0),
          "InvalidArgument", "rotary_embedding: dynamic_ntk_factor {} must be 0 (off) or at least 1",
          c.dynamic_ntk_factor);
    check(c.dynamic_ntk_factor == 0.0 || c.rotary_dim > 2, "InvalidArgument",
          "rotary_embedding: dynamic NTK needs rotary_dim > 2 (its exponent is dim/(dim-2)), got {}", c.rotary_dim);
    return c;
  }

  [[nodiscard]] int half() const noexcept { return config_.rotary_dim / 2; }

  /// cos and sin of float(position)·inv_freq[i] for every i.
  void angles(std::int32_t position, std::span<const float> inv_freq, float* cos_row, float* sin_row) const {
    const auto pos = static_cast<float>(position);
    for (int i = 0; i < half(); ++i) {
      const auto angle = static_cast<double>(pos * inv_freq[static_cast<std::size_t>(i)]);
      cos_row[i] = static_cast<float>(std::cos(angle));
      sin_row[i] = static_cast<float>(std::sin(angle));
    }
  }

  /// A table of the unscaled base covering positions [0, needed) (capped at max_position_embeddings).
  [[nodiscard]] std::shared_ptr<const AngleTable> table_for(std::int64_t needed) const {
    const std::lock_guard lock(cache_->mutex);
    if (cache_->table->positions >= needed) return cache_->table;
    // Grow geometrically so a generation loop that adds one position per step rebuilds rarely.
    const std::int64_t positions =
        std::min(config_.max_position_embeddings, std::max<std::int64_t>(needed, 2 * cache_->table->positions));
    auto table = std::make_shared<AngleTable>();
    table->positions = positions;
    const auto width = static_cast<std::size_t>(half());
    table->cos.resize(static_cast<std::size_t>(positions) * width);
    table->sin.resize(table->cos.size());
    const std::vector<float> inv_freq = inverse_frequencies(0);
    for (std::int64_t p = 0; p < positions; ++p) {
      angles(static_cast<std::int32_t>(p), inv_freq, &table->cos[static_cast<std::size_t>(p) * width],
             &table->sin[static_cast<std::size_t>(p) * width]);
    }
    cache_->table = std::move(table);
    return cache_->table;
  }

  /// Checks positions (non-negative) and seq_len (positive); returns the largest position (0 if none).
  static std::int32_t checked_positions(std::span<const std::int32_t> positions, std::int64_t seq_len, const char* op) {
    check(seq_len > 0, "InvalidArgument", "{}: seq_len {} must be positive", op, seq_len);
    std::int32_t max_position = 0;
    for (std::size_t t = 0; t < positions.size(); ++t) {
      check(positions[t] >= 0, "InvalidPositionIds", "{}: position {} of token {} is negative", op, positions[t], t);
      max_position = std::max(max_position, positions[t]);
    }
    return max_position;
  }

  /// Where a call's cos/sin rows come from: the cached unscaled table, else computed per token.
  struct AngleSource {
    std::shared_ptr<const AngleTable> table;  ///< null when the base is NTK-scaled
    std::vector<float> inv_freq;

    /// The rows of `position`: the table's, or computed into the buffers.
    std::pair<const float*, const float*> rows(const RotaryEmbedding& rope, std::int32_t position, float* cos_buffer,
                                               float* sin_buffer) const {
      const auto width = static_cast<std::size_t>(rope.half());
      if (table && position < table->positions) {
        return {&table->cos[static_cast<std::size_t>(position) * width],
                &table->sin[static_cast<std::size_t>(position) * width]};
      }
      rope.angles(position, inv_freq, cos_buffer, sin_buffer);
      return {cos_buffer, sin_buffer};
    }
  };

  [[nodiscard]] AngleSource angle_source(std::int32_t max_position, std::int64_t seq_len) const {
    const bool scaled = base(seq_len) != config_.theta;
    return {scaled ? nullptr
                   : table_for(std::min<std::int64_t>(std::int64_t{max_position} + 1, config_.max_position_embeddings)),
            inverse_frequencies(seq_len)};
  }

  void rotate(const TensorView& x, std::span<const std::int32_t> positions, std::int64_t seq_len, float sin_sign,
              const char* op, const char* name, unsigned threads) const {
    check(x.rank() == 3 && x.shape()[2] == config_.head_dim, "ShapeMismatch",
          "{}: {} is {}, expected [tokens, heads, {}]", op, name, x.shape().to_string(), config_.head_dim);
    const std::int64_t tokens = x.shape()[0];
    const std::int64_t heads = x.shape()[1];
    detail::F32Arguments{op}.tensor(x, x.shape(), name);
    check(static_cast<std::int64_t>(positions.size()) == tokens, "ShapeMismatch", "{}: {} positions for {} tokens", op,
          positions.size(), tokens);
    const std::int32_t max_position = checked_positions(positions, seq_len, op);
    if (tokens == 0) return;

    const AngleSource source = angle_source(max_position, seq_len);
    const int h = half();
    const std::int64_t head_dim = config_.head_dim;
    auto* data = x.data<float>();

    const auto rotate_tokens = [&](std::int64_t begin, std::int64_t end) {
      std::vector<float> cos_buffer(static_cast<std::size_t>(h)), sin_buffer(static_cast<std::size_t>(h));
      for (std::int64_t t = begin; t < end; ++t) {
        const auto [cos_row, sin_row] =
            source.rows(*this, positions[static_cast<std::size_t>(t)], cos_buffer.data(), sin_buffer.data());
        for (std::int64_t head = 0; head < heads; ++head) {
          float* first = data + (t * heads + head) * head_dim;
          float* second = first + h;
          for (int i = 0; i < h; ++i) {
            const float c = cos_row[i];
            const float s = sin_sign * sin_row[i];
            const float x1 = first[i];
            const float x2 = second[i];
            // Rounded as torch's x*cos + rotate_half(x)*sin: each product, then the sum.
            const float x1c = x1 * c, x2s = x2 * s, x2c = x2 * c, x1s = x1 * s;
            first[i] = x1c - x2s;
            second[i] = x2c + x1s;
          }
        }
      }
    };
    detail::for_row_chunks(tokens, heads * head_dim, rotate_tokens, threads);
  }

  RotaryConfig config_;
  std::unique_ptr<Cache> cache_;
};

}  // namespace qlora
