// Compiler glue shared by every header: host/device function attributes and
// the one switch that says whether nvcc is compiling this translation unit.
//
// Rule for the whole library: nothing here (or anywhere) changes the layout of
// a type under __CUDACC__, so a g++ TU and an nvcc TU of one program agree on
// every qlora type. Only attributes differ.
#pragma once

#if defined(__CUDACC__)
#define QLORA_HOST_DEVICE __forceinline__ __host__ __device__
#define QLORA_DEVICE __forceinline__ __device__
#define QLORA_HOST __host__ inline
#else
#define QLORA_HOST_DEVICE inline
#define QLORA_DEVICE inline
#define QLORA_HOST inline
#endif

// fmt 9 switches its constexpr code off for every nvcc (FMT_USE_CONSTEXPR 0),
// which leaves its C++20 consteval format-string checks calling non-constexpr
// functions: every fmt::format call in a header fails to compile under nvcc
// (and, as a side effect, std::span's range constructor stops matching).
// nvcc 12+ compiles fmt's constexpr code, so turn it back on -- as g++ TUs
// have it -- before any fmt header. It must precede the first fmt include of
// the TU, so qlora headers include this file first (a TU that includes fmt
// itself before any qlora header must define FMT_USE_CONSTEXPR=1 under nvcc).
#if defined(__NVCC__) && !defined(FMT_USE_CONSTEXPR)
#define FMT_USE_CONSTEXPR 1
#endif

#if defined(__CUDA_ARCH__)
#define QLORA_IN_DEVICE_CODE 1
#else
#define QLORA_IN_DEVICE_CODE 0
#endif

// Quantization is bit-exact with bitsandbytes only under IEEE float
// semantics; -ffast-math (reassociation, reciprocal approximations, FTZ)
// silently changes codes, so refuse it rather than produce different weights.
#if defined(__FAST_MATH__) && !defined(QLORA_ALLOW_FAST_MATH)
#error "qlora needs IEEE float semantics: do not compile it with -ffast-math (define QLORA_ALLOW_FAST_MATH to override)"
#endif
