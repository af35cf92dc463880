// AtomicFile and write_file_atomically: write a file so that, after a crash or
// an error, the path holds either the complete new file or the previous one,
// never a torn mix (temp file in the same directory, fsync, rename, fsync of the
// directory: Pillai et al., OSDI '14).
#pragma once

#include <atomic>
#include <cerrno>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/io/detail/posix_file.hpp>

namespace qlora {

/// A file being written beside its final path: a hidden temporary file in the
/// same directory (so that rename cannot cross file systems) that commit()
/// renames over the path. Until then the path keeps its previous content; if the
/// AtomicFile is destroyed without commit() (an exception, an early return), the
/// temporary file is removed. Writes are buffered. The file gets the default
/// permissions (0666 less the umask). A symlink at the path is replaced, not
/// followed. Every failure throws Error("IoError") with the path and the reason.
///
///     AtomicFile file("checkpoint/state.json");
///     file.write(text);
///     file.commit();
class AtomicFile {
 public:
  /// Creates the temporary file; throws Error("IoError") when it cannot be made
  /// (for example when the directory does not exist).
  explicit AtomicFile(std::filesystem::path path) : path_(std::move(path)) {
    const std::filesystem::path directory = directory_of(path_);
    // A target name longer than this would push the temporary name past NAME_MAX.
    const std::string stem = path_.filename().string().substr(0, 128);
    static std::atomic<std::uint64_t> counter{0};
    int error = 0;
    for (int attempt = 0; attempt < 100; ++attempt) {
      temp_path_ = directory / fmt::format(".{}.{}-{}.tmp", stem, ::getpid(), counter.fetch_add(1));
      fd_ = detail::open_fd(temp_path_, O_WRONLY | O_CREAT | O_EXCL, 0666);
      if (fd_.valid()) return;
      error = errno;
      if (error != EEXIST) break;  // EEXIST: a stale file of an earlier process with our pid
    }
    throw Error("IoError", fmt::format("cannot create a temporary file in {} to write {}: {}", directory.string(),
                                       path_.string(), std::generic_category().message(error)));
  }

  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  /// Removes the temporary file unless commit() succeeded.
  ~AtomicFile() {
    if (!committed_) {
      fd_.close();
      ::unlink(temp_path_.c_str());
    }
  }

  /// Appends `bytes`. Throws Error("IoError") on a failed write (ENOSPC, EFBIG, EIO...).
  void write(std::span<const std::byte> bytes) {
    if (bytes.size() >= buffer_capacity - buffer_.size()) {
      flush();
      if (bytes.size() >= buffer_capacity) {  // large writes go straight to the file
        write_fully(bytes);
        return;
      }
    }
    buffer_.insert(buffer_.end(), bytes.begin(), bytes.end());
  }
  /// Appends `text`.
  void write(std::string_view text) { write(std::as_bytes(std::span(text.data(), text.size()))); }

  /// Makes the written bytes the content of the path, durably: flush, fsync the
  /// file, close it, rename it over the path, fsync the directory. If the final
  /// directory fsync fails, the new file is in place but may not survive a crash.
  void commit() {
    flush();
    if (::fsync(fd_.get()) != 0) throw temp_error("sync", errno);
    if (const int error = fd_.close(); error != 0) throw temp_error("close", error);
    if (::rename(temp_path_.c_str(), path_.c_str()) != 0) {
      const int error = errno;
      throw Error("IoError", fmt::format("cannot rename {} to {}: {}", temp_path_.string(), path_.string(),
                                         std::generic_category().message(error)));
    }
    committed_ = true;
    sync_directory(directory_of(path_));
  }

  /// The final path.
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }
  /// The temporary file being written (removed or renamed by the end).
  [[nodiscard]] const std::filesystem::path& temp_path() const noexcept { return temp_path_; }

 private:
  static constexpr std::size_t buffer_capacity = std::size_t{1} << 20;

  static std::filesystem::path directory_of(const std::filesystem::path& path) {
    return path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  }

  Error temp_error(std::string_view action, int error) const {
    return Error("IoError", fmt::format("cannot {} {} (the temporary file for {}): {}", action, temp_path_.string(),
                                        path_.string(), std::generic_category().message(error)));
  }

  void flush() {
    write_fully(buffer_);
    buffer_.clear();
  }

  void write_fully(std::span<const std::byte> bytes) {
    while (!bytes.empty()) {
      const ::ssize_t written = ::write(fd_.get(), bytes.data(), bytes.size());
      if (written < 0) {
        if (errno == EINTR) continue;
        throw temp_error("write", errno);
      }
      bytes = bytes.subspan(static_cast<std::size_t>(written));  // a short write: go on with the rest
    }
  }

  /// fsync of the directory makes the rename itself durable.
  void sync_directory(const std::filesystem::path& directory) const {
    const detail::UniqueFd fd = detail::open_fd(directory, O_RDONLY | O_DIRECTORY);
    if (!fd.valid()) throw detail::io_error("open the directory of", path_, errno);
    // EINVAL: a file system that cannot sync directories; nothing more to do there.
    if (::fsync(fd.get()) != 0 && errno != EINVAL) throw detail::io_error("sync the directory of", path_, errno);
  }

  std::filesystem::path path_;
  std::filesystem::path temp_path_;
  detail::UniqueFd fd_;
  std::vector<std::byte> buffer_;
  bool committed_ = false;
};

/// Writes `path` atomically with the bytes `writer(AtomicFile&)` writes, then
/// commits. If `writer` throws, the temporary file is removed, the previous file
/// at `path` is untouched, and the exception becomes a qlora::Error naming
/// `path`: a qlora::Error keeps its code, any other std::exception becomes
/// Error("WriteAborted"). (An exception of another type passes unchanged.)
///
///     write_file_atomically("out.bin", [&](AtomicFile& file) { file.write(bytes); });
template <class Writer>
requires std::invocable<Writer&, AtomicFile&>
void write_file_atomically(const std::filesystem::path& path, Writer&& writer) {
  AtomicFile file(path);
  try {
    std::invoke(writer, file);
  } catch (const Error& e) {
    throw e.with_context(fmt::format("writing {}", path.string()));
  } catch (const std::exception& e) {
    throw Error("WriteAborted", fmt::format("writing {} was aborted: {}", path.string(), e.what()));
  }
  file.commit();
}

}  // namespace qlora
