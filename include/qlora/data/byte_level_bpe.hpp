// ByteLevelBpeTokenizer: the byte-level BPE tokenizers of GPT-2, CodeGen and
// Phi-2 (and Llama-3 / Qwen2-style ones whose pre-tokenizer is a Split regex
// before ByteLevel), read from a Hugging Face tokenizer.json as it is, giving
// the ids Hugging Face tokenizers and transformers give.
//
// encode(text) = tokenizers' encode(text, add_special_tokens=False):
//   1. added tokens are split out first (AddedVocabulary) and map to their ids;
//   2. each other piece is pre-tokenized (detail/byte_level_pre_tokenizer.hpp);
//   3. each pre-token's bytes are merged by rank (detail/bpe_merges.hpp), with
//      a cache so that a repeated word costs one lookup.
// decode = tokenizers' decode: ids to token strings (added tokens first),
// special ones dropped on request, then ByteLevel's decoder (bytes, then
// from_utf8_lossy). transformers 4.x's decode then applies
// clean_up_tokenization_spaces when the config asks (Phi-2's does), an
// English-punctuation heuristic ("a != b" -> "a!= b") that is not reproduced;
// transformers 5 ignores that setting for BPE tokenizers ("Ignoring
// clean_up_tokenization_spaces=True for BPE tokenizer") and decodes as qlora.
//
// What differs from Hugging Face, on purpose: text that is not UTF-8 is
// Error("InvalidUtf8") (Python cannot even hold it); an unknown id in decode is
// Error("InvalidTokenId") (tokenizers skips it); a byte without a token and no
// unk_token is Error("UntokenizableText") (tokenizers drops it). Settings this
// class does not implement (a normalizer, dropout, byte_fallback, subword
// prefixes, other pre-tokenizers or decoders, another model type) are
// Error("UnsupportedTokenizer") at load time, never a silent difference.
// A file that is not a tokenizer.json, or whose parts disagree, is
// Error("InvalidTokenizer") naming the file and the key.
//
// from_pretrained also reads tokenizer_config.json and registers, as
// transformers' PreTrainedTokenizerFast does, its added_tokens_decoder entries
// and its special tokens (BOS/EOS/UNK/SEP/PAD/CLS/MASK and
// additional_special_tokens) that tokenizer.json lacks.
//
// Tokens added at run time follow transformers: add_tokens gives new tokens
// the next ids (normal ones normalized=true, special ones normalized=false and
// skipped by decode(ids, true)); a token already in the model vocabulary keeps
// its id and is split out from then on; one already added is left as it is
// (detail/added_token_table.hpp; a call that throws changes nothing).
//
// Thread safety: const members may run concurrently (the word cache locks);
// add_tokens and set_special_token need exclusive access.
#pragma once

#include <cstddef>
#include <cstdint>
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

#include <qlora/core/error.hpp>
#include <qlora/data/added_vocabulary.hpp>
#include <qlora/data/detail/added_token_table.hpp>
#include <qlora/data/detail/bpe_merges.hpp>
#include <qlora/data/detail/byte_level_bpe_model.hpp>
#include <qlora/data/detail/byte_level_pre_tokenizer.hpp>
#include <qlora/data/detail/byte_unicode.hpp>
#include <qlora/data/detail/tokenizer_json.hpp>
#include <qlora/data/detail/utf8_lossy.hpp>
#include <qlora/data/tokenizer.hpp>
#include <qlora/data/tokenizer_config.hpp>
#include <qlora/io/detail/json.hpp>
#include <qlora/io/mapped_file.hpp>

namespace qlora {

class ByteLevelBpeTokenizer {
 public:
  /// Reads a tokenizer.json.
  static ByteLevelBpeTokenizer from_file(const std::filesystem::path& path) {
    const MappedFile file(path);
    return from_json(std::string_view(reinterpret_cast<const char*>(file.bytes().data()), file.bytes().size()),
                     path.string());
  }

