// Blockwise 4-bit quantization and dequantization (NF4 / FP4), bit-exact with
// bitsandbytes: the tensor is flattened, cut into blocks of `blocksize`
// consecutive elements (blocks cross row boundaries), each block scaled by its
// absmax and encoded to 4-bit codes packed two per byte, high nibble first.
//
// Two CPU implementations: `*_ref` are plain per-element loops that read like
// the specification and are the fixed point every other path is tested
// against; the unsuffixed functions are the multi-threaded path used in
// practice. CUDA kernels live in cuda/quantize_4bit.cuh and
// cuda/dequantize_4bit.cuh.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <span>
#include <vector>

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/quant/detail/block_scale.hpp>
#include <qlora/quant/detail/nibble_lookup.hpp>
#include <qlora/quant/double_quant.hpp>
#include <qlora/quant/quant_policy.hpp>
#include <qlora/quant/quant_state.hpp>

namespace qlora {

struct Quantize4bitOptions {
  std::int64_t blocksize = 64;  ///< bitsandbytes' default
  bool double_quant = false;    ///< quantize the absmax too (bitsandbytes' compress_statistics)
  unsigned threads = default_thread_count();
};

namespace detail {

/// The state of a fresh quantization, checked: the shape must describe exactly
/// `element_count` elements and the blocksize must be one bitsandbytes allows.
template <FourBitCodebook Q, FloatStorage T>
QuantState new_quant_state(std::size_t element_count, std::vector<std::int64_t> shape, std::int64_t blocksize) {
  try {
    detail::checked_element_count(shape, "quantize_4bit");
  } catch (const Error& e) {
    throw Error("ShapeMismatch", e.message());
  }
  QuantState state{quant_type_of<Q>, blocksize, dtype_of_v<T>, std::move(shape), {}, std::nullopt};
  check(is_valid_4bit_blocksize(blocksize), "InvalidBlocksize",
        "blocksize {} is not a power of two in [32, 4096] (bitsandbytes' allowed sizes)", blocksize);
  check(state.numel() == static_cast<std::int64_t>(element_count), "ShapeMismatch",
        "shape has {} elements but the input has {}", state.numel(), element_count);
  return state;
}

/// The input as float, refusing NaN and Inf: bitsandbytes' CPU and CUDA paths
/// disagree on them (nf4_spec.md §2) and neither gives a usable weight.
template <FloatStorage T>
float finite_value(T element, std::int64_t index) {
  const float value = to_float(element);
  check(std::isfinite(value), "NonFiniteInput", "input element {} is {}; 4-bit quantization needs finite values",
        index, value);
  return value;
}

/// max |x| over `length` values; throws NonFiniteInput naming the first NaN
/// or Inf (its index counted from the tensor start, `first_index`). The scan
/// itself is branch-free so it vectorizes; the slow search runs only on failure.
template <FloatStorage T>
float finite_max_magnitude(const T* values, std::int64_t length, std::int64_t first_index) {
  float max_magnitude = 0.0f;
  bool saw_nan = false;
  for (std::int64_t i = 0; i < length; ++i) {
    const float magnitude = std::fabs(to_float(values[i]));
    saw_nan |= magnitude != magnitude;
    max_magnitude = std::max(max_magnitude, magnitude);
  }
  if (saw_nan || !std::isfinite(max_magnitude)) [[unlikely]] {
    for (std::int64_t i = 0; i < length; ++i) finite_value(values[i], first_index + i);
  }
  return max_magnitude;
}

/// Double quantization, when asked for, replaces the float absmax by its nested form.
inline void compress_absmax(QuantState& state, bool double_quant) {
  if (!double_quant) return;
  state.nested = double_quantize(state.absmax, mean_offset(state.absmax));
  state.absmax.clear();
}

}  // namespace detail

/// Reference quantizer: per-element loops, one thread.
template <FourBitCodebook Q, FloatStorage T>
Quantized4bit quantize_4bit_ref(std::span<const T> input, std::vector<std::int64_t> shape,
                                const Quantize4bitOptions& options = {}) {
  QuantState state = detail::new_quant_state<Q, T>(input.size(), std::move(shape), options.blocksize);
  const std::int64_t n = state.numel();
  const std::int64_t blocksize = state.blocksize;
  const std::int64_t blocks = state.block_count();

  std::vector<float> max_magnitude(static_cast<std::size_t>(blocks), 0.0f);
  for (std::int64_t i = 0; i < n; ++i) {
    auto& block_max = max_magnitude[static_cast<std::size_t>(i / blocksize)];
    block_max = std::max(block_max, std::fabs(detail::finite_value(input[static_cast<std::size_t>(i)], i)));
  }
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(n + 1), Q::zero_code);  // +1: padding for odd n
  state.absmax.resize(static_cast<std::size_t>(blocks));
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t block = i / blocksize;
    const bool partial = (block + 1) * blocksize > n;
    const detail::BlockScale scale = detail::block_scale(max_magnitude[static_cast<std::size_t>(block)], partial);
    state.absmax[static_cast<std::size_t>(block)] = scale.stored_absmax;
    codes[static_cast<std::size_t>(i)] = Q::encode(detail::normalize(to_float(input[static_cast<std::size_t>(i)]), scale));
  }
  std::vector<std::uint8_t> packed(static_cast<std::size_t>(state.packed_bytes()));
  for (std::size_t k = 0; k < packed.size(); ++k) packed[k] = detail::pack_nibbles(codes[2 * k], codes[2 * k + 1]);
  detail::compress_absmax(state, options.double_quant);
  return Quantized4bit{std::move(packed), std::move(state)};
}

