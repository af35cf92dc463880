// libFuzzer target for SentencePieceTokenizer. The first byte picks the mode
// (tokenizer_invariants.hpp); the rest is:
// - 't' (and 'j': a SentencePiece model is protobuf that libsentencepiece
//   parses, not qlora) text for the stand-in InternLM2 tokenizer
//   (tests/data/data/sentencepiece/internlm2_like, with its
//   tokenizer_config.json). Invalid UTF-8 must be Error("InvalidUtf8") at the
//   first bad byte; valid UTF-8 must encode, and decode back to the same text
//   but for two rewrites (expected_decode), both as in transformers' slow
//   tokenizer and Python sentencepiece 0.2.3:
//     1. U+2581 '▁' comes back as a space: SentencePiece writes spaces as '▁'
//        inside pieces and turns every '▁' back into a space when it decodes
//        (sentencepiece: decode(encode("a▁b")) == "a b");
//     2. the spelling of a model piece whose id tokenizer_config.json gives to
//        an added token comes back as that token: "[UNUSED_TOKEN_141]" is one
//        user-defined piece of the model, id 1500, which the config names
//        "<|plugin|>" (InternLM2's files do the same with [UNUSED_TOKEN_146] and
//        <|im_start|>), and added tokens win when ids are turned into text
//        (tests/reference/sentencepiece_bpe.py's InternLM2Tokenizer encodes
//        "x[UNUSED_TOKEN_141]y" to 1159 1500 1143, tokens x <|plugin|> y).
//   Nothing else may change the text: the model's normalization rule is
//   identity, it adds no dummy prefix, keeps extra white space and falls back
//   to bytes for characters it has no piece for, and the added tokens decode
//   to their own content (checked at start-up).
// - 'i' token ids to decode: ids outside the vocabulary are
//   Error("InvalidTokenId"), the rest decode to UTF-8 that round-trips as text.
// - 'c' a tokenizer_config.json beside the stand-in tokenizer.model, through
//   from_pretrained: it loads or is refused with a qlora::Error; a loaded one
//   keeps check_loaded's invariants on the same bytes as text.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>
#include <sentencepiece_processor.h>

#include <qlora/core/error.hpp>
#include <qlora/data/sentencepiece_tokenizer.hpp>

#include "tokenizer_invariants.hpp"

namespace {

using qlora::SentencePieceTokenizer;
using qlora_fuzz::require;

const std::filesystem::path stand_in =
    std::filesystem::path(QLORA_SOURCE_DIR) / "tests/data/data/sentencepiece/internlm2_like";

SentencePieceTokenizer internlm2_tokenizer() {
  SentencePieceTokenizer tokenizer = SentencePieceTokenizer::from_pretrained(stand_in);
  // What the round trip rests on: a byte piece for every byte, and added
  // tokens that decode to themselves and keep the white space around them.
  for (unsigned byte = 0; byte < 256; ++byte) {
    require(tokenizer.token_to_id(fmt::format("<0x{:02X}>", byte)).has_value());
  }
  qlora_fuzz::require_plain_added_tokens(tokenizer);
  // No normalization, dummy prefix or white-space folding.
  for (const std::string_view text : {"  two  spaces ", "\xEF\xBC\xA1 full-width A, \xE2\x84\xAB"}) {
    require(tokenizer.decode(tokenizer.encode(text), false) == text);
  }
  return tokenizer;
}

const qlora_fuzz::Subject<SentencePieceTokenizer>& subject() {
  static const qlora_fuzz::Subject<SentencePieceTokenizer> loaded(internlm2_tokenizer());
  return loaded;
}

/// A model piece that an added token renames: its spelling in the model and
/// the added token's content.
struct RenamedPiece {
  std::string spelling;
  std::string content;
};

/// The model's pieces whose ids the stand-in's added tokens hold under
/// another content. Each must be a piece SentencePiece always keeps whole
/// (a user-defined one): encoding its spelling gives its id alone.
std::vector<RenamedPiece> find_renamed_pieces() {
  sentencepiece::SentencePieceProcessor model;
  require(model.Load((stand_in / "tokenizer.model").string()).ok());
  std::vector<RenamedPiece> renamed;
  for (const qlora::AddedToken& token : subject().tokenizer.added_tokens().tokens()) {
    if (token.id >= model.GetPieceSize() || model.IdToPiece(token.id) == token.content) continue;
    RenamedPiece& piece = renamed.emplace_back(RenamedPiece{model.IdToPiece(token.id), token.content});
    require(subject().tokenizer.encode(piece.spelling) == std::vector<qlora::TokenId>{token.id});
  }
  return renamed;
}

/// What decode(encode(text)) must give for valid UTF-8 `text` (see the top).
std::string expected_decode(std::string_view text) {
  static const std::vector<RenamedPiece> renamed = find_renamed_pieces();
  constexpr std::string_view lower_one_eighth_block = "\xE2\x96\x81";  // '▁'
  std::string out;
  for (std::size_t pos = 0; pos < text.size();) {
    const std::string_view rest = text.substr(pos);
    const auto piece =
        std::ranges::find_if(renamed, [&](const RenamedPiece& p) { return rest.starts_with(p.spelling); });
    if (piece != renamed.end()) {
      out += piece->content;
      pos += piece->spelling.size();
    } else if (rest.starts_with(lower_one_eighth_block)) {
      out += ' ';
      pos += lower_one_eighth_block.size();
    } else {
      out += text[pos++];
    }
  }
  return out;
}

const qlora_fuzz::ScratchDir& config_dir() {
  static const qlora_fuzz::ScratchDir dir("sentencepiece_tokenizer_fuzz", stand_in / "tokenizer.model",
                                          "tokenizer.model");
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (qlora_fuzz::mode_of(data[0])) {
    case qlora_fuzz::Mode::text:
    case qlora_fuzz::Mode::document:
      qlora_fuzz::check_text(subject(), rest, expected_decode);
      break;
    case qlora_fuzz::Mode::ids:
      qlora_fuzz::check_ids(subject(), rest, expected_decode);
      break;
    case qlora_fuzz::Mode::config:
      qlora_fuzz::check_config<SentencePieceTokenizer>(config_dir(), rest);
      break;
  }
  return 0;
}
