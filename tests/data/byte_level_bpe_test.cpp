// ByteLevelBpeTokenizer against tests/data/data/bpe/ (written by
// tests/reference/byte_level_bpe.py): a small Phi-2-like tokenizer.json
// trained by tokenizers, the same with legacy "a b" merges, a Phi-2-shaped
// tokenizer_config.json, and what tokenizers and transformers (after the Phi-2
// tutorial's run-time additions) make of the hostile corpus. Then the files
// that must be refused, each with its named error.
#include <qlora/data/byte_level_bpe.hpp>

#include <algorithm>
#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "data/test_support.hpp"
#include "io/test_support.hpp"

using qlora::AddedTokenKind;
using qlora::ByteLevelBpeTokenizer;
using qlora::SpecialRole;
using qlora::TokenId;
using qlora::test::bytes_of;
using qlora::test::data_fixture;
using qlora::test::ids_of;
using qlora::test::Json;
using qlora::test::require_error;
using qlora::test::TempDir;

namespace {

std::filesystem::path model_dir() { return data_fixture("bpe/phi2_like"); }

const Json& encodings() {
  static const Json document = qlora::test::load_json(data_fixture("bpe/encodings.json"));
  return document;
}

const Json& tokenizer_json() {
  static const Json document = qlora::test::load_json(model_dir() / "tokenizer.json");
  return document;
}

/// The Phi-2 tutorial's run-time changes, in this library's terms.
void tutorial_additions(ByteLevelBpeTokenizer& tokenizer) {
  const std::vector<std::string> chat = {"<|im_start|>", "<PAD>"};
  CHECK(tokenizer.add_tokens(chat, AddedTokenKind::normal) == encodings()["runtime"]["add_tokens_returned"]);
  tokenizer.set_special_token(SpecialRole::pad, "<PAD>");
  const std::vector<std::string> end = {"<|im_end|>"};
  CHECK(tokenizer.add_tokens(end, AddedTokenKind::special) == encodings()["runtime"]["add_special_tokens_returned"]);
  tokenizer.set_special_token(SpecialRole::eos, "<|im_end|>");
}

/// The fixture's tokenizer.json changed by `edit`, loaded under the name "edited.json".
template <class Edit>
ByteLevelBpeTokenizer load_edited(Edit&& edit) {
  Json document = tokenizer_json();
  edit(document);
  return ByteLevelBpeTokenizer::from_json(document.dump(), "edited.json");
}

/// How many valid entries `expected(entry)` gives other ids than the plain
/// tokenizer.json: a setting a test checks must change some, or the test
/// could not fail.
template <class Expected>
std::size_t entries_changed_by(Expected&& expected) {
  std::size_t changed = 0;
  for (const Json& entry : encodings()["entries"]) {
    if (!entry.contains("invalid_utf8_offset")) changed += expected(entry) != entry["tokenizers"]["ids"];
  }
  return changed;
}

/// Requires every valid hostile entry to encode to `expected(entry)`.
template <class Expected>
void check_hostile_corpus(const ByteLevelBpeTokenizer& tokenizer, Expected&& expected) {
  for (const Json& entry : encodings()["entries"]) {
    if (entry.contains("invalid_utf8_offset")) continue;
    INFO("text: " << entry["text"].dump());
    CHECK(tokenizer.encode(entry["text"].get<std::string>()) == ids_of(expected(entry)));
  }
}

}  // namespace

TEST_CASE("encodes and decodes the hostile corpus as tokenizers does") {
  const ByteLevelBpeTokenizer tokenizer = ByteLevelBpeTokenizer::from_file(model_dir() / "tokenizer.json");
  CHECK(tokenizer.model_size() == encodings()["model_size"]);
  CHECK(tokenizer.vocab_size() == encodings()["size_with_added_tokens"]);
  for (const Json& entry : encodings()["entries"]) {
    const std::string text = bytes_of(entry);
    INFO("text: " << Json(entry["bytes"]).dump());
    if (entry.contains("invalid_utf8_offset")) {
      // The offset is where Python's strict UTF-8 decoder stops.
      require_error([&] { (void)tokenizer.encode(text); }, "InvalidUtf8",
                    fmt::format("offset {}", entry["invalid_utf8_offset"].get<std::size_t>()));
      continue;
    }
    const Json& expected = entry["tokenizers"];
    const std::vector<TokenId> ids = tokenizer.encode(text);
    CHECK(ids == ids_of(expected["ids"]));
    CHECK(tokenizer.decode(ids) == expected["decode"].get<std::string>());
    CHECK(tokenizer.decode(ids, true) == expected["decode_skip_special"].get<std::string>());
  }
}