/// Quantizes `input` (row-major, `shape`) to 4-bit codes with policy Q,
/// block by block over `options.threads` threads. Bit-identical to
/// quantize_4bit_ref and to bitsandbytes 0.50's CPU quantize_4bit.
template <FourBitCodebook Q, FloatStorage T>
Quantized4bit quantize_4bit(std::span<const T> input, std::vector<std::int64_t> shape,
                            const Quantize4bitOptions& options = {}) {
  QuantState state = detail::new_quant_state<Q, T>(input.size(), std::move(shape), options.blocksize);
  const std::int64_t n = state.numel();
  const std::int64_t blocksize = state.blocksize;
  const std::int64_t blocks = state.block_count();
  std::vector<std::uint8_t> packed(static_cast<std::size_t>(state.packed_bytes()));
  state.absmax.resize(static_cast<std::size_t>(blocks));

  // Blocks start at even elements (blocksize >= 32 is even), so each block
  // owns whole bytes. Each step below is a simple loop the compiler can
  // vectorize: magnitude scan, encode into a small buffer, pack pairs.
  const auto quantize_blocks = [&](std::int64_t first_block, std::int64_t last_block) {
    std::uint8_t codes[4096 + 1];  // one block, +1 pad for an odd tail
    for (std::int64_t block = first_block; block < last_block; ++block) {
      const std::int64_t begin = block * blocksize;
      const std::int64_t length = std::min(blocksize, n - begin);
      const T* values = input.data() + begin;
      const float max_magnitude = detail::finite_max_magnitude(values, length, begin);
      const detail::BlockScale scale = detail::block_scale(max_magnitude, length < blocksize);
      state.absmax[static_cast<std::size_t>(block)] = scale.stored_absmax;
      if (scale.divide) {
        for (std::int64_t i = 0; i < length; ++i) codes[i] = Q::encode(to_float(values[i]) / scale.factor);
      } else {
        for (std::int64_t i = 0; i < length; ++i) codes[i] = Q::encode(to_float(values[i]) * scale.factor);
      }
      codes[length] = Q::zero_code;
      std::uint8_t* bytes = packed.data() + begin / 2;
      for (std::int64_t k = 0; k < (length + 1) / 2; ++k) bytes[k] = detail::pack_nibbles(codes[2 * k], codes[2 * k + 1]);
    }
  };
  // ~16K elements per task keeps thread start-up well under the work.
  parallel_for(blocks, std::max<std::int64_t>(1, 16384 / blocksize), quantize_blocks, options.threads);
  detail::compress_absmax(state, options.double_quant);
  return Quantized4bit{std::move(packed), std::move(state)};
}

