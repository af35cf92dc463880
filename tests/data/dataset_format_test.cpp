// read_conversation and detect_dataset_format for the four record layouts,
// against tests/data/data/formats/ (tests/reference/dataset_formats.py):
// OpenAI-style records and the turns XTuner's real openai_map_fn makes of them,
// the same conversations in XTuner's format as openai_map_fn writes them, and
// the Phi-2 tutorial's alternating messages with the roles its tokenize() gives.
// Then every named error, with its JSON path.
#include <qlora/data/dataset_format.hpp>

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#include <qlora/data/chat_turns.hpp>
#include <qlora/data/conversation.hpp>
#include <qlora/data/json_document.hpp>
#include <qlora/data/jsonl_reader.hpp>

#include "data/test_support.hpp"
#include "io/test_support.hpp"

using qlora::Conversation;
using qlora::DatasetFormat;
using qlora::JsonDocument;
using qlora::JsonlReader;
using qlora::Message;
using qlora::Role;
using qlora::test::data_fixture;
using qlora::test::Json;
using qlora::test::load_json;
using qlora::test::require_error;

namespace {

/// Every record of a fixture file, converted in `format`.
std::vector<Conversation> read_all(std::string_view name, DatasetFormat format) {
  JsonlReader reader(data_fixture(name));
  std::vector<Conversation> conversations;
  while (const auto record = reader.next()) {
    qlora::read_conversation(*record, format, conversations.emplace_back());
  }
  return conversations;
}

/// An XTuner turn, as openai_map_fn writes it.
struct Turn {
  std::string system, input, output;
  bool output_with_loss;
  bool operator==(const Turn&) const = default;
};

std::ostream& operator<<(std::ostream& out, const Turn& t) {
  return out << "{system: '" << t.system << "', input: '" << t.input << "', output: '" << t.output
             << "', loss: " << t.output_with_loss << "}";
}

std::vector<Turn> turns_in(const Json& turns) {
  std::vector<Turn> out;
  for (const Json& t : turns) {
    out.push_back({t["system"].get<std::string>(), t["input"].get<std::string>(), t["output"].get<std::string>(),
                   t["output_with_loss"].get<bool>()});
  }
  return out;
}

/// The turns of `conversation` as the chat templates cut them with
/// RoleOrder::xtuner (data/chat_turns.hpp), which follows openai_map_fn.
std::vector<Turn> turns_of(const Conversation& conversation) {
  std::vector<Turn> turns;
  qlora::for_each_chat_turn(conversation, qlora::RoleOrder::xtuner, [&](const qlora::ChatTurn& turn) {
    Turn& t = turns.emplace_back();
    if (const Message* system = turn.system()) t.system = system->content;
    turn.for_each_input([&](std::string_view input) { t.input += input; });
    t.output = turn.answer().content;
    t.output_with_loss = turn.answer().loss;
  });
  return turns;
}

/// read_conversation on one JSON record.
Conversation convert(std::string_view json, DatasetFormat format) {
  JsonDocument document;
  document.parse(json);
  Conversation conversation;
  qlora::read_conversation(document.root(), format, conversation);
  return conversation;
}

DatasetFormat detect(std::string_view json) {
  JsonDocument document;
  document.parse(json);
  return qlora::detect_dataset_format(document.root());
}

Role role_named(const std::string& name) {
  for (const Role role : {Role::system, Role::user, Role::assistant, Role::text}) {
    if (qlora::role_name(role) == name) return role;
  }
  FAIL("no role " << name);
  return Role::text;
}

}  // namespace

TEST_CASE("openai records keep every message, with XTuner's loss, and cut into XTuner's turns") {
  const Json expected = load_json(data_fixture("formats/openai.json"))["records"];
  const std::vector<Conversation> conversations = read_all("formats/openai.jsonl", DatasetFormat::openai);
  REQUIRE(conversations.size() == expected.size());
  for (std::size_t r = 0; r < conversations.size(); ++r) {
    INFO("openai.jsonl line " << r + 1);
    const std::vector<Message>& messages = conversations[r].messages;
    const Json& expected_messages = expected[r]["messages"];
    REQUIRE(messages.size() == expected_messages.size());  // nothing dropped, nothing joined
    for (std::size_t m = 0; m < messages.size(); ++m) {
      INFO("messages[" << m << "]");
      CHECK(messages[m].role == role_named(expected_messages[m]["role"]));
      CHECK(messages[m].content == expected_messages[m]["content"].get<std::string>());
      // XTuner's output_with_loss for an assistant message; other roles are never learned.
      CHECK(messages[m].loss == expected_messages[m].value("xtuner_output_with_loss", false));
    }
    CHECK(turns_of(conversations[r]) == turns_in(expected[r]["xtuner_turns"]));
  }
}