TEST_CASE("reads merges in the legacy \"a b\" form as in the pairs form") {
  const ByteLevelBpeTokenizer legacy =
      ByteLevelBpeTokenizer::from_file(data_fixture("bpe/tokenizer_legacy_merges.json"));
  check_hostile_corpus(legacy, [](const Json& entry) { return entry["tokenizers"]["ids"]; });
  CHECK(legacy.encode(encodings()["long_text"]["text"].get<std::string>()) == ids_of(encodings()["long_text"]["ids"]));
}

TEST_CASE("encodes a longer text with long pre-tokens, also from several threads at once") {
  const ByteLevelBpeTokenizer tokenizer = ByteLevelBpeTokenizer::from_file(model_dir() / "tokenizer.json");
  const std::string text = encodings()["long_text"]["text"].get<std::string>();
  const std::vector<TokenId> expected = ids_of(encodings()["long_text"]["ids"]);
  CHECK(tokenizer.encode(text) == expected);
  CHECK(tokenizer.encode(text) == expected);  // again, now from the word cache
  // The word cache is shared: concurrent encodes must not disturb each other.
  std::vector<std::vector<TokenId>> results(4);
  {
    std::vector<std::jthread> threads;
    for (auto& result : results) {
      threads.emplace_back([&] {
        for (int round = 0; round < 3; ++round) result = tokenizer.encode(text);
      });
    }
  }
  for (const auto& result : results) CHECK(result == expected);
  // encode_into appends.
  std::vector<TokenId> appended = {-7};
  tokenizer.encode_into("Hello", appended);
  CHECK(appended.size() == 1 + tokenizer.encode("Hello").size());
  CHECK(appended.front() == -7);
}

TEST_CASE("gives the ids transformers gives after the Phi-2 tutorial's run-time additions") {
  ByteLevelBpeTokenizer tokenizer = ByteLevelBpeTokenizer::from_pretrained(model_dir());
  const Json& runtime = encodings()["runtime"];
  CHECK(tokenizer.vocab_size() == runtime["size_before"]);
  tutorial_additions(tokenizer);
  CHECK(tokenizer.vocab_size() == runtime["size_after"]);
  for (const auto& [content, expected] : runtime["tokens"].items()) {
    INFO("token " << content);
    const std::optional<TokenId> id = tokenizer.token_to_id(content);
    REQUIRE(id == expected["id"].get<TokenId>());
    const qlora::AddedToken* token = tokenizer.added_tokens().find(*id);
    REQUIRE(token != nullptr);
    CHECK(token->special == expected["special"].get<bool>());
    CHECK(token->normalized == expected["normalized"].get<bool>());
    CHECK(token->lstrip == expected["lstrip"].get<bool>());
    CHECK(token->rstrip == expected["rstrip"].get<bool>());
    CHECK(token->single_word == expected["single_word"].get<bool>());
  }
  const qlora::SpecialTokenIds special = tokenizer.special_ids();
  CHECK(special.bos == runtime["special_ids"]["bos"].get<TokenId>());
  CHECK(special.eos == runtime["special_ids"]["eos"].get<TokenId>());
  CHECK(special.pad == runtime["special_ids"]["pad"].get<TokenId>());
  CHECK(special.unk == runtime["special_ids"]["unk"].get<TokenId>());

  for (const Json& entry : encodings()["entries"]) {
    if (entry.contains("invalid_utf8_offset")) continue;
    INFO("text: " << entry["text"].dump());
    const Json& expected = entry["transformers"];
    const std::vector<TokenId> ids = tokenizer.encode(entry["text"].get<std::string>());
    CHECK(ids == ids_of(expected["ids"]));
    CHECK(tokenizer.decode(ids) == expected["decode"].get<std::string>());
    CHECK(tokenizer.decode(ids, true) == expected["decode_skip_special"].get<std::string>());
  }
}

