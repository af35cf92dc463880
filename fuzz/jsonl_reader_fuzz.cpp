// libFuzzer target for the JSONL reader and the record -> Conversation
// conversion: any byte string is a JSONL file. Reading it must never fail
// other than by qlora::Error, and what the reader reports is checked against a
// model of the file built here without the reader: the file split at "\n"
// (a "\r" before it and a BOM at the start dropped, a last line without "\n"
// kept) and each line parsed alone by a JsonDocument (which must refuse a line
// over the value limit, and only such a line, with RecordTooComplex). For
// several buffer sizes, line limits and value limits (the buffer smaller than
// a line, lines around the limit):
// - BadLinePolicy::skip: the records come back at their lines, equal to the
//   model's; the lines over the limit and only those are LineTooLong, every
//   other bad line carries its own parse error; records + blank + bad lines =
//   lines; every byte is consumed; the buffer never grows past what one line
//   of the limit needs;
// - BadLinePolicy::error: the same records up to the first bad line, then that
//   line's error, located at file:line.
// Each record then goes through read_conversation as ConversationReader does
// (the first record that converts fixes the format, DatasetFormat::detect),
// and ConversationReader itself must give the same conversations. Every
// conversation must have the shape its format promises.
//
// JsonlReader reads a file, not memory: the bytes go into one memfd, opened by
// its /proc/self/fd path, so no input touches the disk.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>
#include <sys/mman.h>
#include <unistd.h>

#include <qlora/core/error.hpp>
#include <qlora/data/conversation.hpp>
#include <qlora/data/conversation_reader.hpp>
#include <qlora/data/dataset_format.hpp>
#include <qlora/data/json_document.hpp>
#include <qlora/data/jsonl_reader.hpp>
#include <qlora/io/detail/utf8.hpp>

namespace {

using qlora::BadLinePolicy;
using qlora::Conversation;
using qlora::DatasetFormat;
using qlora::JsonType;
using qlora::JsonValue;
using qlora::Role;

void require(bool condition) {
  if (!condition) std::abort();
}

/// The input as a file: one memfd, rewritten for each input.
class MemoryFile {
 public:
  MemoryFile() : fd_(::memfd_create("jsonl_reader_fuzz", 0)), path_(fmt::format("/proc/self/fd/{}", fd_)) {
    require(fd_ >= 0);
  }
  MemoryFile(const MemoryFile&) = delete;
  MemoryFile& operator=(const MemoryFile&) = delete;
  ~MemoryFile() { ::close(fd_); }