TEST_CASE("xtuner records, as openai_map_fn writes them, give back XTuner's turns") {
  const Json fixture = load_json(data_fixture("formats/openai.json"));
  const std::vector<Conversation> conversations = read_all("formats/xtuner.jsonl", DatasetFormat::xtuner);
  const Json& sources = fixture["xtuner_source_lines"];
  REQUIRE(conversations.size() == sources.size());
  for (std::size_t r = 0; r < conversations.size(); ++r) {
    INFO("xtuner.jsonl line " << r + 1);
    const Json& source = fixture["records"][sources[r].get<std::size_t>() - 1];
    CHECK(turns_of(conversations[r]) == turns_in(source["xtuner_turns"]));
    // openai_map_fn writes "system": "" in turns without one: no system message for those.
    for (const Message& message : conversations[r].messages) CHECK((message.role != Role::system || !message.content.empty()));
  }
}

TEST_CASE("alternating records take the roles the Phi-2 tutorial gives them") {
  const Json expected = load_json(data_fixture("formats/alternating.json"))["records"];
  const std::vector<Conversation> conversations = read_all("formats/alternating.jsonl", DatasetFormat::alternating);
  REQUIRE(conversations.size() == expected.size());
  for (std::size_t r = 0; r < conversations.size(); ++r) {
    INFO("alternating.jsonl line " << r + 1);
    const Json& roles = expected[r]["roles"];
    REQUIRE(conversations[r].messages.size() == roles.size());
    for (std::size_t m = 0; m < roles.size(); ++m) {
      const Message& message = conversations[r].messages[m];
      CHECK(message.role == role_named(roles[m]));
      CHECK(message.content == expected[r]["contents"][m].get<std::string>());
      CHECK(message.loss == (message.role == Role::assistant));
    }
  }
}

TEST_CASE("xtuner turns: optional system and input, output_with_loss") {
  const Conversation c = convert(R"({"conversation": [
      {"system": "S", "input": "I1", "output": "O1", "output_with_loss": false},
      {"input": null, "output": "O2", "system": null},
      {"output": "O3", "system": "", "need_eos_token": false}]})",
                                 DatasetFormat::xtuner);
  // XTuner's template_map_fn: a null or missing input is "", a null or "" system is none.
  const std::vector<std::pair<Role, std::string>> expected = {
      {Role::system, "S"}, {Role::user, "I1"}, {Role::assistant, "O1"}, {Role::user, ""},
      {Role::assistant, "O2"}, {Role::user, ""}, {Role::assistant, "O3"}};
  REQUIRE(c.messages.size() == expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    CHECK(c.messages[i].role == expected[i].first);
    CHECK(c.messages[i].content == expected[i].second);
  }
  CHECK_FALSE(c.messages[2].loss);
  CHECK(c.messages[4].loss);
}

TEST_CASE("text records are one unstripped text message") {
  const Conversation c = convert(R"({"text": "  a document\n", "meta": {"source": "x"}})", DatasetFormat::text);
  REQUIRE(c.messages.size() == 1);
  CHECK(c.messages[0].role == Role::text);
  CHECK(c.messages[0].content == "  a document\n");  // stripping is the Pretrain template's (as pretrain_map_fn does)
  CHECK(c.messages[0].loss);
}

TEST_CASE("read_conversation reuses the conversation it writes into") {
  JsonDocument document;
  Conversation c;
  document.parse(R"({"messages": ["q1", "a1", "q2", "a2"]})");
  qlora::read_conversation(document.root(), DatasetFormat::alternating, c);
  CHECK(c.messages.size() == 4);
  document.parse(R"({"messages": ["only"]})");
  qlora::read_conversation(document.root(), DatasetFormat::alternating, c);
  REQUIRE(c.messages.size() == 1);
  CHECK(c.messages[0].content == "only");
}

TEST_CASE("detect_dataset_format reads the keys of a record") {
  CHECK(detect(R"({"conversation": [{"input": "", "output": "x"}]})") == DatasetFormat::xtuner);
  CHECK(detect(R"({"messages": [{"role": "user", "content": "x"}]})") == DatasetFormat::openai);
  CHECK(detect(R"({"number": 3, "messages": ["x", "y"]})") == DatasetFormat::alternating);
  CHECK(detect(R"({"text": "x", "id": 1})") == DatasetFormat::text);
  CHECK(convert(R"({"text": "x"})", DatasetFormat::detect).messages[0].role == Role::text);

  require_error([] { (void)detect(R"({"instruction": "x", "output": "y"})"); }, "UnknownFormat",
                "none of the keys", "it has: \"instruction\", \"output\"");
  require_error([] { (void)detect(R"({"text": "x", "messages": ["y"]})"); }, "AmbiguousFormat", "name the format");
  require_error([] { (void)detect(R"({"messages": []})"); }, "EmptyConversation", "`messages` is empty");
  require_error([] { (void)detect(R"({"messages": [1]})"); }, "WrongType",
                "`messages[0]`: expected an object (openai) or a string (alternating), got a number");
  require_error([] { (void)detect(R"({"messages": {"role": "user"}})"); }, "WrongType",
                "`messages`: expected an array, got an object");
}