TEST_CASE("gives the ids of transformers' slow CodeGenTokenizer, which the Phi-2 tutorial loads") {
  // use_fast=False: Python BPE over vocab.json + merges.txt, after the same additions.
  ByteLevelBpeTokenizer tokenizer = ByteLevelBpeTokenizer::from_pretrained(model_dir());
  tutorial_additions(tokenizer);
  for (const Json& entry : encodings()["entries"]) {
    if (entry.contains("invalid_utf8_offset")) continue;
    INFO("text: " << entry["text"].dump());
    CHECK(tokenizer.encode(entry["text"].get<std::string>()) == ids_of(entry["slow_ids"]));
  }
}

TEST_CASE("adding tokens again, or tokens of the model vocabulary, gives no new id") {
  ByteLevelBpeTokenizer tokenizer = ByteLevelBpeTokenizer::from_pretrained(model_dir());
  tutorial_additions(tokenizer);
  const Json& readd = encodings()["runtime"]["readd"];
  // "<|im_start|>" is an added token already, "st" a model token, "" is skipped:
  // transformers counts "st", which becomes an added token.
  const auto known = readd["tokens"].get<std::vector<std::string>>();
  CHECK(tokenizer.add_tokens(known, AddedTokenKind::normal) == readd["returned"].get<std::size_t>());
  CHECK(tokenizer.vocab_size() == readd["size_after"].get<std::size_t>());
  // A model token becomes an added token with its own id: split out before BPE.
  const TokenId st = tokenizer.token_to_id("st").value();
  CHECK(st == readd["st"]["id"].get<TokenId>());
  REQUIRE(tokenizer.added_tokens().id_of("st") == st);
  CHECK(tokenizer.added_tokens().find(st)->special == readd["st"]["special"].get<bool>());
  CHECK(tokenizer.added_tokens().find(st)->normalized == readd["st"]["normalized"].get<bool>());
  const std::vector<TokenId> ids = tokenizer.encode("first");
  CHECK(ids.back() == st);
  CHECK(tokenizer.decode(ids) == "first");

  // Where qlora differs on purpose (tokenizer.hpp, add_tokens): an added token
  // given again with other flags is left as it is and not counted;
  // transformers' fast tokenizer would rewrite its flags and count it.
  const std::vector<std::string> end_of_text = {"<|endoftext|>"};
  CHECK(tokenizer.add_tokens(end_of_text, AddedTokenKind::normal) == 0);
  CHECK(tokenizer.added_tokens().find(0)->special);
  CHECK(tokenizer.vocab_size() == readd["size_after"].get<std::size_t>());
}

TEST_CASE("add_tokens is all or nothing: a token that cannot be added changes nothing") {
  ByteLevelBpeTokenizer tokenizer = ByteLevelBpeTokenizer::from_pretrained(model_dir());
  const std::size_t size = tokenizer.vocab_size();
  const std::vector<std::string> broken = {"<ok>", "\xff\xfe"};
  require_error([&] { tokenizer.add_tokens(broken, AddedTokenKind::normal); }, "InvalidUtf8", "byte 0");
  CHECK(tokenizer.vocab_size() == size);
  CHECK_FALSE(tokenizer.token_to_id("<ok>").has_value());
  // The ids given afterwards are still those transformers gives.
  tutorial_additions(tokenizer);
  CHECK(tokenizer.vocab_size() == encodings()["runtime"]["size_after"].get<std::size_t>());
  for (const auto& [content, expected] : encodings()["runtime"]["tokens"].items()) {
    INFO("token " << content);
    CHECK(tokenizer.token_to_id(content) == expected["id"].get<TokenId>());
  }
}

