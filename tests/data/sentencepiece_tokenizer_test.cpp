// SentencePieceTokenizer against tests/data/data/sentencepiece/ (written by
// tests/reference/sentencepiece_bpe.py): a small InternLM2-like BPE model with
// an InternLM2-shaped tokenizer_config.json, and the ids and texts that
// transformers' slow-tokenizer machinery (with InternLM2's tokenizer methods)
// and sentencepiece give for the hostile corpus.
#include <qlora/data/sentencepiece_tokenizer.hpp>

#include <cstddef>
#include <cstdio>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <sentencepiece_processor.h>
#include <unistd.h>

#include "data/test_support.hpp"
#include "io/test_support.hpp"

using qlora::SentencePieceTokenizer;
using qlora::SpecialRole;
using qlora::TokenId;
using qlora::test::bytes_of;
using qlora::test::data_fixture;
using qlora::test::ids_of;
using qlora::test::Json;
using qlora::test::require_error;
using qlora::test::TempDir;

namespace {

std::filesystem::path model_dir() { return data_fixture("sentencepiece/internlm2_like"); }

const Json& encodings() {
  static const Json document = qlora::test::load_json(data_fixture("sentencepiece/encodings.json"));
  return document;
}

/// What `action` writes to file descriptor 2 (SentencePiece logs there, bypassing std::cerr).
template <class Action>
std::string stderr_of(Action&& action) {
  TempDir dir;
  const std::string path = (dir / "stderr").string();
  std::fflush(stderr);
  const int saved = ::dup(2);
  REQUIRE(saved >= 0);
  std::FILE* capture = std::fopen(path.c_str(), "w");
  REQUIRE(capture != nullptr);
  ::dup2(::fileno(capture), 2);
  try {
    action();
  } catch (...) {
  }
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);
  std::fclose(capture);
  return qlora::test::read_text(path);
}

}  // namespace

TEST_CASE("encodes the hostile corpus as transformers' InternLM2 tokenizer does, and decodes it") {
  const SentencePieceTokenizer tokenizer = SentencePieceTokenizer::from_pretrained(model_dir());
  for (const Json& entry : encodings()["entries"]) {
    const std::string text = bytes_of(entry);
    INFO("text: " << Json(entry["bytes"]).dump());
    if (entry.contains("invalid_utf8_offset")) {
      // The offset is where Python's strict UTF-8 decoder stops.
      require_error([&] { (void)tokenizer.encode(text); }, "InvalidUtf8",
                    fmt::format("byte offset {}", entry["invalid_utf8_offset"].get<std::size_t>()));
      continue;
    }
    const Json& want = entry["pretrained"];
    const std::vector<TokenId> ids = tokenizer.encode(text);
    CHECK(ids == ids_of(want["ids"]));
    CHECK(tokenizer.decode(ids) == want["decode"].get<std::string>());
    CHECK(tokenizer.decode(ids, true) == want["decode_skip_special"].get<std::string>());

    std::vector<TokenId> appended = {7};
    tokenizer.encode_into(text, appended);
    CHECK(appended.size() == ids.size() + 1);
  }
}

TEST_CASE("from_file is the model alone, with its <s> </s> <unk> split out of text as transformers does") {
  const SentencePieceTokenizer tokenizer = SentencePieceTokenizer::from_file(model_dir() / "tokenizer.model");
  for (const Json& entry : encodings()["entries"]) {
    if (!entry.contains("bare")) continue;
    INFO("text: " << entry["text"].get<std::string>());
    CHECK(tokenizer.encode(bytes_of(entry)) == ids_of(entry["bare"]["ids"]));
  }
  CHECK(tokenizer.vocab_size() == encodings()["model_size"].get<std::size_t>());
  CHECK(tokenizer.special_ids().bos == 1);
  CHECK(tokenizer.special_ids().eos == 2);
  CHECK(tokenizer.special_ids().unk == 0);
  CHECK_FALSE(tokenizer.special_ids().pad);  // the model defines none (pad_id -1)
}

