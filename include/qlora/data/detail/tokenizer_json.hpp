// IWYU pragma: private
// Reading the JSON files of a Hugging Face tokenizer (tokenizer.json,
// tokenizer_config.json): one JSON value with the file and the path of keys
// that lead to it, so that every failure names the file and the key. A value
// of the wrong type is an error with the file's own code ("InvalidTokenizer"
// for tokenizer.json, "InvalidTokenizerConfig" for tokenizer_config.json); a
// setting qlora does not implement is Error("UnsupportedTokenizer"), so that a
// tokenizer is refused rather than silently run differently from Hugging
// Face's.
//
// Both files spell added tokens as the same object, read by added_token():
// "content" and the flags "special", "single_word", "lstrip", "rstrip",
// "normalized" (tokenizer.json's entries add their "id"; tokenizer_config.json's
// may carry the "__type": "AddedToken" marker of older transformers). A missing
// flag takes tokenizers' default (false; normalized = !special), as
// transformers' AddedToken(**dict) does (tokenizers' own reader would refuse
// the file; its writer always writes every flag). A field of any other name is
// refused in both files: transformers raises TypeError for one, and although
// tokenizers' reader ignores it, a field qlora does not know could change how
// the token matches, which must not pass silently (tokenizers' writer never
// writes one, so no file it wrote is refused).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/tokenizer.hpp>
#include <qlora/io/detail/json.hpp>

namespace qlora::detail {

/// Where an AddedToken object comes from, which decides its extra fields.
enum class AddedTokenLayout : std::uint8_t {
  tokenizer_json,    // an "added_tokens" entry: with its "id"
  tokenizer_config,  // an added_tokens_decoder value or a special token: no id, maybe "__type"
};

class TokenizerJson {
 public:
  /// The whole `document` of `file`. `error_code` (a string literal) is the
  /// code of Error for a value that is not what the file has there.
  TokenizerJson(std::string_view file, const Json& document, const char* error_code)
      : TokenizerJson(file, std::string(), document, error_code) {}

  [[nodiscard]] const Json& json() const noexcept { return *value_; }
  [[nodiscard]] const std::string& path() const noexcept { return path_; }
  [[nodiscard]] bool is_null() const noexcept { return value_->is_null(); }

  /// Where this value is, for messages: `file: key "path"` (the file alone
  /// for the document itself).
  [[nodiscard]] std::string location() const {
    return path_.empty() ? std::string(file_) : fmt::format("{}: key \"{}\"", file_, path_);
  }

  /// `value`, reached by `path` in the same file (for values not reached
  /// through find, at or element).
  [[nodiscard]] TokenizerJson other(std::string path, const Json& value) const {
    return {file_, std::move(path), value, error_code_};
  }

  /// Error(error_code): this value is not what the file has here.
  [[noreturn]] void fail(std::string_view expected) const {
    std::string found = value_->dump();
    if (found.size() > 80) found = found.substr(0, 77) + "...";
    throw Error(error_code_, fmt::format("{}: expected {}, found {}", location(), expected, found));
  }

  /// Error("UnsupportedTokenizer"): a valid setting that qlora does not implement.
  [[noreturn]] void unsupported(std::string_view what) const {
    throw Error("UnsupportedTokenizer", fmt::format("{}: {}", location(), what));
  }

  /// Member `name` of this object, or nullopt when it is absent.
  [[nodiscard]] std::optional<TokenizerJson> find(std::string_view name) const {
    if (!value_->is_object()) fail("an object");
    const auto found = value_->find(name);
    if (found == value_->end()) return std::nullopt;
    return other(path_.empty() ? std::string(name) : fmt::format("{}.{}", path_, name), *found);
  }

  /// Member `name` of this object, which must be there.
  [[nodiscard]] TokenizerJson at(std::string_view name) const {
    std::optional<TokenizerJson> member = find(name);
    if (!member) fail(fmt::format("an object with a \"{}\" member", name));
    return *std::move(member);
  }