TEST_CASE("applies tokenizer_config.json tokens that tokenizer.json lacks as transformers does") {
  // added_tokens_decoder, pad_token, mask_token and additional_special_tokens (strings, an
  // AddedToken object with its own flags, and tokens already there) name tokens tokenizer.json
  // does not have: transformers registers them in that order.
  const Json& variant = encodings()["config_variant"];
  TempDir dir;
  std::filesystem::copy_file(model_dir() / "tokenizer.json", dir / "tokenizer.json");
  qlora::test::write_bytes(dir / "tokenizer_config.json", variant["config"].dump());
  const ByteLevelBpeTokenizer tokenizer = ByteLevelBpeTokenizer::from_pretrained(dir.path());
  CHECK(tokenizer.vocab_size() == variant["size"]);
  for (const auto& [content, expected] : variant["tokens"].items()) {
    INFO("token " << content);
    const std::optional<TokenId> id = tokenizer.token_to_id(content);
    REQUIRE(id == expected["id"].get<TokenId>());
    const qlora::AddedToken& token = *tokenizer.added_tokens().find(*id);
    CHECK(token.special == expected["special"].get<bool>());
    CHECK(token.normalized == expected["normalized"].get<bool>());
    CHECK(token.lstrip == expected["lstrip"].get<bool>());
    CHECK(token.rstrip == expected["rstrip"].get<bool>());
    CHECK(token.single_word == expected["single_word"].get<bool>());
  }
  CHECK(tokenizer.special_ids().pad == variant["special_ids"]["pad"].get<TokenId>());
  CHECK(tokenizer.special_ids().eos == variant["special_ids"]["eos"].get<TokenId>());
  CHECK(tokenizer.encode(variant["text"].get<std::string>()) == ids_of(variant["ids"]));

  SECTION("an added_tokens_decoder id other than the one tokenizer.json would give is refused") {
    Json config = variant["config"];
    config["added_tokens_decoder"]["1600"] = config["added_tokens_decoder"]["1538"];
    config["added_tokens_decoder"].erase("1538");
    qlora::test::write_bytes(dir / "tokenizer_config.json", config.dump());
    require_error([&] { (void)ByteLevelBpeTokenizer::from_pretrained(dir.path()); }, "InvalidTokenizer",
                  "tokenizer_config.json", "added_tokens_decoder.1600", "\"<extra>\"", "1538");
  }
  SECTION("another id for a token of tokenizer.json is refused") {
    Json config = variant["config"];
    config["added_tokens_decoder"]["5"] = config["added_tokens_decoder"]["0"];
    config["added_tokens_decoder"].erase("0");
    qlora::test::write_bytes(dir / "tokenizer_config.json", config.dump());
    require_error([&] { (void)ByteLevelBpeTokenizer::from_pretrained(dir.path()); }, "InvalidTokenizer",
                  "added_tokens_decoder.5", "\"<|endoftext|>\"", "id 0 in tokenizer.json");
  }
  SECTION("other flags for a token of tokenizer.json are refused") {
    Json config = variant["config"];
    config["added_tokens_decoder"]["0"]["lstrip"] = true;
    qlora::test::write_bytes(dir / "tokenizer_config.json", config.dump());
    require_error([&] { (void)ByteLevelBpeTokenizer::from_pretrained(dir.path()); }, "UnsupportedTokenizer",
                  "tokenizer_config.json", "\"<|endoftext|>\"", "flags");
  }
}

TEST_CASE("decode replaces bytes that are not UTF-8 as tokenizers does") {
  const ByteLevelBpeTokenizer tokenizer = ByteLevelBpeTokenizer::from_file(model_dir() / "tokenizer.json");
  for (const Json& entry : encodings()["lossy_decode"]) {
    INFO("bytes: " << entry["bytes"].dump());
    CHECK(tokenizer.decode(ids_of(entry["ids"])) == entry["decode"].get<std::string>());
  }
  const std::vector<TokenId> unknown = {5, static_cast<TokenId>(tokenizer.vocab_size())};
  require_error([&] { (void)tokenizer.decode(unknown); }, "InvalidTokenId", std::to_string(tokenizer.vocab_size()),
                "not in the vocabulary");
  const std::vector<TokenId> negative = {-100};
  require_error([&] { (void)tokenizer.decode(negative); }, "InvalidTokenId", "-100");
}