  /// Parses the text of a tokenizer.json; `source_name` names it in errors.
  static ByteLevelBpeTokenizer from_json(std::string_view text, std::string_view source_name) {
    const detail::Json document = detail::parse_json_rejecting_duplicates(
        text, "InvalidTokenizer", fmt::format("{} (expected a Hugging Face tokenizer.json)", source_name));
    const detail::TokenizerJson root(source_name, document, "InvalidTokenizer");
    if (!document.is_object()) root.fail("a Hugging Face tokenizer.json (a JSON object)");
    const std::optional<detail::TokenizerJson> model = root.find("model");
    if (!model || !model->json().is_object()) root.fail("a Hugging Face tokenizer.json, with a \"model\" object");
    if (const std::string type = model->type(); type != "BPE") {
      model->at("type").unsupported(fmt::format("model type \"{}\" is not supported (expected BPE)", type));
    }
    if (const auto normalizer = root.find("normalizer"); normalizer && !normalizer->is_null()) {
      normalizer->unsupported(
          fmt::format("normalizer \"{}\" is not supported (byte-level BPE has none)", normalizer->type()));
    }
    check_byte_level_decoder(root);
    // "post_processor" only adds BOS/EOS when special tokens are requested,
    // which encode never does; "truncation" and "padding" are per-call
    // settings that transformers overrides the same way. All three are ignored.
    ByteLevelBpeTokenizer tokenizer(read_model(*model),
                                    detail::ByteLevelPreTokenizer::from_json(optional_member(root, "pre_tokenizer")));
    tokenizer.read_added_tokens(root);
    if (const auto unk = model->find("unk_token"); unk && !unk->is_null()) {
      tokenizer.set_special_token(SpecialRole::unk, unk->string());
    }
    return tokenizer;
  }

  /// Reads `dir`/tokenizer.json, then, when present, `dir`/tokenizer_config.json
  /// for its added_tokens_decoder and special tokens, as transformers'
  /// PreTrainedTokenizerFast does (apply_config).
  static ByteLevelBpeTokenizer from_pretrained(const std::filesystem::path& dir) {
    ByteLevelBpeTokenizer tokenizer = from_file(dir / "tokenizer.json");
    const std::filesystem::path config_path = dir / "tokenizer_config.json";
    // Only "no such file" means "no config": one that cannot be examined or
    // read is read_tokenizer_config's Error("IoError") naming it.
    std::error_code status_error;
    if (std::filesystem::status(config_path, status_error).type() != std::filesystem::file_type::not_found) {
      tokenizer.apply_config(read_tokenizer_config(config_path), config_path.string());
    }
    return tokenizer;
  }

  /// Appends the ids of `text` (valid UTF-8) to `out`; no BOS/EOS.
  void encode_into(std::string_view text, std::vector<TokenId>& out) const {
    detail::require_utf8_text(text);
    tokens_.vocabulary().split(
        text,
        [&](std::string_view piece) {
          pre_tokenizer_.split(piece, [&](std::string_view word) { model_->encode_word(word, out); });
        },
        [&](const AddedToken& token) { out.push_back(token.id); });
  }

  [[nodiscard]] std::vector<TokenId> encode(std::string_view text) const {
    std::vector<TokenId> ids;
    ids.reserve(text.size() / 3);
    encode_into(text, ids);
    return ids;
  }

  /// The text of `ids`; `skip_special` leaves out added tokens flagged
  /// special (and vocabulary tokens spelled like one), as tokenizers does.
  /// An id that is no token is Error("InvalidTokenId").
  [[nodiscard]] std::string decode(std::span<const TokenId> ids, bool skip_special = false) const {
    std::string bytes;
    for (const TokenId id : ids) {
      if (const AddedToken* added = tokens_.token_at(id)) {
        if (!(skip_special && added->special)) detail::append_byte_level_decoded(bytes, added->content);
        continue;
      }
      const std::string& token = model_->vocabulary().token(id);
      if (skip_special && is_special_content(token)) continue;
      detail::append_byte_level_decoded(bytes, token);
    }
    return detail::utf8_lossy(std::move(bytes));
  }

  /// The id of a token as the vocabulary spells it (added tokens first).
  [[nodiscard]] std::optional<TokenId> token_to_id(std::string_view token) const {
    if (const std::optional<TokenId> added = tokens_.vocabulary().id_of(token)) return added;
    return model_->vocabulary().id_of(token);
  }

  /// The token with this id as the vocabulary spells it (byte-level: a space is "Ġ").
  /// An id in no vocabulary is Error("InvalidTokenId").
  [[nodiscard]] std::string id_to_token(TokenId id) const {
    if (const AddedToken* added = tokens_.token_at(id)) return added->content;
    return model_->vocabulary().token(id);
  }

