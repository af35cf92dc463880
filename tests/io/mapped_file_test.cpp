// MappedFile: a file's bytes, empty files, and errors that name the path and
// the reason.
#include <qlora/io/mapped_file.hpp>

#include <cstddef>
#include <string>
#include <utility>

#include <catch2/catch.hpp>

#include "io/test_support.hpp"

using qlora::Error;
using qlora::MappedFile;
using qlora::test::TempDir;

TEST_CASE("maps the bytes of a file") {
  TempDir dir;
  qlora::test::write_bytes(dir / "data.bin", std::string("hello\0world", 11));
  const MappedFile file(dir / "data.bin");
  REQUIRE(file.size() == 11);
  CHECK(std::string(reinterpret_cast<const char*>(file.bytes().data()), file.size()) ==
        std::string("hello\0world", 11));
  CHECK(file.path() == dir / "data.bin");
}

TEST_CASE("an empty file maps to an empty span") {
  TempDir dir;
  qlora::test::write_bytes(dir / "empty", "");
  const MappedFile file(dir / "empty");
  CHECK(file.size() == 0);
  CHECK(file.bytes().empty());
  CHECK(MappedFile().bytes().empty());
}

TEST_CASE("the bytes stay valid when the mapping is moved") {
  TempDir dir;
  qlora::test::write_bytes(dir / "data.bin", "abc");
  MappedFile first(dir / "data.bin");
  const std::byte* bytes = first.bytes().data();
  MappedFile second(std::move(first));
  CHECK(first.bytes().empty());
  CHECK(second.bytes().data() == bytes);
  MappedFile third;
  third = std::move(second);
  CHECK(third.bytes().data() == bytes);
  CHECK(std::to_integer<char>(third.bytes()[2]) == 'c');
}

TEST_CASE("errors name the path and the reason") {
  TempDir dir;
  try {
    MappedFile file(dir / "missing.bin");
    FAIL("a missing file mapped");
  } catch (const Error& e) {
    CHECK(e.code() == "IoError");
    CHECK_THAT(e.what(),
               Catch::Contains((dir / "missing.bin").string()) && Catch::Contains("No such file or directory"));
  }
  try {
    MappedFile file(dir.path());
    FAIL("a directory mapped");
  } catch (const Error& e) {
    CHECK(e.code() == "IoError");
    CHECK_THAT(e.what(), Catch::Contains(dir.path().string()) && Catch::Contains("not a regular file"));
  }
}
