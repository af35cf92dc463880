// TokenizerConfig: what transformers reads from tokenizer_config.json files
// (tests/reference/sentencepiece_bpe.py loads each fixture with transformers'
// from_pretrained and records it), and the errors for files it cannot read.
#include <qlora/data/tokenizer_config.hpp>

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include "data/test_support.hpp"
#include "io/test_support.hpp"

using qlora::parse_tokenizer_config;
using qlora::read_tokenizer_config;
using qlora::TokenizerConfig;
using qlora::test::data_fixture;
using qlora::test::Json;
using qlora::test::require_error;

namespace {

std::optional<std::string> string_or_null(const Json& value) {
  if (value.is_null()) return std::nullopt;
  return value.get<std::string>();
}

std::optional<std::string> content_of(const std::optional<qlora::AddedToken>& token) {
  if (!token) return std::nullopt;
  return token->content;
}

TokenizerConfig parse(std::string_view text) { return parse_tokenizer_config(text, "cfg.json"); }

}  // namespace

TEST_CASE("reads what transformers reads from each tokenizer_config.json fixture") {
  const Json expected = qlora::test::load_json(data_fixture("tokenizer_config/expected.json"));
  for (const auto& [name, want] : expected["configs"].items()) {
    INFO("config: " << name);
    const TokenizerConfig config = read_tokenizer_config(data_fixture("tokenizer_config") / name);

    const Json& special = want["special_tokens"];
    // transformers fills a role the file does not name with the class default; the file's
    // own value (a name or null) is what the reader reports.
    const auto check_role = [&](const char* role, const std::optional<qlora::AddedToken>& read) {
      if (special.contains(role)) {
        CHECK(content_of(read) == string_or_null(special[role]));
      } else {
        CHECK_FALSE(read.has_value());
      }
    };
    check_role("bos_token", config.bos_token);
    check_role("eos_token", config.eos_token);
    check_role("pad_token", config.pad_token);
    check_role("unk_token", config.unk_token);

    const Json& flags = want["flags"];
    CHECK(config.add_bos_token ==
          (flags.contains("add_bos_token") ? std::optional(flags["add_bos_token"].get<bool>()) : std::nullopt));
    CHECK(config.add_eos_token ==
          (flags.contains("add_eos_token") ? std::optional(flags["add_eos_token"].get<bool>()) : std::nullopt));
    CHECK(config.tokenizer_class == want["tokenizer_class"].get<std::string>());
    CHECK(config.model_max_length == (want["model_max_length"].is_null()
                                          ? std::nullopt
                                          : std::optional(want["model_max_length"].get<std::size_t>())));

    // transformers' all_special_tokens, recorded where the file names BOS, EOS,
    // UNK and PAD (elsewhere the class defaults, which are not in the file, fill in).
    if (!want["all_special_tokens"].is_null()) {
      std::vector<std::string> contents;
      for (const qlora::AddedToken& token : config.special_tokens()) contents.push_back(token.content);
      CHECK(contents == want["all_special_tokens"].get<std::vector<std::string>>());
    }

    const Json& tokens = want["added_tokens"];
    REQUIRE(config.added_tokens.size() == tokens.size());
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      const qlora::AddedToken& token = config.added_tokens[i];
      INFO("added token " << tokens[i].dump());
      CHECK(token.id == tokens[i]["id"].get<int>());
      CHECK(token.content == tokens[i]["content"].get<std::string>());
      CHECK(token.special == tokens[i]["special"].get<bool>());
      CHECK(token.single_word == tokens[i]["single_word"].get<bool>());
      CHECK(token.lstrip == tokens[i]["lstrip"].get<bool>());
      CHECK(token.rstrip == tokens[i]["rstrip"].get<bool>());
      CHECK(token.normalized == tokens[i]["normalized"].get<bool>());
    }
  }
}

