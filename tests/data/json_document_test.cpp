// JsonDocument and JsonValue: walking a parsed document, string decoding
// against CPython's json.loads (tests/data/data/formats/texts.json, written by
// tests/reference/dataset_formats.py), and the errors where we are stricter
// than CPython, and the budget of values. (CPython's verdicts on malformed
// lines, columns included, are checked through JsonlReader in
// jsonl_reader_test.cpp.)
#include <qlora/data/json_document.hpp>

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#include "data/test_support.hpp"
#include "io/test_support.hpp"

using qlora::JsonDocument;
using qlora::JsonMember;
using qlora::JsonParseError;
using qlora::JsonType;
using qlora::JsonValue;
using qlora::test::data_fixture;
using qlora::test::Json;
using qlora::test::load_json;
using qlora::test::read_text;
using qlora::test::require_error;

namespace {

/// The error try_parse reports for `text`; fails the test when it parses.
JsonParseError parse_error(std::string_view text) {
  JsonDocument document;
  const std::optional<JsonParseError> error = document.try_parse(text);
  INFO("text: " << text);
  REQUIRE(error.has_value());
  return *error;
}

/// 1-based column of `error` in the one-line `text`.
std::uint64_t column_of(std::string_view text, const JsonParseError& error) {
  return qlora::text_position(text, error.offset).column;
}

}  // namespace

TEST_CASE("JsonDocument walks objects in text order, arrays, and every scalar type") {
  const std::string text = R"( {"b": [1, -2.50e3, true, false, null, "s", [], {}], "a": {"x": {"y": []}}, "": 0} )";
  JsonDocument document;
  document.parse(text);
  const JsonValue root = document.root();
  REQUIRE(root.type() == JsonType::object);
  CHECK(root.size() == 3);

  std::vector<std::string> keys;
  for (const JsonMember& member : root.members()) keys.emplace_back(member.key);
  CHECK(keys == std::vector<std::string>{"b", "a", ""});  // text order, not sorted

  const JsonValue b = *root.find("b");
  REQUIRE(b.size() == 8);
  std::vector<JsonType> types;
  for (const JsonValue element : b.elements()) types.push_back(element.type());
  CHECK(types == std::vector<JsonType>{JsonType::number, JsonType::number, JsonType::boolean, JsonType::boolean,
                                       JsonType::null, JsonType::string, JsonType::array, JsonType::object});
  auto element = b.elements().begin();
  CHECK((*element).number_text() == "1");
  CHECK((*++element).number_text() == "-2.50e3");  // as written: nothing is lost by re-printing
  CHECK((*++element).as_bool());
  CHECK_FALSE((*++element).as_bool());
  CHECK((*++element).is(JsonType::null));
  CHECK((*++element).as_string() == "s");
  CHECK((*++element).size() == 0);
  CHECK((*++element).size() == 0);
  CHECK(++element == b.elements().end());

  // Skipping a nested subtree lands on the next sibling.
  const JsonValue a = *root.find("a");
  CHECK(a.find("x")->find("y")->size() == 0);
  CHECK(root.find("")->number_text() == "0");
  CHECK_FALSE(root.find("x").has_value());  // only direct members are found
  CHECK(b.offset() == text.find('['));
}

TEST_CASE("JsonDocument leaves unescaped strings in the text and decodes escaped ones") {
  const std::string text = R"({"plain": "no escapes here", "escaped": "a\"b\\c\/d\b\f\n\r\t\u00e9\u4e2d\ud83d\ude00"})";
  JsonDocument document;
  document.parse(text);
  const std::string_view plain = document.root().find("plain")->as_string();
  CHECK(plain == "no escapes here");
  CHECK(plain.data() == text.data() + text.find("no escapes"));  // a view into the text: no copy
  CHECK(document.root().find("escaped")->as_string() == "a\"b\\c/d\b\f\n\r\t\u00e9\u4e2d\U0001F600");
}

TEST_CASE("JsonDocument decodes strings as CPython's json.loads does") {
  // texts.jsonl: json.dumps spellings (ASCII escapes, surrogate pairs, raw
  // UTF-8, \/, odd separators); texts.json: the strings json.loads decoded.
  const Json expected = load_json(data_fixture("formats/texts.json"))["texts"];
  const std::string file = read_text(data_fixture("formats/texts.jsonl"));
  JsonDocument document;
  std::size_t index = 0;
  for (std::size_t begin = 0; begin < file.size(); ++index) {
    const std::size_t end = file.find('\n', begin);
    const std::string_view line = std::string_view(file).substr(begin, end - begin);
    begin = end + 1;
    INFO("line " << index + 1 << ": " << line);
    document.parse(line);  // the same document, re-parsed: its buffers are reused
    REQUIRE(index < expected.size());
    CHECK(document.root().find("text")->as_string() == expected[index].get<std::string>());
  }
  CHECK(index == expected.size());
}