TEST_CASE("token strings and ids are those of tokenizer.json") {
  const ByteLevelBpeTokenizer tokenizer = ByteLevelBpeTokenizer::from_file(model_dir() / "tokenizer.json");
  for (const auto& [token, id] : tokenizer_json()["model"]["vocab"].items()) {
    CHECK(tokenizer.id_to_token(id.get<TokenId>()) == token);
    CHECK(tokenizer.token_to_id(token) == id.get<TokenId>());
  }
  for (const Json& added : tokenizer_json()["added_tokens"]) {
    CHECK(tokenizer.id_to_token(added["id"].get<TokenId>()) == added["content"].get<std::string>());
  }
  CHECK_FALSE(tokenizer.token_to_id("no such token").has_value());
  require_error([&] { (void)tokenizer.id_to_token(static_cast<TokenId>(tokenizer.vocab_size())); }, "InvalidTokenId",
                std::to_string(tokenizer.vocab_size()));
}

TEST_CASE("copies are independent") {
  const ByteLevelBpeTokenizer original = ByteLevelBpeTokenizer::from_pretrained(model_dir());
  ByteLevelBpeTokenizer copy = original;
  tutorial_additions(copy);
  CHECK(copy.vocab_size() == original.vocab_size() + 3);
  CHECK_FALSE(original.token_to_id("<|im_start|>").has_value());
  CHECK(original.special_ids().eos == original.token_to_id("<|endoftext|>"));
}

TEST_CASE("set_special_token refuses a token it does not know") {
  ByteLevelBpeTokenizer tokenizer = ByteLevelBpeTokenizer::from_pretrained(model_dir());
  require_error([&] { tokenizer.set_special_token(SpecialRole::pad, "<PAD>"); }, "UnknownSpecialToken", "\"<PAD>\"",
                "PAD");
}

TEST_CASE("other pre-tokenizers: Split steps before ByteLevel, and add_prefix_space") {
  for (const auto& variant : encodings()["variants"].items()) {
    // Named copies: lambdas cannot capture structured bindings before clang 16.
    const std::string name = variant.key();
    const Json& pre_tokenizer = variant.value();
    INFO("variant " << name);
    REQUIRE(entries_changed_by([&](const Json& entry) { return entry["variants"][name]; }) > 0);
    const ByteLevelBpeTokenizer tokenizer =
        load_edited([&](Json& document) { document["pre_tokenizer"] = pre_tokenizer; });
    check_hostile_corpus(tokenizer, [&](const Json& entry) { return entry["variants"][name]; });
  }
}

TEST_CASE("ignore_merges: a pre-token that is a vocabulary entry is that token") {
  // Every token of a trained vocabulary is what merging its spelling gives, so
  // the reference script removed the merge that makes "Ġthe": with
  // ignore_merges " the" is still that token, without it is two.
  const Json& removed = encodings()["ignore_merges_edit"]["removed_merge"];
  const ByteLevelBpeTokenizer tokenizer = load_edited([&](Json& d) {
    Json& merges = d["model"]["merges"];
    const auto merge = std::find(merges.begin(), merges.end(), removed);
    REQUIRE(merge != merges.end());
    merges.erase(merge);
    d["model"]["ignore_merges"] = true;
  });
  REQUIRE(entries_changed_by([](const Json& entry) { return entry["ignore_merges"]; }) > 0);
  check_hostile_corpus(tokenizer, [](const Json& entry) { return entry["ignore_merges"]; });
}

TEST_CASE("unk_token stands for bytes without a token, fused or not as fuse_unk says") {
  const Json unk_model = qlora::test::load_json(data_fixture("bpe/ascii_unk.json"));
  for (const bool fuse : {false, true}) {
    const std::string name = fuse ? "fuse_unk_true" : "fuse_unk_false";
    INFO(name);
    Json document = unk_model;
    document["model"]["fuse_unk"] = fuse;
    const ByteLevelBpeTokenizer tokenizer = ByteLevelBpeTokenizer::from_json(document.dump(), "ascii_unk.json");
    check_hostile_corpus(tokenizer, [&](const Json& entry) { return entry["unk"][name]; });
  }
  // Without an unk_token tokenizers drops such bytes silently; qlora refuses.
  Json document = unk_model;
  document["model"]["unk_token"] = nullptr;
  const ByteLevelBpeTokenizer tokenizer = ByteLevelBpeTokenizer::from_json(document.dump(), "ascii_unk.json");
  require_error([&] { (void)tokenizer.encode("caf\u00e9"); }, "UntokenizableText", "byte 0xc3", "\"caf\u00e9\"",
                "unk_token");
}

