// JsonlReader: line splitting (BOM, CRLF, blank lines, a last line without a
// newline), bad lines located as CPython locates them (tests/data/data/formats/
// malformed.json, written by tests/reference/dataset_formats.py from json.loads
// and bytes.decode), skip-and-count, the line-length limit, and reading in
// constant memory (the buffer's size is capped, whatever the file's size).
#include <qlora/data/jsonl_reader.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <unistd.h>

#include "data/test_support.hpp"
#include "io/test_support.hpp"

using qlora::BadLinePolicy;
using qlora::Error;
using qlora::JsonlReader;
using qlora::JsonlReaderOptions;
using qlora::JsonValue;
using qlora::SkippedLine;
using qlora::test::data_fixture;
using qlora::test::Json;
using qlora::test::load_json;
using qlora::test::require_error;
using qlora::test::TempDir;
using qlora::test::write_bytes;

namespace {

/// Line numbers of the records in `path`, read to the end.
std::vector<std::uint64_t> record_lines(JsonlReader& reader) {
  std::vector<std::uint64_t> lines;
  while (reader.next()) lines.push_back(reader.line());
  return lines;
}

/// What a reader reports for one line: "ok", "blank", or an error code with its column.
struct Verdict {
  std::uint64_t line;
  std::string code;
  std::uint64_t column;
  bool operator==(const Verdict&) const = default;
};

std::ostream& operator<<(std::ostream& out, const Verdict& v) {
  return out << "line " << v.line << ": " << v.code << " at column " << v.column;
}

}  // namespace

TEST_CASE("JsonlReader reports every bad line where CPython does, and reads on past it") {
  const Json expected = load_json(data_fixture("formats/malformed.json"))["lines"];
  const auto path = data_fixture("formats/malformed.jsonl");

  std::vector<Verdict> expected_bad;
  std::vector<std::uint64_t> expected_records;
  std::uint64_t expected_blank = 0;
  for (const Json& line : expected) {
    const auto code = line["code"].get<std::string>();
    const auto number = line["line"].get<std::uint64_t>();
    if (code == "ok") {
      expected_records.push_back(number);
    } else if (code == "blank") {
      ++expected_blank;
    } else {
      expected_bad.push_back({number, code, line["column"].get<std::uint64_t>()});
    }
  }
  REQUIRE(expected_bad.size() > 30);  // the fixture is the one meant

  SECTION("skip: every bad line is counted and logged with its location") {
    JsonlReader reader(path, {.bad_lines = BadLinePolicy::skip, .logged_bad_lines = 100});
    CHECK(record_lines(reader) == expected_records);
    CHECK(reader.records() == expected_records.size());
    CHECK(reader.blank_lines() == expected_blank);
    CHECK(reader.bad_lines().count() == expected_bad.size());
    std::vector<Verdict> bad;
    for (const SkippedLine& skipped : reader.bad_lines().first()) bad.push_back({skipped.line, skipped.code, skipped.column});
    CHECK(bad == expected_bad);
    CHECK(reader.bad_lines().count("InvalidUtf8") == 5);
    CHECK(reader.bad_lines().count("NotAnObject") == 5);
    CHECK(reader.bad_lines().count("LineTooLong") == 0);
    // The whole file was read; the BOM counts as consumed bytes.
    CHECK(reader.bytes_consumed() == std::filesystem::file_size(path));
    CHECK(reader.file_size() == std::filesystem::file_size(path));
  }

  SECTION("error: each bad line throws its error, file:line:column and CPython's reason; the next call reads on") {
    JsonlReader reader(path);
    std::vector<std::uint64_t> records;
    std::size_t bad = 0;
    for (;;) {
      try {
        if (!reader.next()) break;
        records.push_back(reader.line());
      } catch (const Error& error) {
        REQUIRE(bad < expected_bad.size());
        const Json& line = expected[expected_bad[bad].line - 1];
        INFO(error.what());
        CHECK(error.code() == expected_bad[bad].code);
        CHECK(error.message().starts_with(
            fmt::format("{}:{}:{}: ", path.string(), expected_bad[bad].line, expected_bad[bad].column)));
        if (line.contains("reason")) {
          // CPython's reason, whose trailing " at" (followed in CPython by the position) is " here" in ours.
          std::string reason = line["reason"].get<std::string>();
          if (reason.ends_with(" at")) reason.replace(reason.size() - 3, 3, " here");
          CHECK(error.message().ends_with("invalid JSON: " + reason));
        }
        ++bad;
      }
    }
    CHECK(bad == expected_bad.size());
    CHECK(records == expected_records);
  }
}

