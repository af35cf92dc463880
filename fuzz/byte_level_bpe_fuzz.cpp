// libFuzzer target for ByteLevelBpeTokenizer. The first byte picks the mode
// (tokenizer_invariants.hpp); the rest is:
// - 't' text for the stand-in Phi-2 tokenizer (tests/data/data/bpe/phi2_like,
//   with the Phi-2 tutorial's run-time tokens <|im_start|>, <PAD>, <|im_end|>).
//   Invalid UTF-8 must be Error("InvalidUtf8") at the first bad byte; valid
//   UTF-8 must encode (the vocabulary has a token for every byte, checked at
//   start-up) and decode back to exactly the same bytes. That holds here
//   because every added token of this tokenizer decodes to its own content
//   (none is spelled with the byte-level alphabet, none strips white space;
//   checked at start-up too) and byte-level BPE has no normalizer.
// - 'i' token ids to decode: ids outside the vocabulary are
//   Error("InvalidTokenId"), the rest decode to UTF-8 that round-trips as text.
// - 'j' a tokenizer.json for from_json: it loads or is refused with a
//   qlora::Error; a loaded one keeps check_loaded's invariants on the same bytes
//   as text.
// - 'c' a tokenizer_config.json beside a small tokenizer.json
//   (tests/data/data/bpe/ascii_unk.json), through from_pretrained: the same.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <qlora/core/error.hpp>
#include <qlora/data/byte_level_bpe.hpp>
#include <qlora/data/detail/byte_unicode.hpp>
#include <qlora/data/tokenizer.hpp>

#include "tokenizer_invariants.hpp"

namespace {

using qlora::ByteLevelBpeTokenizer;
using qlora_fuzz::require;

const std::filesystem::path stand_in = std::filesystem::path(QLORA_SOURCE_DIR) / "tests/data/data/bpe/phi2_like";

ByteLevelBpeTokenizer tutorial_tokenizer() {
  ByteLevelBpeTokenizer tokenizer = ByteLevelBpeTokenizer::from_pretrained(stand_in);
  const std::string chat[] = {"<|im_start|>", "<PAD>"};
  tokenizer.add_tokens(chat, qlora::AddedTokenKind::normal);
  tokenizer.set_special_token(qlora::SpecialRole::pad, "<PAD>");
  const std::string end[] = {"<|im_end|>"};
  tokenizer.add_tokens(end, qlora::AddedTokenKind::special);
  tokenizer.set_special_token(qlora::SpecialRole::eos, "<|im_end|>");
  // The exact round trip rests on these: every byte has a token, every added
  // token decodes to itself and keeps the white space around it.
  for (unsigned byte = 0; byte < 256; ++byte) {
    std::string spelling;
    qlora::detail::append_byte_level_char(spelling, static_cast<unsigned char>(byte));
    require(tokenizer.token_to_id(spelling).has_value());
  }
  qlora_fuzz::require_plain_added_tokens(tokenizer);
  return tokenizer;
}

const qlora_fuzz::Subject<ByteLevelBpeTokenizer>& subject() {
  static const qlora_fuzz::Subject<ByteLevelBpeTokenizer> loaded(tutorial_tokenizer());
  return loaded;
}

std::string unchanged(std::string_view text) { return std::string(text); }

void check_document(std::string_view json) {
  std::optional<ByteLevelBpeTokenizer> tokenizer;
  try {
    tokenizer.emplace(ByteLevelBpeTokenizer::from_json(json, "fuzz.json"));
  } catch (const qlora::Error&) {
    return;
  }
  qlora_fuzz::check_loaded(*tokenizer, json);
}

const qlora_fuzz::ScratchDir& config_dir() {
  // The small tokenizer.json (310 tokens, "<unk>"): loading Phi-2's stand-in
  // for every input would take most of the fuzzing time.
  static const qlora_fuzz::ScratchDir dir("byte_level_bpe_fuzz", stand_in.parent_path() / "ascii_unk.json",
                                          "tokenizer.json");
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (qlora_fuzz::mode_of(data[0])) {
    case qlora_fuzz::Mode::text:
      qlora_fuzz::check_text(subject(), rest, unchanged);
      break;
    case qlora_fuzz::Mode::ids:
      qlora_fuzz::check_ids(subject(), rest, unchanged);
      break;
    case qlora_fuzz::Mode::document:
      check_document(rest);
      break;
    case qlora_fuzz::Mode::config:
      qlora_fuzz::check_config<ByteLevelBpeTokenizer>(config_dir(), rest);
      break;
  }
  return 0;
}
