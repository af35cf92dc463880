// SentencePieceTokenizer: a SentencePiece model (InternLM2's tokenizer.model)
// plus the added tokens of its tokenizer_config.json, giving the ids that
// transformers gives with InternLM2's slow tokenizer (remote code
// tokenization_internlm2.py) for tokenizer.encode(text, add_special_tokens=False).
//
// Why a layer over sentencepiece::SentencePieceProcessor: InternLM2's chat
// tokens and their ids live in tokenizer_config.json ("added_tokens_decoder"),
// not (or under other names, "[UNUSED_TOKEN_146]") in the model, and
// transformers splits them out of the text before SentencePiece sees it. So:
//   - encode: the added tokens (the config's, the special tokens', those of
//     add_tokens) are split out first (AddedVocabulary::split) and map to their
//     ids; each piece of text between them is encoded by SentencePiece on its
//     own, as transformers passes each piece to sp_model.encode. Text that is
//     not valid UTF-8 is Error("InvalidUtf8") with the byte offset, where
//     SentencePiece would silently put U+FFFD in its place.
//   - ids: an added token's id wins over the model's piece with the same id
//     (the config renames it), as transformers looks added tokens up first.
//   - the BOS/EOS/UNK/PAD tokens are added tokens too (transformers registers
//     them when the tokenizer is built): "<s>" in text is BOS, not three
//     pieces. Their names come from the config, else from the model.
//   - decode: runs of model ids go through SentencePiece's decoder (byte
//     pieces reassembled, bytes that are not UTF-8 become U+FFFD), added tokens
//     give their content. This is what the fast tokenizers and SentencePiece
//     do; InternLM2's remote decode also puts a space before each special token
//     and runs transformers' clean_up_tokenization ("a != b" -> "a!= b"), which
//     is not reproduced. skip_special drops special added tokens and the
//     BOS/EOS/UNK/PAD ids.
//   - no BOS is added by encode: the chat templates place it (add_bos_token).
// Known differences from transformers' slow tokenizer, none reachable with
// InternLM2's files: added tokens with lstrip/rstrip/single_word or
// normalized=true follow tokenizers' (Rust) matching rules (AddedVocabulary),
// and a model piece whose spelling equals the content of an added token with
// another id keeps the model's id (transformers would use the added one).
//
// Loading a file that is not a SentencePiece model (missing, empty, truncated,
// a tokenizer.json) is Error("InvalidTokenizer") naming the file and
// SentencePiece's own message; SentencePiece writes nothing to stderr then.
// encode and decode are const and safe to call from several threads; copies
// share the model and have their own added tokens.
#pragma once

#include <algorithm>
#include <cstddef>
#include <filesystem>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <sentencepiece_processor.h>

#include <qlora/core/error.hpp>
#include <qlora/data/added_vocabulary.hpp>
#include <qlora/data/tokenizer.hpp>
#include <qlora/data/tokenizer_config.hpp>
#include <qlora/io/detail/utf8.hpp>

namespace qlora {

class SentencePieceTokenizer {
 public:
  /// The model at `model` alone (a tokenizer.model): its BOS/EOS/UNK/PAD
  /// pieces become special added tokens, as transformers does for a tokenizer
  /// built from the model file only.
  static SentencePieceTokenizer from_file(const std::filesystem::path& model) {
    SentencePieceTokenizer tokenizer(model);
    tokenizer.register_special_tokens(TokenizerConfig{});
    return tokenizer;
  }

  /// `dir`/tokenizer.model with, when present, `dir`/tokenizer_config.json:
  /// its added_tokens_decoder (at their ids, renaming model pieces where the
  /// model spells the id otherwise) and its bos/eos/unk/pad token names.
  static SentencePieceTokenizer from_pretrained(const std::filesystem::path& dir) {
    SentencePieceTokenizer tokenizer(dir / "tokenizer.model");
    const std::filesystem::path config_path = dir / "tokenizer_config.json";
    TokenizerConfig config;
    // A config that exists but cannot be read is an error (read_tokenizer_config's IoError), not "no config".
    std::error_code status_error;
    if (std::filesystem::status(config_path, status_error).type() != std::filesystem::file_type::not_found) {
      config = read_tokenizer_config(config_path);
    }
    try {
      for (const AddedToken& token : config.added_tokens) tokenizer.register_added_token(token);
      tokenizer.register_special_tokens(config);
    } catch (const Error& e) {
      throw e.with_context(fmt::format("while reading {}", config_path.string()));
    }
    return tokenizer;
  }

