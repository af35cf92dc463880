// What every qlora::Tokenizer must do with hostile input, shared by the
// tokenizer fuzz targets (byte_level_bpe_fuzz, sentencepiece_tokenizer_fuzz).
// A failed invariant aborts, so libFuzzer saves the input.
//
// An input's first byte picks what the rest of it is, by its value mod 4 so
// that every mutation of it lands on some mode; the letters make seed files
// readable: 't' text to encode, 'i' token ids to decode, 'j' a tokenizer
// document to load, 'c' a tokenizer_config.json to load with the stand-in
// model. A target without a use for a mode reads it as text.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <qlora/core/error.hpp>
#include <qlora/data/tokenizer.hpp>

#include "scratch_dir.hpp"

namespace qlora_fuzz {

inline void require(bool condition) {
  if (!condition) std::abort();
}

enum class Mode : std::uint8_t { text, ids, document, config };

inline Mode mode_of(std::uint8_t first_byte) {
  switch (first_byte % 4) {
    case 1:
      return Mode::ids;  // 'i'
    case 2:
      return Mode::document;  // 'j'
    case 3:
      return Mode::config;  // 'c'
    default:
      return Mode::text;  // 't'
  }
}

/// The offset of the first byte of `text` that is not UTF-8, or text.size().
/// Written from Unicode's table 3-7 (shortest form, no surrogates, at most
/// U+10FFFF) apart from the library's validator, so that the tokenizers' gate
/// is checked against a second reading.
inline std::size_t first_invalid_utf8(std::string_view text) {
  std::size_t pos = 0;
  while (pos < text.size()) {
    const auto lead = static_cast<unsigned char>(text[pos]);
    // 0xxxxxxx, 110xxxxx, 1110xxxx, 11110xxx; anything else cannot start a character.
    const std::size_t length = lead < 0x80           ? 1
                               : lead >> 5 == 0x6u   ? 2
                               : lead >> 4 == 0xEu   ? 3
                               : lead >> 3 == 0x1Eu  ? 4
                                                     : 0;
    if (length == 0 || text.size() - pos < length) return pos;
    char32_t code_point = length == 1 ? lead : lead & (0xFFu >> (length + 1));
    for (std::size_t k = 1; k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[pos + k]);
      if (next >> 6 != 0x2) return pos;
      code_point = code_point << 6 | (next & 0x3Fu);
    }
    const char32_t shortest_from[] = {0, 0, 0x80, 0x800, 0x10000};
    if (code_point < shortest_from[length] || code_point > 0x10FFFF || (code_point >= 0xD800 && code_point <= 0xDFFF)) {
      return pos;
    }
    pos += length;
  }
  return text.size();
}

/// Whether `message` names byte offset `offset` ("offset 7", not "offset 70").
inline bool names_offset(std::string_view message, std::size_t offset) {
  const std::string needle = "offset " + std::to_string(offset);
  for (std::size_t at = message.find(needle); at != std::string_view::npos; at = message.find(needle, at + 1)) {
    const std::size_t end = at + needle.size();
    if (end == message.size() || message[end] < '0' || message[end] > '9') return true;
  }
  return false;
}

/// What an exact round trip needs of `tokenizer`'s added tokens, for the
/// start-up checks of a stand-in: each decodes to its own content and leaves
/// the white space around it alone (no lstrip, rstrip or single_word).
template <qlora::Tokenizer T>
void require_plain_added_tokens(const T& tokenizer) {
  for (const qlora::AddedToken& token : tokenizer.added_tokens().tokens()) {
    const qlora::TokenId id[] = {token.id};
    require(tokenizer.decode(id, false) == token.content && !token.lstrip && !token.rstrip && !token.single_word);
  }
}

/// A stand-in tokenizer, loaded once, with what the checks need to know
/// about each of its ids (the vocabulary is small).
template <qlora::Tokenizer T>
struct Subject {
  enum class Id : std::uint8_t {
    invalid,  // decode refuses it: a gap between the model's ids and the added ones
    kept,     // decode(ids, skip_special = true) keeps it
    skipped,  // ... leaves it out: a special token
  };

  explicit Subject(T loaded) : tokenizer(std::move(loaded)) {
    for (std::size_t id = 0; id < tokenizer.vocab_size(); ++id) {
      const qlora::TokenId one[] = {static_cast<qlora::TokenId>(id)};
      try {
        const bool dropped = tokenizer.decode(one, true).empty() && !tokenizer.decode(one, false).empty();
        ids.push_back(dropped ? Id::skipped : Id::kept);
      } catch (const qlora::Error& e) {
        require(e.code() == "InvalidTokenId");
        ids.push_back(Id::invalid);
      }
    }
  }

  [[nodiscard]] Id kind(qlora::TokenId id) const {
    return id >= 0 && static_cast<std::size_t>(id) < ids.size() ? ids[static_cast<std::size_t>(id)] : Id::invalid;
  }

  T tokenizer;
  std::vector<Id> ids;
};

/// Decodes `ids` (all valid): the text is UTF-8 (broken byte sequences become
/// U+FFFD), skipping special tokens is the same as leaving them out, and
/// decoding is deterministic.
template <qlora::Tokenizer T>
std::string check_decode(const Subject<T>& subject, std::span<const qlora::TokenId> ids) {
  const T& tokenizer = subject.tokenizer;
  std::string text = tokenizer.decode(ids, false);
  require(first_invalid_utf8(text) == text.size());
  std::vector<qlora::TokenId> kept;
  for (const qlora::TokenId id : ids) {
    if (subject.kind(id) == Subject<T>::Id::kept) kept.push_back(id);
  }
  require(tokenizer.decode(ids, true) == tokenizer.decode(kept, false));
  require(tokenizer.decode(ids, false) == text);
  return text;
}

