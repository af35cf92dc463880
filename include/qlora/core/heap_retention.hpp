// retain_freed_heap_memory: keep what a training step frees inside the
// process for the next step.
//
// glibc's malloc serves a block above its mmap threshold (128 KiB, adapting
// upwards) with a fresh mmap and gives it back on free, and trims the heap top
// above its trim threshold. A training step allocates and frees the same
// activation sizes every step, so by default every step pays the page faults
// and the kernel's zeroing of each page again: about 30% of a step of the tiny
// model (docs/benchmarks.md, "Training step"). Raising both thresholds makes
// malloc reuse the freed blocks instead.
//
// Process-wide, so it is the program's choice, not the library's: call it at
// the start of main() (qlora-train and the training benchmark do). Blocks
// above 32 MiB (glibc's largest mmap threshold on 64-bit) are still mapped
// afresh. The cost: memory freed after the peak stays resident in the process
// (reused by the next step, not returned to the system). Does nothing where
// the C library is not glibc.
#pragma once

#include <cstdlib>  // first: on glibc it defines __GLIBC__, tested below

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace qlora {

/// Tunes glibc's malloc to keep freed memory (see above); false where that is
/// not possible (another C library, or glibc refused a setting).
inline bool retain_freed_heap_memory() noexcept {
#if defined(__GLIBC__)
  constexpr int largest_mmap_threshold = 32 * 1024 * 1024;  // DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
  constexpr int never_trim = 0x7fffffff;                    // bytes free at the heap top before a trim
  const bool mmap_set = mallopt(M_MMAP_THRESHOLD, largest_mmap_threshold) == 1;
  const bool trim_set = mallopt(M_TRIM_THRESHOLD, never_trim) == 1;
  return mmap_set && trim_set;
#else
  return false;
#endif
}

}  // namespace qlora