  void assign(std::string_view bytes) {
    require(::ftruncate(fd_, 0) == 0);
    for (std::size_t done = 0; done < bytes.size();) {
      const ::ssize_t wrote = ::pwrite(fd_, bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
      require(wrote > 0);
      done += static_cast<std::size_t>(wrote);
    }
  }

  [[nodiscard]] const std::string& path() const noexcept { return path_; }

 private:
  int fd_;
  std::string path_;
};

/// A spelling of a parsed value that two parses of the same text share:
/// strings decoded and length-prefixed, numbers as written. Also checks the
/// document's own bookkeeping: child counts, unique keys, offsets in the text.
void append_canonical(JsonValue value, std::size_t text_size, std::string& out) {
  require(value.offset() < text_size);
  switch (value.type()) {
    case JsonType::null:
      out += 'n';
      return;
    case JsonType::boolean:
      out += value.as_bool() ? 't' : 'f';
      return;
    case JsonType::number:
      out += fmt::format("#{};", value.number_text());
      return;
    case JsonType::string: {
      const std::string_view text = value.as_string();
      require(qlora::detail::is_valid_utf8(text));
      out += fmt::format("s{}:", text.size());
      out += text;
      return;
    }
    case JsonType::array: {
      std::size_t count = 0;
      out += '[';
      for (const JsonValue element : value.elements()) {
        append_canonical(element, text_size, out);
        ++count;
      }
      out += ']';
      require(count == value.size());
      return;
    }
    case JsonType::object: {
      std::size_t count = 0;
      out += '{';
      for (const qlora::JsonMember& member : value.members()) {
        require(qlora::detail::is_valid_utf8(member.key) && member.key_offset < member.value.offset());
        // Keys are unique (a repeat is an error), so find() gives this very member.
        const std::optional<JsonValue> found = value.find(member.key);
        require(found && found->offset() == member.value.offset());
        out += fmt::format("k{}:", member.key.size());
        out += member.key;
        append_canonical(member.value, text_size, out);
        ++count;
      }
      out += '}';
      require(count == value.size());
      return;
    }
  }
  require(false);
}

std::string canonical(JsonValue value, std::size_t text_size) {
  std::string out;
  append_canonical(value, text_size, out);
  return out;
}

/// JSON values in `value` (itself, its elements, its members' keys and values),
/// as JsonlReaderOptions::max_values counts them.
std::size_t count_values(JsonValue value) {
  std::size_t count = 1;
  if (value.is(JsonType::array)) {
    for (const JsonValue element : value.elements()) count += count_values(element);
  } else if (value.is(JsonType::object)) {
    for (const qlora::JsonMember& member : value.members()) count += 1 + count_values(member.value);
  }
  return count;
}

/// What the reader must make of one line, whatever the line limit.
struct ModelLine {
  std::size_t bytes;  // without the line end (and the BOM on line 1)
  bool blank;
  /// MalformedJson, InvalidUtf8, RecordTooComplex, or NotAnObject for another value.
  std::optional<qlora::JsonParseError> error;
  std::string record;  // canonical, for an object
};

bool is_json_whitespace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/// The lines of `bytes` as the reader defines them, each parsed alone by a
/// document that holds at most `max_values` values.
std::vector<ModelLine> model_lines(std::string_view bytes, std::size_t max_values) {
  std::vector<std::string_view> lines;
  for (std::size_t pos = 0; pos < bytes.size();) {
    const std::size_t newline = bytes.find('\n', pos);
    if (newline == std::string_view::npos) {
      lines.push_back(bytes.substr(pos));  // the last line: a "\r" at its end is part of it
      break;
    }
    std::string_view line = bytes.substr(pos, newline - pos);
    if (line.ends_with('\r')) line.remove_suffix(1);
    lines.push_back(line);
    pos = newline + 1;
  }
  if (!lines.empty() && lines.front().starts_with("\xEF\xBB\xBF")) lines.front().remove_prefix(3);

  std::vector<ModelLine> model;
  qlora::JsonDocument document(max_values);
  qlora::JsonDocument unlimited;
  for (const std::string_view line : lines) {
    ModelLine& out = model.emplace_back();
    out.bytes = line.size();
    out.blank = std::all_of(line.begin(), line.end(), is_json_whitespace);
    if (out.blank) continue;
    out.error = document.try_parse(line);
    // The value limit changes nothing else: a text within it parses as without
    // it, one over it is RecordTooComplex unless an error comes first.
    if (const std::optional<qlora::JsonParseError> full = unlimited.try_parse(line)) {
      require(out.error && (std::string_view(out.error->code) == full->code ||
                            std::string_view(out.error->code) == "RecordTooComplex"));
    } else if (count_values(unlimited.root()) > max_values) {
      require(out.error && std::string_view(out.error->code) == "RecordTooComplex");
    } else {
      require(!out.error);
    }
    if (out.error) continue;
    if (!document.root().is(JsonType::object)) {
      out.error = qlora::JsonParseError{"NotAnObject", {}, document.root().offset()};
      continue;
    }
    out.record = canonical(document.root(), line.size());
  }
  return model;
}

struct ReaderSetup {
  std::size_t buffer_bytes;
  std::size_t max_line_bytes;
  std::size_t max_values;
  std::size_t logged_bad_lines;
};

constexpr std::size_t log_all = std::numeric_limits<std::size_t>::max();

// No fuzz input has a line this long or this many values: every line is parsed.
constexpr ReaderSetup whole_lines{std::size_t{1} << 16, std::size_t{1} << 20, std::size_t{1} << 20, log_all};

// A one-byte buffer grows through every size; a buffer larger than the limit
// finds over-long lines whole (a different path from one that fills up first).
constexpr ReaderSetup setups[] = {
    {1, 16, 4, 2}, {64, 16, std::size_t{1} << 20, log_all}, {7, 200, 16, log_all}, whole_lines};

qlora::JsonlReaderOptions options_for(const ReaderSetup& setup, BadLinePolicy policy) {
  return {.buffer_bytes = setup.buffer_bytes,
          .max_line_bytes = setup.max_line_bytes,
          .max_values = setup.max_values,
          .bad_lines = policy,
          .logged_bad_lines = setup.logged_bad_lines};
}

/// The model's verdict on a line under `setup`'s line limit: nullptr for a
/// record or a blank line, else the error code.
const char* bad_line_code(const ModelLine& line, const ReaderSetup& setup) {
  if (line.bytes > setup.max_line_bytes) return "LineTooLong";
  if (line.blank || !line.error) return nullptr;
  return line.error->code;
}

bool starts_with_location(const std::string& message, const std::string& path, std::uint64_t line) {
  return std::string_view(message).starts_with(fmt::format("{}:{}", path, line));
}

void check_skipping_reader(const MemoryFile& file, std::string_view bytes, const std::vector<ModelLine>& model,
                           const ReaderSetup& setup) {
  qlora::JsonlReader reader(file.path(), options_for(setup, BadLinePolicy::skip));
  std::uint64_t previous = 0;
  while (const std::optional<JsonValue> record = reader.next()) {
    const std::uint64_t line = reader.line();
    require(line > previous && line <= model.size());
    const ModelLine& expected = model[line - 1];
    require(bad_line_code(expected, setup) == nullptr && !expected.blank);
    require(canonical(*record, expected.bytes) == expected.record);
    for (std::uint64_t skipped = previous + 1; skipped < line; ++skipped) {
      const ModelLine& between = model[skipped - 1];
      require(between.blank || bad_line_code(between, setup) != nullptr);
    }
    previous = line;
  }
  for (std::uint64_t skipped = previous + 1; skipped <= model.size(); ++skipped) {
    const ModelLine& after = model[skipped - 1];
    require(after.blank || bad_line_code(after, setup) != nullptr);
  }

  std::map<std::string_view, std::uint64_t> bad_by_code;
  std::uint64_t bad = 0;
  std::uint64_t blank = 0;
  for (const ModelLine& line : model) {
    if (const char* code = bad_line_code(line, setup)) {
      ++bad_by_code[code];
      ++bad;
    } else if (line.blank) {
      ++blank;
    }
  }
  const qlora::BadLineLog& log = reader.bad_lines();
  require(reader.records() + reader.blank_lines() + log.count() == model.size());
  require(reader.blank_lines() == blank && log.count() == bad);
  for (const auto& [code, count] : bad_by_code) require(log.count(code) == count);
  require(log.first().size() == std::min<std::uint64_t>(bad, setup.logged_bad_lines));
  for (const qlora::SkippedLine& skipped : log.first()) {
    require(skipped.line >= 1 && skipped.line <= model.size());
    const ModelLine& line = model[skipped.line - 1];
    require(std::string_view(skipped.code) == bad_line_code(line, setup));
    require(starts_with_location(skipped.message, file.path(), skipped.line));
    if (line.bytes <= setup.max_line_bytes) require(skipped.column >= 1 && skipped.column <= line.bytes + 1);
  }
  for (std::size_t i = 1; i < log.first().size(); ++i) require(log.first()[i - 1].line < log.first()[i].line);
  require(reader.bytes_consumed() == bytes.size() && reader.file_size() == bytes.size());
  // Memory stays bounded by the limit, not by the file.
  require(reader.buffer_capacity() <= std::max(setup.buffer_bytes, setup.max_line_bytes + 2));
  require(log.summary().empty() == (log.count() == 0));
}

void check_strict_reader(const MemoryFile& file, const std::vector<ModelLine>& model, const ReaderSetup& setup) {
  const auto first_bad = std::find_if(model.begin(), model.end(),
                                      [&](const ModelLine& line) { return bad_line_code(line, setup) != nullptr; });
  const auto bad_line = static_cast<std::uint64_t>(first_bad - model.begin()) + 1;
  qlora::JsonlReader reader(file.path(), options_for(setup, BadLinePolicy::error));
  std::uint64_t previous = 0;
  try {
    while (const std::optional<JsonValue> record = reader.next()) {
      require(reader.line() > previous && reader.line() < bad_line);
      previous = reader.line();
      require(canonical(*record, model[previous - 1].bytes) == model[previous - 1].record);
    }
  } catch (const qlora::Error& error) {
    require(first_bad != model.end() && error.code() == bad_line_code(*first_bad, setup));
    require(starts_with_location(error.message(), file.path(), bad_line));
    return;
  }
  require(first_bad == model.end());
}

/// The shape every conversation of `format` has.
void check_conversation(const Conversation& conversation, DatasetFormat format) {
  const std::vector<qlora::Message>& messages = conversation.messages;
  require(!messages.empty());
  for (std::size_t i = 0; i < messages.size(); ++i) {
    const qlora::Message& message = messages[i];
    require(qlora::detail::is_valid_utf8(message.content));
    if (message.role == Role::system || message.role == Role::user) require(!message.loss);
    require((message.role == Role::text) == (format == DatasetFormat::text));
    if (format == DatasetFormat::alternating) require(message.role == (i % 2 == 0 ? Role::user : Role::assistant));
    // XTuner's turns are (system?, user, assistant): a user message is always answered.
    if (format == DatasetFormat::xtuner && message.role == Role::user) {
      require(i + 1 < messages.size() && messages[i + 1].role == Role::assistant);
    }
  }
  if (format == DatasetFormat::text) require(messages.size() == 1 && messages.front().loss);
}

bool same_messages(const Conversation& a, const Conversation& b) {
  return std::equal(a.messages.begin(), a.messages.end(), b.messages.begin(), b.messages.end(),
                    [](const qlora::Message& x, const qlora::Message& y) {
                      return x.role == y.role && x.loss == y.loss && x.content == y.content;
                    });
}

/// Converts each record as ConversationReader does, and checks that
/// ConversationReader gives the same conversations.
void check_conversations(const MemoryFile& file, const std::vector<ModelLine>& model) {
  const ReaderSetup& setup = whole_lines;
  qlora::JsonlReader reader(file.path(), options_for(setup, BadLinePolicy::skip));
  DatasetFormat format = DatasetFormat::detect;
  std::vector<Conversation> expected;
  Conversation scratch;  // reused as ConversationReader reuses its output
  while (const std::optional<JsonValue> record = reader.next()) {
    // read_conversation on its own: detect, then the detected format's reading.
    std::optional<DatasetFormat> detected;
    try {
      detected = qlora::detect_dataset_format(*record);
    } catch (const qlora::Error&) {  // then read_conversation must refuse the record too
    }
    std::optional<Conversation> alone;
    try {
      alone.emplace();
      qlora::read_conversation(*record, DatasetFormat::detect, *alone);
      require(detected.has_value());
      check_conversation(*alone, *detected);
    } catch (const qlora::Error&) {
      alone.reset();
    }
    if (detected) {
      Conversation by_format;
      try {
        qlora::read_conversation(*record, *detected, by_format);
        require(alone && same_messages(by_format, *alone));
      } catch (const qlora::Error&) {
        require(!alone);
      }
    }

    try {
      const DatasetFormat used = format == DatasetFormat::detect ? qlora::detect_dataset_format(*record) : format;
      qlora::read_conversation(*record, used, scratch);
      check_conversation(scratch, used);
      format = used;
      scratch.line = reader.line();
      expected.push_back(scratch);
    } catch (const qlora::Error& error) {
      reader.reject_record(error);
    }
  }
  require(reader.records() == expected.size());
  require(reader.records() + reader.blank_lines() + reader.bad_lines().count() == model.size());

  qlora::ConversationReader conversations(file.path(), DatasetFormat::detect, options_for(setup, BadLinePolicy::skip));
  Conversation got;
  std::size_t index = 0;
  while (conversations.next(got)) {
    require(index < expected.size() && got.line == expected[index].line && same_messages(got, expected[index]));
    ++index;
  }
  require(index == expected.size() && conversations.format() == format);
  require(conversations.jsonl().bad_lines().count() == reader.bad_lines().count());

  qlora::ConversationReader strict(file.path(), DatasetFormat::detect, options_for(setup, BadLinePolicy::error));
  index = 0;
  try {
    while (strict.next(got)) {
      require(index < expected.size() && got.line == expected[index].line && same_messages(got, expected[index]));
      ++index;
    }
    require(index == expected.size() && reader.bad_lines().count() == 0);
  } catch (const qlora::Error& error) {
    // It stops at the first line skipped above, naming it, after every conversation before it.
    require(!reader.bad_lines().first().empty());
    const std::uint64_t bad_line = reader.bad_lines().first().front().line;
    require(starts_with_location(error.message(), file.path(), bad_line));
    const auto before = std::count_if(expected.begin(), expected.end(),
                                      [&](const Conversation& conversation) { return conversation.line < bad_line; });
    require(index == static_cast<std::size_t>(before));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static MemoryFile file;
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  file.assign(bytes);
  for (const ReaderSetup& setup : setups) {
    const std::vector<ModelLine> model = model_lines(bytes, setup.max_values);
    check_skipping_reader(file, bytes, model, setup);
    check_strict_reader(file, model, setup);
  }
  check_conversations(file, model_lines(bytes, whole_lines.max_values));
  return 0;
}