TEST_CASE("JsonlReader's messages for each kind of bad line") {
  const TempDir dir;
  const auto path = dir / "bad.jsonl";
  write_bytes(path, "{\"a\": 1}\n[1]\n{\"a\": \"\xC3\xA9\xFF\"}\n{\"a\": 1,}\n");
  JsonlReader reader(path);
  CHECK(reader.next().has_value());
  require_error([&] { (void)reader.next(); }, "NotAnObject",
                fmt::format("{}:2:1: expected a JSON object (one record per line), got an array", path.string()));
  require_error([&] { (void)reader.next(); }, "InvalidUtf8",
                fmt::format("{}:3:9: invalid UTF-8 byte 0xFF", path.string()));
  require_error([&] { (void)reader.next(); }, "MalformedJson",
                fmt::format("{}:4:9: invalid JSON: Expecting property name enclosed in double quotes", path.string()));
  CHECK_FALSE(reader.next().has_value());
}

TEST_CASE("JsonlReader handles a BOM, CRLF, blank lines and a last line without a newline") {
  const TempDir dir;
  const auto path = dir / "crlf.jsonl";
  write_bytes(path, "\xEF\xBB\xBF{\"a\": 1}\r\n\r\n  \t\n{\"b\": \"x\"}\r\n{\"c\": [true]}");
  JsonlReader reader(path);
  std::vector<std::string> keys;
  std::vector<std::uint64_t> lines;
  while (const std::optional<JsonValue> record = reader.next()) {
    keys.emplace_back((*record->members().begin()).key);
    lines.push_back(reader.line());
  }
  CHECK(keys == std::vector<std::string>{"a", "b", "c"});
  CHECK(lines == std::vector<std::uint64_t>{1, 4, 5});
  CHECK(reader.blank_lines() == 2);
  CHECK(reader.bytes_consumed() == std::filesystem::file_size(path));

  // The BOM is not part of line 1: a first line of exactly max_line_bytes
  // after it is a record whatever the buffer size, with or without "\r\n" or
  // a final newline (found by fuzzing: it used to depend on the buffer).
  for (const std::string_view end : {"\n", "\r\n", ""}) {
    write_bytes(path, std::string("\xEF\xBB\xBF{\"a\":\"12345678\"}") + std::string(end));
    for (const std::size_t buffer : {1, 3, 4, 64}) {
      INFO("buffer " << buffer << ", line end " << end.size() << " bytes");
      JsonlReader limited(path, {.buffer_bytes = buffer, .max_line_bytes = 16});
      CHECK(limited.next().has_value());
      CHECK_FALSE(limited.next().has_value());
      CHECK(limited.bytes_consumed() == std::filesystem::file_size(path));
    }
  }

  // A "\r" that is not followed by "\n" is JSON whitespace, not a line end.
  write_bytes(path, "{\"a\": 1}\r");
  JsonlReader lone_cr(path);
  CHECK(lone_cr.next().has_value());
  CHECK_FALSE(lone_cr.next().has_value());
  // An empty file has no record.
  write_bytes(path, "");
  JsonlReader empty(path);
  CHECK_FALSE(empty.next().has_value());
  CHECK(empty.bytes_consumed() == 0);
}

TEST_CASE("JsonlReader grows its buffer for a line longer than it, and only that far") {
  const TempDir dir;
  const auto path = dir / "long.jsonl";
  const std::string text(1000, 'x');
  write_bytes(path, "{\"a\": 1}\n{\"text\": \"" + text + "\"}\n{\"b\": 2}\n");
  JsonlReader reader(path, {.buffer_bytes = 16});
  CHECK(reader.next().has_value());
  const std::optional<JsonValue> record = reader.next();
  REQUIRE(record.has_value());
  CHECK(record->find("text")->as_string() == text);
  CHECK(reader.next().has_value());
  // Doubled from 16 until the 1013-byte line fitted.
  CHECK(reader.buffer_capacity() == 1024);
}