TEST_CASE("model_max_length: transformers' 1e30 sentinel and anything beyond size_t mean no limit") {
  // 1000000000000000019884624838656 is int(1e30) as transformers writes it: above
  // every integer type, the JSON reader gives a double.
  CHECK_FALSE(parse(R"({"model_max_length": 1000000000000000019884624838656})").model_max_length);
  CHECK_FALSE(parse(R"({"model_max_length": 1e30})").model_max_length);
  CHECK_FALSE(parse(R"({"model_max_length": 18446744073709551616})").model_max_length);
  CHECK_FALSE(parse(R"({"model_max_length": null})").model_max_length);
  CHECK(parse(R"({"model_max_length": 18446744073709551615})").model_max_length == std::size_t{18446744073709551615u});
  CHECK(parse(R"({"model_max_length": 2048.0})").model_max_length == 2048u);
  require_error([] { parse(R"({"model_max_length": -1})"); }, "InvalidTokenizerConfig", "cfg.json",
                "\"model_max_length\"", "non-negative integer");
  require_error([] { parse(R"({"model_max_length": 1.5})"); }, "InvalidTokenizerConfig", "\"model_max_length\"");
  require_error([] { parse(R"({"model_max_length": "4k"})"); }, "InvalidTokenizerConfig", "\"model_max_length\"");
}

TEST_CASE("special tokens: strings, AddedToken objects or null") {
  const TokenizerConfig config =
      parse(R"({"bos_token": "<s>", "eos_token": {"content": "</s>", "special": true}, "pad_token": null})");
  CHECK(content_of(config.bos_token) == "<s>");
  CHECK(content_of(config.eos_token) == "</s>");
  CHECK_FALSE(config.pad_token);
  CHECK_FALSE(config.unk_token);
  require_error([] { parse(R"({"bos_token": 1})"); }, "InvalidTokenizerConfig", "cfg.json", "\"bos_token\"");
  require_error([] { parse(R"({"eos_token": {"special": true}})"); }, "InvalidTokenizerConfig", "\"eos_token\"",
                "\"content\"");
  require_error([] { parse(R"({"unk_token": {"__type": "Other", "content": "x"}})"); }, "InvalidTokenizerConfig",
                "\"unk_token.__type\"");
}

TEST_CASE("special tokens: every attribute and additional_special_tokens, as transformers registers them") {
  const TokenizerConfig config = parse(R"({
      "additional_special_tokens": ["<|tool|>", {"content": "<|obj|>", "lstrip": true}, "<s>",
                                    {"__type": "AddedToken", "content": "<n>", "special": true}],
      "mask_token": "<mask>", "cls_token": null, "sep_token": {"content": "<sep>", "normalized": false},
      "bos_token": "<s>"})");
  REQUIRE(config.additional_special_tokens.size() == 4);
  // A string: special, not normalized (AddedToken(content, special=True)).
  CHECK(config.additional_special_tokens[0].content == "<|tool|>");
  CHECK(config.additional_special_tokens[0].special);
  CHECK_FALSE(config.additional_special_tokens[0].normalized);
  // An object keeps its flags and is made special; "normalized" took its
  // default from the object's own "special" before (tokenizers' AddedToken).
  CHECK(config.additional_special_tokens[1].special);
  CHECK(config.additional_special_tokens[1].lstrip);
  CHECK(config.additional_special_tokens[1].normalized);
  CHECK_FALSE(config.additional_special_tokens[3].normalized);
  CHECK(content_of(config.mask_token) == "<mask>");
  CHECK_FALSE(config.cls_token.has_value());
  CHECK_FALSE(config.sep_token->normalized);
  // bos, eos, unk, sep, pad, cls, mask, then the additional ones; each content once.
  std::vector<std::string> order;
  for (const qlora::AddedToken& token : config.special_tokens()) order.push_back(token.content);
  CHECK(order == std::vector<std::string>{"<s>", "<sep>", "<mask>", "<|tool|>", "<|obj|>", "<n>"});
  CHECK(config.is_special_token("<|obj|>"));
  CHECK_FALSE(config.is_special_token("<|ob"));

  CHECK(parse(R"({"additional_special_tokens": null})").additional_special_tokens.empty());
  require_error([] { parse(R"({"additional_special_tokens": "<a>"})"); }, "InvalidTokenizerConfig", "cfg.json",
                "\"additional_special_tokens\"", "list");
  require_error([] { parse(R"({"additional_special_tokens": ["<a>", 7]})"); }, "InvalidTokenizerConfig",
                "\"additional_special_tokens[1]\"", "token string");
  require_error([] { parse(R"({"additional_special_tokens": [{"content": "<a>", "weight": 1}]})"); },
                "InvalidTokenizerConfig", "\"additional_special_tokens[0]\"", "\"weight\"");
  require_error([] { parse(R"({"mask_token": {"content": ""}})"); }, "InvalidTokenizerConfig", "\"mask_token\"",
                "non-empty");
}

