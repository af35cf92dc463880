// ConversationReader: format detection over whole files (the fixtures of
// tests/reference/dataset_formats.py), a record that does not match the
// detected format, and skip-and-count for records that do not convert or that
// a later stage rejects.
#include <qlora/data/conversation_reader.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "data/test_support.hpp"
#include "io/test_support.hpp"

using qlora::BadLinePolicy;
using qlora::Conversation;
using qlora::ConversationReader;
using qlora::DatasetFormat;
using qlora::Role;
using qlora::SkippedLine;
using qlora::test::data_fixture;
using qlora::test::Json;
using qlora::test::load_json;
using qlora::test::require_error;
using qlora::test::TempDir;
using qlora::test::write_bytes;

namespace {

/// The source lines of every conversation the reader gives.
std::vector<std::uint64_t> conversation_lines(ConversationReader& reader) {
  std::vector<std::uint64_t> lines;
  Conversation conversation;
  while (reader.next(conversation)) lines.push_back(conversation.line);
  return lines;
}

}  // namespace

TEST_CASE("ConversationReader detects each fixture's format and reads all of it") {
  const std::vector<std::pair<std::string, DatasetFormat>> files = {{"formats/openai.jsonl", DatasetFormat::openai},
                                                                    {"formats/xtuner.jsonl", DatasetFormat::xtuner},
                                                                    {"formats/alternating.jsonl", DatasetFormat::alternating},
                                                                    {"formats/texts.jsonl", DatasetFormat::text}};
  for (const auto& [name, format] : files) {
    INFO(name);
    ConversationReader reader(data_fixture(name));
    CHECK(reader.format() == DatasetFormat::detect);
    const std::vector<std::uint64_t> lines = conversation_lines(reader);
    CHECK(reader.format() == format);
    CHECK(lines.size() == reader.jsonl().records());
    CHECK(lines.front() == 1);
    CHECK(lines.back() == lines.size());  // these fixtures have no blank line
    CHECK(reader.jsonl().bytes_consumed() == std::filesystem::file_size(data_fixture(name)));
  }
}

TEST_CASE("ConversationReader gives json.loads' strings for {\"text\"} records") {
  const Json expected = load_json(data_fixture("formats/texts.json"))["texts"];
  ConversationReader reader(data_fixture("formats/texts.jsonl"), DatasetFormat::text);
  Conversation conversation;
  std::size_t index = 0;
  while (reader.next(conversation)) {
    REQUIRE(index < expected.size());
    REQUIRE(conversation.messages.size() == 1);
    CHECK(conversation.messages[0].role == Role::text);
    CHECK(conversation.messages[0].content == expected[index++].get<std::string>());
  }
  CHECK(index == expected.size());
}

TEST_CASE("ConversationReader holds every record to the detected format") {
  const TempDir dir;
  const auto path = dir / "mixed.jsonl";
  write_bytes(path,
              "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n"
              "\n"
              "{\"text\": \"a pre-training document in a chat file\"}\n");
  ConversationReader reader(path);
  Conversation conversation;
  REQUIRE(reader.next(conversation));
  CHECK(conversation.line == 1);
  require_error([&] { (void)reader.next(conversation); }, "MissingField",
                fmt::format("{}:3: `messages` is missing (the file's format is openai, detected from line 1)",
                            path.string()));
}

TEST_CASE("ConversationReader with BadLinePolicy::skip skips records that do not convert, and says which") {
  const TempDir dir;
  const auto path = dir / "dirty.jsonl";
  write_bytes(path,
              "{\"instruction\": \"no known key\"}\n"                                   // 1: UnknownFormat
              "{\"conversation\": [{\"input\": \"q\"}]}\n"                              // 2: MissingField, not detected from
              "{\"conversation\": [{\"input\": \"q\", \"output\": \"a\"}]}\n"           // 3: detected from here
              "{\"conversation\": [{\"input\": \"q\", \"output\": \"a\"}]\n"            // 4: MalformedJson
              "{\"conversation\": []}\n"                                                // 5: EmptyConversation
              "{\"conversation\": [{\"input\": \"q2\", \"output\": \"a2\"}]}\n");       // 6
  ConversationReader reader(path, DatasetFormat::detect, {.bad_lines = BadLinePolicy::skip});
  CHECK(conversation_lines(reader) == std::vector<std::uint64_t>{3, 6});
  CHECK(reader.format() == DatasetFormat::xtuner);
  const auto& log = reader.jsonl().bad_lines();
  CHECK(log.count() == 4);
  std::vector<std::pair<std::uint64_t, std::string>> skipped;
  for (const SkippedLine& line : log.first()) skipped.emplace_back(line.line, line.code);
  CHECK(skipped == std::vector<std::pair<std::uint64_t, std::string>>{
                       {1, "UnknownFormat"}, {2, "MissingField"}, {4, "MalformedJson"}, {5, "EmptyConversation"}});
  CHECK(log.first()[1].message == fmt::format("{}:2: `conversation[0].output` is missing", path.string()));
  CHECK(log.first()[3].message ==
        fmt::format("{}:5: `conversation` is empty: there is nothing to learn (the file's format is xtuner, detected "
                    "from line 3)",
                    path.string()));
  CHECK(reader.jsonl().records() == 2);
}

TEST_CASE("ConversationReader::reject locates a record a later stage refused, or skips and counts it") {
  const TempDir dir;
  const auto path = dir / "chat.jsonl";
  write_bytes(path, "{\"messages\": [\"q1\", \"a1\"]}\n{\"messages\": [\"q2\"]}\n{\"messages\": [\"q3\", \"a3\"]}\n");
  const qlora::Error unanswered("WrongRoleOrder", "messages[0] is 'user' and ends the conversation");
  Conversation conversation;

  ConversationReader strict(path);
  REQUIRE(strict.next(conversation));
  REQUIRE(strict.next(conversation));
  require_error([&] { strict.reject(unanswered); }, "WrongRoleOrder",
                fmt::format("{}:2: messages[0] is 'user' and ends the conversation", path.string()));

  ConversationReader lenient(path, DatasetFormat::detect, {.bad_lines = BadLinePolicy::skip});
  std::vector<std::uint64_t> kept;
  while (lenient.next(conversation)) {
    if (conversation.messages.size() == 1) {
      lenient.reject(unanswered);
    } else {
      kept.push_back(conversation.line);
    }
  }
  CHECK(kept == std::vector<std::uint64_t>{1, 3});
  CHECK(lenient.jsonl().records() == 2);
  CHECK(lenient.jsonl().bad_lines().count("WrongRoleOrder") == 1);
  CHECK(lenient.jsonl().bad_lines().first().at(0).message ==
        fmt::format("{}:2: messages[0] is 'user' and ends the conversation", path.string()));
}
