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
//     of the match and reaches the model as nothing;
//   - the search resumes at the end of the token itself, even after an rstrip
//     match: a token that starts in the white space the previous one
//     swallowed is still found, and the plain text after it starts at its own
//     end (so text that rstrip swallowed can reach the model again, when a
//     later token ends inside it), exactly as tokenizers' find_matches does;
//     an lstrip match never reaches back before the end of the previous one.
//
// Hot path: a text without added tokens costs one scan with a two-byte
// filter (a bit per possible first two bytes), and matching never allocates;
// where a token may start, a byte trie finds the longest one in as many steps
// as it has bytes, however many tokens there are.
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

/// The tokens of one matching pass, in a byte trie for leftmost-longest
/// search: the longest token at a position costs one step per byte of it,
/// however many tokens share its first bytes (Llama-3's 256 reserved tokens
/// all start "<|reserved_special_token_"). A filter on the first two bytes
/// rejects most positions before the trie is touched.
class AddedTokenMatcher {
 public:
  /// Adds tokens[index] (non-empty content, none other with the same content)
  /// to the set searched. All or nothing, like AddedVocabulary::add.
  void insert(std::uint32_t index, const std::vector<AddedToken>& tokens) {
    const std::string& content = tokens[index].content;
    nodes_.reserve(nodes_.size() + content.size());  // the only step that can fail: nothing changed yet
    const auto first = static_cast<unsigned char>(content[0]);
    if (roots_[first] == none) roots_[first] = new_node(first);
    std::uint32_t node = roots_[first];
    for (std::size_t i = 1; i < content.size(); ++i) {
      const auto byte = static_cast<unsigned char>(content[i]);
      std::uint32_t next = child(node, byte);
      if (next == none) {
        next = new_node(byte);
        nodes_[next].next_sibling = nodes_[node].first_child;
        nodes_[node].first_child = next;
      }
      node = next;
    }
    nodes_[node].token = index;
    if (content.size() == 1) {
      single_byte_[first] = true;
    } else {
      const unsigned pair = first << 8 | static_cast<unsigned char>(content[1]);
      pair_filter_[pair / 64] |= std::uint64_t{1} << (pair % 64);
    }
  }

  [[nodiscard]] bool empty() const noexcept { return nodes_.empty(); }

  /// The longest token that matches `text` at `pos`, or nullptr.
  [[nodiscard]] const AddedToken* longest_at(std::string_view text, std::size_t pos,
                                             const std::vector<AddedToken>& tokens) const noexcept {
    const auto first = static_cast<unsigned char>(text[pos]);
    if (!single_byte_[first]) {
      if (pos + 1 == text.size()) return nullptr;
      const unsigned pair = first << 8 | static_cast<unsigned char>(text[pos + 1]);
      if ((pair_filter_[pair / 64] >> (pair % 64) & 1u) == 0) return nullptr;
    }
    std::uint32_t longest = none;
    for (std::uint32_t node = roots_[first]; node != none;) {
      if (nodes_[node].token != none) longest = nodes_[node].token;
      if (++pos == text.size()) break;
      node = child(node, static_cast<unsigned char>(text[pos]));
    }
    return longest == none ? nullptr : &tokens[longest];
  }

 private:
  static constexpr std::uint32_t none = 0xFFFFFFFFu;

  /// A trie node: the byte that leads to it, its children as a list (most
  /// nodes have one), and the token that ends here, if any.
  struct Node {
    std::uint32_t first_child = none;
    std::uint32_t next_sibling = none;
    std::uint32_t token = none;  // index into the vocabulary's tokens
    unsigned char byte = 0;
  };

  [[nodiscard]] std::uint32_t child(std::uint32_t node, unsigned char byte) const noexcept {
    std::uint32_t next = nodes_[node].first_child;
    while (next != none && nodes_[next].byte != byte) next = nodes_[next].next_sibling;
    return next;
  }

  /// Appends a node; insert reserved room, so this does not allocate.
  std::uint32_t new_node(unsigned char byte) {
    nodes_.push_back(Node{.byte = byte});
    return static_cast<std::uint32_t>(nodes_.size() - 1);
  }

  std::vector<Node> nodes_;
  /// The node of each first byte, or none.
  std::array<std::uint32_t, 256> roots_ = filled_with_none();
  /// Bit (b0 << 8 | b1) is set when a token of two bytes or more starts b0 b1.
  std::array<std::uint64_t, 65536 / 64> pair_filter_{};
  /// Whether a one-byte token is this byte.
  std::array<bool, 256> single_byte_{};

  static constexpr std::array<std::uint32_t, 256> filled_with_none() noexcept {
    std::array<std::uint32_t, 256> roots{};
    roots.fill(none);
    return roots;
  }
};

}  // namespace detail

class AddedVocabulary {
 public:
  /// Registers `token`. The same content with the same id again is a no-op
  /// (its flags stay those of the first registration); empty content, a
  /// negative id, content already registered under another id, or an id
  /// already registered with other content is Error("InvalidAddedToken");
  /// content that is not UTF-8 is Error("InvalidUtf8") (it could match half a
  /// character of valid text). All or nothing: when it throws, nothing changed.
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
    // Validated: from here only allocation can fail, and it undoes what it did.
    const auto index = static_cast<std::uint32_t>(tokens_.size());
    tokens_.push_back(std::move(token));
    const AddedToken& added = tokens_.back();
    try {
      index_by_content_.emplace(added.content, index);
      index_by_id_.emplace(added.id, index);
      (added.normalized ? normalized_ : raw_).insert(index, tokens_);
    } catch (...) {
      index_by_content_.erase(added.content);
      index_by_id_.erase(added.id);
      tokens_.pop_back();
      throw;
    }
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
    std::size_t text_start = 0;  // where the plain text after the last match starts (tokenizers' start_offset)
    std::size_t pos = 0;
    while (pos < piece.size()) {
      const AddedToken* token = matcher.longest_at(piece, pos, tokens_);
      if (token == nullptr) {
        ++pos;
        continue;
      }
      std::size_t start = pos;
      std::size_t stop = pos + token->content.size();
      pos = stop;  // the next search starts after the token, whatever rstrip swallows
      if (token->single_word && (detail::ends_with_word_character(piece.substr(0, start)) ||
                                 detail::starts_with_word_character(piece.substr(stop)))) {
        continue;
      }
      if (token->lstrip) start = std::max(detail::trailing_white_space_start(piece.substr(0, start)), text_start);
      if (token->rstrip) stop += detail::leading_white_space(piece.substr(stop));
      // A token that starts in white space the previous one's rstrip swallowed
      // has no text before it.
      if (start > text_start) on_text(piece.substr(text_start, start - text_start));
      on_token(*token);
      text_start = stop;
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
