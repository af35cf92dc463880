// IWYU pragma: private, include <qlora/quant/blockwise_4bit.hpp>
// Expands packed nibbles into 16-bit values through a 16-entry table: the
// inner loop of CPU dequantization to bf16/fp16. With SSSE3 (checked at run
// time, since a header-only library cannot assume the consumer's -march) a
// byte shuffle looks up 32 values per 16 input bytes; otherwise a scalar loop.
// Both produce identical bits: they only copy table entries.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define QLORA_HAS_SSSE3_DISPATCH 1
#else
#define QLORA_HAS_SSSE3_DISPATCH 0
#endif

namespace qlora::detail {

/// out[2k] = table[bytes[k] >> 4], out[2k+1] = table[bytes[k] & 15], for k < byte_count.
inline void expand_nibbles_scalar(const std::uint8_t* bytes, std::int64_t byte_count, const std::uint16_t* table,
                                  std::uint16_t* out) noexcept {
  for (std::int64_t k = 0; k < byte_count; ++k) {
    out[2 * k] = table[bytes[k] >> 4];
    out[2 * k + 1] = table[bytes[k] & 0xF];
  }
}

#if QLORA_HAS_SSSE3_DISPATCH
/// Looks up 16 codes in the split (low byte, high byte) table; stores 16 values.
[[gnu::target("ssse3")]] inline void lookup_16_ssse3(__m128i codes, __m128i table_low, __m128i table_high,
                                                     std::uint16_t* destination) noexcept {
  const __m128i low = _mm_shuffle_epi8(table_low, codes);
  const __m128i high = _mm_shuffle_epi8(table_high, codes);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(destination), _mm_unpacklo_epi8(low, high));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(destination + 8), _mm_unpackhi_epi8(low, high));
}

[[gnu::target("ssse3")]] inline void expand_nibbles_ssse3(const std::uint8_t* bytes, std::int64_t byte_count,
                                                          const std::uint16_t* table, std::uint16_t* out) noexcept {
  alignas(16) std::uint8_t low_bytes[16], high_bytes[16];
  for (int code = 0; code < 16; ++code) {
    low_bytes[code] = static_cast<std::uint8_t>(table[code] & 0xFF);
    high_bytes[code] = static_cast<std::uint8_t>(table[code] >> 8);
  }
  const __m128i table_low = _mm_load_si128(reinterpret_cast<const __m128i*>(low_bytes));
  const __m128i table_high = _mm_load_si128(reinterpret_cast<const __m128i*>(high_bytes));
  const __m128i nibble_mask = _mm_set1_epi8(0x0F);
  std::int64_t k = 0;
  for (; k + 16 <= byte_count; k += 16) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + k));
    const __m128i first = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble_mask);  // even elements
    const __m128i second = _mm_and_si128(packed, nibble_mask);                    // odd elements
    lookup_16_ssse3(_mm_unpacklo_epi8(first, second), table_low, table_high, out + 2 * k);
    lookup_16_ssse3(_mm_unpackhi_epi8(first, second), table_low, table_high, out + 2 * k + 16);
  }
  expand_nibbles_scalar(bytes + k, byte_count - k, table, out + 2 * k);
}

/// Dequantizes one block to bf16: the 16 products code_value * scale are
/// rounded to bf16 (nearest-even, NaN -> 0xFFFF: bf16::from_float's rule)
/// in registers, and their low and high bytes become the two shuffle tables
/// directly — no per-block scalar table build, which otherwise costs more
/// than expanding a 64-element block.
[[gnu::target("ssse3")]] inline void dequantize_block_bf16_ssse3(const float* code_values, float scale,
                                                                 const std::uint8_t* bytes, std::int64_t byte_count,
                                                                 std::uint16_t* out) noexcept {
  const __m128 scale4 = _mm_set1_ps(scale);
  const __m128i one = _mm_set1_epi32(1), bias = _mm_set1_epi32(0x7FFF);
  // Bytes 2 and 3 of each lane are the bf16's low and high byte: gather the
  // four low bytes into bytes 0-3 and the four high bytes into bytes 4-7.
  const __m128i gather = _mm_setr_epi8(2, 6, 10, 14, 3, 7, 11, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  __m128i quarters[4];
  for (int quarter = 0; quarter < 4; ++quarter) {
    const __m128 product = _mm_mul_ps(_mm_loadu_ps(code_values + 4 * quarter), scale4);
    const __m128i u = _mm_castps_si128(product);
    const __m128i lsb = _mm_and_si128(_mm_srli_epi32(u, 16), one);
    const __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(product, product));
    const __m128i rounded = _mm_or_si128(_mm_add_epi32(_mm_add_epi32(u, bias), lsb), nan);
    quarters[quarter] = _mm_shuffle_epi8(rounded, gather);
  }
  const __m128i codes_0_to_7 = _mm_unpacklo_epi32(quarters[0], quarters[1]);    // lo 0-3, lo 4-7, hi 0-3, hi 4-7
  const __m128i codes_8_to_15 = _mm_unpacklo_epi32(quarters[2], quarters[3]);   // lo 8-11, lo 12-15, hi 8-11, hi 12-15
  const __m128i table_low = _mm_unpacklo_epi64(codes_0_to_7, codes_8_to_15);
  const __m128i table_high = _mm_unpackhi_epi64(codes_0_to_7, codes_8_to_15);
  const __m128i nibble_mask = _mm_set1_epi8(0x0F);
  std::int64_t k = 0;
  for (; k + 16 <= byte_count; k += 16) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + k));
    const __m128i first = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble_mask);
    const __m128i second = _mm_and_si128(packed, nibble_mask);
    lookup_16_ssse3(_mm_unpacklo_epi8(first, second), table_low, table_high, out + 2 * k);
    lookup_16_ssse3(_mm_unpackhi_epi8(first, second), table_low, table_high, out + 2 * k + 16);
  }
  if (k < byte_count) {  // the tail of a partial block: spill the tables once
    alignas(16) std::uint8_t low[16], high[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(low), table_low);
    _mm_store_si128(reinterpret_cast<__m128i*>(high), table_high);
    std::uint16_t table[16];
    for (int c = 0; c < 16; ++c) table[c] = static_cast<std::uint16_t>(low[c] | (high[c] << 8));
    expand_nibbles_scalar(bytes + k, byte_count - k, table, out + 2 * k);
  }
}
#endif

inline bool cpu_has_ssse3() noexcept {
#if QLORA_HAS_SSSE3_DISPATCH
  static const bool has_ssse3 = __builtin_cpu_supports("ssse3");
  return has_ssse3;
#else
  return false;
#endif
}

/// The fastest expand_nibbles this CPU supports.
inline void expand_nibbles(const std::uint8_t* bytes, std::int64_t byte_count, const std::uint16_t* table,
                           std::uint16_t* out) noexcept {
#if QLORA_HAS_SSSE3_DISPATCH
  if (cpu_has_ssse3()) {
    expand_nibbles_ssse3(bytes, byte_count, table, out);
    return;
  }
#endif
  expand_nibbles_scalar(bytes, byte_count, table, out);
}

}  // namespace qlora::detail