TEST_CASE("the C++ SentencePiece library reads the model as the Python one that wrote the fixture") {
  // Not qlora code: this pins down that the system's libsentencepiece (0.1.97 on Debian)
  // and the sentencepiece wheel that made the fixture agree, which every other case relies on.
  sentencepiece::SentencePieceProcessor processor;
  REQUIRE(processor.Load((model_dir() / "tokenizer.model").string()).ok());
  for (const Json& entry : encodings()["entries"]) {
    if (!entry.contains("sp")) continue;
    INFO("text: " << entry["text"].get<std::string>());
    std::vector<int> ids;
    REQUIRE(processor.Encode(bytes_of(entry), &ids).ok());
    CHECK(ids == entry["sp"]["ids"].get<std::vector<int>>());
    std::string text;
    REQUIRE(processor.Decode(ids, &text).ok());
    CHECK(text == entry["sp"]["decode"].get<std::string>());
  }
}

TEST_CASE("decodes id sequences text never gives: broken bytes, byte runs cut by tokens, renamed ids") {
  const SentencePieceTokenizer tokenizer = SentencePieceTokenizer::from_pretrained(model_dir());
  for (const Json& decode_case : encodings()["decode_cases"]) {
    INFO("ids: " << decode_case["ids"].dump());
    const std::vector<TokenId> ids = ids_of(decode_case["ids"]);
    CHECK(tokenizer.decode(ids) == decode_case["decode"].get<std::string>());
    CHECK(tokenizer.decode(ids, true) == decode_case["decode_skip_special"].get<std::string>());
  }
}

TEST_CASE("vocabulary: the config's ids win over the model's piece names") {
  const SentencePieceTokenizer tokenizer = SentencePieceTokenizer::from_pretrained(model_dir());
  const Json config = qlora::test::load_json(model_dir() / "tokenizer_config.json");
  const auto model_size = encodings()["model_size"].get<TokenId>();
  CHECK(tokenizer.model_size() == static_cast<std::size_t>(model_size));
  CHECK(tokenizer.vocab_size() == encodings()["pretrained_size"].get<std::size_t>());
  const Json& special = encodings()["special_ids"];
  CHECK(tokenizer.special_ids().bos == special["bos"].get<TokenId>());
  CHECK(tokenizer.special_ids().eos == special["eos"].get<TokenId>());
  CHECK(tokenizer.special_ids().pad == special["pad"].get<TokenId>());
  CHECK(tokenizer.special_ids().unk == special["unk"].get<TokenId>());

  for (const auto& [id, token] : config["added_tokens_decoder"].items()) {
    INFO("added token " << id);
    CHECK(tokenizer.token_to_id(token["content"].get<std::string>()) == std::stoi(id));
    CHECK(tokenizer.id_to_token(std::stoi(id)) == token["content"].get<std::string>());
  }
  // The model spells its first two chat ids [UNUSED_TOKEN_141/142]; the config renames them. The
  // old names still find the ids, as transformers' convert_tokens_to_ids does.
  CHECK(tokenizer.token_to_id("[UNUSED_TOKEN_141]") == model_size - 6);
  CHECK(tokenizer.token_to_id("<0x0A>") == 3 + 0x0A);
  CHECK(tokenizer.id_to_token(3 + 0x0A) == "<0x0A>");
  CHECK_FALSE(tokenizer.token_to_id("certainly not a piece"));
  CHECK_FALSE(tokenizer.token_to_id(""));

  const auto vocab_size = static_cast<TokenId>(tokenizer.vocab_size());
  require_error([&] { (void)tokenizer.id_to_token(vocab_size); }, "InvalidTokenId",
                fmt::format("token id {}", vocab_size));
  require_error([&] { (void)tokenizer.id_to_token(-1); }, "InvalidTokenId", "token id -1");
  const std::vector<TokenId> bad = {5, vocab_size + 3};
  require_error([&] { (void)tokenizer.decode(bad); }, "InvalidTokenId", fmt::format("token id {}", vocab_size + 3));
}