  /// Ids in use, added tokens included: transformers' len(tokenizer).
  [[nodiscard]] std::size_t vocab_size() const noexcept { return tokens_.size(); }

  /// The model's own vocabulary, without added tokens beyond it.
  [[nodiscard]] std::size_t model_size() const noexcept { return model_->vocabulary().size(); }

  [[nodiscard]] SpecialTokenIds special_ids() const noexcept { return tokens_.special_ids(); }

  [[nodiscard]] const AddedVocabulary& added_tokens() const noexcept { return tokens_.vocabulary(); }

  /// Adds each token that is not an added token yet, as transformers'
  /// add_tokens (normal: special=false, normalized=true) and
  /// add_special_tokens (special: special=true, normalized=false) do. A token
  /// of the model vocabulary keeps its id; others get the next free id.
  /// Empty strings are skipped, as transformers skips them. Returns what
  /// PreTrainedTokenizerFast.add_tokens returns where the two agree on ids
  /// and flags: how many tokens became added tokens, model tokens included.
  /// (A token already added is left as it is and not counted; transformers'
  /// fast tokenizer re-registers one given other flags, rewriting them, and
  /// counts it.) A token that is not UTF-8 is Error("InvalidUtf8"), and then
  /// none of `tokens` is added.
  std::size_t add_tokens(std::span<const std::string> tokens, AddedTokenKind kind) {
    return tokens_.add_tokens(tokens, kind, ModelTokenIds{this}).registered;
  }

  /// Makes `token` (a vocabulary or added token) the BOS, EOS, PAD or UNK;
  /// an unknown token is Error("UnknownSpecialToken"). As transformers'
  /// `tokenizer.pad_token = ...`, this changes no token's flags.
  void set_special_token(SpecialRole role, std::string_view token) {
    tokens_.set_special(role, token, token_to_id(token));
  }

 private:
  ByteLevelBpeTokenizer(std::shared_ptr<const detail::ByteLevelBpeModel> model,
                        detail::ByteLevelPreTokenizer pre_tokenizer)
      : model_(std::move(model)), pre_tokenizer_(std::move(pre_tokenizer)), tokens_(model_->vocabulary().size()) {}

  /// The id a token of the model vocabulary keeps when it becomes an added
  /// token (added tokens never rename a model id here: tokenizer.json's ids
  /// are checked against the vocabulary).
  [[nodiscard]] std::optional<TokenId> model_token_id(std::string_view content,
                                                      const AddedVocabulary& /*added*/) const {
    return model_->vocabulary().id_of(content);
  }

  /// model_token_id as the callable AddedTokenTable takes.
  struct ModelTokenIds {
    const ByteLevelBpeTokenizer* tokenizer;
    std::optional<TokenId> operator()(std::string_view content, const AddedVocabulary& added) const {
      return tokenizer->model_token_id(content, added);
    }
  };

  /// Member `name` of `object`, or a JSON null standing for it when absent.
  static detail::TokenizerJson optional_member(const detail::TokenizerJson& object, std::string_view name) {
    static const detail::Json null_value;
    if (std::optional<detail::TokenizerJson> member = object.find(name)) return *std::move(member);
    return object.other(std::string(name), null_value);
  }

  /// The decoder must be ByteLevel: the model's tokens are byte-level spellings.
  static void check_byte_level_decoder(const detail::TokenizerJson& root) {
    const detail::TokenizerJson decoder = optional_member(root, "decoder");
    if (decoder.is_null()) decoder.unsupported("no decoder; byte-level BPE needs the ByteLevel decoder");
    if (const std::string type = decoder.type(); type != "ByteLevel") {
      decoder.unsupported(fmt::format("decoder \"{}\" is not supported (expected ByteLevel)", type));
    }
  }

