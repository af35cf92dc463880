// IWYU pragma: private
// The one place that includes the JSON library (nlohmann-json), plus the two JSON
// string spellings the io/ layer must reproduce byte for byte: serde_json's (the
// safetensors header) and Python's json.dumps with ensure_ascii (the shard index).
#pragma once

#include <array>
#include <cstddef>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <qlora/core/error.hpp>
#include <qlora/io/detail/utf8.hpp>

namespace qlora::detail {

using Json = nlohmann::json;
/// Keeps keys in insertion order: for files rewritten as their writer laid them out.
using OrderedJson = nlohmann::ordered_json;

/// How append_json_string spells characters outside printable ASCII.
enum class JsonEscape {
  /// serde_json (the safetensors writer): escape `"`, `\` and U+0000..U+001F only.
  minimal,
  /// Python json.dumps(ensure_ascii=True) (huggingface_hub's index): also U+007F
  /// and every non-ASCII character, as \uXXXX (surrogate pairs above U+FFFF).
  ascii,
};

/// Appends `text` (valid UTF-8) as a quoted JSON string. Both spellings use the
/// short escapes \b \f \n \r \t and lowercase hex digits, as serde_json and CPython do.
inline void append_json_string(std::string& out, std::string_view text, JsonEscape escape) {
  // Bytes copied as they are: printable ASCII but `"` and `\`, and for minimal
  // also DEL and the bytes of non-ASCII characters.
  static constexpr auto plain_table = [](bool ascii) {
    std::array<bool, 256> table{};
    for (unsigned byte = 0x20; byte < (ascii ? 0x7Fu : 0x100u); ++byte) table[byte] = byte != '"' && byte != '\\';
    return table;
  };
  static constexpr std::array<bool, 256> plain_minimal = plain_table(false);
  static constexpr std::array<bool, 256> plain_ascii = plain_table(true);
  const std::array<bool, 256>& plain = escape == JsonEscape::minimal ? plain_minimal : plain_ascii;
  const auto append_u = [&out](unsigned unit) { out += fmt::format("\\u{:04x}", unit); };
  out += '"';
  for (std::size_t pos = 0; pos < text.size();) {
    std::size_t run = pos;  // copy runs that need no escape in one go
    while (run < text.size() && plain[static_cast<unsigned char>(text[run])]) ++run;
    out.append(text, pos, run - pos);
    if (run == text.size()) break;
    pos = run;
    const auto byte = static_cast<unsigned char>(text[pos]);
    if (byte >= 0x80) {  // JsonEscape::ascii
      const char32_t code_point = decode_utf8(text, pos);
      if (code_point >= 0x10000) {
        const char32_t offset = code_point - 0x10000;
        append_u(0xD800u + static_cast<unsigned>(offset >> 10));
        append_u(0xDC00u + static_cast<unsigned>(offset & 0x3FFu));
      } else {
        append_u(static_cast<unsigned>(code_point));
      }
      continue;
    }
    ++pos;
    switch (byte) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        append_u(byte);
        break;  // other controls, and DEL under JsonEscape::ascii
    }
  }
  out += '"';
}

/// Parses `text` as JSON into a DOM, throwing Error(`syntax_code`) on a syntax
/// error and Error("DuplicateKey") when any object repeats a key. (nlohmann's DOM
/// silently keeps one of the values; the parser callback sees every key first.)
/// `what` names the document in messages.
inline Json parse_json_rejecting_duplicates(std::string_view text, const char* syntax_code, std::string_view what) {
  std::vector<std::set<std::string, std::less<>>> open_objects;
  std::string duplicate;
  bool has_duplicate = false;
  const auto on_event = [&](int /*depth*/, Json::parse_event_t event, Json& parsed) {
    if (event == Json::parse_event_t::object_start) {
      open_objects.emplace_back();
    } else if (event == Json::parse_event_t::object_end) {
      open_objects.pop_back();
    } else if (event == Json::parse_event_t::key && !has_duplicate) {
      auto key = parsed.get<std::string>();
      if (open_objects.back().contains(key)) {
        has_duplicate = true;
        duplicate = std::move(key);
      } else {
        open_objects.back().insert(std::move(key));
      }
    }
    return true;
  };
  Json result;
  try {
    result = Json::parse(text.begin(), text.end(), on_event);
  } catch (const Json::exception& e) {
    throw Error(syntax_code, fmt::format("{}: invalid JSON: {}", what, e.what()));
  }
  check(!has_duplicate, "DuplicateKey", "{}: key `{}` appears more than once in one JSON object", what, duplicate);
  return result;
}

}  // namespace qlora::detail
