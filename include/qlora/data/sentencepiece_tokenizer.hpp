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
//   - the special tokens are added tokens too (transformers registers them
//     when the tokenizer is built, as detail/added_token_table.hpp): "<s>" in
//     text is BOS, not three pieces. They are the config's BOS, EOS, UNK, SEP,
//     PAD, CLS, MASK and additional_special_tokens, in that order, where the
//     BOS/EOS/UNK/PAD the config does not name are the model's pieces (they
//     stand for the class defaults of InternLM2's tokenizer). An
//     added_tokens_decoder entry listed among them is made special: the slow
//     tokenizer leaves its flag but drops it with all_special_ids in decode,
//     which comes to the same.
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

#include <cstddef>
#include <filesystem>
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
#include <qlora/data/detail/added_token_table.hpp>
#include <qlora/data/tokenizer.hpp>
#include <qlora/data/tokenizer_config.hpp>

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
  /// model spells the id otherwise), then its special tokens.
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
      for (AddedToken token : config.added_tokens) {
        token.special = token.special || config.is_special_token(token.content);
        tokenizer.tokens_.add(std::move(token));
      }
      tokenizer.register_special_tokens(std::move(config));
    } catch (const Error& e) {
      throw e.with_context(fmt::format("while reading {}", config_path.string()));
    }
    return tokenizer;
  }

  /// Appends the ids of `text` (no BOS/EOS). Throws Error("InvalidUtf8") naming
  /// the offset of the first byte that is not valid UTF-8.
  void encode_into(std::string_view text, std::vector<TokenId>& out) const {
    detail::require_utf8_text(text);
    tokens_.vocabulary().split(
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
      const AddedToken* added = tokens_.token_at(id);
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
    if (const std::optional<TokenId> id = tokens_.vocabulary().id_of(token)) return id;
    const int id = model_->PieceToId(token);
    if (model_->IdToPiece(id) != token) return std::nullopt;  // PieceToId answers unk_id for unknown pieces
    return id;
  }

  /// The added token's content, else the model's piece ("▁the", "<0x0A>");
  /// an id in no vocabulary is Error("InvalidTokenId").
  [[nodiscard]] std::string id_to_token(TokenId id) const {
    const AddedToken* added = tokens_.token_at(id);
    return added != nullptr ? added->content : model_->IdToPiece(id);
  }

  /// One past the largest id, added tokens included (transformers' len(tokenizer)).
  [[nodiscard]] std::size_t vocab_size() const noexcept { return tokens_.size(); }
  /// The number of pieces in the SentencePiece model.
  [[nodiscard]] std::size_t model_size() const noexcept { return static_cast<std::size_t>(model_->GetPieceSize()); }
  [[nodiscard]] SpecialTokenIds special_ids() const noexcept { return tokens_.special_ids(); }
  [[nodiscard]] const AddedVocabulary& added_tokens() const noexcept { return tokens_.vocabulary(); }

  /// transformers' add_tokens / add_special_tokens: a token that is already an
  /// added token is left as it is; one the model spells (under an id no added
  /// token renames) becomes an added token with that id; any other gets the
  /// next id, one past the largest (transformers takes len(get_vocab()), the
  /// same unless added ids leave a gap). Empty strings are skipped. Returns
  /// what the slow PreTrainedTokenizer.add_tokens returns: how many got a new
  /// id (model pieces that became added tokens are not counted). A token that
  /// is not valid UTF-8 is Error("InvalidUtf8"), and then none of `tokens` is
  /// added.
  std::size_t add_tokens(std::span<const std::string> tokens, AddedTokenKind kind) {
    return tokens_.add_tokens(tokens, kind, ModelTokenIds{this}).new_ids;
  }

  /// Makes `token` (an added token or a model piece) the BOS/EOS/PAD/UNK; an
  /// unknown token is Error("UnknownSpecialToken"). As transformers'
  /// `tokenizer.pad_token = ...`, this does not register the token as an added
  /// token (add_tokens does).
  void set_special_token(SpecialRole role, std::string_view token) {
    tokens_.set_special(role, token, token_to_id(token));
  }

 private:
  explicit SentencePieceTokenizer(const std::filesystem::path& model)
      : model_(load(model.string())), source_(model.string()), tokens_(model_size()) {}

  static std::shared_ptr<const sentencepiece::SentencePieceProcessor> load(const std::string& path) {
    auto processor = std::make_shared<sentencepiece::SentencePieceProcessor>();
    const auto status = processor->Load(path);
    check(status.ok(), "InvalidTokenizer", "{}: not a SentencePiece model: {}", path, status.ToString());
    return processor;
  }

  void encode_with_model(std::string_view text, std::vector<TokenId>& out) const {
    std::vector<int> ids;
    const auto status = model_->Encode(text, &ids);
    check(status.ok(), "InvalidTokenizer", "{}: SentencePiece cannot encode: {}", source_, status.ToString());
    out.insert(out.end(), ids.begin(), ids.end());
  }

  bool is_special(TokenId id, const AddedToken* added) const noexcept {
    const SpecialTokenIds& special = tokens_.special_ids();
    return (added != nullptr && added->special) || id == special.bos || id == special.eos || id == special.pad ||
           id == special.unk;
  }

  /// The id of the model piece spelled `content`, unless one of the `added`
  /// tokens has renamed that id: what transformers' get_vocab() lists, and so
  /// the id a piece keeps when it becomes an added token.
  [[nodiscard]] std::optional<TokenId> model_token_id(std::string_view content, const AddedVocabulary& added) const {
    const int id = model_->PieceToId(content);
    if (model_->IdToPiece(id) != content || added.find(id) != nullptr) return std::nullopt;
    return id;
  }

  /// model_token_id as the callable AddedTokenTable takes.
  struct ModelTokenIds {
    const SentencePieceTokenizer* tokenizer;
    std::optional<TokenId> operator()(std::string_view content, const AddedVocabulary& added) const {
      return tokenizer->model_token_id(content, added);
    }
  };

  /// The config's special tokens become special added tokens when they are
  /// not added tokens yet, in transformers' order (which decides the ids of
  /// those the model lacks), and take their roles; the BOS/EOS/UNK/PAD the
  /// config does not name are the model's pieces.
  void register_special_tokens(TokenizerConfig config) {
    const std::pair<std::optional<AddedToken>*, int> defaults[] = {{&config.bos_token, model_->bos_id()},
                                                                   {&config.eos_token, model_->eos_id()},
                                                                   {&config.unk_token, model_->unk_id()},
                                                                   {&config.pad_token, model_->pad_id()}};
    for (const auto& [token, model_id] : defaults) {
      if (!token->has_value() && model_id >= 0) {
        *token = AddedToken{.content = model_->IdToPiece(model_id), .special = true, .normalized = false};
      }
    }
    tokens_.add_special_tokens(config, ModelTokenIds{this},
                               [this](std::string_view content) { return token_to_id(content); });
  }

  std::shared_ptr<const sentencepiece::SentencePieceProcessor> model_;
  std::string source_;  // the model's path, for messages
  detail::AddedTokenTable tokens_;
};

static_assert(Tokenizer<SentencePieceTokenizer>);

}  // namespace qlora