  /// tokenizer.json's "model": vocabulary, merges (both spellings) and options.
  static std::shared_ptr<const detail::ByteLevelBpeModel> read_model(const detail::TokenizerJson& model) {
    if (const auto dropout = model.find("dropout");
        dropout && !dropout->is_null() && !(dropout->json().is_number() && dropout->json().get<double>() == 0.0)) {
      dropout->unsupported("BPE dropout is not supported (training-time randomness; expected null)");
    }
    if (model.flag("byte_fallback", false)) model.at("byte_fallback").unsupported("byte_fallback is not supported");
    for (const char* affix : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      // GPT-2's converted files (Phi-2's among them) write "" for "none".
      if (!model.optional_string(affix).empty()) model.at(affix).unsupported(fmt::format("{} is not supported", affix));
    }
    detail::BpeVocabulary vocabulary = read_vocabulary(model.at("vocab"));
    detail::BpeMerges merges = read_merges(model.at("merges"), vocabulary);
    detail::BpeOptions options{.unk = std::nullopt,
                               .fuse_unk = model.flag("fuse_unk", false),
                               .ignore_merges = model.flag("ignore_merges", false)};
    if (const auto unk = model.find("unk_token"); unk && !unk->is_null()) {
      options.unk = vocabulary.id_of(unk->string());
      if (!options.unk) unk->fail("a token of the vocabulary");
    }
    return std::make_shared<const detail::ByteLevelBpeModel>(std::move(vocabulary), std::move(merges), options);
  }

  /// "vocab": {token: id}, the ids exactly 0..n-1. (Key paths for messages
  /// are only built on failure: Phi-2 has 50,000 entries.)
  static detail::BpeVocabulary read_vocabulary(const detail::TokenizerJson& vocab) {
    if (!vocab.json().is_object()) vocab.fail("an object {\"token\": id, ...}");
    std::vector<std::string> tokens(vocab.json().size());
    std::vector<bool> seen(tokens.size());
    for (auto it = vocab.json().begin(); it != vocab.json().end(); ++it) {
      const detail::Json& value = it.value();
      if (!value.is_number_unsigned() || value.get<std::uint64_t>() >= tokens.size() ||
          seen[value.get<std::size_t>()]) {
        refuse_vocabulary_entry(vocab, it.key(), value, tokens);
      }
      seen[value.get<std::size_t>()] = true;
      tokens[value.get<std::size_t>()] = it.key();
    }
    return detail::BpeVocabulary(std::move(tokens));
  }

  /// Why vocabulary entry `token` with id `value` cannot be read.
  [[noreturn]] static void refuse_vocabulary_entry(const detail::TokenizerJson& vocab, const std::string& token,
                                                   const detail::Json& value, const std::vector<std::string>& tokens) {
    const detail::TokenizerJson entry = vocab.other(fmt::format("{}[{:?}]", vocab.path(), token), value);
    const auto id = static_cast<std::size_t>(entry.id());
    if (id >= tokens.size()) {
      entry.unsupported(
          fmt::format("id {} leaves a gap: only vocabularies with ids 0 to {} (the number of "
                      "entries less one) are supported",
                      id, tokens.size() - 1));
    }
    entry.fail(fmt::format("an id of its own (id {} is also {:?})", id, tokens[id]));
  }

  /// "merges": ["a b", ...] (before tokenizers 0.20) or [["a", "b"], ...];
  /// the rank of a merge is its place in the list.
  static detail::BpeMerges read_merges(const detail::TokenizerJson& merges, const detail::BpeVocabulary& vocabulary) {
    const detail::Json& list = merges.json();
    if (!list.is_array()) merges.fail("an array of merges");
    const bool legacy = !list.empty() && list.front().is_string();
    detail::BpeMerges table(list.size());
    std::uint32_t rank = 0;
    std::string merged;
    for (std::size_t index = 0; index < list.size(); ++index) {
      const detail::Json& merge = list[index];
      std::string_view left;
      std::string_view right;
      if (legacy) {
        if (!merge.is_string()) merges.element(index).fail("a merge \"left right\", as the ones before it");
        const std::string_view line = merge.get_ref<const std::string&>();
        if (line.starts_with("#version")) continue;  // a header line of merges.txt, skipped as tokenizers does
        const std::size_t space = line.find(' ');
        if (space == std::string_view::npos || line.find(' ', space + 1) != std::string_view::npos) {
          merges.element(index).fail("a merge \"left right\" (two tokens, one space)");
        }
        left = line.substr(0, space);
        right = line.substr(space + 1);
      } else {
        if (!merge.is_array() || merge.size() != 2 || !merge[0].is_string() || !merge[1].is_string()) {
          merges.element(index).fail("a merge [\"left\", \"right\"]");
        }
        left = merge[0].get_ref<const std::string&>();
        right = merge[1].get_ref<const std::string&>();
      }
      merged.assign(left).append(right);
      const auto id_of = [&](std::string_view token) {
        const std::optional<TokenId> id = vocabulary.id_of(token);
        if (!id) {
          merges.element(index).fail(
              fmt::format("a merge of vocabulary tokens whose result is one too ({:?} is not)", token));
        }
        return *id;
      };
      table.set(id_of(left), id_of(right), {rank++, id_of(merged)});
    }
    return table;
  }

