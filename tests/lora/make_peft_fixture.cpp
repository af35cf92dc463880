// Writes the tiny-Phi adapter of tiny_phi_adapter.hpp, as qlora writes it, into
// the directory given as argv[1]. tests/reference/peft_adapter.py runs it to make
// tests/data/lora/qlora_written/ and then loads that with peft; built with the
// tests, not run by ctest.
#include <cstdio>
#include <exception>

#include <qlora/lora/peft_adapter.hpp>

#include "lora/tiny_phi_adapter.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUTPUT_DIR\n", argv[0]);
    return 2;
  }
  try {
    qlora::write_peft_adapter(argv[1], qlora::test::tiny_phi_adapter());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
