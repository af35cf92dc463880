// IWYU pragma: private
// AddedTokenTable: what both tokenizers of qlora keep beside their model (the
// added tokens, the BOS/EOS/PAD/UNK ids and the number of ids in use), with
// the rules by which transformers adds tokens when it loads a tokenizer and at
// run time. One copy of those rules, so that the SentencePiece and byte-level
// BPE tokenizers cannot drift apart.
//
// Ids: a model token keeps its id when it becomes an added token; any other
// new token gets one past the largest id in use (vocab_size), as tokenizers
// and transformers do unless added ids leave a gap (see
// SentencePieceTokenizer). Ids between the model's last one and the largest
// added one that no added token holds are in no vocabulary.
//
// Every change is all or nothing: a call that throws leaves the table as it
// was (vocab_size, ids, flags), so that a caller who catches the error keeps
// a tokenizer whose later ids are still those transformers gives.
#pragma once

#include <algorithm>
#include <cstddef>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/added_vocabulary.hpp>
#include <qlora/data/tokenizer.hpp>
#include <qlora/data/tokenizer_config.hpp>
#include <qlora/io/detail/utf8.hpp>

namespace qlora::detail {

/// Error("InvalidUtf8") naming the offset and value of the first byte of
/// `text` that is not valid UTF-8: what encode does with such text (Python
/// cannot even hold it; SentencePiece would put U+FFFD in its place).
inline void require_utf8_text(std::string_view text) {
  const std::size_t valid = utf8_valid_prefix(text);
  check(valid == text.size(), "InvalidUtf8", "text is not valid UTF-8 at byte offset {} (byte 0x{:02X})", valid,
        valid < text.size() ? static_cast<unsigned char>(text[valid]) : 0u);
}

/// What add_new did: how many tokens it registered, and how many of those got
/// a new id (the others are model tokens that became added tokens). The fast
/// tokenizers of transformers report the first, the slow ones the second.
struct AddedTokenCount {
  std::size_t registered = 0;
  std::size_t new_ids = 0;
};

class AddedTokenTable {
 public:
  /// A table for a model with ids 0 to model_size - 1.
  explicit AddedTokenTable(std::size_t model_size) : model_size_(model_size), size_(model_size) {
    check(model_size < static_cast<std::size_t>(std::numeric_limits<TokenId>::max()), "InvalidTokenizer",
          "a vocabulary of {} tokens does not fit 32-bit ids", model_size);
  }

  [[nodiscard]] const AddedVocabulary& vocabulary() const noexcept { return added_; }
  /// One past the largest id in use: transformers' len(tokenizer).
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] const SpecialTokenIds& special_ids() const noexcept { return special_; }
  /// The id the next new token gets: one past every id in use.
  [[nodiscard]] TokenId next_id() const noexcept { return static_cast<TokenId>(size_); }

  /// The added token with this id, or nullptr for an id of the model. Any
  /// other id (negative, past the last, or one no added token holds between
  /// the model's ids and the added ones) is Error("InvalidTokenId").
  [[nodiscard]] const AddedToken* token_at(TokenId id) const {
    if (const AddedToken* added = added_.find(id)) return added;
    if (id >= 0 && static_cast<std::size_t>(id) < model_size_) return nullptr;
    if (id >= 0 && static_cast<std::size_t>(id) < size_) {
      throw Error("InvalidTokenId", fmt::format("token id {} is not in the vocabulary: no added token has it (ids "
                                                "below {} are the model's, the added tokens' go up to {})",
                                                id, model_size_, size_ - 1));
    }
    throw Error("InvalidTokenId", fmt::format("token id {} is not in the vocabulary, which has ids 0 to {} ({} ids)",
                                              id, size_ == 0 ? 0 : size_ - 1, size_));
  }