  /// tokenizer.json's "added_tokens". tokenizers re-adds them in order,
  /// ignoring the ids written (a token of the model keeps its id, others get
  /// the next one) and only warns when they differ: a file whose ids differ is
  /// refused here instead.
  void read_added_tokens(const detail::TokenizerJson& root) {
    const detail::TokenizerJson tokens = optional_member(root, "added_tokens");
    if (tokens.is_null()) return;
    if (!tokens.json().is_array()) tokens.fail("an array of added tokens");
    for (std::size_t index = 0; index < tokens.json().size(); ++index) {
      const detail::TokenizerJson entry = tokens.element(index);
      AddedToken token = entry.added_token(detail::AddedTokenLayout::tokenizer_json);
      const TokenId expected = token_to_id(token.content).value_or(tokens_.next_id());
      if (token.id != expected) {
        entry.at("id").fail(
            fmt::format("id {}, which tokenizers gives {:?} whatever the file says (its vocabulary "
                        "id, its earlier entry's, or the next free one)",
                        expected, token.content));
      }
      tokens_.add(std::move(token));
    }
  }

  /// tokenizer_config.json as transformers 4.x's PreTrainedTokenizerFast
  /// applies it: the entries of added_tokens_decoder that tokenizer.json
  /// lacks are added (special when the config says so or when they are among
  /// its special tokens), then the special tokens that are no added token yet
  /// are added (TokenizerConfig::special_tokens(), in that order), then the
  /// BOS/EOS/UNK/PAD roles are set. Where the two files disagree on a token
  /// (its id, or its flags, which transformers would rewrite), the tokenizer
  /// is refused. (transformers 5 no longer marks added_tokens_decoder entries
  /// special for being listed, nor keeps the flags of an AddedToken object in
  /// additional_special_tokens; qlora follows 4.x, which XTuner uses.)
  void apply_config(const TokenizerConfig& config, std::string_view source_name) {
    for (AddedToken token : config.added_tokens) {
      if (const std::optional<TokenId> known_id = tokens_.vocabulary().id_of(token.content)) {
        check(*known_id == token.id, "InvalidTokenizer",
              "{}: added_tokens_decoder.{}: {:?} has id {} in tokenizer.json, not {}", source_name, token.id,
              token.content, *known_id, token.id);
        check(same_token(*tokens_.vocabulary().find(*known_id), token), "UnsupportedTokenizer",
              "{}: added_tokens_decoder.{}: token {:?} has other flags than in tokenizer.json; changing an added "
              "token's flags is not supported",
              source_name, token.id, token.content);
        continue;
      }
      token.special = token.special || config.is_special_token(token.content);
      const TokenId expected = model_->vocabulary().id_of(token.content).value_or(tokens_.next_id());
      check(token.id == expected, "InvalidTokenizer",
            "{}: added_tokens_decoder.{}: {:?} would get id {} from tokenizer.json's vocabulary, not {}", source_name,
            token.id, token.content, expected, token.id);
      tokens_.add(std::move(token));
    }
    tokens_.add_special_tokens(config, ModelTokenIds{this},
                               [this](std::string_view content) { return token_to_id(content); });
  }

  static bool same_token(const AddedToken& a, const AddedToken& b) noexcept {
    return a.content == b.content && a.special == b.special && a.single_word == b.single_word && a.lstrip == b.lstrip &&
           a.rstrip == b.rstrip && a.normalized == b.normalized;
  }

  /// Whether a vocabulary token is spelled like a special added token
  /// (tokenizers skips by content).
  [[nodiscard]] bool is_special_content(std::string_view token) const {
    const std::optional<TokenId> id = tokens_.vocabulary().id_of(token);
    return id && tokens_.vocabulary().find(*id)->special;
  }

  std::shared_ptr<const detail::ByteLevelBpeModel> model_;
  detail::ByteLevelPreTokenizer pre_tokenizer_;
  detail::AddedTokenTable tokens_;
};

static_assert(Tokenizer<ByteLevelBpeTokenizer>);

}  // namespace qlora
