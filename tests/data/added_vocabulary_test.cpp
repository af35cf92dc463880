// AddedVocabulary against tests/data/data/added_vocabulary/splits.json and
// many_tokens.json (written by tests/reference/added_vocabulary.py): the pieces
// Hugging Face tokenizers' AddedVocabulary cuts texts into, for tokens with
// every flag, overlapping tokens, the two matching passes, tokens that start
// in white space an lstrip/rstrip match swallowed, and a thousand tokens with
// long shared prefixes. Then the registration rules.
#include <qlora/data/added_vocabulary.hpp>

#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#include "data/test_support.hpp"
#include "io/test_support.hpp"

using qlora::AddedToken;
using qlora::AddedVocabulary;
using qlora::TokenId;
using qlora::test::data_fixture;
using qlora::test::Json;
using qlora::test::require_error;

namespace {

AddedToken token_of(const Json& entry) {
  return {.content = entry["content"].get<std::string>(),
          .id = entry["id"].get<TokenId>(),
          .special = entry["special"].get<bool>(),
          .single_word = entry["single_word"].get<bool>(),
          .lstrip = entry["lstrip"].get<bool>(),
          .rstrip = entry["rstrip"].get<bool>(),
          .normalized = entry["normalized"].get<bool>()};
}

/// The pieces as the fixture spells them: {"text": ...} or {"id": ...}.
Json pieces_of(const AddedVocabulary& vocabulary, std::string_view text) {
  Json pieces = Json::array();
  vocabulary.split(
      text,
      [&](std::string_view piece) {
        pieces.push_back({{"text", std::string(piece)}});
      },
      [&](const AddedToken& token) {
        pieces.push_back({{"id", token.id}});
      });
  return pieces;
}

/// Requires every case of the fixture `name` to split as tokenizers split it.
void check_splits(const char* name) {
  const Json document = qlora::test::load_json(data_fixture(name));
  for (const Json& test_case : document["cases"]) {
    // Insertion order must not matter: leftmost-longest decides, whatever was added first.
    for (const bool reversed : {false, true}) {
      std::vector<Json> entries(test_case["tokens"].begin(), test_case["tokens"].end());
      if (reversed) std::ranges::reverse(entries);
      AddedVocabulary vocabulary;
      for (const Json& entry : entries) vocabulary.add(token_of(entry));
      for (const Json& expected : test_case["texts"]) {
        const std::string text = expected["text"].get<std::string>();
        INFO("case " << test_case["name"] << (reversed ? " (tokens added in reverse)" : "") << ", text "
                     << Json(text).dump());
        CHECK(pieces_of(vocabulary, text) == expected["pieces"]);
      }
    }
  }
}

}  // namespace

TEST_CASE("splits texts as tokenizers' AddedVocabulary does") { check_splits("added_vocabulary/splits.json"); }

TEST_CASE("finds the longest token among a thousand with long shared prefixes, as tokenizers does") {
  check_splits("added_vocabulary/many_tokens.json");
}

TEST_CASE("looks tokens up by content and by id") {
  AddedVocabulary vocabulary;
  CHECK(vocabulary.empty());
  vocabulary.add({.content = "<|im_start|>", .id = 7, .normalized = true});
  vocabulary.add({.content = "<|im_end|>", .id = 3, .special = true});
  CHECK_FALSE(vocabulary.empty());
  CHECK(vocabulary.id_of("<|im_end|>") == 3);
  CHECK_FALSE(vocabulary.id_of("<|im_end").has_value());
  REQUIRE(vocabulary.find(7) != nullptr);
  CHECK(vocabulary.find(7)->content == "<|im_start|>");
  CHECK(vocabulary.find(4) == nullptr);
  REQUIRE(vocabulary.tokens().size() == 2);
  CHECK(vocabulary.tokens()[0].content == "<|im_start|>");  // insertion order
  CHECK(vocabulary.tokens()[1].special);
}

TEST_CASE("registration: the same token again is a no-op, a clash is an error") {
  AddedVocabulary vocabulary;
  vocabulary.add({.content = "<PAD>", .id = 10});
  vocabulary.add({.content = "<PAD>", .id = 10, .special = true});  // flags of the first registration stay
  REQUIRE(vocabulary.tokens().size() == 1);
  CHECK_FALSE(vocabulary.find(10)->special);

  require_error([&] { vocabulary.add({.content = "<PAD>", .id = 11}); }, "InvalidAddedToken", "\"<PAD>\"", "10", "11");
  require_error([&] { vocabulary.add({.content = "<pad>", .id = 10}); }, "InvalidAddedToken", "10", "\"<PAD>\"",
                "\"<pad>\"");
  require_error([&] { vocabulary.add({.content = "", .id = 12}); }, "InvalidAddedToken", "12", "empty");
  require_error([&] { vocabulary.add({.content = "<x>", .id = -1}); }, "InvalidAddedToken", "\"<x>\"", "-1");
  // Half of "你" (E4 BD A0) would split the character of a valid text.
  require_error([&] { vocabulary.add({.content = "a\xE4\xBD", .id = 13}); }, "InvalidUtf8", "13", "byte 1");
  CHECK(vocabulary.tokens().size() == 1);
}

TEST_CASE("an empty vocabulary passes text on whole, and calls nothing for an empty text") {
  const AddedVocabulary vocabulary;
  CHECK(pieces_of(vocabulary, "a  <|im_end|> b") == Json::parse(R"([{"text": "a  <|im_end|> b"}])"));
  CHECK(pieces_of(vocabulary, "") == Json::array());
}
