// FrozenWeight<Quant, Compute>: the base weight W [out_features, in_features]
// of a LoRA layer, frozen, stored the way Quant says (NF4 / FP4 packed 4-bit,
// or NoQuant: dense in the Compute type), and handed to the GEMMs one tile at
// a time. There is no persistent full-precision copy: `dequantize_tile`
// writes only the rows and columns asked for into a caller-owned buffer.
//
// Tile values are exactly what bitsandbytes' matmul_4bit multiplies with:
// code value * block absmax in float32, rounded to the Compute type (its
// dequantize_4bit output dtype), here widened back to float for the GEMM.
#pragma once

#include <fmt/ranges.h>

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/quant/blockwise_4bit.hpp>
#include <qlora/quant/quant_policy.hpp>
#include <qlora/quant/quant_state.hpp>

#include <cstdint>
#include <cstring>
#include <span>
#include <utility>

namespace qlora {

namespace detail {
/// A tile must lie inside the [rows, cols] weight and fit rows of `ld` floats.
inline void check_tile(std::int64_t row_begin, std::int64_t row_end, std::int64_t col_begin, std::int64_t col_end,
                       std::int64_t ld, std::int64_t rows, std::int64_t cols) {
  check(0 <= row_begin && row_begin <= row_end && row_end <= rows && 0 <= col_begin && col_begin <= col_end &&
            col_end <= cols && ld >= col_end - col_begin,
        "ShapeMismatch", "tile rows [{}, {}) x cols [{}, {}) (row stride {}) is outside the [{}, {}] weight", row_begin,
        row_end, col_begin, col_end, ld, rows, cols);
}
}  // namespace detail

template <QuantPolicy Quant, FloatStorage Compute>
class FrozenWeight;

/// A 4-bit base weight (NF4 or FP4): packed codes plus their quant state.
template <FourBitCodebook Quant, FloatStorage Compute>
class FrozenWeight<Quant, Compute> {
 public:
  /// Takes a quantized weight (e.g. read from a bnb-4bit checkpoint). Its
  /// quant type must be Quant's and its shape [out, in].
  explicit FrozenWeight(Quantized4bit weight) : weight_(std::move(weight)) {
    const QuantState& state = weight_.state;
    check(state.quant_type == quant_type_of<Quant>, "QuantTypeMismatch", "base weight is {}, the layer expects {}",
          quant_type_name(state.quant_type), quant_type_name(quant_type_of<Quant>));
    check(state.shape.size() == 2 && state.shape[0] > 0 && state.shape[1] > 0, "ShapeMismatch",
          "base weight must be [out_features, in_features] with both > 0, got [{}]", fmt::join(state.shape, ", "));
    state.validate(weight_.packed.size());
  }

  /// Quantizes a dense [out, in] weight (F32, F16 or BF16), bit-exact with bitsandbytes.
  static FrozenWeight quantize(const TensorView& dense, const Quantize4bitOptions& options = {}) {
    check(dense.rank() == 2, "ShapeMismatch", "base weight must be [out_features, in_features], got {}",
          dense.shape().to_string());
    std::vector<std::int64_t> shape{dense.shape()[0], dense.shape()[1]};
    return visit_float_dtype(dense.dtype(), [&]<class T>(T) {
      return FrozenWeight(quantize_4bit<Quant, T>(dense.span<const T>(), shape, options));
    });
  }

  [[nodiscard]] std::int64_t out_features() const noexcept { return weight_.state.shape[0]; }
  [[nodiscard]] std::int64_t in_features() const noexcept { return weight_.state.shape[1]; }
  [[nodiscard]] const Quantized4bit& quantized() const noexcept { return weight_; }
  /// Bytes held: packed codes plus the (possibly nested) absmax statistics.
  [[nodiscard]] std::size_t bytes() const noexcept {
    const QuantState& state = weight_.state;
    std::size_t total = weight_.packed.size() + state.absmax.size() * sizeof(float);
    if (state.nested) {
      total += state.nested->codes.size() + (state.nested->absmax.size() + state.nested->code_map.size()) * sizeof(float);
    }
    return total;
  }