TEST_CASE("JsonValue accessors of the wrong type throw WrongType") {
  JsonDocument document;
  document.parse(R"({"n": 1, "s": "x"})");
  const JsonValue root = document.root();
  require_error([&] { (void)root.find("n")->as_string(); }, "WrongType", "expected a string, got a number");
  require_error([&] { (void)root.find("s")->as_bool(); }, "WrongType", "expected a boolean, got a string");
  require_error([&] { (void)root.find("s")->size(); }, "WrongType", "expected an array, got a string");
  require_error([&] { (void)root.elements(); }, "WrongType", "expected an array, got an object");
  require_error([&] { (void)root.find("s")->find("k"); }, "WrongType", "expected an object, got a string");
  require_error([&] { (void)JsonDocument().root(); }, "NoDocument", "before a successful parse");
}

TEST_CASE("JsonDocument::parse names the line and the column in characters") {
  // "é" is one character (of two bytes) in both.
  require_error([] { JsonDocument().parse("{\"a\": 1,\n\"é\" 2}"); }, "MalformedJson",
                "line 2, column 5: Expecting ':' delimiter");
  require_error([] { JsonDocument().parse("[\"\xC3\xA9\", \"\xE4\xB8\"]"); }, "InvalidUtf8",
                "line 1, column 8: invalid UTF-8 byte 0xE4");
  require_error([] { JsonDocument().parse(""); }, "MalformedJson", "line 1, column 1: Expecting value");
}

TEST_CASE("JsonDocument rejects what CPython lets through") {
  // CPython's json accepts each of these; the columns are ours, counted by hand.
  SECTION("NaN and Infinity are not JSON") {
    for (const std::string_view text : {R"({"a": NaN})", R"({"a": Infinity})", R"({"a": -Infinity})"}) {
      const JsonParseError error = parse_error(text);
      CHECK(error.reason == "NaN and Infinity are not JSON");
      CHECK(column_of(text, error) == 7);
    }
  }
  SECTION("an unpaired surrogate escape, which has no UTF-8 form") {
    for (const std::string_view text : {R"({"a": "x\ud800"})", R"({"a": "x\udc00y"})", R"({"a": "x\ud800\u0041"})"}) {
      const JsonParseError error = parse_error(text);
      CHECK(error.code == std::string_view("MalformedJson"));
      CHECK(error.reason == "Unpaired surrogate in \\uXXXX escape (not valid UTF-8)");
      CHECK(column_of(text, error) == 9);  // the backslash
    }
  }
  SECTION("a repeated key: CPython keeps the last value and drops the first without a word") {
    const std::string_view small = R"({"a": 1, "b": {"a": 2}, "a": 3})";  // the nested "a" is another object's
    const JsonParseError error = parse_error(small);
    CHECK(error.reason == "Duplicate key \"a\" (CPython would keep only its last value)");
    CHECK(column_of(small, error) == 25);
    // More than 16 keys take the sorting path; the first repeat in the text is named.
    std::string big = "{";
    for (int i = 0; i < 20; ++i) big += "\"k" + std::to_string(i) + "\": 0, ";
    big += R"("k7": 1, "k3": 2})";
    const JsonParseError big_error = parse_error(big);
    CHECK(big_error.reason.starts_with("Duplicate key \"k7\""));
    CHECK(big_error.offset == big.find("\"k7\": 1"));
  }
  SECTION("nesting deeper than 1000 levels") {
    const std::string deepest = std::string(1000, '[') + std::string(1000, ']');
    JsonDocument document;
    CHECK_FALSE(document.try_parse(deepest).has_value());
    const std::string too_deep = "[" + deepest + "]";
    const JsonParseError error = parse_error(too_deep);
    CHECK(error.reason == "nesting deeper than 1000 levels");
    CHECK(column_of(too_deep, error) == 1001);
  }
}

TEST_CASE("JsonDocument holds at most max_values values") {
  // Values counted by hand: the object, the key, the array and its elements.
  JsonDocument document(5);
  CHECK_FALSE(document.try_parse(R"({"a": [1, 2]})").has_value());
  CHECK_FALSE(document.try_parse(R"({"a": {}, "b": null})").has_value());
  const std::string_view six = R"({"a": [1, 2, 3]})";
  const std::optional<JsonParseError> error = document.try_parse(six);
  REQUIRE(error.has_value());
  CHECK(error->code == std::string_view("RecordTooComplex"));
  CHECK(error->reason == "more than 5 values in one document");
  CHECK(column_of(six, *error) == 14);  // the sixth value, "3"
  // A key counts as much as a value: six values, the last one a key.
  require_error([&] { document.parse(R"({"a": [1, 2], "b": 3})"); }, "RecordTooComplex", "line 1, column 15");
  // The document is still usable after the refusal.
  document.parse("[0, 0, 0, 0]");
  CHECK(document.root().size() == 4);
  // By default only the 32-bit offsets limit it.
  std::string wide = "[0";
  for (int i = 0; i < 100000; ++i) wide += ",0";
  wide += "]";
  JsonDocument unlimited;
  CHECK_FALSE(unlimited.try_parse(wide).has_value());
  require_error([] { JsonDocument(0); }, "InvalidArgument", "max_values");
}