TEST_CASE("dataset format names") {
  for (const DatasetFormat format : {DatasetFormat::detect, DatasetFormat::xtuner, DatasetFormat::openai,
                                     DatasetFormat::alternating, DatasetFormat::text}) {
    CHECK(qlora::parse_dataset_format(qlora::dataset_format_name(format)) == format);
  }
  require_error([] { (void)qlora::parse_dataset_format("jsonl"); }, "UnknownFormat", "\"jsonl\"",
                "detect, xtuner, openai, alternating or text");
}

TEST_CASE("read_conversation names the error and the JSON path") {
  using enum DatasetFormat;
  const auto fails = [](std::string_view json, DatasetFormat format, std::string_view code, std::string_view message) {
    INFO(json);
    require_error([&] { (void)convert(json, format); }, code, message);
  };
  SECTION("xtuner") {
    fails(R"({"messages": []})", xtuner, "MissingField", "`conversation` is missing");
    fails(R"({"conversation": "hi"})", xtuner, "WrongType", "`conversation`: expected an array, got a string");
    fails(R"({"conversation": []})", xtuner, "EmptyConversation", "`conversation` is empty");
    fails(R"({"conversation": [{"input": "", "output": ""}, "x"]})", xtuner, "WrongType",
          "`conversation[1]`: expected an object, got a string");
    fails(R"({"conversation": [{"input": "a", "output": "b"}, {"input": "c", "outputs": "d"}]})", xtuner,
          "MissingField", "`conversation[1].output` is missing");
    fails(R"({"conversation": [{"input": "a", "output": 7}]})", xtuner, "WrongType",
          "`conversation[0].output`: expected a string, got a number");
    fails(R"({"conversation": [{"input": ["a"], "output": ""}]})", xtuner, "WrongType",
          "`conversation[0].input`: expected a string, got an array");
    fails(R"({"conversation": [{"system": 1, "input": "", "output": ""}]})", xtuner, "WrongType",
          "`conversation[0].system`: expected a string, got a number");
    // XTuner tests it for truth: the string "false" would be learned.
    fails(R"({"conversation": [{"input": "", "output": "", "output_with_loss": "false"}]})", xtuner, "WrongType",
          "`conversation[0].output_with_loss`: expected true or false, got a string");
  }
  SECTION("openai") {
    fails(R"({"conversation": []})", openai, "MissingField", "`messages` is missing");
    fails(R"({"messages": []})", openai, "EmptyConversation", "`messages` is empty");
    fails(R"({"messages": ["hi"]})", openai, "WrongType", "`messages[0]`: expected an object, got a string");
    fails(R"({"messages": [{"role": "user", "content": "a"}, {"content": "b"}]})", openai, "MissingField",
          "`messages[1].role` is missing");
    fails(R"({"messages": [{"role": "user"}]})", openai, "MissingField", "`messages[0].content` is missing");
    fails(R"({"messages": [{"role": "assistant", "content": null}]})", openai, "WrongType",
          "`messages[0].content`: expected a string, got null");
    fails(R"({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]})", openai, "WrongType",
          "`messages[0].content`: expected a string, got an array");
    fails(R"({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]})", openai,
          "UnknownRole", "`messages[1].role`: unknown role \"tool\" (expected system, user or assistant)");
    fails(R"({"messages": [{"role": "System", "content": "a"}]})", openai, "UnknownRole", "unknown role \"System\"");
    fails(R"({"messages": [{"role": 1, "content": "a"}]})", openai, "WrongType",
          "`messages[0].role`: expected a string, got a number");
    // XTuner would read each of these as false, silently.
    fails(R"({"messages": [{"role": "assistant", "content": "a", "loss": "yes"}]})", openai, "InvalidValue",
          "`messages[0].loss`: expected true, false, \"true\" or \"false\", got \"yes\"");
    fails(R"({"messages": [{"role": "assistant", "content": "a", "loss": 1}]})", openai, "WrongType",
          "`messages[0].loss`: expected true, false, \"true\" or \"false\", got a number");
    fails(R"({"messages": [{"role": "assistant", "content": "a", "loss": null}]})", openai, "WrongType",
          "`messages[0].loss`: expected true, false, \"true\" or \"false\", got null");
  }
  SECTION("alternating and text") {
    fails(R"({"messages": ["q", {"role": "assistant"}]})", alternating, "WrongType",
          "`messages[1]`: expected a string, got an object");
    fails(R"({"messages": []})", alternating, "EmptyConversation", "`messages` is empty");
    fails(R"({"content": "x"})", text, "MissingField", "`text` is missing");
    fails(R"({"text": ["x"]})", text, "WrongType", "`text`: expected a string, got an array");
  }
}