TEST_CASE("add_tokens and set_special_token at run time, as transformers' add_tokens and pad_token =") {
  const Json runtime = qlora::test::load_json(data_fixture("sentencepiece/runtime.json"));
  SentencePieceTokenizer tokenizer = SentencePieceTokenizer::from_pretrained(model_dir());
  const SentencePieceTokenizer before = tokenizer;
  CHECK(tokenizer.vocab_size() == runtime["size_before"].get<std::size_t>());

  const auto normal = runtime["add_normal"]["tokens"].get<std::vector<std::string>>();
  const auto special = runtime["add_special"]["tokens"].get<std::vector<std::string>>();
  CHECK(tokenizer.add_tokens(normal, qlora::AddedTokenKind::normal) ==
        runtime["add_normal"]["added"].get<std::size_t>());
  CHECK(tokenizer.add_tokens(special, qlora::AddedTokenKind::special) ==
        runtime["add_special"]["added"].get<std::size_t>());
  tokenizer.set_special_token(SpecialRole::pad, "<|new_special|>");
  CHECK(tokenizer.vocab_size() == runtime["size_after"].get<std::size_t>());
  for (const auto& [token, id] : runtime["ids"].items()) {
    INFO("token: " << token);
    CHECK(tokenizer.token_to_id(token) == id.get<TokenId>());
  }
  CHECK(tokenizer.special_ids().pad == runtime["pad_after_set"].get<TokenId>());
  for (const Json& encoding : runtime["encodings"]) {
    const auto text = encoding["text"].get<std::string>();
    INFO("text: " << text);
    const std::vector<TokenId> ids = tokenizer.encode(text);
    CHECK(ids == ids_of(encoding["ids"]));
    CHECK(tokenizer.decode(ids, true) == encoding["decode_skip_special"].get<std::string>());
  }

  // The copy taken before shares the model but not the added tokens.
  CHECK(before.vocab_size() == runtime["size_before"].get<std::size_t>());
  CHECK_FALSE(before.token_to_id("<tool>"));

  require_error([&] { tokenizer.set_special_token(SpecialRole::eos, "<nowhere>"); }, "UnknownSpecialToken", "<nowhere>",
                "EOS");
  // All or nothing: "<ok>" before the broken token is not added either, and
  // the next token still gets the id transformers would give it.
  const std::vector<std::string> broken = {"<ok>", std::string("\xe4\xbd", 2)};
  require_error([&] { tokenizer.add_tokens(broken, qlora::AddedTokenKind::normal); }, "InvalidUtf8", "byte 0");
  CHECK(tokenizer.vocab_size() == runtime["size_after"].get<std::size_t>());
  CHECK_FALSE(tokenizer.token_to_id("<ok>"));
  const std::vector<std::string> next = {"<next>"};
  CHECK(tokenizer.add_tokens(next, qlora::AddedTokenKind::normal) == 1);
  CHECK(tokenizer.token_to_id("<next>") == runtime["size_after"].get<TokenId>());
}

TEST_CASE("from_pretrained registers the config's special tokens the model lacks, in transformers' order") {
  // A sep_token, a mask_token that is an added token already, and more
  // additional_special_tokens: new ones, a model piece ("Hello") and an
  // added_tokens_decoder entry that is not special (decode skips it, as
  // transformers' all_special_ids does).
  const Json& variant = encodings()["config_variant"];
  TempDir dir;
  std::filesystem::copy_file(model_dir() / "tokenizer.model", dir / "tokenizer.model");
  qlora::test::write_bytes(dir / "tokenizer_config.json", variant["config"].dump());
  const SentencePieceTokenizer tokenizer = SentencePieceTokenizer::from_pretrained(dir.path());
  CHECK(tokenizer.vocab_size() == variant["size"].get<std::size_t>());
  for (const auto& [token, id] : variant["ids"].items()) {
    INFO("token: " << token);
    CHECK(tokenizer.token_to_id(token) == id.get<TokenId>());
  }
  const Json& special = variant["special_ids"];
  CHECK(tokenizer.special_ids().bos == special["bos"].get<TokenId>());
  CHECK(tokenizer.special_ids().eos == special["eos"].get<TokenId>());
  CHECK(tokenizer.special_ids().pad == special["pad"].get<TokenId>());
  CHECK(tokenizer.special_ids().unk == special["unk"].get<TokenId>());
  for (const Json& encoding : variant["encodings"]) {
    const auto text = encoding["text"].get<std::string>();
    INFO("text: " << text);
    const std::vector<TokenId> ids = tokenizer.encode(text);
    CHECK(ids == ids_of(encoding["ids"]));
    CHECK(tokenizer.decode(ids, true) == encoding["decode_skip_special"].get<std::string>());
  }
}

