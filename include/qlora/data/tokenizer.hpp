// The Tokenizer concept: what the encoder, the templates and the trainers need
// from a tokenizer, so that SentencePiece (InternLM2) and byte-level BPE
// (Phi-2, tokenizer.json) are interchangeable template arguments.
//
// Conventions every implementation follows (they are what Hugging Face's
// `tokenizer.encode(text, add_special_tokens=False)` does, which XTuner and the
// Phi-2 tutorial call once per text piece):
//   - encode never adds BOS/EOS: templates place those explicitly;
//   - added tokens (<|im_start|>, <|im_end|>, <PAD>, ...) are split out of the
//     text before the model sees it, and map straight to their ids;
//   - decode is the inverse up to normalisation (bytes that are not valid UTF-8
//     come back as U+FFFD, as in both reference libraries).
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace qlora {

/// A vocabulary index. Signed and 32-bit because labels share the type and use
/// ignore_index (-100), as torch's int64 labels do in the Python stack.
using TokenId = std::int32_t;

/// The label of a position that takes no part in the loss (PyTorch's
/// CrossEntropyLoss ignore_index default, which transformers and XTuner use).
inline constexpr TokenId ignore_index = -100;

/// Which reserved role set_special_token assigns.
enum class SpecialRole : std::uint8_t { bos, eos, pad, unk };

[[nodiscard]] constexpr std::string_view special_role_name(SpecialRole role) noexcept {
  switch (role) {
    case SpecialRole::bos:
      return "BOS";
    case SpecialRole::eos:
      return "EOS";
    case SpecialRole::pad:
      return "PAD";
    case SpecialRole::unk:
      return "UNK";
  }
  return "?";
}

/// The ids a tokenizer reserves; absent where the tokenizer defines none
/// (Phi-2 has no pad token until one is added; SentencePiece may lack all).
struct SpecialTokenIds {
  std::optional<TokenId> bos;
  std::optional<TokenId> eos;
  std::optional<TokenId> pad;
  std::optional<TokenId> unk;

  /// The id of `role`, for code that takes the role as a value.
  [[nodiscard]] std::optional<TokenId>& operator[](SpecialRole role) noexcept {
    switch (role) {
      case SpecialRole::bos:
        return bos;
      case SpecialRole::eos:
        return eos;
      case SpecialRole::pad:
        return pad;
      case SpecialRole::unk:
        break;
    }
    return unk;
  }
};

/// How add_tokens registers new tokens. `special` ones are skipped by
/// decode(ids, skip_special = true); both kinds are split out of text.
enum class AddedTokenKind : std::uint8_t { normal, special };

/// A token split out of text before the model sees it, with Hugging Face's
/// flags (tokenizer.json "added_tokens", tokenizer_config.json
/// "added_tokens_decoder"): `single_word` matches only between word boundaries,
/// `lstrip`/`rstrip` swallow the whitespace left/right of a match, `normalized`
/// tokens are matched after the normalizer (a second pass), `special` ones are
/// dropped by decode(ids, skip_special = true).
struct AddedToken {
  std::string content;
  TokenId id = 0;
  bool special = false;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
};

template <class T>
concept Tokenizer = requires(T& mutable_tokenizer, const T& tokenizer, std::string_view text,
                             std::span<const TokenId> ids, TokenId id, std::vector<TokenId>& out,
                             std::span<const std::string> new_tokens) {
  /// Appends the ids of `text` to `out` (no BOS/EOS); the allocation-free form.
  { tokenizer.encode_into(text, out) } -> std::same_as<void>;
  { tokenizer.encode(text) } -> std::same_as<std::vector<TokenId>>;
  /// Text of `ids`; `skip_special` drops special tokens, as HF's skip_special_tokens.
  { tokenizer.decode(ids, bool{}) } -> std::same_as<std::string>;
  { tokenizer.token_to_id(text) } -> std::same_as<std::optional<TokenId>>;
  /// The token's string as the vocabulary spells it; throws for an id out of range.
  { tokenizer.id_to_token(id) } -> std::same_as<std::string>;
  /// Number of ids, added tokens included (HF's len(tokenizer)).
  { tokenizer.vocab_size() } -> std::same_as<std::size_t>;
  { tokenizer.special_ids() } -> std::same_as<SpecialTokenIds>;
  /// Makes each token that is not an added token yet one, as HF's add_tokens /
  /// add_special_tokens do: a token of the model keeps its id, any other gets
  /// the next free id; a token already added is left as it is. Returns the
  /// count that the transformers class the tokenizer mirrors returns (the
  /// fast ones count model tokens that became added tokens, the slow ones only
  /// new ids; see each implementation). All or nothing: when it throws, no
  /// token was added.
  { mutable_tokenizer.add_tokens(new_tokens, AddedTokenKind{}) } -> std::same_as<std::size_t>;
  /// Makes an existing token (vocabulary or added) the BOS/EOS/PAD/UNK; an
  /// unknown token is an Error naming it.
  { mutable_tokenizer.set_special_token(SpecialRole{}, text) } -> std::same_as<void>;
};

}  // namespace qlora
