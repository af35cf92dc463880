// save_tokenizer_files: a tokenizer folder written back with the tokens a
// run added, as transformers' save_pretrained writes it after add_tokens /
// add_special_tokens — so the adapter (or merged model) a run produces carries
// the vocabulary it was trained with, and transformers, qlora-chat and
// qlora-merge load the same ids.
//
//   * tokenizer.json (fast tokenizers): each added token appended to
//     "added_tokens" with its id and flags;
//   * tokenizer_config.json: each in "added_tokens_decoder" ("<id>": {...}),
//     and the special roles reassigned ("eos_token": "<|im_end|>", ...);
//   * special_tokens_map.json, when the source has one: the same roles
//     reassigned (transformers rewrites it from the current roles; a stale
//     copy would give the old EOS to anything that reads it);
//   * every other tokenizer file (tokenizer.model, vocab.json, merges.txt,
//     added_tokens.json) copied as it is.
// Each file is written atomically. A token already in the source files is
// left as it is.
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/data/tokenizer.hpp>
#include <qlora/io/atomic_file.hpp>
#include <qlora/io/detail/json.hpp>
#include <qlora/io/mapped_file.hpp>

#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>

namespace qlora {

namespace detail {

inline OrderedJson read_tokenizer_json_file(const std::filesystem::path& path) {
  const MappedFile file(path);
  const auto bytes = file.bytes();
  const std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  (void)parse_json_rejecting_duplicates(text, "InvalidTokenizerConfig", path.string());
  OrderedJson document = OrderedJson::parse(text.begin(), text.end());
  check(document.is_object(), "InvalidTokenizerConfig", "{}: expected a JSON object at the top level", path.string());
  return document;
}

inline OrderedJson added_token_entry(const AddedToken& token, bool with_id) {
  OrderedJson entry;
  if (with_id) entry["id"] = token.id;
  entry["content"] = token.content;
  entry["single_word"] = token.single_word;
  entry["lstrip"] = token.lstrip;
  entry["rstrip"] = token.rstrip;
  entry["normalized"] = token.normalized;
  entry["special"] = token.special;
  return entry;
}

inline void write_json_file(const std::filesystem::path& path, const OrderedJson& document) {
  write_file_atomically(path, [&](AtomicFile& file) { file.write(document.dump(2, ' ', false) + "\n"); });
}

}  // namespace detail

/// The files of tokenizer folder `source` written into `destination` (created
/// if needed) with `added` registered and `roles` ("eos_token" → "<|im_end|>",
/// "pad_token" → "<PAD>", ...) set. Errors: IoError, InvalidTokenizerConfig
/// (a source file that is not a JSON object; an added token whose id another
/// entry already holds with other content).
inline void save_tokenizer_files(const std::filesystem::path& source, const std::filesystem::path& destination,
                                 std::span<const AddedToken> added,
                                 const std::map<std::string, std::string>& roles = {}) {
  std::error_code error;
  std::filesystem::create_directories(destination, error);
  check(!error, "IoError", "cannot create {}: {}", destination.string(), error.message());
  for (const char* name : {"tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json"}) {
    if (!std::filesystem::exists(source / name)) continue;
    const MappedFile file(source / name);
    write_file_atomically(destination / name, [&](AtomicFile& out) { out.write(file.bytes()); });
  }
  if (std::filesystem::exists(source / "tokenizer.json")) {
    detail::OrderedJson document = detail::read_tokenizer_json_file(source / "tokenizer.json");
    detail::OrderedJson& list = document["added_tokens"];
    if (list.is_null()) list = detail::OrderedJson::array();
    for (const AddedToken& token : added) {
      bool present = false;
      for (const auto& entry : list) {
        if (entry.value("id", -1) != token.id) continue;
        check(entry.value("content", std::string()) == token.content, "InvalidTokenizerConfig",
              "{}: id {} is already \"{}\", cannot add \"{}\" there", (source / "tokenizer.json").string(), token.id,
              entry.value("content", std::string()), token.content);
        present = true;
      }
      if (!present) list.push_back(detail::added_token_entry(token, true));
    }
    detail::write_json_file(destination / "tokenizer.json", document);
  }
  detail::OrderedJson config = std::filesystem::exists(source / "tokenizer_config.json")
                                   ? detail::read_tokenizer_json_file(source / "tokenizer_config.json")
                                   : detail::OrderedJson::object();
  detail::OrderedJson& decoder = config["added_tokens_decoder"];
  if (decoder.is_null()) decoder = detail::OrderedJson::object();
  for (const AddedToken& token : added) {
    const std::string key = std::to_string(token.id);
    if (!decoder.contains(key)) decoder[key] = detail::added_token_entry(token, false);
  }
  for (const auto& [role, content] : roles) config[role] = content;
  detail::write_json_file(destination / "tokenizer_config.json", config);
  if (std::filesystem::exists(source / "special_tokens_map.json")) {
    detail::OrderedJson map = detail::read_tokenizer_json_file(source / "special_tokens_map.json");
    for (const auto& [role, content] : roles) {
      // An entry is the token's text or an AddedToken object {"content": ..., flags}.
      if (map.contains(role) && map[role].is_object()) {
        map[role]["content"] = content;
      } else {
        map[role] = content;
      }
    }
    detail::write_json_file(destination / "special_tokens_map.json", map);
  }
}

}  // namespace qlora
