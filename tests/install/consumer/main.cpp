// Prints the version of the qlora headers it was built with. Uses fmt, which it
// gets only through qlora's usage requirements (so that path is tested too).
#if __has_include(<qlora/qlora.hpp>)
#include <qlora/qlora.hpp>
#else
#include <qlora/version.hpp>
#endif

#include <fmt/format.h>

int main() {
  constexpr auto v = qlora::version();
  static_assert(QLORA_VERSION == v.major * 10000 + v.minor * 100 + v.patch);
  fmt::print("qlora {}.{}.{}\n", v.major, v.minor, v.patch);
  return 0;
}
