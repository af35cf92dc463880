// IWYU pragma: private
// LineReader: the lines of a file through one fixed-size buffer, so that a
// training file of any size is read in constant memory. A line longer than
// the buffer grows it (a line must be whole to be parsed), up to a hard limit;
// a longer line is read through and reported, never held. Handles "\r\n", a
// last line without "\n", and a UTF-8 byte order mark at the start of the file.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <qlora/core/error.hpp>
#include <qlora/io/detail/posix_file.hpp>

namespace qlora::detail {

/// One line of the file.
struct Line {
  /// Without its "\n" or "\r\n" (and without the BOM on line 1); empty when too_long.
  std::string_view text;
  /// 1-based.
  std::uint64_t number;
  /// The line was longer than the limit: it was skipped, and `text` is empty.
  bool too_long;
};

class LineReader {
 public:
  /// Opens `path` (Error "IoError" if it cannot be read). The buffer starts at
  /// `buffer_bytes` and grows up to what a line of `max_line_bytes` needs.
  LineReader(std::filesystem::path path, std::size_t buffer_bytes, std::size_t max_line_bytes)
      : path_(std::move(path)), max_line_bytes_(max_line_bytes), fd_(open_fd(path_, O_RDONLY)) {
    check(buffer_bytes > 0, "InvalidArgument", "the read buffer of {} must not be empty", path_.string());
    if (!fd_.valid()) throw io_error("open", path_, errno);
    struct stat info {};
    if (::fstat(fd_.get(), &info) != 0) throw io_error("stat", path_, errno);
    if (S_ISREG(info.st_mode)) file_size_ = static_cast<std::uint64_t>(info.st_size);
    buffer_.resize(buffer_bytes);
  }

  /// The next line, or nullopt at the end of the file. The text stays valid
  /// until the next call. Throws Error("IoError") when reading fails.
  std::optional<Line> next() {
    if (!bom_checked_) skip_bom();
    for (;;) {
      const char* const data = buffer_.data();
      if (const void* found = std::memchr(data + scan_, '\n', end_ - scan_)) {
        const auto newline = static_cast<std::size_t>(static_cast<const char*>(found) - data);
        return take_line(newline, newline + 1);
      }
      scan_ = end_;
      // Over the limit even if the next bytes are "\r\n": read through it without holding it.
      if (end_ - begin_ > max_line_bytes_ + 1) return skip_rest_of_line();
      if (at_eof_) return end_ == begin_ ? std::nullopt : std::optional<Line>(take_line(end_, end_));
      make_room();
      fill();
    }
  }

  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }
  /// Bytes of the lines returned so far, with their line ends (and the BOM).
  [[nodiscard]] std::uint64_t bytes_consumed() const noexcept { return bytes_consumed_; }
  /// The size of the file at open, or nullopt for what is not a regular file (a pipe).
  [[nodiscard]] std::optional<std::uint64_t> file_size() const noexcept { return file_size_; }
  /// The bytes the buffer holds now: its first size, or what the longest line needed.
  [[nodiscard]] std::size_t buffer_capacity() const noexcept { return buffer_.size(); }

 private:
  /// Hands out buffer_[begin_, end) as the next line and moves past `next`
  /// (end + 1 after a "\n"; end itself for a last line without one).
  Line take_line(std::size_t end, std::size_t next) {
    std::string_view text(buffer_.data() + begin_, end - begin_);
    if (text.ends_with('\r') && next != end) text.remove_suffix(1);  // "\r\n" (a last "\r" alone is whitespace)
    const bool too_long = text.size() > max_line_bytes_;
    bytes_consumed_ += next - begin_;
    begin_ = scan_ = next;
    return {too_long ? std::string_view() : text, ++line_number_, too_long};
  }

  /// Steps over a UTF-8 BOM at the start of the file before any line is
  /// measured, so that it never counts against max_line_bytes (whatever the
  /// buffer size, the first line gets the same verdict as any other).
  void skip_bom() {
    bom_checked_ = true;
    constexpr std::string_view bom = "\xEF\xBB\xBF";
    if (buffer_.size() < bom.size()) buffer_.resize(bom.size());
    while (end_ < bom.size() && !at_eof_) fill();
    if (std::string_view(buffer_.data(), end_).starts_with(bom)) {
      begin_ = scan_ = bom.size();
      bytes_consumed_ += bom.size();
    }
  }

  /// Drops the current line, which is over the limit and has no "\n" in the
  /// buffer: reads on, a buffer at a time, to the next "\n" or the end of the file.
  Line skip_rest_of_line() {
    std::optional<std::size_t> newline;
    while (!newline) {
      bytes_consumed_ += end_ - begin_;
      begin_ = scan_ = end_ = 0;
      fill();
      if (at_eof_ && end_ == 0) break;
      if (const void* found = std::memchr(buffer_.data(), '\n', end_)) {
        newline = static_cast<std::size_t>(static_cast<const char*>(found) - buffer_.data());
      } else {
        scan_ = end_;
      }
    }
    const std::size_t next = newline ? *newline + 1 : end_;
    bytes_consumed_ += next - begin_;
    begin_ = scan_ = next;
    return {{}, ++line_number_, true};
  }

  /// Makes room at the end of the buffer: moves the partial line to the front,
  /// or, when it fills the buffer, doubles the buffer (up to the line limit).
  void make_room() {
    if (end_ < buffer_.size()) return;
    if (begin_ > 0) {
      std::memmove(buffer_.data(), buffer_.data() + begin_, end_ - begin_);
      end_ -= begin_;
      scan_ -= begin_;
      begin_ = 0;
      return;
    }
    // Enough for the longest allowed line and its "\r\n"; next() has already
    // skipped a line that fills a buffer this large.
    const std::size_t most = std::max(buffer_.size(), max_line_bytes_ + 2);
    buffer_.resize(std::min(most, buffer_.size() * 2));
  }

  /// One read(2) into the free end of the buffer; sets at_eof_ when it returns 0.
  void fill() {
    for (;;) {
      const ::ssize_t got = ::read(fd_.get(), buffer_.data() + end_, buffer_.size() - end_);
      if (got >= 0) {
        end_ += static_cast<std::size_t>(got);
        at_eof_ = got == 0;
        return;
      }
      if (errno != EINTR) throw io_error("read", path_, errno);
    }
  }

  std::filesystem::path path_;
  std::size_t max_line_bytes_;
  UniqueFd fd_;
  std::vector<char> buffer_;
  std::size_t begin_ = 0;  // start of the current line
  std::size_t scan_ = 0;   // searched for "\n" up to here
  std::size_t end_ = 0;    // end of the bytes read
  bool at_eof_ = false;
  bool bom_checked_ = false;
  std::uint64_t line_number_ = 0;
  std::uint64_t bytes_consumed_ = 0;
  std::optional<std::uint64_t> file_size_;
};

}  // namespace qlora::detail
