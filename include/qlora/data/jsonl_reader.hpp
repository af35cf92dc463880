// JsonlReader: the records of a JSON Lines file, one parsed object at a time,
// in constant memory (a fixed read buffer that grows only for a longer line,
// up to a hard limit). Bad lines are the norm in scraped training data, so each
// one is located exactly (file:line:column and the reason, the column as
// CPython's json counts it) and, under BadLinePolicy::skip, counted and logged
// instead of stopping the run; nothing is dropped without a trace. HF datasets,
// by contrast, reports "JSON parse error ... in row N" of a 10 MB chunk.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/detail/json_lexer.hpp>
#include <qlora/data/detail/line_reader.hpp>
#include <qlora/data/json_document.hpp>

namespace qlora {

/// What a reader does with a line it cannot use.
enum class BadLinePolicy : std::uint8_t {
  /// Throw the line's Error (the default: a bad line is usually a bad file).
  error,
  /// Skip it, count it and remember where it was (BadLineLog).
  skip,
};

struct JsonlReaderOptions {
  /// The read buffer's first size. It grows for a longer line only.
  std::size_t buffer_bytes = std::size_t{1} << 20;
  /// A longer line is Error("LineTooLong") (or skipped): a file without line
  /// ends must not make the reader hold all of it. At most 4 GiB - 1.
  std::size_t max_line_bytes = std::size_t{64} << 20;
  /// A record of more JSON values (each number, string, key, array, object)
  /// is Error("RecordTooComplex") (or skipped): each value takes a 32-byte
  /// node, so a 64 MiB line of "0," would take 1 GiB. The default, 2^20 (at
  /// most 32 MiB of nodes), is far above a chat record's few dozen values and
  /// holds a pre-tokenized record of a million ids.
  std::size_t max_values = std::size_t{1} << 20;
  BadLinePolicy bad_lines = BadLinePolicy::error;
  /// How many skipped lines BadLineLog keeps the message of (all are counted).
  std::size_t logged_bad_lines = 20;
};

/// A line that was skipped: where, and the error it would have thrown.
struct SkippedLine {
  std::uint64_t line;
  /// 1-based, in characters; 0 for an error that has no column (LineTooLong, a rejected record).
  std::uint64_t column;
  /// The error's code ("MalformedJson", ...): a string literal.
  const char* code;
  /// The error's message, which starts with file:line[:column].
  std::string message;
};

/// The lines a reader skipped under BadLinePolicy::skip: how many, per error
/// code, and the first few in full.
class BadLineLog {
 public:
  explicit BadLineLog(std::size_t kept = 20) : kept_(kept) {}

  /// Counts a skipped line; `message()` is called only if the log keeps it.
  template <class MessageFn>
  void add(std::uint64_t line, std::uint64_t column, const char* code, MessageFn&& message) {
    ++total_;
    ++by_code_[code];
    if (first_.size() < kept_) first_.push_back({line, column, code, message()});
  }

  [[nodiscard]] std::uint64_t count() const noexcept { return total_; }
  [[nodiscard]] std::uint64_t count(std::string_view code) const {
    const auto found = by_code_.find(code);
    return found == by_code_.end() ? 0 : found->second;
  }
  /// The first skipped lines, in file order.
  [[nodiscard]] const std::vector<SkippedLine>& first() const noexcept { return first_; }

  /// "skipped 3 lines (2 MalformedJson, 1 InvalidUtf8); first: <message>", or "" when none.
  [[nodiscard]] std::string summary() const {
    if (total_ == 0) return {};
    std::string counts;
    for (const auto& [code, count] : by_code_) counts += fmt::format("{}{} {}", counts.empty() ? "" : ", ", count, code);
    return fmt::format("skipped {} line{} ({}); first: {}", total_, total_ == 1 ? "" : "s", counts, first_.empty() ? "" : first_.front().message);
  }

 private:
  std::size_t kept_;
  std::uint64_t total_ = 0;
  std::map<std::string_view, std::uint64_t, std::less<>> by_code_;  // codes are string literals
  std::vector<SkippedLine> first_;
};

/// Reads a JSONL file record by record:
///
///     JsonlReader reader("train.jsonl");
///     while (std::optional<JsonValue> record = reader.next()) {
///       use(*record, reader.line());
///     }
///
/// Blank lines (only whitespace) are skipped and counted. Every other line must
/// be one JSON object; otherwise (errors name `file:line:column`):
/// - "InvalidUtf8": a byte that is not UTF-8 (column of its character);
/// - "MalformedJson": not JSON, with CPython's reason ("Expecting ',' delimiter");
/// - "NotAnObject": valid JSON that is not an object (an array, a string...);
/// - "RecordTooComplex": more than max_values JSON values;
/// - "LineTooLong": longer than max_line_bytes (file:line only).
/// Under BadLinePolicy::skip these lines are skipped and logged (bad_lines()).
/// Reading errors are Error("IoError").
class JsonlReader {
 public:
  explicit JsonlReader(std::filesystem::path path, JsonlReaderOptions options = {})
      : options_(validated(options)),
        lines_(std::move(path), options_.buffer_bytes, options_.max_line_bytes),
        document_(options_.max_values),
        bad_lines_(options_.logged_bad_lines) {}

