// JsonDocument: one JSON value parsed into a flat, reusable array of nodes, and
// JsonValue, a cheap view to walk it. Written for JSONL training data, where a
// general DOM (nlohmann's: ~120 MB/s here, a map and a string per value) would
// be the slowest part of reading: strings without escapes stay views into the
// text, escaped ones are decoded into one arena, and parsing the next line
// reuses both buffers. Errors carry the byte offset of the bad character and
// CPython's json reason, so line:column agree with `python -m json.tool`.
//
// Stricter than CPython where CPython lets bad data through: invalid UTF-8,
// an unpaired \ud800 surrogate, NaN/Infinity, a repeated key (CPython keeps the
// last value and drops the others silently) and nesting deeper than 1000 levels
// (CPython's RecursionError) are errors.
//
// Each value costs a 32-byte node, up to 16 times the text it was parsed from
// ("0," is 2 bytes): a document may hold at most max_values values
// (Error("RecordTooComplex")), so that one pathological line cannot take
// gigabytes.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/detail/json_lexer.hpp>
#include <qlora/io/detail/utf8.hpp>

namespace qlora {

enum class JsonType : std::uint8_t { null, boolean, number, string, array, object };

/// "null", "a boolean", "a number", "a string", "an array", "an object": for
/// messages such as "expected a string, got a number".
[[nodiscard]] constexpr std::string_view json_type_name(JsonType type) noexcept {
  switch (type) {
    case JsonType::null:
      return "null";
    case JsonType::boolean:
      return "a boolean";
    case JsonType::number:
      return "a number";
    case JsonType::string:
      return "a string";
    case JsonType::array:
      return "an array";
    case JsonType::object:
      return "an object";
  }
  return "?";
}

/// Where and why a text is not a JSON document.
struct JsonParseError {
  /// "MalformedJson", "InvalidUtf8" or "RecordTooComplex".
  const char* code;
  /// CPython's reason where CPython rejects the text too ("Expecting ',' delimiter").
  std::string reason;
  /// Byte offset of the offending character in the parsed text.
  std::size_t offset;
};

/// A line and column (both 1-based) in a text; the column counts characters
/// (code points), as editors and CPython's json do, not bytes.
struct TextPosition {
  std::uint64_t line;
  std::uint64_t column;
};

/// The position of byte `offset` of `text`. Bytes of an invalid UTF-8 sequence
/// count as one character each (only the prefix before an error is counted).
[[nodiscard]] inline TextPosition text_position(std::string_view text, std::size_t offset) noexcept {
  const std::string_view before = text.substr(0, offset);
  const std::size_t newline = before.rfind('\n');
  const std::string_view line_start = newline == std::string_view::npos ? before : before.substr(newline + 1);
  // Characters = bytes that are not UTF-8 continuation bytes (10xxxxxx).
  const auto characters = std::count_if(line_start.begin(), line_start.end(),
                                        [](char c) { return (static_cast<unsigned char>(c) & 0xC0u) != 0x80u; });
  return {static_cast<std::uint64_t>(std::count(before.begin(), before.end(), '\n')) + 1,
          static_cast<std::uint64_t>(characters) + 1};
}

namespace detail {

/// One value of a parsed document, in document order (a value's children
/// follow it; an object's children alternate key, value).
struct JsonNode {
  /// string and key: the decoded bytes; number: its spelling in the text.
  const char* text = nullptr;
  std::uint32_t length = 0;
  /// Byte offset of the value in the parsed text.
  std::uint32_t offset = 0;
  /// array: elements; object: members.
  std::uint32_t count = 0;
  /// Nodes in this value's subtree, itself included: the next sibling is at this + span.
  std::uint32_t span = 1;
  JsonType type = JsonType::null;
  bool boolean = false;
};

}  // namespace detail

struct JsonMember;
template <class Item>
class JsonChildIterator;
template <class Item>
struct JsonChildren;

/// A read-only view of one value of a JsonDocument, valid while the document
/// is neither destroyed nor re-parsed. Accessors for the wrong type throw
/// Error("WrongType", "expected a string, got a number").
class JsonValue {
 public:
  explicit JsonValue(const detail::JsonNode* node) noexcept : node_(node) {}

  [[nodiscard]] JsonType type() const noexcept { return node_->type; }
  [[nodiscard]] bool is(JsonType type) const noexcept { return node_->type == type; }
  /// Byte offset of the value in the parsed text (a string's opening quote).
  [[nodiscard]] std::size_t offset() const noexcept { return node_->offset; }

