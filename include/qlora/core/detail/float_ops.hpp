// IWYU pragma: private, include <qlora/core/dtype.hpp>
// Single IEEE round-to-nearest-even float operations that no compiler may
// fuse into an FMA, for arithmetic that must give the same bits on every
// build of the CPU path and in CUDA device code (the nested-absmax rebuild,
// the 8-bit LUT bin): bitsandbytes rounds these steps separately.
//
// Why not plain code: a multiply followed by an add may be contracted into
// one fused multiply-add (one rounding instead of two). Writing the steps in
// double and rounding each to float does not prevent it either: both g++
// (-O2 -march=haswell, whose default is -ffp-contract=fast) and nvcc's NVVM
// narrow fl32(fl64(a) * fl64(b)) back to a float multiply and then fuse it
// with the following add (seen as vfmadd132ss and fma.rn.f32).
//  - Device code uses __fmul_rn/__fadd_rn, which are never contracted.
//  - Host code passes the rounded result through an empty asm statement
//    that the optimizer must treat as opaque, so it cannot fuse the multiply
//    with the add that follows (no instruction is emitted; a volatile float
//    is the fallback where the register constraint is unknown).
// Arguments should come from these functions or from memory (not from an
// unrounded expression such as x * y written inline by the caller).
#pragma once

#include <qlora/config.hpp>

namespace qlora::detail {

/// Makes `value` opaque to the optimizer at no run-time cost (host only).
inline float opaque(float value) noexcept {
#if defined(__GNUC__) && defined(__x86_64__)
  __asm__("" : "+x"(value));
  return value;
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(value));
  return value;
#else
  const volatile float stored = value;
  return stored;
#endif
}

/// fl32(a * b), never fused with a neighbouring add.
QLORA_HOST_DEVICE float mul_rn(float a, float b) noexcept {
#if QLORA_IN_DEVICE_CODE
  return __fmul_rn(a, b);
#else
  return opaque(a * b);
#endif
}

/// fl32(a + b), never fused with a neighbouring multiply.
QLORA_HOST_DEVICE float add_rn(float a, float b) noexcept {
#if QLORA_IN_DEVICE_CODE
  return __fadd_rn(a, b);
#else
  return opaque(a + b);
#endif
}

}  // namespace qlora::detail