  /// The next record, or nullopt at the end of the file. The record (and every
  /// string in it) is valid until the next call.
  [[nodiscard]] std::optional<JsonValue> next() {
    while (const std::optional<detail::Line> line = lines_.next()) {
      line_ = line->number;
      if (line->too_long) {
        reject("LineTooLong", 0, [&] {
          return fmt::format("{}: the line is longer than the limit of {} bytes (JsonlReaderOptions::max_line_bytes)",
                             location(), options_.max_line_bytes);
        });
        continue;
      }
      const std::string_view text = line->text;
      if (detail::skip_json_whitespace(text, 0) == text.size()) {
        ++blank_lines_;
        continue;
      }
      if (const std::optional<JsonParseError> error = document_.try_parse(text)) {
        const std::uint64_t column = text_position(text, error->offset).column;
        reject(error->code, column, [&] { return fmt::format("{}:{}: {}", location(), column, describe(*error)); });
        continue;
      }
      const JsonValue record = document_.root();
      if (!record.is(JsonType::object)) {
        const std::uint64_t column = text_position(text, record.offset()).column;
        reject("NotAnObject", column, [&] {
          return fmt::format("{}:{}: expected a JSON object (one record per line), got {}", location(), column,
                             json_type_name(record.type()));
        });
        continue;
      }
      ++records_;
      return record;
    }
    return std::nullopt;
  }

  /// Handles the record next() returned last, which the caller found unusable
  /// (a missing field...): throws `error` with the record's location under
  /// BadLinePolicy::error, or logs it and returns under skip. Call it at most
  /// once per record; `error`'s message should not repeat the location.
  void reject_record(const Error& error) {
    --records_;  // it was counted when next() returned it
    reject(error.code().data(), 0, [&] { return fmt::format("{}: {}", location(), error.message()); });
  }

  [[nodiscard]] const std::filesystem::path& path() const noexcept { return lines_.path(); }
  /// 1-based line of the record next() returned last (0 before the first).
  [[nodiscard]] std::uint64_t line() const noexcept { return line_; }
  /// "path:line" of that record, for messages.
  [[nodiscard]] std::string location() const { return fmt::format("{}:{}", path().string(), line_); }

  /// Records returned (less those rejected).
  [[nodiscard]] std::uint64_t records() const noexcept { return records_; }
  [[nodiscard]] std::uint64_t blank_lines() const noexcept { return blank_lines_; }
  [[nodiscard]] const BadLineLog& bad_lines() const noexcept { return bad_lines_; }

  /// Progress: bytes read through so far, and the file's size (nullopt for a pipe).
  [[nodiscard]] std::uint64_t bytes_consumed() const noexcept { return lines_.bytes_consumed(); }
  [[nodiscard]] std::optional<std::uint64_t> file_size() const noexcept { return lines_.file_size(); }
  /// The read buffer's size now: buffer_bytes, or what the longest line needed.
  [[nodiscard]] std::size_t buffer_capacity() const noexcept { return lines_.buffer_capacity(); }

 private:
  static JsonlReaderOptions validated(const JsonlReaderOptions& options) {
    check(options.max_line_bytes > 0 && options.max_line_bytes <= std::numeric_limits<std::uint32_t>::max(),
          "InvalidArgument", "JsonlReaderOptions::max_line_bytes must be in [1, 4 GiB - 1], got {}",
          options.max_line_bytes);
    check(options.max_values > 0, "InvalidArgument", "JsonlReaderOptions::max_values must be at least 1");
    return options;
  }

  /// "invalid JSON: Expecting value" / "invalid UTF-8 byte 0xFF" / "more than
  /// 1048576 values in one document (JsonlReaderOptions::max_values)".
  static std::string describe(const JsonParseError& error) {
    const std::string_view code = error.code;
    if (code == "MalformedJson") return "invalid JSON: " + error.reason;
    if (code == "RecordTooComplex") return error.reason + " (JsonlReaderOptions::max_values)";
    return error.reason;
  }

  template <class MessageFn>
  void reject(const char* code, std::uint64_t column, MessageFn&& message) {
    if (options_.bad_lines == BadLinePolicy::error) throw Error(code, message());
    bad_lines_.add(line_, column, code, message);
  }

  JsonlReaderOptions options_;
  detail::LineReader lines_;
  JsonDocument document_;
  BadLineLog bad_lines_;
  std::uint64_t line_ = 0;
  std::uint64_t records_ = 0;
  std::uint64_t blank_lines_ = 0;
};

}  // namespace qlora