  [[nodiscard]] bool as_bool() const {
    expect(JsonType::boolean);
    return node_->boolean;
  }
  /// The decoded string: valid UTF-8, escapes resolved (it may hold U+0000).
  [[nodiscard]] std::string_view as_string() const {
    expect(JsonType::string);
    return {node_->text, node_->length};
  }
  /// The number as written ("-1.50e3"): converting is up to the caller, and
  /// writing it back unchanged loses nothing (CPython re-prints floats).
  [[nodiscard]] std::string_view number_text() const {
    expect(JsonType::number);
    return {node_->text, node_->length};
  }
  /// Elements of an array or members of an object.
  [[nodiscard]] std::size_t size() const {
    if (!is(JsonType::object)) expect(JsonType::array);
    return node_->count;
  }

  /// The elements of an array, for range-for.
  [[nodiscard]] JsonChildren<JsonValue> elements() const;
  /// The members of an object, in the order of the text.
  [[nodiscard]] JsonChildren<JsonMember> members() const;
  /// The value of member `key` of an object (keys are unique: the parser rejects repeats).
  [[nodiscard]] std::optional<JsonValue> find(std::string_view key) const;

 private:
  void expect(JsonType type) const {
    check(node_->type == type, "WrongType", "expected {}, got {}", json_type_name(type), json_type_name(node_->type));
  }

  const detail::JsonNode* node_;
};

/// An object member.
struct JsonMember {
  std::string_view key;
  JsonValue value;
  /// Byte offset of the key's opening quote in the parsed text.
  std::size_t key_offset;
};

/// Walks the children of an array (Item = JsonValue) or of an object (Item =
/// JsonMember) in place: a child's subtree is skipped by its span.
template <class Item>
class JsonChildIterator {
 public:
  using value_type = Item;
  using difference_type = std::ptrdiff_t;

  JsonChildIterator() = default;
  explicit JsonChildIterator(const detail::JsonNode* node) noexcept : node_(node) {}

  Item operator*() const noexcept {
    if constexpr (is_member) {
      return JsonMember{{node_->text, node_->length}, JsonValue(node_ + 1), node_->offset};
    } else {
      return JsonValue(node_);
    }
  }
  JsonChildIterator& operator++() noexcept {
    if constexpr (is_member) ++node_;  // past the key, to the value
    node_ += node_->span;
    return *this;
  }
  JsonChildIterator operator++(int) noexcept {
    JsonChildIterator before = *this;
    ++*this;
    return before;
  }
  bool operator==(const JsonChildIterator&) const = default;

 private:
  static constexpr bool is_member = std::is_same_v<Item, JsonMember>;
  const detail::JsonNode* node_ = nullptr;
};

template <class Item>
struct JsonChildren {
  JsonChildIterator<Item> first, last;
  [[nodiscard]] JsonChildIterator<Item> begin() const noexcept { return first; }
  [[nodiscard]] JsonChildIterator<Item> end() const noexcept { return last; }
};

inline JsonChildren<JsonValue> JsonValue::elements() const {
  expect(JsonType::array);
  return {JsonChildIterator<JsonValue>(node_ + 1), JsonChildIterator<JsonValue>(node_ + node_->span)};
}

inline JsonChildren<JsonMember> JsonValue::members() const {
  expect(JsonType::object);
  return {JsonChildIterator<JsonMember>(node_ + 1), JsonChildIterator<JsonMember>(node_ + node_->span)};
}

inline std::optional<JsonValue> JsonValue::find(std::string_view key) const {
  for (const JsonMember& member : members()) {
    if (member.key == key) return member.value;
  }
  return std::nullopt;
}

/// A parsed JSON document. Parse again to reuse its buffers for the next one.
///
///     JsonDocument document;
///     document.parse(R"({"text": "hello"})");
///     std::string_view text = document.root().find("text")->as_string();
class JsonDocument {
 public:
  /// No limit but the 32-bit offsets' (a text of at most 4 GiB).
  static constexpr std::size_t unlimited_values = std::numeric_limits<std::uint32_t>::max();

  /// A document that refuses texts of more than `max_values` values.
  explicit JsonDocument(std::size_t max_values = unlimited_values) : max_values_(max_values) {
    check(max_values > 0, "InvalidArgument", "JsonDocument's max_values must be at least 1");
  }
  // A copy's nodes would point into the original's buffers.
  JsonDocument(const JsonDocument&) = delete;
  JsonDocument& operator=(const JsonDocument&) = delete;
  JsonDocument(JsonDocument&&) noexcept = default;
  JsonDocument& operator=(JsonDocument&&) noexcept = default;