  /// Appends the ids of `text` (no BOS/EOS). Throws Error("InvalidUtf8") naming
  /// the offset of the first byte that is not valid UTF-8.
  void encode_into(std::string_view text, std::vector<TokenId>& out) const {
    const std::size_t valid = detail::utf8_valid_prefix(text);
    check(valid == text.size(), "InvalidUtf8", "text is not valid UTF-8 at byte offset {} (byte 0x{:02X})", valid,
          valid < text.size() ? static_cast<unsigned char>(text[valid]) : 0u);
    added_.split(
        text, [&](std::string_view piece) { encode_with_model(piece, out); },
        [&](const AddedToken& token) { out.push_back(token.id); });
  }

  [[nodiscard]] std::vector<TokenId> encode(std::string_view text) const {
    std::vector<TokenId> ids;
    encode_into(text, ids);
    return ids;
  }

  /// The text of `ids`; `skip_special` drops special added tokens and the
  /// BOS/EOS/UNK/PAD ids as if they were not there (byte pieces around them
  /// still join up, as in transformers). An id outside the vocabulary is
  /// Error("InvalidTokenId").
  [[nodiscard]] std::string decode(std::span<const TokenId> ids, bool skip_special = false) const {
    std::string text;
    std::vector<int> model_run;  // consecutive model ids, decoded together so byte pieces join up
    const auto flush = [&] {
      if (model_run.empty()) return;
      std::string piece;
      const auto status = model_->Decode(model_run, &piece);
      check(status.ok(), "InvalidTokenizer", "{}: SentencePiece cannot decode: {}", source_, status.ToString());
      text += piece;
      model_run.clear();
    };
    for (const TokenId id : ids) {
      const AddedToken* added = added_.find(id);
      require_in_vocabulary(id, added);
      if (skip_special && is_special(id, added)) continue;
      if (added != nullptr) {
        flush();
        text += added->content;
      } else {
        model_run.push_back(id);
      }
    }
    flush();
    return text;
  }

  /// The id of an added token or a model piece spelled `token`, else nullopt.
  [[nodiscard]] std::optional<TokenId> token_to_id(std::string_view token) const {
    if (const std::optional<TokenId> id = added_.id_of(token)) return id;
    const int id = model_->PieceToId(token);
    if (model_->IdToPiece(id) != token) return std::nullopt;  // PieceToId answers unk_id for unknown pieces
    return id;
  }

  /// The added token's content, else the model's piece ("▁the", "<0x0A>").
  [[nodiscard]] std::string id_to_token(TokenId id) const {
    const AddedToken* added = added_.find(id);
    require_in_vocabulary(id, added);
    return added != nullptr ? added->content : model_->IdToPiece(id);
  }

  /// One past the largest id, added tokens included (transformers' len(tokenizer)).
  [[nodiscard]] std::size_t vocab_size() const noexcept { return static_cast<std::size_t>(vocab_size_); }
  /// The number of pieces in the SentencePiece model.
  [[nodiscard]] std::size_t model_size() const noexcept { return static_cast<std::size_t>(model_size_); }
  [[nodiscard]] SpecialTokenIds special_ids() const noexcept { return special_; }
  [[nodiscard]] const AddedVocabulary& added_tokens() const noexcept { return added_; }

  /// transformers' add_tokens / add_special_tokens: a token that is already an
  /// added token is left as it is; one the model spells (under an id no added
  /// token renames) becomes an added token with that id; any other gets the
  /// next id, one past the largest (transformers takes len(get_vocab()), the
  /// same unless added ids leave a gap). Empty strings are skipped. Returns how
  /// many got a new id. A token that is not valid UTF-8 is Error("InvalidUtf8").
  std::size_t add_tokens(std::span<const std::string> tokens, AddedTokenKind kind) {
    std::size_t new_ids = 0;
    for (const std::string& content : tokens) {
      if (content.empty() || added_.id_of(content)) continue;
      AddedToken token;
      token.content = content;
      token.special = kind == AddedTokenKind::special;
      token.normalized = !token.special;
      const std::optional<TokenId> piece = unrenamed_model_piece(content);
      token.id = piece.value_or(vocab_size_);
      if (!piece) ++new_ids;
      register_added_token(std::move(token));
    }
    return new_ids;
  }