TEST_CASE("refuses files that are not byte-level BPE tokenizer.json files") {
  SECTION("not JSON: a SentencePiece model renamed") {
    TempDir dir;
    std::filesystem::copy_file(data_fixture("sentencepiece/internlm2_like/tokenizer.model"), dir / "tokenizer.json");
    require_error([&] { (void)ByteLevelBpeTokenizer::from_file(dir / "tokenizer.json"); }, "InvalidTokenizer",
                  "tokenizer.json", "expected a Hugging Face tokenizer.json", "invalid JSON");
  }
  SECTION("JSON without a model") {
    require_error([] { (void)ByteLevelBpeTokenizer::from_json(R"({"version": "1.0"})", "config.json"); },
                  "InvalidTokenizer", "config.json", "\"model\"");
    require_error([] { (void)ByteLevelBpeTokenizer::from_json("[1, 2]", "list.json"); }, "InvalidTokenizer",
                  "list.json", "object");
  }
  SECTION("a missing file") {
    require_error([] { (void)ByteLevelBpeTokenizer::from_file(data_fixture("bpe/no_such_file.json")); }, "IoError",
                  "no_such_file.json");
  }
  SECTION("a tokenizer_config.json that cannot be examined is an error naming it, not \"no config\"") {
    // A symbolic link to itself: stat fails with ELOOP (a permission error,
    // which root does not get, takes the same path).
    TempDir dir;
    std::filesystem::copy_file(model_dir() / "tokenizer.json", dir / "tokenizer.json");
    std::filesystem::create_symlink("tokenizer_config.json", dir / "tokenizer_config.json");
    require_error([&] { (void)ByteLevelBpeTokenizer::from_pretrained(dir.path()); }, "IoError",
                  "tokenizer_config.json");
  }
  SECTION("merges naming tokens not in the vocabulary") {
    require_error([] { (void)load_edited([](Json& d) {
                         d["model"]["merges"][3] = {"Ġ", "no-such-token"};
                       }); },
                  "InvalidTokenizer", "edited.json", "model.merges[3]", "\"no-such-token\"");
    // Both parts known, but not their concatenation.
    require_error([] { (void)load_edited([](Json& d) {
                         d["model"]["merges"][0] = {"x", "q"};
                       }); }, "InvalidTokenizer",
                  "model.merges[0]", "\"xq\"");
    require_error([] { (void)load_edited([](Json& d) { d["model"]["merges"][1] = {"a"}; }); }, "InvalidTokenizer",
                  "model.merges[1]", "[\"left\", \"right\"]");
  }
  SECTION("legacy merges that are not two tokens") {
    Json legacy = qlora::test::load_json(data_fixture("bpe/tokenizer_legacy_merges.json"));
    legacy["model"]["merges"][2] = "a b c";
    require_error([&] { (void)ByteLevelBpeTokenizer::from_json(legacy.dump(), "legacy.json"); }, "InvalidTokenizer",
                  "legacy.json", "model.merges[2]", "two tokens");
  }
  SECTION("duplicate or missing vocabulary ids") {
    require_error([] { (void)load_edited([](Json& d) { d["model"]["vocab"]["a"] = 5; }); }, "InvalidTokenizer",
                  "model.vocab", "id 5");
    require_error([] { (void)load_edited([](Json& d) { d["model"]["vocab"]["a"] = 99999; }); }, "UnsupportedTokenizer",
                  "model.vocab[\"a\"]", "99999");
    require_error([] { (void)load_edited([](Json& d) { d["model"]["vocab"]["a"] = -1; }); }, "InvalidTokenizer",
                  "model.vocab[\"a\"]", "token id");
  }
  SECTION("a repeated key") {
    std::string text = tokenizer_json().dump();
    text.replace(text.find("\"vocab\":{") + 9, 0, R"("a":65,)");
    require_error([&] { (void)ByteLevelBpeTokenizer::from_json(text, "repeated.json"); }, "DuplicateKey", "`a`");
  }
  SECTION("added tokens whose ids are not the ones tokenizers assigns") {
    require_error([] { (void)load_edited([](Json& d) { d["added_tokens"][1]["id"] = 1700; }); }, "InvalidTokenizer",
                  "added_tokens[1].id", "1500");
    require_error([] { (void)load_edited([](Json& d) { d["added_tokens"][0]["id"] = 3; }); }, "InvalidTokenizer",
                  "added_tokens[0].id", "\"<|endoftext|>\"");
  }
}

