// NF4: bitsandbytes' 4-bit NormalFloat code. The 16 values and the 15
// encoder thresholds below are bitsandbytes' own float32 constants
// (functional.get_4bit_type("nf4"), csrc/kernels.cu dQuantizeNF4 /
// nf4_dequantization_lut); tests/quant/blockwise_4bit_test.cpp holds our
// quantizer to bitsandbytes 0.50.2's output byte for byte.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

#include <qlora/config.hpp>

namespace qlora {

struct NF4 {
  static constexpr std::string_view name = "nf4";
  /// Code of an exact zero: the nibble used to pad an odd element count.
  static constexpr std::uint8_t zero_code = 7;
  /// The table bitsandbytes serializes as `weight.quant_map` (the code values).
  static constexpr std::array<float, 16> quant_map = {
      -0x1p+0f,        -0x1.647362p-1f, -0x1.0cd66p-1f,  -0x1.94654p-2f, -0x1.23449ap-2f, -0x1.7a6a7ep-3f,
      -0x1.74f0e2p-4f, 0x0p+0f,         0x1.45f5fep-4f,  0x1.4995c6p-3f, 0x1.f809bap-3f,  0x1.5a0674p-2f,
      0x1.c3497p-2f,   0x1.200f56p-1f,  0x1.722766p-1f,  0x1p+0f};

  /// Code -> normalized value in [-1, 1]. The codes are sorted ascending.
  static QLORA_HOST_DEVICE float decode(std::uint8_t code) noexcept {
    constexpr float table[16] = {
        -0x1p+0f,         -0x1.647362p-1f, -0x1.0cd66p-1f,  -0x1.94654p-2f,   // -1.0, -0.6961928, -0.5250731, -0.3949175
        -0x1.23449ap-2f,  -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0x0p+0f,          // -0.2844414, -0.1847734, -0.0910500, 0
        0x1.45f5fep-4f,   0x1.4995c6p-3f,  0x1.f809bap-3f,  0x1.5a0674p-2f,   // 0.0795803, 0.1609302, 0.2461123, 0.3379152
        0x1.c3497p-2f,    0x1.200f56p-1f,  0x1.722766p-1f,  0x1p+0f,          // 0.4407098, 0.5626170, 0.7229568, 1.0
    };
    return table[code & 0xF];
  }

  /// Normalized value -> nearest code. Exactly bitsandbytes' rule: the code
  /// is the number of thresholds strictly below x, the thresholds being the
  /// float32 midpoints of neighbouring codes (so an exact tie goes to the
  /// lower code). Written as a branch-free sum so it vectorizes on the CPU
  /// and does not diverge on the GPU. NaN compares false everywhere: code 0.
  static QLORA_HOST_DEVICE std::uint8_t encode(float x) noexcept {
    return static_cast<std::uint8_t>(
        (x > -0x1.b239bp-1f) + (x > -0x1.38a4ep-1f) + (x > -0x1.d709p-2f) + (x > -0x1.5bd4ecp-2f) +
        (x > -0x1.e079d8p-3f) + (x > -0x1.1a7178p-3f) + (x > -0x1.74f0e2p-5f) + (x > 0x1.45f5fep-5f) +
        (x > 0x1.ec90c4p-4f) + (x > 0x1.a0cfcp-3f) + (x > 0x1.2b05a8p-2f) + (x > 0x1.8ea7f2p-2f) +
        (x > 0x1.00da08p-1f) + (x > 0x1.491b5ep-1f) + (x > 0x1.b913b4p-1f));
  }
};

}  // namespace qlora