  /// Element `index` of this array (the caller checks the bounds).
  [[nodiscard]] TokenizerJson element(std::size_t index) const {
    return other(fmt::format("{}[{}]", path_, index), (*value_)[index]);
  }

  [[nodiscard]] std::string string() const {
    if (!value_->is_string()) fail("a string");
    return value_->get<std::string>();
  }

  [[nodiscard]] bool boolean() const {
    if (!value_->is_boolean()) fail("true or false");
    return value_->get<bool>();
  }

  /// Boolean member `name`; `absent` when it is missing or null.
  [[nodiscard]] bool flag(std::string_view name, bool absent) const {
    const std::optional<TokenizerJson> member = find(name);
    return member && !member->is_null() ? member->boolean() : absent;
  }

  /// Member `name` as a string, "" when it is missing or null.
  [[nodiscard]] std::string optional_string(std::string_view name) const {
    const std::optional<TokenizerJson> member = find(name);
    return member && !member->is_null() ? member->string() : std::string();
  }

  /// A token id: an integer from 0 to the largest TokenId.
  [[nodiscard]] TokenId id() const {
    if (value_->is_number_unsigned() &&
        value_->get<std::uint64_t>() <= std::uint64_t{std::numeric_limits<TokenId>::max()}) {
      return static_cast<TokenId>(value_->get<std::uint64_t>());
    }
    fail(fmt::format("a token id (an integer from 0 to {})", std::numeric_limits<TokenId>::max()));
  }

  /// The "type" member of this object.
  [[nodiscard]] std::string type() const { return at("type").string(); }

  /// An AddedToken object (see the header comment); the id is 0 for the
  /// tokenizer_config layout, whose objects do not carry one.
  [[nodiscard]] AddedToken added_token(AddedTokenLayout layout) const {
    if (!value_->is_object()) fail("an AddedToken object {\"content\": ...}");
    AddedToken token;
    std::optional<bool> normalized;
    bool has_content = false;
    bool has_id = false;
    for (auto it = value_->begin(); it != value_->end(); ++it) {
      const std::string& name = it.key();
      const TokenizerJson field = other(fmt::format("{}.{}", path_, name), it.value());
      if (name == "content") {
        token.content = field.string();
        has_content = true;
      } else if (name == "special") {
        token.special = field.boolean();
      } else if (name == "single_word") {
        token.single_word = field.boolean();
      } else if (name == "lstrip") {
        token.lstrip = field.boolean();
      } else if (name == "rstrip") {
        token.rstrip = field.boolean();
      } else if (name == "normalized") {
        normalized = field.boolean();
      } else if (name == "id" && layout == AddedTokenLayout::tokenizer_json) {
        token.id = field.id();
        has_id = true;
      } else if (name == "__type" && layout == AddedTokenLayout::tokenizer_config) {
        if (field.string() != "AddedToken") field.fail("\"AddedToken\"");
      } else {
        const std::string_view id_field = layout == AddedTokenLayout::tokenizer_json ? "id, " : "";
        throw Error(error_code_, fmt::format("{}: unknown AddedToken field \"{}\" (expected {}content, special, "
                                             "single_word, lstrip, rstrip, normalized)",
                                             location(), name, id_field));
      }
    }
    if (!has_content) fail("an AddedToken object with a \"content\" string");
    if (layout == AddedTokenLayout::tokenizer_json && !has_id) fail("an AddedToken object with an \"id\"");
    if (token.content.empty()) fail("a non-empty token");
    token.normalized = normalized.value_or(!token.special);
    return token;
  }

 private:
  TokenizerJson(std::string_view file, std::string path, const Json& value, const char* error_code)
      : file_(file), path_(std::move(path)), value_(&value), error_code_(error_code) {}

  std::string_view file_;
  std::string path_;
  const Json* value_;
  const char* error_code_;
};

}  // namespace qlora::detail
