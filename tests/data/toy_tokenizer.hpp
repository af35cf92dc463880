// ToyTokenizer: a deterministic tokenizer that satisfies qlora::Tokenizer, for
// data tests that need exact ids without a real model. It is the C++ twin of
// ToyTokenizer in tests/reference/chat_templates.py (the fixtures the data
// tests compare against were made with that one):
//   - ids 0..9 are reserved: <pad> 0, <s> 1 (BOS), </s> 2 (EOS), <unk> 3,
//     <reserved_4>..<reserved_9>;
//   - every UTF-8 byte b is id 10 + b, spelled "<0xHH>" (as SentencePiece's
//     byte fallback spells bytes);
//   - added tokens get the next ids (266, 267, ...) and are split out of text
//     first: at each position the longest added token that starts there wins,
//     as Hugging Face's added-token trie does.
#pragma once

#include <algorithm>
#include <cstddef>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/tokenizer.hpp>
#include <qlora/io/detail/utf8.hpp>

namespace qlora::test {

class ToyTokenizer {
 public:
  static constexpr TokenId pad_id = 0;
  static constexpr TokenId bos_id = 1;
  static constexpr TokenId eos_id = 2;
  static constexpr TokenId unk_id = 3;
  static constexpr TokenId byte_offset = 10;
  static constexpr TokenId reserved_count = 10;

  /// The tokenizer with `added` registered (special) in order from id 266.
  explicit ToyTokenizer(std::span<const std::string> added = {},
                        SpecialTokenIds specials = {.bos = bos_id, .eos = eos_id, .pad = pad_id, .unk = unk_id})
      : specials_(specials) {
    for (const std::string_view name : {"<pad>", "<s>", "</s>", "<unk>"}) add_vocabulary_entry(std::string(name));
    for (TokenId id = 4; id < reserved_count; ++id) add_vocabulary_entry(fmt::format("<reserved_{}>", id));
    for (unsigned byte = 0; byte < 256; ++byte) add_vocabulary_entry(fmt::format("<0x{:02X}>", byte));
    add_tokens(added, AddedTokenKind::special);
  }

  void encode_into(std::string_view text, std::vector<TokenId>& out) const {
    std::size_t pos = 0;
    while (pos < text.size()) {
      const Added* match = nullptr;
      for (const Added& added : added_) {
        if (text.substr(pos).starts_with(added.content) &&
            (match == nullptr || added.content.size() > match->content.size())) {
          match = &added;
        }
      }
      if (match != nullptr) {
        out.push_back(match->id);
        pos += match->content.size();
      } else {
        out.push_back(byte_offset + static_cast<unsigned char>(text[pos]));
        ++pos;
      }
    }
  }

  [[nodiscard]] std::vector<TokenId> encode(std::string_view text) const {
    std::vector<TokenId> ids;
    encode_into(text, ids);
    return ids;
  }

  /// Bytes that are not valid UTF-8 become U+FFFD, one per maximal ill-formed
  /// subpart, as Python's bytes.decode(errors="replace") does.
  [[nodiscard]] std::string decode(std::span<const TokenId> ids, bool skip_special) const {
    std::string bytes;
    for (const TokenId id : ids) {
      if (id >= byte_offset && id < byte_offset + 256) {
        bytes.push_back(static_cast<char>(id - byte_offset));
      } else if (!skip_special || !is_special(id)) {
        bytes += id_to_token(id);
      }
    }
    return replace_invalid_utf8(bytes);
  }

  [[nodiscard]] std::optional<TokenId> token_to_id(std::string_view token) const {
    const auto found = ids_.find(token);
    if (found == ids_.end()) return std::nullopt;
    return found->second;
  }

  [[nodiscard]] std::string id_to_token(TokenId id) const {
    check(id >= 0 && static_cast<std::size_t>(id) < vocabulary_.size(), "InvalidTokenId",
          "token id {} is out of range [0, {})", id, vocabulary_.size());
    return vocabulary_[static_cast<std::size_t>(id)];
  }

  [[nodiscard]] std::size_t vocab_size() const noexcept { return vocabulary_.size(); }
  [[nodiscard]] SpecialTokenIds special_ids() const noexcept { return specials_; }

  std::size_t add_tokens(std::span<const std::string> tokens, AddedTokenKind kind) {
    std::size_t new_ids = 0;
    for (const std::string& token : tokens) {
      std::optional<TokenId> id = token_to_id(token);
      if (!id) {
        id = add_vocabulary_entry(token);
        ++new_ids;
      }
      const bool registered =
          std::any_of(added_.begin(), added_.end(), [&](const Added& a) { return a.content == token; });
      if (!registered) added_.push_back({token, *id, kind == AddedTokenKind::special});
    }
    return new_ids;
  }

  void set_special_token(SpecialRole role, std::string_view token) {
    const std::optional<TokenId> id = token_to_id(token);
    check(id.has_value(), "UnknownSpecialToken", "{:?} is not in the vocabulary", token);
    switch (role) {
      case SpecialRole::bos:
        specials_.bos = id;
        break;
      case SpecialRole::eos:
        specials_.eos = id;
        break;
      case SpecialRole::pad:
        specials_.pad = id;
        break;
      case SpecialRole::unk:
        specials_.unk = id;
        break;
    }
  }

 private:
  struct Added {
    std::string content;
    TokenId id;
    bool special;
  };

  TokenId add_vocabulary_entry(std::string token) {
    const auto id = static_cast<TokenId>(vocabulary_.size());
    ids_.emplace(token, id);
    vocabulary_.push_back(std::move(token));
    return id;
  }

  [[nodiscard]] bool is_special(TokenId id) const {
    if (id < reserved_count) return true;
    return std::any_of(added_.begin(), added_.end(), [&](const Added& a) { return a.id == id && a.special; });
  }

  static std::string replace_invalid_utf8(std::string_view bytes) {
    std::string text;
    while (!bytes.empty()) {
      const std::size_t valid = detail::utf8_valid_prefix(bytes);
      text.append(bytes.substr(0, valid));
      bytes.remove_prefix(valid);
      if (bytes.empty()) break;
      text.append("\xEF\xBF\xBD");
      bytes.remove_prefix(ill_formed_length(bytes));
    }
    return text;
  }

  /// Length of the maximal ill-formed subpart at the start of `bytes` (Unicode
  /// 15, 3.9 U+FFFD substitution): a lead byte and the continuation bytes
  /// that could still have completed it, or one byte.
  static std::size_t ill_formed_length(std::string_view bytes) {
    const auto lead = static_cast<unsigned char>(bytes[0]);
    const std::size_t length = lead >= 0xC2 && lead <= 0xDF   ? 2
                               : lead >= 0xE0 && lead <= 0xEF ? 3
                               : lead >= 0xF0 && lead <= 0xF4 ? 4
                                                              : 1;
    const unsigned low = lead == 0xE0 ? 0xA0 : lead == 0xF0 ? 0x90 : 0x80;
    const unsigned high = lead == 0xED ? 0x9F : lead == 0xF4 ? 0x8F : 0xBF;
    std::size_t taken = 1;
    while (taken < length && taken < bytes.size()) {
      const auto next = static_cast<unsigned char>(bytes[taken]);
      if (taken == 1 ? (next < low || next > high) : (next & 0xC0u) != 0x80u) break;
      ++taken;
    }
    return taken;
  }

  std::vector<std::string> vocabulary_;
  std::map<std::string, TokenId, std::less<>> ids_;
  std::vector<Added> added_;
  SpecialTokenIds specials_;
};

static_assert(Tokenizer<ToyTokenizer>);

}  // namespace qlora::test
