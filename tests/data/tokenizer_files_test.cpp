// save_tokenizer_files: the tiny Phi's tokenizer (examples/assets/tiny-phi,
// written by transformers' save_pretrained) with the Phi-2 tutorial's
// additions (<|im_start|> and <PAD> as added tokens, <|im_end|> as the special
// EOS) saved and loaded back: the reloaded tokenizer — whose loader is checked
// against transformers in byte_level_bpe_test — gives the same ids as the one
// the tokens were added to in memory, and the special roles as set.
#include <qlora/data/tokenizer_files.hpp>

#include <qlora/data/byte_level_bpe.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "support/errors.hpp"

using namespace qlora;

namespace {
const std::filesystem::path tiny_phi = QLORA_SOURCE_DIR "/examples/assets/tiny-phi";
}

TEST_CASE("save_tokenizer_files writes the added tokens as they were trained", "[data][tokenizer_files]") {
  ByteLevelBpeTokenizer tokenizer = ByteLevelBpeTokenizer::from_pretrained(tiny_phi);
  const std::vector<std::string> normal{"<|im_start|>", "<PAD>"}, special{"<|im_end|>"};
  REQUIRE(tokenizer.add_tokens(normal, AddedTokenKind::normal) == 2);
  REQUIRE(tokenizer.add_tokens(special, AddedTokenKind::special) == 1);
  tokenizer.set_special_token(SpecialRole::eos, "<|im_end|>");
  tokenizer.set_special_token(SpecialRole::pad, "<PAD>");
  std::vector<AddedToken> added;
  for (const std::string token : {"<|im_start|>", "<PAD>", "<|im_end|>"}) {
    const bool is_special = std::string(token) == "<|im_end|>";
    added.push_back({.content = token, .id = *tokenizer.token_to_id(token), .special = is_special,
                     .normalized = !is_special});
  }
  const std::filesystem::path out = std::filesystem::temp_directory_path() / "qlora_tokenizer_files_test";
  std::filesystem::remove_all(out);
  save_tokenizer_files(tiny_phi, out, added, {{"eos_token", "<|im_end|>"}, {"pad_token", "<PAD>"}});

  const ByteLevelBpeTokenizer reloaded = ByteLevelBpeTokenizer::from_pretrained(out);
  CHECK(reloaded.vocab_size() == tokenizer.vocab_size());
  const std::string text = "<|im_start|>user\nWho are you?<|im_end|><|im_start|>assistant\nI am<PAD>";
  CHECK(reloaded.encode(text) == tokenizer.encode(text));
  CHECK(reloaded.special_ids().eos == tokenizer.special_ids().eos);
  CHECK(reloaded.special_ids().pad == tokenizer.special_ids().pad);
  // decode(skip_special) drops <|im_end|> (special) but keeps the normal added tokens, as transformers does.
  CHECK(reloaded.decode(reloaded.encode(text), true) == tokenizer.decode(tokenizer.encode(text), true));

  SECTION("saving again is idempotent; an id held by another token is refused") {
    save_tokenizer_files(out, out, added, {});
    CHECK(ByteLevelBpeTokenizer::from_pretrained(out).encode(text) == tokenizer.encode(text));
    std::vector<AddedToken> clash = added;
    clash[0].content = "<|other|>";
    test::require_error([&] { save_tokenizer_files(out, out, clash, {}); }, "InvalidTokenizerConfig", "<|other|>",
                        "<|im_start|>");
  }
  std::filesystem::remove_all(out);
}

TEST_CASE("save_tokenizer_files reassigns the roles in special_tokens_map.json", "[data][tokenizer_files]") {
  // A folder as transformers 4.x saves Phi-2's: the map holds EOS as an AddedToken object, BOS as text.
  const std::filesystem::path source = std::filesystem::temp_directory_path() / "qlora_tokenizer_files_map_source";
  const std::filesystem::path out = std::filesystem::temp_directory_path() / "qlora_tokenizer_files_map_out";
  std::filesystem::remove_all(source);
  std::filesystem::remove_all(out);
  std::filesystem::copy(tiny_phi, source);
  {
    std::ofstream map(source / "special_tokens_map.json");
    map << R"({"bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>", "lstrip": false}})";
  }
  save_tokenizer_files(source, out, {}, {{"eos_token", "<|im_end|>"}, {"pad_token", "<PAD>"}});
  std::ifstream in(out / "special_tokens_map.json");
  const auto map = nlohmann::json::parse(in);
  CHECK(map["bos_token"] == "<|endoftext|>");
  CHECK(map["eos_token"]["content"] == "<|im_end|>");
  CHECK(map["eos_token"]["lstrip"] == false);
  CHECK(map["pad_token"] == "<PAD>");
  std::filesystem::remove_all(source);
  std::filesystem::remove_all(out);
}