  /// Makes `token` (an added token or a model piece) the BOS/EOS/PAD/UNK; an
  /// unknown token is Error("UnknownSpecialToken"). As transformers'
  /// `tokenizer.pad_token = ...`, this does not register the token as an added
  /// token (add_tokens does).
  void set_special_token(SpecialRole role, std::string_view token) {
    const std::optional<TokenId> id = token_to_id(token);
    check(id.has_value(), "UnknownSpecialToken",
          "{}: cannot make {:?} the {} token: it is neither an added token nor a piece of the model", source_, token,
          special_role_name(role));
    special_[role] = id;
  }

 private:
  explicit SentencePieceTokenizer(const std::filesystem::path& model) : source_(model.string()) {
    auto processor = std::make_shared<sentencepiece::SentencePieceProcessor>();
    const auto status = processor->Load(source_);
    check(status.ok(), "InvalidTokenizer", "{}: not a SentencePiece model: {}", source_, status.ToString());
    model_size_ = processor->GetPieceSize();
    vocab_size_ = model_size_;
    model_ = std::move(processor);
  }

  /// `added` is added_.find(id). Ids between the model's last piece and the
  /// largest added id that no added token holds are not in the vocabulary either.
  void require_in_vocabulary(TokenId id, const AddedToken* added) const {
    check(added != nullptr || (id >= 0 && id < model_size_), "InvalidTokenId",
          "token id {} is not in the vocabulary ({} model pieces, {} ids with the added tokens)", id, model_size_,
          vocab_size_);
  }

  void encode_with_model(std::string_view text, std::vector<TokenId>& out) const {
    std::vector<int> ids;
    const auto status = model_->Encode(text, &ids);
    check(status.ok(), "InvalidTokenizer", "{}: SentencePiece cannot encode: {}", source_, status.ToString());
    out.insert(out.end(), ids.begin(), ids.end());
  }

  bool is_special(TokenId id, const AddedToken* added) const noexcept {
    return (added != nullptr && added->special) || id == special_.bos || id == special_.eos || id == special_.pad ||
           id == special_.unk;
  }

  /// The id of the model piece spelled `content`, unless an added token has
  /// renamed that id: what transformers' get_vocab() lists.
  std::optional<TokenId> unrenamed_model_piece(std::string_view content) const {
    const int id = model_->PieceToId(content);
    if (model_->IdToPiece(id) != content || added_.find(id) != nullptr) return std::nullopt;
    return id;
  }

  void register_added_token(AddedToken token) {
    const std::size_t valid = detail::utf8_valid_prefix(token.content);
    check(valid == token.content.size(), "InvalidUtf8", "added token id {}: the content is not valid UTF-8 at byte {}",
          token.id, valid);
    // One past the largest id must be a TokenId too (vocab_size, the next id of add_tokens).
    check(token.id < std::numeric_limits<TokenId>::max(), "InvalidAddedToken",
          "added token {:?}: id {} leaves no room for a vocabulary size in a 32-bit id", token.content, token.id);
    vocab_size_ = std::max(vocab_size_, token.id + 1);
    added_.add(std::move(token));
  }

  /// The BOS, EOS, UNK and PAD tokens, named by `config` or else by the model,
  /// become special added tokens when they are not added tokens yet (in
  /// transformers' order, which decides the ids of names the model lacks).
  void register_special_tokens(const TokenizerConfig& config) {
    const auto model_piece = [&](int id) -> std::optional<std::string> {
      if (id < 0) return std::nullopt;
      return model_->IdToPiece(id);
    };
    const std::pair<SpecialRole, std::optional<std::string>> roles[] = {
        {SpecialRole::bos, config.bos_token ? config.bos_token : model_piece(model_->bos_id())},
        {SpecialRole::eos, config.eos_token ? config.eos_token : model_piece(model_->eos_id())},
        {SpecialRole::unk, config.unk_token ? config.unk_token : model_piece(model_->unk_id())},
        {SpecialRole::pad, config.pad_token ? config.pad_token : model_piece(model_->pad_id())},
    };
    for (const auto& [role, name] : roles) {
      if (!name) continue;
      const std::string names[] = {*name};
      add_tokens(names, AddedTokenKind::special);
      special_[role] = added_.id_of(*name);
    }
  }

  std::shared_ptr<const sentencepiece::SentencePieceProcessor> model_;
  std::string source_;  // the model's path, for messages
  TokenId model_size_ = 0;
  TokenId vocab_size_ = 0;
  AddedVocabulary added_;
  SpecialTokenIds special_;
};

static_assert(Tokenizer<SentencePieceTokenizer>);

}  // namespace qlora