TEST_CASE("refuses settings it does not implement, naming them") {
  const auto refused = [](auto edit, std::string_view key, std::string_view what) {
    require_error([&] { (void)load_edited(edit); }, "UnsupportedTokenizer", "edited.json", key, what);
  };
  refused([](Json& d) { d["model"]["type"] = "Unigram"; }, "model.type", "Unigram");
  refused([](Json& d) { d["normalizer"] = {{"type", "NFC"}}; }, "normalizer", "NFC");
  refused([](Json& d) { d["model"]["dropout"] = 0.1; }, "model.dropout", "dropout");
  refused([](Json& d) { d["model"]["byte_fallback"] = true; }, "model.byte_fallback", "byte_fallback");
  refused([](Json& d) { d["model"]["continuing_subword_prefix"] = "##"; }, "model.continuing_subword_prefix",
          "continuing_subword_prefix");
  refused([](Json& d) { d["model"]["end_of_word_suffix"] = "</w>"; }, "model.end_of_word_suffix", "end_of_word_suffix");
  refused([](Json& d) { d["decoder"] = {{"type", "WordPiece"}}; }, "decoder", "WordPiece");
  refused([](Json& d) { d["decoder"] = nullptr; }, "decoder", "ByteLevel");
  refused([](Json& d) { d["pre_tokenizer"] = {{"type", "Whitespace"}}; }, "pre_tokenizer", "Whitespace");
  refused([](Json& d) { d["pre_tokenizer"] = nullptr; }, "pre_tokenizer", "ByteLevel");
  for (const std::string_view pattern : {"\\w+", "[\\W]", "\\bx", "\\B", "\\h+", "\\H", "[\\v]", "\\V", "\\C"}) {
    // \h is a hex digit in Oniguruma, horizontal white space in PCRE2; \v the
    // vertical tab, or vertical white space; \w, \b differ on Unicode classes;
    // \C (one code unit, cutting UTF-8 apart) Oniguruma refuses (found by fuzzing).
    INFO("regex " << pattern);
    refused(
        [&](Json& d) {
          d["pre_tokenizer"] = encodings()["variants"]["llama3_split"];
          d["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = std::string(pattern);
        },
        "pre_tokenizer.pretokenizers[0].pattern", pattern.substr(pattern.find('\\'), 2));
  }
  const Json split = encodings()["variants"]["llama3_split"];
  refused(
      [&](Json& d) {
        d["pre_tokenizer"] = split;
        d["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed";
      },
      "pre_tokenizer.pretokenizers[0].behavior", "Removed");
  refused(
      [&](Json& d) {
        d["pre_tokenizer"] = split;
        d["pre_tokenizer"]["pretokenizers"][0]["invert"] = true;
      },
      "pre_tokenizer.pretokenizers[0].invert", "invert");
  refused(
      [&](Json& d) {
        d["pre_tokenizer"] = split;
        d["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = R"(\w+|\s+)";
      },
      "pre_tokenizer.pretokenizers[0].pattern", "\\w");
  require_error(
      [&] {
        (void)load_edited([&](Json& d) {
          d["pre_tokenizer"] = split;
          d["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
        });
      },
      "InvalidRegex", "pre_tokenizer.pretokenizers[0].pattern");
  // Accepted as "none": dropout 0 and the "" affixes GPT-2's converted files have.
  CHECK_NOTHROW(load_edited([](Json& d) { d["model"]["dropout"] = 0.0; }));
}