TEST_CASE("JsonlReader reads a file of many lines in a buffer whose size is capped") {
  // 20000 records (about 2.5 MB), a 64-byte buffer and lines of at most 300
  // bytes: the buffer never holds more than the longest line needs, however
  // big the file. (Memory use, not speed, is what makes a reader streaming.)
  const TempDir dir;
  const auto path = dir / "many.jsonl";
  std::string file;
  for (int i = 0; i < 20000; ++i) {
    file += fmt::format("{{\"i\": {}, \"text\": \"{}\"}}\n", i, std::string(static_cast<std::size_t>(i * 7919 % 250), 'a' + i % 26));
  }
  write_bytes(path, file);
  JsonlReader reader(path, {.buffer_bytes = 64, .max_line_bytes = 300});
  int expected = 0;
  std::uint64_t previous_consumed = 0;
  bool in_order = true;
  while (const std::optional<JsonValue> record = reader.next()) {
    in_order = in_order && record->find("i")->number_text() == std::to_string(expected) &&
               record->find("text")->as_string().size() == static_cast<std::size_t>(expected * 7919 % 250) &&
               reader.line() == static_cast<std::uint64_t>(expected + 1) && reader.bytes_consumed() > previous_consumed;
    previous_consumed = reader.bytes_consumed();
    ++expected;
  }
  CHECK(in_order);
  CHECK(expected == 20000);
  CHECK(reader.buffer_capacity() <= 300 + 2);
  CHECK(reader.bytes_consumed() == file.size());
}

TEST_CASE("JsonlReader's line limit: LineTooLong, or the line skipped without being held") {
  const TempDir dir;
  const auto path = dir / "limit.jsonl";
  // Line 1: exactly 100 bytes (the limit), with "\r\n"; line 2: 101 bytes; line
  // 3: 10000 bytes, much longer than the buffer; line 4 good; line 5: 101 bytes
  // without a final newline.
  const auto line_of = [](std::size_t bytes) { return "{\"t\": \"" + std::string(bytes - 9, 'x') + "\"}"; };
  REQUIRE(line_of(100).size() == 100);
  write_bytes(path, line_of(100) + "\r\n" + line_of(101) + "\n" + line_of(10000) + "\n{\"ok\": 1}\n" + line_of(101));

  SECTION("error") {
    JsonlReader reader(path, {.buffer_bytes = 16, .max_line_bytes = 100});
    CHECK(reader.next().has_value());
    require_error([&] { (void)reader.next(); }, "LineTooLong",
                  fmt::format("{}:2: the line is longer than the limit of 100 bytes", path.string()));
  }
  SECTION("skip") {
    JsonlReader reader(path, {.buffer_bytes = 16, .max_line_bytes = 100, .bad_lines = BadLinePolicy::skip});
    CHECK(record_lines(reader) == std::vector<std::uint64_t>{1, 4});
    CHECK(reader.bad_lines().count("LineTooLong") == 3);
    std::vector<std::uint64_t> skipped;
    for (const SkippedLine& line : reader.bad_lines().first()) skipped.push_back(line.line);
    CHECK(skipped == std::vector<std::uint64_t>{2, 3, 5});
    CHECK(reader.buffer_capacity() <= 100 + 2);  // line 3 was read through, not held
    CHECK(reader.bytes_consumed() == std::filesystem::file_size(path));
    CHECK(reader.bad_lines().summary() ==
          fmt::format("skipped 3 lines (3 LineTooLong); first: {}:2: the line is longer than the limit of 100 bytes "
                      "(JsonlReaderOptions::max_line_bytes)",
                      path.string()));
  }
}