  /// Registers `token` under its id (AddedVocabulary::add's rules), and
  /// refuses an id with no room after it for a 32-bit vocabulary size.
  void add(AddedToken token) {
    check(token.id < std::numeric_limits<TokenId>::max(), "InvalidAddedToken",
          "added token {:?}: id {} leaves no room for a vocabulary size in a 32-bit id", token.content, token.id);
    const auto end = static_cast<std::size_t>(token.id) + 1;
    added_.add(std::move(token));  // all or nothing; the rest cannot throw
    size_ = std::max(size_, end);
  }

  /// Registers each of `tokens` (content and flags) whose content is not an
  /// added token yet, in order: a token of the model keeps its id, any other
  /// gets the next one. model_id_of(content, added) is that model id or
  /// nullopt, given the added tokens so far (SentencePiece: a piece whose id an
  /// added token renamed is no longer the model's). An empty content is
  /// skipped, as transformers skips it.
  template <class ModelIdOf>
  AddedTokenCount add_new(std::span<const AddedToken> tokens, ModelIdOf&& model_id_of) {
    AddedTokenTable next = *this;  // all or nothing: the work is done on a copy
    AddedTokenCount count;
    for (AddedToken token : tokens) {
      if (token.content.empty() || next.added_.id_of(token.content)) continue;
      const std::optional<TokenId> model_id = model_id_of(std::string_view(token.content), next.added_);
      token.id = model_id.value_or(next.next_id());
      next.add(std::move(token));
      ++count.registered;
      count.new_ids += !model_id.has_value();
    }
    *this = std::move(next);
    return count;
  }

  /// add_new of `contents` as transformers' add_tokens (normal: special
  /// false, normalized true) or add_special_tokens (special: special true,
  /// normalized false) make them.
  template <class ModelIdOf>
  AddedTokenCount add_tokens(std::span<const std::string> contents, AddedTokenKind kind, ModelIdOf&& model_id_of) {
    const bool special = kind == AddedTokenKind::special;
    std::vector<AddedToken> tokens;
    tokens.reserve(contents.size());
    for (const std::string& content : contents) {
      tokens.push_back({.content = content, .special = special, .normalized = !special});
    }
    return add_new(tokens, std::forward<ModelIdOf>(model_id_of));
  }

  /// The last steps of transformers' tokenizer constructors: `config`'s
  /// special tokens that are no added tokens yet are added (add_new, in
  /// TokenizerConfig::special_tokens() order), then the BOS/EOS/UNK/PAD it
  /// names take their roles; token_to_id(content) is the tokenizer's lookup
  /// (added tokens first). For loading: a throw leaves the tokenizer unusable.
  template <class ModelIdOf, class TokenToId>
  void add_special_tokens(const TokenizerConfig& config, ModelIdOf&& model_id_of, TokenToId&& token_to_id) {
    add_new(config.special_tokens(), std::forward<ModelIdOf>(model_id_of));
    const std::pair<SpecialRole, const std::optional<AddedToken>*> roles[] = {{SpecialRole::bos, &config.bos_token},
                                                                              {SpecialRole::eos, &config.eos_token},
                                                                              {SpecialRole::unk, &config.unk_token},
                                                                              {SpecialRole::pad, &config.pad_token}};
    for (const auto& [role, token] : roles) {
      if (token->has_value()) set_special(role, (*token)->content, token_to_id(std::string_view((*token)->content)));
    }
  }

  /// Makes `token`, whose id is `id` (nullopt: neither an added token nor a
  /// token of the model, Error("UnknownSpecialToken")), the BOS/EOS/PAD/UNK.
  void set_special(SpecialRole role, std::string_view token, std::optional<TokenId> id) {
    check(id.has_value(), "UnknownSpecialToken",
          "cannot make {:?} the {} token: it is neither an added token nor a token of the model", token,
          special_role_name(role));
    special_[role] = id;
  }

 private:
  AddedVocabulary added_;
  SpecialTokenIds special_;
  std::size_t model_size_;
  std::size_t size_;  // one past the largest id: model ids, then the added ones past them
};

}  // namespace qlora::detail