  /// out[(r - row_begin) * ld + (c - col_begin)] = W̃[r, c] for the tile
  /// [row_begin, row_end) x [col_begin, col_end).
  void dequantize_tile(std::int64_t row_begin, std::int64_t row_end, std::int64_t col_begin, std::int64_t col_end,
                       float* out, std::int64_t ld) const {
    detail::check_tile(row_begin, row_end, col_begin, col_end, ld, out_features(), in_features());
    const std::int64_t in = in_features();
    const std::int64_t blocksize = weight_.state.blocksize;
    const std::uint8_t* packed = weight_.packed.data();
    float table[16];
    std::int64_t table_block = -1;
    for (std::int64_t row = row_begin; row < row_end; ++row) {
      float* destination = out + (row - row_begin) * ld;
      for (std::int64_t index = row * in + col_begin, end = row * in + col_end; index < end;) {
        const std::int64_t block = index / blocksize;
        if (block != table_block) {  // 16 products per block, then one lookup per element
          const float scale = weight_.state.block_absmax(block);
          for (std::uint8_t code = 0; code < 16; ++code) {
            table[code] = to_float(from_float<Compute>(Quant::decode(code) * scale));
          }
          table_block = block;
        }
        const std::int64_t run_end = std::min(end, (block + 1) * blocksize);
        for (; index < run_end; ++index) {
          const std::uint8_t byte = packed[index / 2];
          *destination++ = table[(index % 2 == 0) ? byte >> 4 : byte & 0xF];
        }
      }
    }
  }

 private:
  Quantized4bit weight_;
};

/// A dense base weight kept in the Compute type (QLoRA's "Quant = None": plain LoRA).
template <FloatStorage Compute>
class FrozenWeight<NoQuant, Compute> {
 public:
  /// Takes (a copy of) a dense [out, in] weight, converting it to Compute.
  explicit FrozenWeight(const TensorView& dense) {
    check(dense.rank() == 2 && dense.shape()[0] > 0 && dense.shape()[1] > 0, "ShapeMismatch",
          "base weight must be [out_features, in_features], got {}", dense.shape().to_string());
    weight_ = Tensor(dtype_of_v<Compute>, dense.shape());
    const auto destination = weight_.span<Compute>();
    visit_float_dtype(dense.dtype(), [&]<class T>(T) {
      const auto source = dense.span<const T>();
      for (std::size_t i = 0; i < source.size(); ++i) destination[i] = from_float<Compute>(to_float(source[i]));
    });
  }

  [[nodiscard]] std::int64_t out_features() const noexcept { return weight_.shape()[0]; }
  [[nodiscard]] std::int64_t in_features() const noexcept { return weight_.shape()[1]; }
  [[nodiscard]] const Tensor& dense() const noexcept { return weight_; }
  [[nodiscard]] std::size_t bytes() const noexcept { return weight_.byte_size(); }

  void dequantize_tile(std::int64_t row_begin, std::int64_t row_end, std::int64_t col_begin, std::int64_t col_end,
                       float* out, std::int64_t ld) const {
    detail::check_tile(row_begin, row_end, col_begin, col_end, ld, out_features(), in_features());
    const Compute* values = weight_.view().data<const Compute>();
    const std::int64_t in = in_features();
    for (std::int64_t row = row_begin; row < row_end; ++row) {
      const Compute* source = values + row * in;
      float* destination = out + (row - row_begin) * ld;
      if constexpr (std::is_same_v<Compute, float>) {
        std::memcpy(destination, source + col_begin, static_cast<std::size_t>(col_end - col_begin) * sizeof(float));
      } else {
        for (std::int64_t col = col_begin; col < col_end; ++col) *destination++ = to_float(source[col]);
      }
    }
  }

 private:
  Tensor weight_;
};

}  // namespace qlora