TEST_CASE("flags and the class name: null flags read as false, as transformers passes None") {
  const TokenizerConfig config = parse(R"({"add_bos_token": null, "add_eos_token": true, "tokenizer_class": null})");
  CHECK(config.add_bos_token == false);
  CHECK(config.add_eos_token == true);
  CHECK(config.tokenizer_class.empty());
  require_error([] { parse(R"({"add_bos_token": "true"})"); }, "InvalidTokenizerConfig", "\"add_bos_token\"",
                "true or false");
  require_error([] { parse(R"({"tokenizer_class": 3})"); }, "InvalidTokenizerConfig", "\"tokenizer_class\"");
}

TEST_CASE("added_tokens_decoder: ids sorted as numbers, flags checked, unknown fields refused") {
  const TokenizerConfig config = parse(R"({"added_tokens_decoder": {
      "10": {"content": "<ten>", "special": true},
      "9": {"content": "<nine>"},
      "100": {"content": "<hundred>", "special": false, "normalized": false}}})");
  REQUIRE(config.added_tokens.size() == 3);
  CHECK(config.added_tokens[0].id == 9);
  CHECK(config.added_tokens[0].normalized);  // tokenizers' AddedToken: normalized defaults to !special
  CHECK(config.added_tokens[1].id == 10);
  CHECK_FALSE(config.added_tokens[1].normalized);
  CHECK(config.added_tokens[2].id == 100);
  CHECK_FALSE(config.added_tokens[2].normalized);

  for (const char* key : {"-1", "1.0", "x", " 1", "2147483648", ""}) {
    INFO("key: " << key);
    const std::string text = fmt::format(R"({{"added_tokens_decoder": {{"{}": {{"content": "a"}}}}}})", key);
    require_error([&] { parse(text); }, "InvalidTokenizerConfig", "cfg.json",
                  fmt::format("\"added_tokens_decoder.{}\"", key), "token id");
  }
  require_error([] { parse(R"({"added_tokens_decoder": {"1": {"content": "a"}, "01": {"content": "b"}}})"); },
                "InvalidTokenizerConfig", "id 1 is given twice");
  require_error([] { parse(R"({"added_tokens_decoder": {"5": {"content": "a", "weight": 1}}})"); },
                "InvalidTokenizerConfig", "\"added_tokens_decoder.5\"", "\"weight\"");
  require_error([] { parse(R"({"added_tokens_decoder": {"5": {"content": "a", "lstrip": 1}}})"); },
                "InvalidTokenizerConfig", "\"added_tokens_decoder.5.lstrip\"", "true or false");
  require_error([] { parse(R"({"added_tokens_decoder": {"5": {"content": ""}}})"); }, "InvalidTokenizerConfig",
                "\"added_tokens_decoder.5\"", "non-empty");
  require_error([] { parse(R"({"added_tokens_decoder": {"5": "<a>"}})"); }, "InvalidTokenizerConfig",
                "\"added_tokens_decoder.5\"", "AddedToken object");
  require_error([] { parse(R"({"added_tokens_decoder": ["<a>"]})"); }, "InvalidTokenizerConfig",
                "\"added_tokens_decoder\"");
}

TEST_CASE("unknown keys are ignored; broken files are errors naming the file") {
  const TokenizerConfig config = parse(R"({"chat_template": "{{ x }}", "auto_map": {"a": [1]}, "legacy": false})");
  CHECK(config.added_tokens.empty());
  require_error([] { parse("{\"bos_token\": \"<s>\",}"); }, "InvalidTokenizerConfig", "cfg.json", "line 1");
  require_error([] { parse("[]"); }, "InvalidTokenizerConfig", "cfg.json", "JSON object");
  require_error([] { parse("{\"bos_token\": \"\xff\"}"); }, "InvalidTokenizerConfig", "cfg.json");
  require_error([] { parse(R"({"bos_token": "<s>", "bos_token": "<t>"})"); }, "DuplicateKey", "cfg.json", "bos_token");
  require_error([] { read_tokenizer_config(data_fixture("tokenizer_config/missing.json")); }, "IoError",
                "missing.json");
}
