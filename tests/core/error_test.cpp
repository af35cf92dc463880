#include <qlora/core/error.hpp>

#include <catch2/catch.hpp>

TEST_CASE("Error carries a code, a message and added context") {
  const qlora::Error error("InvalidOffset", "tensor `w` starts at 8, expected 0");
  CHECK(error.code() == "InvalidOffset");
  CHECK(error.message() == "tensor `w` starts at 8, expected 0");
  CHECK(std::string(error.what()) == "[InvalidOffset] tensor `w` starts at 8, expected 0");

  const qlora::Error outer = error.with_context("model.safetensors");
  CHECK(outer.code() == "InvalidOffset");
  CHECK(std::string(outer.what()) == "[InvalidOffset] model.safetensors: tensor `w` starts at 8, expected 0");
}

TEST_CASE("check throws only when the condition fails, formatting lazily") {
  CHECK_NOTHROW(qlora::check(true, "Never", "{}", 1));
  try {
    qlora::check(false, "BadBlocksize", "blocksize {} is not a power of two", 48);
    FAIL("check(false) did not throw");
  } catch (const qlora::Error& e) {
    CHECK(e.code() == "BadBlocksize");
    CHECK(e.message() == "blocksize 48 is not a power of two");
  }
}