/// Encodes `text`: invalid UTF-8 must be Error("InvalidUtf8") naming the
/// offset of the first bad byte; any other error is a bug when
/// `valid_always_encodes` (a vocabulary that covers every byte). What encodes
/// gives ids of the vocabulary, the same each time, and encode_into appends
/// them after what the vector held. Returns the ids, or nothing when refused.
template <qlora::Tokenizer T>
std::optional<std::vector<qlora::TokenId>> check_encode(const T& tokenizer, std::string_view text,
                                                        bool valid_always_encodes) {
  const std::size_t invalid_at = first_invalid_utf8(text);
  std::vector<qlora::TokenId> ids;
  try {
    ids = tokenizer.encode(text);
  } catch (const qlora::Error& e) {
    if (invalid_at != text.size()) {
      require(e.code() == "InvalidUtf8" && names_offset(e.message(), invalid_at));
    } else {
      require(!valid_always_encodes);
    }
    return std::nullopt;
  }
  require(invalid_at == text.size());
  for (const qlora::TokenId id : ids) require(id >= 0 && static_cast<std::size_t>(id) < tokenizer.vocab_size());
  std::vector<qlora::TokenId> appended = {-1};
  tokenizer.encode_into(text, appended);
  require(appended.front() == -1 && std::equal(ids.begin(), ids.end(), appended.begin() + 1, appended.end()));
  return ids;
}

/// Text through a stand-in tokenizer: check_encode, check_decode, and
/// decode(encode(text)) == expected_decode(text), the tokenizer's round trip.
template <qlora::Tokenizer T, class ExpectedDecode>
void check_text(const Subject<T>& subject, std::string_view text, ExpectedDecode&& expected_decode) {
  const auto ids = check_encode(subject.tokenizer, text, true);
  if (ids) require(check_decode(subject, *ids) == expected_decode(text));
}

/// Bytes as token ids, two bytes each (little-endian), spread over the
/// vocabulary and a few ids past both of its ends. A sequence with an id
/// outside the vocabulary must be Error("InvalidTokenId"), any other must
/// decode (check_decode), and what it decodes to is text (check_text).
template <qlora::Tokenizer T, class ExpectedDecode>
void check_ids(const Subject<T>& subject, std::string_view bytes, ExpectedDecode&& expected_decode) {
  constexpr long margin = 4;
  const long range = static_cast<long>(subject.ids.size()) + 2 * margin;
  std::vector<qlora::TokenId> ids;
  bool invalid = false;
  for (std::size_t i = 0; i + 1 < bytes.size(); i += 2) {
    const unsigned word = static_cast<unsigned char>(bytes[i]) | static_cast<unsigned char>(bytes[i + 1]) << 8;
    const auto id = static_cast<qlora::TokenId>(static_cast<long>(word) % range - margin);
    invalid = invalid || subject.kind(id) == Subject<T>::Id::invalid;
    ids.push_back(id);
  }
  std::string text;
  try {
    text = check_decode(subject, ids);
  } catch (const qlora::Error& e) {
    require(invalid && e.code() == "InvalidTokenId");
    return;
  }
  require(!invalid);
  check_text(subject, text, expected_decode);
}

/// A tokenizer loaded from fuzzed files: its added tokens are found by
/// content and by id, its BOS/EOS/PAD/UNK are ids of the vocabulary, and
/// `probe` (text, maybe not UTF-8) encodes or is refused with a qlora::Error;
/// what encodes decodes to UTF-8. (No round trip: such a tokenizer may map
/// text to an unknown token, or strip the white space around an added one.)
template <qlora::Tokenizer T>
void check_loaded(const T& tokenizer, std::string_view probe) {
  for (const qlora::AddedToken& token : tokenizer.added_tokens().tokens()) {
    require(tokenizer.token_to_id(token.content) == token.id && tokenizer.id_to_token(token.id) == token.content);
    require(static_cast<std::size_t>(token.id) < tokenizer.vocab_size());
  }
  const qlora::SpecialTokenIds special = tokenizer.special_ids();
  for (const std::optional<qlora::TokenId>& id : {special.bos, special.eos, special.pad, special.unk}) {
    if (id) (void)tokenizer.id_to_token(*id);  // an id outside the vocabulary throws, and that aborts the run
  }
  const auto ids = check_encode(tokenizer, probe, false);
  if (!ids) return;
  for (const bool skip_special : {false, true}) {
    const std::string text = tokenizer.decode(*ids, skip_special);
    require(first_invalid_utf8(text) == text.size());
  }
}

/// `json` as the tokenizer_config.json of `dir`, which holds the model file,
/// through T::from_pretrained: it loads or is refused with a qlora::Error, and
/// a loaded tokenizer keeps check_loaded's invariants with `json` as the probe.
template <qlora::Tokenizer T>
void check_config(const ScratchDir& dir, std::string_view json) {
  dir.write("tokenizer_config.json", json);
  std::optional<T> tokenizer;
  try {
    tokenizer.emplace(T::from_pretrained(dir.path()));
  } catch (const qlora::Error&) {
    return;
  }
  check_loaded(*tokenizer, json);
}

}  // namespace qlora_fuzz
