// IWYU pragma: private
// POSIX file-descriptor ownership and errno reporting shared by mapped_file.hpp
// and atomic_file.hpp: one place for EINTR retries and "cannot X path: reason".
#pragma once

#include <cerrno>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include <fcntl.h>
#include <sys/types.h>
#include <unistd.h>

#include <fmt/format.h>

#include <qlora/core/error.hpp>

namespace qlora::detail {

/// Error("IoError", "cannot <action> <path>: <strerror(error)>").
[[nodiscard]] inline Error io_error(std::string_view action, const std::filesystem::path& path, int error) {
  return Error("IoError",
               fmt::format("cannot {} {}: {}", action, path.string(), std::generic_category().message(error)));
}

/// Owns a file descriptor and closes it on destruction.
class UniqueFd {
 public:
  UniqueFd() noexcept = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) {
      close();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { close(); }

  [[nodiscard]] int get() const noexcept { return fd_; }
  [[nodiscard]] bool valid() const noexcept { return fd_ >= 0; }

  /// Closes the descriptor; returns 0 or the errno of close(2), where a file
  /// system such as NFS reports a write that failed after write(2) returned.
  int close() noexcept {
    if (fd_ < 0) return 0;
    // Not retried on EINTR: Linux releases the descriptor even then.
    const int result = ::close(std::exchange(fd_, -1));
    return result == 0 ? 0 : errno;
  }

 private:
  int fd_ = -1;
};

/// open(2) retried on EINTR; an invalid UniqueFd with errno set on failure.
inline UniqueFd open_fd(const std::filesystem::path& path, int flags, mode_t mode = 0) noexcept {
  int fd;
  do {
    fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  } while (fd < 0 && errno == EINTR);
  return UniqueFd(fd);
}

}  // namespace qlora::detail
