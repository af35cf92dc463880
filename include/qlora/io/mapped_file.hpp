// MappedFile: a whole file mapped read-only into memory (RAII), so that readers
// such as the safetensors reader hand out zero-copy views of multi-gigabyte
// checkpoints instead of copying them.
#pragma once

#include <cerrno>
#include <cstddef>
#include <filesystem>
#include <span>
#include <utility>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <qlora/core/error.hpp>
#include <qlora/io/detail/posix_file.hpp>

namespace qlora {

/// A read-only, private memory mapping of a whole file. An empty file maps to an
/// empty span. The bytes stay valid while the MappedFile lives (also after a
/// move), even if the file is replaced by rename, as AtomicFile does. Truncating
/// the file in place while it is mapped makes later reads fault (SIGBUS): that is
/// the nature of mmap.
///
///     MappedFile file("model.safetensors");
///     std::span<const std::byte> bytes = file.bytes();
class MappedFile {
 public:
  /// Nothing mapped; bytes() is empty.
  MappedFile() noexcept = default;

  /// Maps `path`. Throws Error("IoError") naming the path and the reason when it
  /// cannot be opened, is not a regular file, or cannot be mapped.
  explicit MappedFile(std::filesystem::path path) : path_(std::move(path)) {
    const detail::UniqueFd fd = detail::open_fd(path_, O_RDONLY);
    if (!fd.valid()) throw detail::io_error("open", path_, errno);
    struct stat status {};
    if (::fstat(fd.get(), &status) != 0) throw detail::io_error("stat", path_, errno);
    if (!S_ISREG(status.st_mode)) {
      throw Error("IoError", fmt::format("cannot map {}: not a regular file", path_.string()));
    }
    size_ = static_cast<std::size_t>(status.st_size);
    if (size_ == 0) return;  // mmap rejects a zero length
    void* address = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd.get(), 0);
    if (address == MAP_FAILED) throw detail::io_error("map", path_, errno);
    data_ = static_cast<const std::byte*>(address);
  }

  MappedFile(MappedFile&& other) noexcept
      : path_(std::move(other.path_)),
        data_(std::exchange(other.data_, nullptr)),
        size_(std::exchange(other.size_, 0)) {}
  MappedFile& operator=(MappedFile&& other) noexcept {
    if (this != &other) {
      unmap();
      path_ = std::move(other.path_);
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() { unmap(); }

  /// The file's bytes.
  [[nodiscard]] std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }
  /// The file's size in bytes.
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  /// The path given to the constructor.
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }

 private:
  void unmap() noexcept {
    if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = nullptr;
    size_ = 0;
  }

  std::filesystem::path path_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace qlora
