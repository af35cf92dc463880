// AtomicFile and write_file_atomically: the path holds the complete new file or
// the previous one, and no temporary file is left behind, whether the caller's
// writer throws, the directory is missing, a write fails (EFBIG from a file-size
// limit stands in for ENOSPC: both fail write(2) after a short write), or the
// rename fails.
#include <qlora/io/atomic_file.hpp>

#include <csignal>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <sys/stat.h>

#include <catch2/catch.hpp>

#include <qlora/io/mapped_file.hpp>

#include "io/test_support.hpp"

using qlora::AtomicFile;
using qlora::Error;
using qlora::write_file_atomically;
using qlora::test::read_text;
using qlora::test::TempDir;
using Names = std::vector<std::string>;

namespace {

/// A directory holding "target" with the text "old".
struct Scene {
  TempDir dir;
  std::filesystem::path target = dir / "target";
  Scene() { qlora::test::write_bytes(target, "old"); }
  void check_untouched() const {
    CHECK(read_text(target) == "old");
    CHECK(dir.listing() == Names{"target"});  // no temporary file left
  }
};

/// Lowers the file-size limit (RLIMIT_FSIZE) for its lifetime, ignoring SIGXFSZ
/// so that exceeding it fails write(2) with EFBIG instead of killing the process.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &saved_) == 0);
    previous_handler_ = std::signal(SIGXFSZ, SIG_IGN);
    rlimit lowered = saved_;
    lowered.rlim_cur = bytes;
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &lowered) == 0);
  }
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &saved_);
    std::signal(SIGXFSZ, previous_handler_);
  }

 private:
  rlimit saved_{};
  void (*previous_handler_)(int) = nullptr;
};

}  // namespace

TEST_CASE("writes the new content over the old file, with default permissions and nothing else left") {
  Scene scene;
  const std::string big(3 << 20, 'x');  // larger than the write buffer
  write_file_atomically(scene.target, [&](AtomicFile& file) {
    file.write("new ");
    file.write(big);
    file.write(" end");
  });
  CHECK(read_text(scene.target) == "new " + big + " end");
  CHECK(scene.dir.listing() == Names{"target"});
  struct stat status {};
  REQUIRE(::stat(scene.target.c_str(), &status) == 0);
  const mode_t mask = ::umask(0);
  ::umask(mask);
  CHECK((status.st_mode & 0777) == (0666 & ~mask));
}

TEST_CASE("a mapping of the previous file keeps its bytes after the replacement") {
  Scene scene;
  const qlora::MappedFile old_mapping(scene.target);
  write_file_atomically(scene.target, [](AtomicFile& file) { file.write("brand new"); });
  CHECK(read_text(scene.target) == "brand new");
  CHECK(std::string(reinterpret_cast<const char*>(old_mapping.bytes().data()), old_mapping.size()) == "old");
}

TEST_CASE("a writer that throws leaves the old file and no temporary file") {
  Scene scene;
  try {
    write_file_atomically(scene.target, [](AtomicFile& file) {
      file.write("partial");
      throw std::runtime_error("disk quota reached in the caller");
    });
    FAIL("the writer's exception was swallowed");
  } catch (const Error& e) {
    CHECK(e.code() == "WriteAborted");
    CHECK_THAT(e.what(), Catch::Contains(scene.target.string()) && Catch::Contains("disk quota reached"));
  }
  scene.check_untouched();

  try {
    write_file_atomically(scene.target, [](AtomicFile&) { throw Error("BadTensor", "tensor `w` is wrong"); });
    FAIL("the writer's Error was swallowed");
  } catch (const Error& e) {
    CHECK(e.code() == "BadTensor");
    CHECK_THAT(e.what(), Catch::Contains(scene.target.string()) && Catch::Contains("tensor `w` is wrong"));
  }
  scene.check_untouched();
}

TEST_CASE("an AtomicFile dropped without commit removes its temporary file") {
  Scene scene;
  {
    AtomicFile file(scene.target);
    file.write("never committed");
    CHECK(std::filesystem::exists(file.temp_path()));
    CHECK(file.temp_path().parent_path() == scene.dir.path());
  }
  scene.check_untouched();
}

TEST_CASE("a missing directory is reported with the path") {
  TempDir dir;
  try {
    write_file_atomically(dir / "no/such/dir/file", [](AtomicFile& file) { file.write("x"); });
    FAIL("writing into a missing directory succeeded");
  } catch (const Error& e) {
    CHECK(e.code() == "IoError");
    CHECK_THAT(e.what(),
               Catch::Contains((dir / "no/such/dir/file").string()) && Catch::Contains("No such file or directory"));
  }
  CHECK(dir.listing().empty());
}

TEST_CASE("a write that runs out of space fails cleanly (short write, then EFBIG)") {
  Scene scene;
  const std::string big(2 << 20, 'y');
  {
    const FileSizeLimit limit(1 << 20);
    try {
      write_file_atomically(scene.target, [&](AtomicFile& file) { file.write(big); });
      FAIL("a write past the file-size limit succeeded");
    } catch (const Error& e) {
      CHECK(e.code() == "IoError");
      CHECK_THAT(e.what(), Catch::Contains(scene.target.string()) && Catch::Contains("File too large"));
    }
    // The same through the buffer: many small writes, the failure surfaces on a flush or at commit.
    try {
      write_file_atomically(scene.target, [&](AtomicFile& file) {
        for (int i = 0; i < 64; ++i) file.write(std::string_view(big).substr(0, 64 << 10));
      });
      FAIL("buffered writes past the file-size limit succeeded");
    } catch (const Error& e) {
      CHECK(e.code() == "IoError");
    }
    // Commit alone: a buffered tail that does not fit.
    AtomicFile file(scene.target);
    file.write(std::string_view(big).substr(0, (1 << 20) - 1));
    file.write(std::string_view(big).substr(0, 1000));
    CHECK_THROWS_AS(file.commit(), Error);
  }
  scene.check_untouched();
}

TEST_CASE("a rename that fails (the path is a directory) leaves no temporary file") {
  TempDir dir;
  std::filesystem::create_directory(dir / "target");
  qlora::test::write_bytes(dir / "target" / "inside", "keep");
  try {
    write_file_atomically(dir / "target", [](AtomicFile& file) { file.write("x"); });
    FAIL("renaming over a directory succeeded");
  } catch (const Error& e) {
    CHECK(e.code() == "IoError");
    CHECK_THAT(e.what(), Catch::Contains("rename") && Catch::Contains((dir / "target").string()));
  }
  CHECK(dir.listing() == Names{"target"});
  CHECK(read_text(dir / "target" / "inside") == "keep");
}

TEST_CASE("a relative path is written in the current directory") {
  TempDir dir;
  const std::filesystem::path previous = std::filesystem::current_path();
  std::filesystem::current_path(dir.path());
  write_file_atomically("relative.txt", [](AtomicFile& file) { file.write("here"); });
  std::filesystem::current_path(previous);
  CHECK(read_text(dir / "relative.txt") == "here");
  CHECK(dir.listing() == Names{"relative.txt"});
}
