// IWYU pragma: private
// The BPE model of a byte-level tokenizer.json (tokenizers' models/bpe), fused
// with ByteLevel's byte -> character mapping: a pre-token's bytes map straight
// to the ids of their one-character tokens, so encoding never builds the
// mapped string. Immutable once built (the tokenizer shares it between
// copies); the word cache inside is thread-safe.
#pragma once

#include <array>
#include <cstddef>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/detail/bpe_merges.hpp>
#include <qlora/data/detail/bpe_word_cache.hpp>
#include <qlora/data/detail/byte_unicode.hpp>
#include <qlora/data/tokenizer.hpp>

namespace qlora::detail {

/// The model's tokens by id, and the id of each token.
class BpeVocabulary {
 public:
  /// `tokens[id]` is the token with that id (the caller checks there are no duplicates).
  explicit BpeVocabulary(std::vector<std::string> tokens) : tokens_(std::move(tokens)) {
    ids_.reserve(tokens_.size());
    for (std::size_t id = 0; id < tokens_.size(); ++id) ids_.emplace(tokens_[id], static_cast<TokenId>(id));
  }
  // Moving keeps the map's views valid (a moved vector keeps its elements in
  // place); a copy would not.
  BpeVocabulary(BpeVocabulary&&) noexcept = default;
  BpeVocabulary(const BpeVocabulary&) = delete;
  BpeVocabulary& operator=(const BpeVocabulary&) = delete;
  BpeVocabulary& operator=(BpeVocabulary&&) = delete;

  [[nodiscard]] std::size_t size() const noexcept { return tokens_.size(); }
  [[nodiscard]] std::optional<TokenId> id_of(std::string_view token) const {
    const auto found = ids_.find(token);
    return found == ids_.end() ? std::nullopt : std::optional<TokenId>(found->second);
  }
  /// `id` must be below size().
  [[nodiscard]] const std::string& token(TokenId id) const noexcept { return tokens_[static_cast<std::size_t>(id)]; }

 private:
  std::vector<std::string> tokens_;
  std::unordered_map<std::string_view, TokenId> ids_;  // views into tokens_
};

/// The BPE settings a byte-level tokenizer.json may use.
struct BpeOptions {
  /// Stands for a byte without a token (tokenizers' unk_token); without one such a byte is an error.
  std::optional<TokenId> unk;
  /// Consecutive unknown bytes give one unk.
  bool fuse_unk = false;
  /// A pre-token that is a vocabulary entry is that token, without merging (Llama-3).
  bool ignore_merges = false;
};

class ByteLevelBpeModel {
 public:
  ByteLevelBpeModel(BpeVocabulary vocabulary, BpeMerges merges, BpeOptions options)
      : vocabulary_(std::move(vocabulary)), merges_(std::move(merges)), options_(options) {
    std::string spelling;
    for (unsigned byte = 0; byte < 256; ++byte) {
      spelling.clear();
      append_byte_level_char(spelling, static_cast<unsigned char>(byte));
      byte_ids_[byte] = vocabulary_.id_of(spelling).value_or(-1);
    }
  }

  [[nodiscard]] const BpeVocabulary& vocabulary() const noexcept { return vocabulary_; }

  /// Appends the ids of one pre-token (raw bytes, non-empty).
  void encode_word(std::string_view word, std::vector<TokenId>& out) const {
    if (word.size() == 1 && byte_ids_[static_cast<unsigned char>(word[0])] >= 0) {
      out.push_back(byte_ids_[static_cast<unsigned char>(word[0])]);
      return;
    }
    if (options_.ignore_merges) {
      std::string spelling;
      for (const char byte : word) append_byte_level_char(spelling, static_cast<unsigned char>(byte));
      if (const std::optional<TokenId> whole = vocabulary_.id_of(spelling)) {
        out.push_back(*whole);
        return;
      }
    }
    if (cache_.append_cached(word, out)) return;
    const std::size_t first = out.size();
    append_byte_ids(word, out);
    out.resize(first + merges_.apply(out.data() + first, out.size() - first));
    cache_.insert(word, std::span<const TokenId>(out).subspan(first));
  }

 private:
  /// One symbol per byte, as tokenizers' merge_word makes one per character
  /// of the mapped string; unk for bytes the vocabulary lacks.
  void append_byte_ids(std::string_view word, std::vector<TokenId>& out) const {
    bool previous_unknown = false;
    for (const char c : word) {
      const auto byte = static_cast<unsigned char>(c);
      const TokenId id = byte_ids_[byte];
      if (id >= 0) {
        out.push_back(id);
        previous_unknown = false;
        continue;
      }
      // tokenizers drops such a byte when there is no unk_token: refuse instead.
      check(options_.unk.has_value(), "UntokenizableText",
            "byte 0x{:02x} of pre-token {:?} has no token in the vocabulary, and the model has no unk_token", byte,
            std::string(word));
      if (!(options_.fuse_unk && previous_unknown)) out.push_back(*options_.unk);
      previous_unknown = true;
    }
  }

  BpeVocabulary vocabulary_;
  BpeMerges merges_;
  BpeOptions options_;
  std::array<TokenId, 256> byte_ids_{};  // -1 where the byte's character is not a token
  BpeWordCache cache_;
};

}  // namespace qlora::detail
