// ConversationReader: a JSONL training file as a stream of qlora::Conversation,
// in one of the DatasetFormats (JsonlReader + read_conversation). One record
// at a time in constant memory, each conversation written over the previous
// one's buffers, every error located at file:line (and the JSON path).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <utility>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/conversation.hpp>
#include <qlora/data/dataset_format.hpp>
#include <qlora/data/json_document.hpp>
#include <qlora/data/jsonl_reader.hpp>

namespace qlora {

///     ConversationReader reader("train.jsonl");   // format detected from the first record
///     Conversation conversation;
///     while (reader.next(conversation)) encode(conversation);
///
/// Errors are JsonlReader's and read_conversation's, prefixed with
/// `file:line: `. Under BadLinePolicy::skip a record that does not convert is
/// skipped and logged too (jsonl().bad_lines()), and so is one a later stage
/// rejects (reject()). With DatasetFormat::detect the first usable record
/// picks the format and every later record must match it.
class ConversationReader {
 public:
  explicit ConversationReader(std::filesystem::path path, DatasetFormat format = DatasetFormat::detect,
                              JsonlReaderOptions options = {})
      : reader_(std::move(path), options), format_(format) {}

  /// Reads the next conversation into `out` (its buffers are reused) and sets
  /// out.line; false at the end of the file.
  bool next(Conversation& out) {
    while (const std::optional<JsonValue> record = reader_.next()) {
      try {
        const DatasetFormat format = format_ == DatasetFormat::detect ? detect_dataset_format(*record) : format_;
        read_conversation(*record, format, out);
        if (format_ == DatasetFormat::detect) {  // only a record that converts decides
          format_ = format;
          detected_at_ = reader_.line();
        }
        out.line = reader_.line();
        return true;
      } catch (const Error& error) {
        reader_.reject_record(detected_at_ == 0 ? error : with_detection(error));
      }
    }
    return false;
  }

  /// Rejects the conversation next() gave last, for a reason found after
  /// reading it (its encoding failed): throws `error` located at file:line
  /// under BadLinePolicy::error, logs and counts it under skip
  /// (JsonlReader::reject_record). `error`'s message should not name the line.
  void reject(const Error& error) { reader_.reject_record(error); }

  /// The records' format: the one given, or the detected one (detect until the first record).
  [[nodiscard]] DatasetFormat format() const noexcept { return format_; }
  /// The underlying reader: progress (bytes_consumed, file_size), counts and skipped lines.
  [[nodiscard]] const JsonlReader& jsonl() const noexcept { return reader_; }

 private:
  /// A record that does not fit the detected format may be one in another
  /// format (a mixed file): say which format was expected and why.
  [[nodiscard]] Error with_detection(const Error& error) const {
    return Error(error.code().data(), fmt::format("{} (the file's format is {}, detected from line {})", error.message(),
                                                  dataset_format_name(format_), detected_at_));
  }

  JsonlReader reader_;
  DatasetFormat format_;
  std::uint64_t detected_at_ = 0;  // line the format was detected from; 0 if it was given
};

}  // namespace qlora