  /// Containers nested deeper than this are an error (CPython's json gives up
  /// near the same depth with a RecursionError); it also bounds the recursion
  /// of code that walks a document.
  static constexpr std::size_t max_depth = 1000;

  /// Parses `text`, which must outlive the document's use (unescaped strings
  /// point into it). Throws Error("MalformedJson", "InvalidUtf8" or
  /// "RecordTooComplex") naming the line and column and the reason.
  void parse(std::string_view text) {
    if (const std::optional<JsonParseError> error = try_parse(text)) {
      const TextPosition at = text_position(text, error->offset);
      throw Error(error->code, fmt::format("line {}, column {}: {}", at.line, at.column, error->reason));
    }
  }

  /// Parses `text` as parse() does, returning the error instead of throwing it.
  /// The previous document is gone either way.
  [[nodiscard]] std::optional<JsonParseError> try_parse(std::string_view text);

  /// The top-level value of the last successful parse.
  [[nodiscard]] JsonValue root() const {
    check(parsed_, "NoDocument", "JsonDocument::root() before a successful parse");
    return JsonValue(nodes_.data());
  }

 private:
  enum class Expect : std::uint8_t { value, key, after_value };

  /// Starts a new node of `type` at `offset` as a child of the open container.
  detail::JsonNode& add_node(JsonType type, std::size_t offset) {
    if (!open_.empty()) {
      detail::JsonNode& parent = nodes_[open_.back()];
      // An object counts its members at their keys, not again at their values.
      if (parent.type == JsonType::array || (type == JsonType::string && expect_ == Expect::key)) ++parent.count;
    }
    detail::JsonNode& node = nodes_.emplace_back();
    node.type = type;
    node.offset = static_cast<std::uint32_t>(offset);
    return node;
  }

  /// The error for a repeated key in the object at nodes_[object], if any: the
  /// second occurrence that comes first in the text.
  std::optional<JsonParseError> find_repeated_key(std::size_t object);