TEST_CASE("a file that is not a SentencePiece model is InvalidTokenizer, with SentencePiece's reason") {
  TempDir dir;
  const std::string model = qlora::test::read_text(model_dir() / "tokenizer.model");
  qlora::test::write_bytes(dir / "empty.model", "");
  qlora::test::write_bytes(dir / "truncated.model", std::string_view(model).substr(0, model.size() / 3));
  qlora::test::write_bytes(dir / "tokenizer.json.model", R"({"version": "1.0", "model": {"type": "BPE"}})");
  // The reasons are libsentencepiece's status messages (0.1.97): they say what failed.
  const std::pair<std::string, std::string> cases[] = {
      {"missing.model", "No such file"},
      {"empty.model", "unk is not defined"},
      {"truncated.model", "ParseFromArray"},
      {"tokenizer.json.model", "ParseFromArray"},
  };
  for (const auto& [name, reason] : cases) {
    INFO("file: " << name);
    const std::string path = (dir / name).string();
    const std::string expected_reason = reason;  // clang cannot capture a structured binding
    const auto load = [&] {
      require_error([&] { (void)SentencePieceTokenizer::from_file(path); }, "InvalidTokenizer", path, expected_reason);
    };
    CHECK(stderr_of(load).empty());
  }
  CHECK(stderr_of([] { (void)SentencePieceTokenizer::from_pretrained(model_dir()); }).empty());
  require_error([&] { (void)SentencePieceTokenizer::from_pretrained(dir.path()); }, "InvalidTokenizer",
                (dir / "tokenizer.model").string());
}

TEST_CASE("from_pretrained: a broken or contradictory tokenizer_config.json is an error naming it") {
  TempDir dir;
  std::filesystem::copy_file(model_dir() / "tokenizer.model", dir / "tokenizer.model");
  const std::string config_path = (dir / "tokenizer_config.json").string();

  qlora::test::write_bytes(dir / "tokenizer_config.json", R"({"added_tokens_decoder": {"7": {"content": 1}}})");
  require_error([&] { (void)SentencePieceTokenizer::from_pretrained(dir.path()); }, "InvalidTokenizerConfig",
                config_path, "added_tokens_decoder.7.content");

  qlora::test::write_bytes(dir / "tokenizer_config.json",
                           R"({"added_tokens_decoder": {"1600": {"content": "<x>"}, "1601": {"content": "<x>"}}})");
  require_error([&] { (void)SentencePieceTokenizer::from_pretrained(dir.path()); }, "InvalidAddedToken", config_path,
                "<x>");

  // A config without added tokens still makes the model's special pieces added tokens.
  qlora::test::write_bytes(dir / "tokenizer_config.json", R"({"eos_token": "<|im_end|>"})");
  const SentencePieceTokenizer tokenizer = SentencePieceTokenizer::from_pretrained(dir.path());
  CHECK(tokenizer.special_ids().eos == tokenizer.token_to_id("<|im_end|>"));
  CHECK(tokenizer.encode("<s>") == std::vector<TokenId>{1});
}

TEST_CASE("an added id far beyond the model leaves ids between that are not in the vocabulary") {
  TempDir dir;
  std::filesystem::copy_file(model_dir() / "tokenizer.model", dir / "tokenizer.model");
  qlora::test::write_bytes(dir / "tokenizer_config.json", R"({"added_tokens_decoder": {"1600": {"content": "<far>"}}})");
  SentencePieceTokenizer tokenizer = SentencePieceTokenizer::from_pretrained(dir.path());
  CHECK(tokenizer.vocab_size() == 1601);
  CHECK(tokenizer.decode(std::vector<TokenId>{1600}) == "<far>");
  require_error([&] { (void)tokenizer.decode(std::vector<TokenId>{1550}); }, "InvalidTokenId", "token id 1550",
                "not in the vocabulary", "no added token has it");
  require_error([&] { (void)tokenizer.id_to_token(1550); }, "InvalidTokenId", "token id 1550",
                "no added token has it");
  require_error([&] { (void)tokenizer.id_to_token(1601); }, "InvalidTokenId", "token id 1601",
                "not in the vocabulary");
  // transformers numbers a new token len(get_vocab()) (1507 here, inside the gap; with other gaps
  // it can even be an added token's id); qlora takes one past the largest id, so that every id
  // stays below vocab_size().
  const std::vector<std::string> next = {"<next>"};
  CHECK(tokenizer.add_tokens(next, qlora::AddedTokenKind::normal) == 1);
  CHECK(tokenizer.token_to_id("<next>") == 1601);
}
