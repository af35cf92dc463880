// AddedVocabulary: the tokens a tokenizer splits out of text before its model
// sees it (<|endoftext|>, <|im_start|>, <PAD>, CodeGen's runs of spaces...),
// matched as Hugging Face tokenizers' AddedVocabulary matches them, so that
// both tokenizers of qlora (SentencePiece and byte-level BPE) give the ids
// transformers gives.
//
// Matching (tokenizers/src/tokenizer/added_vocabulary.rs, find_matches):
//   - two passes: tokens with normalized=false are found in the raw text, then
//     tokens with normalized=true in each piece the first pass left (qlora's
//     tokenizers apply no normalizer of their own to added-token matching, so
//     the second pass sees the same bytes);
//   - each pass is a leftmost-longest, non-overlapping search (Aho-Corasick's
//     MatchKind::LeftmostLongest): at the leftmost position where any token
//     starts, the longest one wins;
//   - single_word: a match with a word character (Rust regex `\w`) right
//     before or after it in its piece is skipped, and the search goes on after
//     it, as tokenizers does;
//   - lstrip / rstrip: the white space (`\s`) before / after a match is part
//     of the match and reaches the model as nothing.
// One deliberate difference: after an rstrip match the search resumes after
// the swallowed white space. tokenizers resumes at the end of the token
// itself, and a following token that starts with white space would then
// overlap the previous match and repeat text.
//
// Hot path: a text without added tokens costs one scan with a two-byte
// filter (a bit per possible first two bytes), and matching never allocates.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/detail/unicode_word.hpp>
#include <qlora/data/tokenizer.hpp>
#include <qlora/io/detail/utf8.hpp>

namespace qlora {

namespace detail {

/// std::hash over string_view, usable for heterogeneous lookup in
/// unordered_map<std::string, ...> (find with a string_view, no allocation).
struct StringViewHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view text) const noexcept { return std::hash<std::string_view>{}(text); }
};

/// The tokens of one matching pass, indexed for leftmost-longest search.
class AddedTokenMatcher {
 public:
  /// Adds tokens[index] (non-empty content) to the set searched.
  void insert(std::uint32_t index, const std::vector<AddedToken>& tokens) {
    const std::string& content = tokens[index].content;
    const auto first = static_cast<unsigned char>(content[0]);
    std::vector<std::uint32_t>& bucket = candidates_[first];
    // Longest first, so that the first match in a bucket is the longest.
    const auto position = std::ranges::find_if(
        bucket, [&](std::uint32_t other) { return tokens[other].content.size() < content.size(); });
    bucket.insert(position, index);
    if (content.size() == 1) {
      single_byte_[first] = true;
    } else {
      const unsigned pair = first << 8 | static_cast<unsigned char>(content[1]);
      pair_filter_[pair / 64] |= std::uint64_t{1} << (pair % 64);
    }
    empty_ = false;
  }

  [[nodiscard]] bool empty() const noexcept { return empty_; }

  /// The longest token that matches `text` at `pos`, or nullptr.
  [[nodiscard]] const AddedToken* longest_at(std::string_view text, std::size_t pos,
                                             const std::vector<AddedToken>& tokens) const noexcept {
    const auto first = static_cast<unsigned char>(text[pos]);
    if (!single_byte_[first]) {
      if (pos + 1 == text.size()) return nullptr;
      const unsigned pair = first << 8 | static_cast<unsigned char>(text[pos + 1]);
      if ((pair_filter_[pair / 64] >> (pair % 64) & 1u) == 0) return nullptr;
    }
    const std::string_view rest = text.substr(pos);
    for (const std::uint32_t index : candidates_[first]) {
      if (rest.starts_with(tokens[index].content)) return &tokens[index];
    }
    return nullptr;
  }

 private:
  /// Indices into the vocabulary's tokens by first byte, longest first.
  std::array<std::vector<std::uint32_t>, 256> candidates_;
  /// Bit (b0 << 8 | b1) is set when a token of two bytes or more starts b0 b1.
  std::array<std::uint64_t, 65536 / 64> pair_filter_{};
  /// Whether a one-byte token is this byte.
  std::array<bool, 256> single_byte_{};
  bool empty_ = true;
};

}  // namespace detail