  std::size_t max_values_;
  std::vector<detail::JsonNode> nodes_;
  std::vector<std::uint32_t> open_;  // indices of the containers not yet closed
  std::vector<char> arena_;          // decoded escaped strings (a vector: moving it keeps their address)
  std::vector<std::pair<std::string_view, std::uint32_t>> keys_;  // find_repeated_key's scratch
  Expect expect_ = Expect::value;
  bool parsed_ = false;
};

inline std::optional<JsonParseError> JsonDocument::try_parse(std::string_view text) {
  nodes_.clear();
  open_.clear();
  parsed_ = false;
  // Offsets and lengths are 32-bit (a node is 32 bytes): a training record of
  // 4 GiB is a broken file, not a record.
  if (text.size() > std::numeric_limits<std::uint32_t>::max()) {
    return JsonParseError{"MalformedJson", "text longer than 4 GiB", 0};
  }
  if (const std::size_t valid = detail::utf8_valid_prefix(text); valid != text.size()) {
    return JsonParseError{"InvalidUtf8",
                          fmt::format("invalid UTF-8 byte 0x{:02X}", static_cast<unsigned char>(text[valid])), valid};
  }
  if (arena_.size() < text.size()) arena_.resize(text.size());  // decoding never lengthens
  char* scratch = arena_.data();
  const auto syntax_error = [](const detail::JsonSyntaxError& e) {
    return JsonParseError{"MalformedJson", e.reason, e.offset};
  };
  const auto at = [&](std::size_t pos, char c) { return pos < text.size() && text[pos] == c; };

  const auto too_complex = [&](std::size_t offset) {
    return JsonParseError{"RecordTooComplex", fmt::format("more than {} values in one document", max_values_), offset};
  };

  std::size_t pos = detail::skip_json_whitespace(text, 0);
  expect_ = Expect::value;
  for (;;) {
    // A value and a key each add one node.
    if (expect_ != Expect::after_value && nodes_.size() == max_values_) return too_complex(pos);
    if (expect_ == Expect::value) {
      if (pos == text.size()) return JsonParseError{"MalformedJson", "Expecting value", pos};
      const char c = text[pos];
      if (c == '{' || c == '[') {
        if (open_.size() == max_depth) {
          return JsonParseError{"MalformedJson", fmt::format("nesting deeper than {} levels", max_depth), pos};
        }
        add_node(c == '{' ? JsonType::object : JsonType::array, pos);
        open_.push_back(static_cast<std::uint32_t>(nodes_.size() - 1));
        pos = detail::skip_json_whitespace(text, pos + 1);
        if (at(pos, c == '{' ? '}' : ']')) {
          open_.pop_back();
          ++pos;
          expect_ = Expect::after_value;
        } else {
          expect_ = c == '{' ? Expect::key : Expect::value;
        }
        continue;
      }
      if (c == '"') {
        detail::ScannedJsonString scanned;
        if (const auto error = detail::scan_json_string(text, pos, scratch, scanned)) return syntax_error(*error);
        detail::JsonNode& node = add_node(JsonType::string, pos);
        node.text = scanned.value.data();
        node.length = static_cast<std::uint32_t>(scanned.value.size());
        pos = scanned.end;
      } else if (text.substr(pos, 4) == "null") {
        add_node(JsonType::null, pos);
        pos += 4;
      } else if (text.substr(pos, 4) == "true" || text.substr(pos, 5) == "false") {
        add_node(JsonType::boolean, pos).boolean = c == 't';
        pos += c == 't' ? 4 : 5;
      } else if (const std::size_t end = detail::scan_json_number(text, pos); end != pos) {
        detail::JsonNode& node = add_node(JsonType::number, pos);
        node.text = text.data() + pos;
        node.length = static_cast<std::uint32_t>(end - pos);
        pos = end;
      } else {
        const std::string_view rest = text.substr(pos);
        const bool not_a_number = rest.starts_with("NaN") || rest.starts_with("Infinity") || rest.starts_with("-Infinity");
        return JsonParseError{"MalformedJson", not_a_number ? "NaN and Infinity are not JSON" : "Expecting value", pos};
      }
      expect_ = Expect::after_value;
    } else if (expect_ == Expect::key) {
      if (!at(pos, '"')) return JsonParseError{"MalformedJson", "Expecting property name enclosed in double quotes", pos};
      detail::ScannedJsonString scanned;
      if (const auto error = detail::scan_json_string(text, pos, scratch, scanned)) return syntax_error(*error);
      detail::JsonNode& node = add_node(JsonType::string, pos);
      node.text = scanned.value.data();
      node.length = static_cast<std::uint32_t>(scanned.value.size());
      pos = detail::skip_json_whitespace(text, scanned.end);
      if (!at(pos, ':')) return JsonParseError{"MalformedJson", "Expecting ':' delimiter", pos};
      pos = detail::skip_json_whitespace(text, pos + 1);
      expect_ = Expect::value;
    } else {  // after a value: close containers, or go on after a comma
      pos = detail::skip_json_whitespace(text, pos);
      if (open_.empty()) {
        if (pos != text.size()) return JsonParseError{"MalformedJson", "Extra data", pos};
        parsed_ = true;
        return std::nullopt;
      }
      const std::uint32_t container = open_.back();
      const bool in_object = nodes_[container].type == JsonType::object;
      if (at(pos, in_object ? '}' : ']')) {
        nodes_[container].span = static_cast<std::uint32_t>(nodes_.size() - container);
        if (in_object) {
          if (auto error = find_repeated_key(container)) return error;
        }
        open_.pop_back();
        ++pos;
        continue;
      }
      if (!at(pos, ',')) return JsonParseError{"MalformedJson", "Expecting ',' delimiter", pos};
      pos = detail::skip_json_whitespace(text, pos + 1);
      expect_ = in_object ? Expect::key : Expect::value;
    }
  }
}

inline std::optional<JsonParseError> JsonDocument::find_repeated_key(std::size_t object) {
  keys_.clear();
  for (const JsonMember& member : JsonValue(&nodes_[object]).members()) {
    keys_.emplace_back(member.key, static_cast<std::uint32_t>(member.key_offset));
  }
  // The repeat reported is the second occurrence that comes first in the text.
  std::optional<std::pair<std::string_view, std::uint32_t>> repeat;
  if (keys_.size() <= 16) {  // records have a handful of keys: compare them all
    for (std::size_t i = 1; i < keys_.size() && !repeat; ++i) {
      for (std::size_t j = 0; j < i; ++j) {
        if (keys_[j].first == keys_[i].first) {
          repeat = keys_[i];
          break;
        }
      }
    }
  } else {
    std::sort(keys_.begin(), keys_.end());  // by key, then by offset
    for (std::size_t i = 1; i < keys_.size(); ++i) {
      if (keys_[i].first == keys_[i - 1].first && (!repeat || keys_[i].second < repeat->second)) repeat = keys_[i];
    }
  }
  if (!repeat) return std::nullopt;
  return JsonParseError{"MalformedJson",
                        fmt::format("Duplicate key \"{}\" (CPython would keep only its last value)", repeat->first),
                        repeat->second};
}

}  // namespace qlora
