// retain_freed_heap_memory: after it, a freed 4 MiB block (above glibc's
// default 128 KiB mmap threshold) stays in the heap as free space that the
// next allocation of that size reuses, instead of going back to the system.
// Observed through glibc's own accounting (mallinfo2), not our code.
#include <qlora/core/heap_retention.hpp>

#include <catch2/catch.hpp>

#include <cstdlib>
#include <cstring>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

TEST_CASE("retain_freed_heap_memory keeps freed blocks in the heap", "[core][heap_retention]") {
#if defined(__SANITIZE_ADDRESS__)
  // AddressSanitizer brings its own allocator (mallopt and mallinfo2 do not describe it): only the call.
  (void)qlora::retain_freed_heap_memory();
#elif defined(__GLIBC__)
  REQUIRE(qlora::retain_freed_heap_memory());
  constexpr std::size_t size = std::size_t{4} << 20;
  const std::size_t mapped_before = mallinfo2().hblkhd;
  void* block = std::malloc(size);
  REQUIRE(block != nullptr);
  std::memset(block, 1, size);  // touch it, as a tensor is
  CHECK(mallinfo2().hblkhd == mapped_before);  // not an mmapped block
  std::free(block);
  const std::size_t free_after = mallinfo2().fordblks;
  CHECK(free_after >= size);  // kept as free heap memory
  void* again = std::malloc(size);
  REQUIRE(again != nullptr);
  std::memset(again, 2, size);  // used, so the compiler keeps the malloc/free pair
  CHECK(mallinfo2().hblkhd == mapped_before);         // not mapped afresh
  CHECK(free_after - mallinfo2().fordblks >= size);  // but taken from that free memory
  std::free(again);
#else
  CHECK_FALSE(qlora::retain_freed_heap_memory());
#endif
}