class AddedVocabulary {
 public:
  /// Registers `token`. The same content with the same id again is a no-op
  /// (its flags stay those of the first registration); empty content, a
  /// negative id, content already registered under another id, or an id
  /// already registered with other content is Error("InvalidAddedToken");
  /// content that is not UTF-8 is Error("InvalidUtf8") (it could match half a
  /// character of valid text).
  void add(AddedToken token) {
    check(!token.content.empty(), "InvalidAddedToken", "added token id {}: the content is empty", token.id);
    const std::size_t valid = detail::utf8_valid_prefix(token.content);
    check(valid == token.content.size(), "InvalidUtf8", "added token id {}: the content is not valid UTF-8 at byte {}",
          token.id, valid);
    check(token.id >= 0, "InvalidAddedToken", "added token {:?}: id {} is negative", token.content, token.id);
    if (const auto known = index_by_content_.find(std::string_view(token.content)); known != index_by_content_.end()) {
      const TokenId known_id = tokens_[known->second].id;
      check(known_id == token.id, "InvalidAddedToken", "added token {:?} already has id {}; cannot also have id {}",
            token.content, known_id, token.id);
      return;
    }
    if (const auto known = index_by_id_.find(token.id); known != index_by_id_.end()) {
      throw Error("InvalidAddedToken", fmt::format("added token id {} already belongs to {:?}; cannot also be {:?}",
                                                   token.id, tokens_[known->second].content, token.content));
    }
    const auto index = static_cast<std::uint32_t>(tokens_.size());
    index_by_content_.emplace(token.content, index);
    index_by_id_.emplace(token.id, index);
    tokens_.push_back(std::move(token));
    (tokens_.back().normalized ? normalized_ : raw_).insert(index, tokens_);
  }

  [[nodiscard]] std::optional<TokenId> id_of(std::string_view content) const {
    const auto found = index_by_content_.find(content);
    if (found == index_by_content_.end()) return std::nullopt;
    return tokens_[found->second].id;
  }

  /// The token with this id, or nullptr when `id` is not an added token. The
  /// pointer is valid until the next add().
  [[nodiscard]] const AddedToken* find(TokenId id) const {
    const auto found = index_by_id_.find(id);
    return found == index_by_id_.end() ? nullptr : &tokens_[found->second];
  }

  /// Every added token, in insertion order.
  [[nodiscard]] const std::vector<AddedToken>& tokens() const noexcept { return tokens_; }
  [[nodiscard]] bool empty() const noexcept { return tokens_.empty(); }

  /// Splits `text` (valid UTF-8) as tokenizers' AddedVocabulary does (see the
  /// header comment): calls on_text(std::string_view) for each non-empty run
  /// of plain text and on_token(const AddedToken&) for each match, in text
  /// order. The views point into `text`.
  template <class OnText, class OnToken>
  void split(std::string_view text, OnText&& on_text, OnToken&& on_token) const {
    const auto second_pass = [&](std::string_view piece) { split_pass(piece, normalized_, on_text, on_token); };
    split_pass(text, raw_, second_pass, on_token);
  }

 private:
  /// One pass over `piece`: find_matches with the tokens of `matcher`.
  template <class OnText, class OnToken>
  void split_pass(std::string_view piece, const detail::AddedTokenMatcher& matcher, OnText&& on_text,
                  OnToken&& on_token) const {
    if (matcher.empty()) {
      if (!piece.empty()) on_text(piece);
      return;
    }
    std::size_t text_start = 0;  // start of the plain text not yet passed on
    std::size_t pos = 0;
    while (pos < piece.size()) {
      const AddedToken* token = matcher.longest_at(piece, pos, tokens_);
      if (token == nullptr) {
        ++pos;
        continue;
      }
      std::size_t start = pos;
      std::size_t stop = pos + token->content.size();
      pos = stop;
      if (token->single_word && (detail::ends_with_word_character(piece.substr(0, start)) ||
                                 detail::starts_with_word_character(piece.substr(stop)))) {
        continue;
      }
      if (token->lstrip) start = detail::trailing_white_space_start(piece.substr(0, start));
      if (token->rstrip) stop += detail::leading_white_space(piece.substr(stop));
      // lstrip may reach back before text_start, into white space an earlier
      // rstrip swallowed: then there is no text between the two.
      if (start > text_start) on_text(piece.substr(text_start, start - text_start));
      on_token(*token);
      text_start = pos = stop;
    }
    if (text_start < piece.size()) on_text(piece.substr(text_start));
  }

  std::vector<AddedToken> tokens_;
  std::unordered_map<std::string, std::uint32_t, detail::StringViewHash, std::equal_to<>> index_by_content_;
  std::unordered_map<TokenId, std::uint32_t> index_by_id_;
  detail::AddedTokenMatcher raw_;         // normalized = false: pass 1, on the raw text
  detail::AddedTokenMatcher normalized_;  // normalized = true: pass 2, on what pass 1 left
};

}  // namespace qlora
