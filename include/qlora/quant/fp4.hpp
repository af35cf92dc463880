// FP4: bitsandbytes' 4-bit float (1 sign bit, then a 3-bit magnitude index;
// magnitudes are the raw FP4 values 0, 0.0625, 8, 12, 4, 6, 2, 3 divided by
// 12). Values from bitsandbytes' functional.get_4bit_type("fp4") and
// csrc/kernels.cu; the code order is not the value order.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

#include <qlora/config.hpp>

namespace qlora {

struct FP4 {
  static constexpr std::string_view name = "fp4";
  /// The code a padded zero element gets (what bitsandbytes writes).
  static constexpr std::uint8_t zero_code = 0;
  /// The table bitsandbytes serializes as `weight.quant_map`: +0.0 at index 8
  /// (get_4bit_type writes the Python integer literal -0).
  static constexpr std::array<float, 16> quant_map = {
      0x0p+0f,         0x1.555556p-8f,  0x1.555556p-1f,  0x1p+0f,  0x1.555556p-2f,  0x1p-1f,
      0x1.555556p-3f,  0x1p-2f,         0x0p+0f,         -0x1.555556p-8f, -0x1.555556p-1f, -0x1p+0f,
      -0x1.555556p-2f, -0x1p-1f,        -0x1.555556p-3f, -0x1p-2f};

  /// Code -> normalized value. Code 8 decodes to -0.0 as in bitsandbytes'
  /// CUDA kernel and native CPU dequantizer (get_4bit_type's serialized
  /// table holds +0.0 there; the sign only shows in the bits of a zero).
  static QLORA_HOST_DEVICE float decode(std::uint8_t code) noexcept {
    constexpr float table[16] = {
        0x0p+0f,  0x1.555556p-8f,  0x1.555556p-1f,  0x1p+0f,   // 0, 1/192, 2/3, 1
        0x1.555556p-2f,  0x1p-1f,  0x1.555556p-3f,  0x1p-2f,   // 1/3, 1/2, 1/6, 1/4
        -0x0p+0f, -0x1.555556p-8f, -0x1.555556p-1f, -0x1p+0f,  // the negatives of codes 0..7
        -0x1.555556p-2f, -0x1p-1f, -0x1.555556p-3f, -0x1p-2f,
    };
    return table[code & 0xF];
  }

  /// Normalized value -> code, as bitsandbytes 0.50's CPU quantizer does it
  /// (backends/default/ops.py): bucketize against the float32 midpoints of the
  /// sorted code values, then map the sorted position back to a code. The two
  /// zeros sort as code 0 then code 8, so 0 and tiny negatives get code 0 and
  /// tiny positives (0 < x <= 1/384) get code 8. bitsandbytes' CUDA kernel
  /// uses slightly different literal thresholds (nf4_spec.md §1.4); we match
  /// the CPU rule on every backend so that our CPU and CUDA outputs agree.
  static QLORA_HOST_DEVICE std::uint8_t encode(float x) noexcept {
    constexpr std::uint8_t code_of_sorted_position[16] = {11, 10, 13, 12, 15, 14, 9, 0,
                                                          8,  1,  6,  7,  4,  5,  2, 3};
    const int position =
        (x > -0x1.aaaaacp-1f) + (x > -0x1.2aaaacp-1f) + (x > -0x1.aaaaacp-2f) + (x > -0x1.2aaaacp-2f) +
        (x > -0x1.aaaaacp-3f) + (x > -0x1.6p-4f) + (x > -0x1.555556p-9f) + (x > 0x0p+0f) +
        (x > 0x1.555556p-9f) + (x > 0x1.6p-4f) + (x > 0x1.aaaaacp-3f) + (x > 0x1.2aaaacp-2f) +
        (x > 0x1.aaaaacp-2f) + (x > 0x1.2aaaacp-1f) + (x > 0x1.aaaaacp-1f);
    return code_of_sorted_position[position];
  }
};

}  // namespace qlora