namespace detail {

template <FloatStorage Out>
void check_dequantize_arguments(std::span<const std::uint8_t> packed, const QuantState& state, std::span<Out> out) {
  state.validate(packed.size());
  check(static_cast<std::int64_t>(out.size()) == state.numel(), "ShapeMismatch",
        "dequantize_4bit: output has {} elements, quant state has {}", out.size(), state.numel());
}

}  // namespace detail

/// Reference dequantizer: out[i] = Out(fl32(decode(code_i) * absmax[i / blocksize])).
template <FloatStorage Out>
void dequantize_4bit_ref(std::span<const std::uint8_t> packed, const QuantState& state, std::span<Out> out) {
  detail::check_dequantize_arguments(packed, state, out);
  visit_quant_type(state.quant_type, [&]<class Q>(Q) {
    for (std::int64_t i = 0; i < state.numel(); ++i) {
      const std::uint8_t byte = packed[static_cast<std::size_t>(i / 2)];
      const std::uint8_t code = (i % 2 == 0) ? byte >> 4 : byte & 0xF;
      out[static_cast<std::size_t>(i)] = from_float<Out>(Q::decode(code) * state.block_absmax(i / state.blocksize));
    }
  });
}

/// Dequantizes into `out` over `threads` threads. Per block the 16 possible
/// outputs are computed once (same float product and rounding as the
/// reference), then each byte is two table loads.
template <FloatStorage Out>
void dequantize_4bit(std::span<const std::uint8_t> packed, const QuantState& state, std::span<Out> out,
                     unsigned threads = default_thread_count()) {
  detail::check_dequantize_arguments(packed, state, out);
  const std::int64_t n = state.numel();
  const std::int64_t blocksize = state.blocksize;
  visit_quant_type(state.quant_type, [&]<class Q>(Q) {
    float code_values[16];
    for (std::uint8_t code = 0; code < 16; ++code) code_values[code] = Q::decode(code);
    const auto dequantize_blocks = [&](std::int64_t first_block, std::int64_t last_block) {
      Out values[16];
      for (std::int64_t block = first_block; block < last_block; ++block) {
        const float scale = state.block_absmax(block);
        const std::int64_t begin = block * blocksize;
        const std::int64_t length = std::min(blocksize, n - begin);
        const std::uint8_t* bytes = packed.data() + begin / 2;
        Out* destination = out.data() + begin;
#if QLORA_HAS_SSSE3_DISPATCH
        if constexpr (std::is_same_v<Out, bf16>) {
          if (detail::cpu_has_ssse3()) {
            detail::dequantize_block_bf16_ssse3(code_values, scale, bytes, length / 2,
                                                reinterpret_cast<std::uint16_t*>(destination));
            if (length % 2 != 0) destination[length - 1] = from_float<Out>(code_values[bytes[length / 2] >> 4] * scale);
            continue;
          }
        }
#endif
        for (std::uint8_t code = 0; code < 16; ++code) values[code] = from_float<Out>(code_values[code] * scale);
        if constexpr (sizeof(Out) == 2) {  // bf16 / fp16: table lookups on the raw 16-bit patterns
          const auto* table = reinterpret_cast<const std::uint16_t*>(values);
          detail::expand_nibbles(bytes, length / 2, table, reinterpret_cast<std::uint16_t*>(destination));
        } else {
          for (std::int64_t k = 0; k < length / 2; ++k) {
            destination[2 * k] = values[bytes[k] >> 4];
            destination[2 * k + 1] = values[bytes[k] & 0xF];
          }
        }
        if (length % 2 != 0) destination[length - 1] = values[bytes[length / 2] >> 4];  // odd n: a lone high nibble
      }
    };
    parallel_for(state.block_count(), std::max<std::int64_t>(1, 32768 / blocksize), dequantize_blocks, threads);
  });
}

}  // namespace qlora
