// IWYU pragma: private
// JSON text spelled exactly as Python's `json.dumps(value, indent=2,
// sort_keys=True)` spells it, for files that Python libraries write that way
// and that we must reproduce byte for byte (PEFT's adapter_config.json).
//
// The rules, from CPython's json.encoder: "key": value with ": ", items joined
// by ",\n" plus two spaces per level, empty containers as [] and {}, object keys
// sorted (by code point, which for UTF-8 is byte order) at every level, strings
// ASCII-escaped (ensure_ascii=True), integers in decimal and floats as repr():
// the shortest text that reads back to the same double, with ".0" on integral
// values and an exponent below 1e-4 and from 1e16 on.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/io/detail/json.hpp>

namespace qlora::detail {

/// Appends Python's repr() of a finite double. {fmt}'s shortest round-trip
/// form switches to an exponent where repr does (adapter_config_test holds it to repr); only
/// repr's ".0" on integral values is missing from it.
inline void append_python_float(std::string& out, double value) {
  check(std::isfinite(value), "InvalidArgument", "{} is not a finite number: strict JSON cannot hold it", value);
  const std::string text = fmt::format("{}", value);
  out += text;
  if (text.find_first_of(".e") == std::string::npos) out += ".0";
}

/// Appends `value` (any nlohmann JSON type) as json.dumps(indent=2, sort_keys=True)
/// writes it, the first line at the current position and nested lines indented
/// from `depth` levels.
template <class JsonT>
void append_python_json(std::string& out, const JsonT& value, int depth = 0) {
  const auto newline = [&](int level) {
    out += '\n';
    out.append(static_cast<std::size_t>(2 * level), ' ');
  };
  switch (value.type()) {
    case JsonT::value_t::null:
      out += "null";
      return;
    case JsonT::value_t::boolean:
      out += value.template get<bool>() ? "true" : "false";
      return;
    case JsonT::value_t::number_integer:
      out += fmt::format("{}", value.template get<std::int64_t>());
      return;
    case JsonT::value_t::number_unsigned:
      out += fmt::format("{}", value.template get<std::uint64_t>());
      return;
    case JsonT::value_t::number_float:
      append_python_float(out, value.template get<double>());
      return;
    case JsonT::value_t::string:
      append_json_string(out, value.template get_ref<const std::string&>(), JsonEscape::ascii);
      return;
    case JsonT::value_t::array: {
      if (value.empty()) {
        out += "[]";
        return;
      }
      out += '[';
      bool first = true;
      for (const auto& item : value) {
        if (!first) out += ',';
        first = false;
        newline(depth + 1);
        append_python_json(out, item, depth + 1);
      }
      newline(depth);
      out += ']';
      return;
    }
    case JsonT::value_t::object: {
      if (value.empty()) {
        out += "{}";
        return;
      }
      // ordered_json keeps file order; sort_keys wants byte order.
      std::vector<std::pair<std::string_view, const JsonT*>> items;
      for (auto it = value.begin(); it != value.end(); ++it) items.emplace_back(it.key(), &it.value());
      std::ranges::sort(items, {}, &std::pair<std::string_view, const JsonT*>::first);
      out += '{';
      bool first = true;
      for (const auto& [key, item] : items) {
        if (!first) out += ',';
        first = false;
        newline(depth + 1);
        append_json_string(out, key, JsonEscape::ascii);
        out += ": ";
        append_python_json(out, *item, depth + 1);
      }
      newline(depth);
      out += '}';
      return;
    }
    default:  // binary and discarded values never come out of a parse
      throw Error("InvalidArgument", "a JSON value of this kind has no Python spelling");
  }
}

}  // namespace qlora::detail