TEST_CASE("JsonlReader refuses a record of more values than the default budget before it costs a GiB") {
  // 2^20 + 3 values (the object, the key, the array and 2^20 numbers) in 2 MiB
  // of text: each value is a 32-byte node, so without a budget a 64 MiB line
  // of "0," would take 1 GiB of nodes.
  const TempDir dir;
  const auto path = dir / "wide.jsonl";
  std::string wide = "{\"ids\": [0";
  for (std::size_t i = 1; i < (std::size_t{1} << 20); ++i) wide += ",0";
  wide += "]}\n{\"ids\": [1, 2]}\n";
  write_bytes(path, wide);
  JsonlReader strict(path);
  require_error([&] { (void)strict.next(); }, "RecordTooComplex", fmt::format("{}:1:", path.string()),
                "JsonlReaderOptions::max_values");
  JsonlReader lenient(path, {.bad_lines = BadLinePolicy::skip});
  CHECK(record_lines(lenient) == std::vector<std::uint64_t>{2});
  CHECK(lenient.bad_lines().count("RecordTooComplex") == 1);
}

TEST_CASE("JsonlReaderOptions::max_values: RecordTooComplex at file:line:column, or skipped") {
  const TempDir dir;
  const auto path = dir / "values.jsonl";
  // 5 values (object, key, array, two numbers), then 6, then 5 again.
  write_bytes(path, "{\"a\": [1, 2]}\n{\"a\": [1, 2, 3]}\n{\"b\": [3, 4]}\n");
  JsonlReader strict(path, {.max_values = 5});
  REQUIRE(strict.next().has_value());
  require_error([&] { (void)strict.next(); }, "RecordTooComplex",
                fmt::format("{}:2:14: more than 5 values in one document (JsonlReaderOptions::max_values)",
                            path.string()));
  JsonlReader lenient(path, {.max_values = 5, .bad_lines = BadLinePolicy::skip});
  CHECK(record_lines(lenient) == std::vector<std::uint64_t>{1, 3});
  CHECK(lenient.bad_lines().count("RecordTooComplex") == 1);
  CHECK(lenient.bad_lines().first().at(0).column == 14);
  require_error([&] { JsonlReader(path, {.max_values = 0}); }, "InvalidArgument", "max_values");
}

TEST_CASE("JsonlReader::reject_record throws with the location, or logs under skip") {
  const TempDir dir;
  const auto path = dir / "records.jsonl";
  write_bytes(path, "{\"a\": 1}\n{\"a\": 2}\n");
  JsonlReader strict(path);
  REQUIRE(strict.next().has_value());
  require_error([&] { strict.reject_record(Error("MissingField", "`text` is missing")); }, "MissingField",
                fmt::format("{}:1: `text` is missing", path.string()));

  JsonlReader lenient(path, {.bad_lines = BadLinePolicy::skip, .logged_bad_lines = 0});
  REQUIRE(lenient.next().has_value());
  lenient.reject_record(Error("MissingField", "`text` is missing"));
  CHECK(record_lines(lenient) == std::vector<std::uint64_t>{2});
  CHECK(lenient.records() == 1);
  CHECK(lenient.bad_lines().count("MissingField") == 1);
  CHECK(lenient.bad_lines().first().empty());  // counted, but none kept in full (logged_bad_lines = 0)
}

TEST_CASE("JsonlReader: files it cannot read and options it cannot use") {
  const TempDir dir;
  require_error([&] { JsonlReader((dir / "missing.jsonl")); }, "IoError", "missing.jsonl");
  require_error([&] { JsonlReader reader(dir.path()); (void)reader.next(); }, "IoError", "cannot read");
  write_bytes(dir / "a.jsonl", "{}\n");
  require_error([&] { JsonlReader(dir / "a.jsonl", {.max_line_bytes = 0}); }, "InvalidArgument", "max_line_bytes");
  require_error([&] { JsonlReader(dir / "a.jsonl", {.buffer_bytes = 0}); }, "InvalidArgument", "buffer");
}

#ifdef __linux__
TEST_CASE("JsonlReader reads a pipe, whose size it cannot know") {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const std::string text = "{\"a\": 1}\n{\"a\": 2}\n";
  REQUIRE(::write(fds[1], text.data(), text.size()) == static_cast<::ssize_t>(text.size()));
  ::close(fds[1]);
  {
    JsonlReader reader("/proc/self/fd/" + std::to_string(fds[0]));
    CHECK_FALSE(reader.file_size().has_value());
    CHECK(record_lines(reader) == std::vector<std::uint64_t>{1, 2});
    CHECK(reader.bytes_consumed() == text.size());
  }
  ::close(fds[0]);
}
#endif
