// IWYU pragma: private
// TemplatePattern: a template string with named placeholders, parsed once and
// rendered per turn. It follows Python's str.format, which XTuner calls on its
// SYSTEM and INSTRUCTION strings, so that a template written for XTuner renders
// the same here: `{name}` is a placeholder, `{{` and `}}` are literal braces,
// and a value is inserted as it is (braces inside a message are never
// re-interpreted). Anything str.format would reject, and the parts of its
// mini-language a template has no use for (`{input!r}`, `{input:>9}`,
// positional `{}`), is Error("InvalidTemplate") at construction, naming the
// string, the column and what was expected: a typo in a template must fail
// before training, not render `{inptu}` into every sample.
#pragma once

#include <cstddef>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/error.hpp>

namespace qlora::detail {

class TemplatePattern {
 public:
  /// Parses `pattern`; `template_name` ("SYSTEM") names it in errors, and
  /// `fields` are the placeholders it may use, in the order render() numbers them.
  TemplatePattern(std::string_view pattern, std::string_view template_name,
                  std::initializer_list<std::string_view> fields) {
    std::size_t literal_start = 0;
    for (std::size_t i = 0; i < pattern.size(); ++i) {
      const char c = pattern[i];
      if (c != '{' && c != '}') continue;
      add_literal(pattern.substr(literal_start, i - literal_start));
      if (i + 1 < pattern.size() && pattern[i + 1] == c) {  // "{{" or "}}": one literal brace
        add_literal(pattern.substr(i, 1));
        literal_start = i + 2;
        ++i;
        continue;
      }
      check(c == '{', "InvalidTemplate", "{} {:?}, column {}: single '}}' (write '}}}}' for a literal brace)",
            template_name, pattern, i + 1);
      const std::size_t close = pattern.find_first_of("{}", i + 1);
      check(close != std::string_view::npos && pattern[close] == '}', "InvalidTemplate",
            "{} {:?}, column {}: '{{' is not closed by '}}' (write '{{{{' for a literal brace)", template_name, pattern,
            i + 1);
      add_field(pattern.substr(i + 1, close - i - 1), fields, pattern, template_name, i + 1);
      literal_start = close + 1;
      i = close;
    }
    add_literal(pattern.substr(literal_start));
  }

  /// Calls `literal(std::string_view)` for each literal run and `field(index)`
  /// for each placeholder, in order.
  template <class Literal, class Field>
  void render(Literal&& literal, Field&& field) const {
    for (const Part& part : parts_) {
      if (part.field == no_field) {
        literal(std::string_view(literals_).substr(part.offset, part.size));
      } else {
        field(part.field);
      }
    }
  }

  /// Whether the pattern holds the placeholder fields[index] at least once.
  [[nodiscard]] bool uses(std::size_t index) const noexcept {
    for (const Part& part : parts_) {
      if (part.field == index) return true;
    }
    return false;
  }

  [[nodiscard]] bool empty() const noexcept { return parts_.empty(); }

 private:
  static constexpr std::size_t no_field = static_cast<std::size_t>(-1);

  /// A literal run (offset/size into literals_) or a placeholder.
  struct Part {
    std::size_t field = no_field;
    std::size_t offset = 0;
    std::size_t size = 0;
  };

  void add_literal(std::string_view text) {
    if (text.empty()) return;
    // Adjacent literal runs (text, then an escaped brace) become one.
    if (!parts_.empty() && parts_.back().field == no_field) {
      parts_.back().size += text.size();
    } else {
      parts_.push_back({no_field, literals_.size(), text.size()});
    }
    literals_.append(text);
  }

  void add_field(std::string_view name, std::initializer_list<std::string_view> fields, std::string_view pattern,
                 std::string_view template_name, std::size_t column) {
    std::size_t index = 0;
    std::string expected;
    for (const std::string_view field : fields) {
      if (field == name) {
        parts_.push_back({index, 0, 0});
        return;
      }
      if (index > 0) expected += index + 1 == fields.size() ? " or " : ", ";
      expected += fmt::format("{{{}}}", field);
      ++index;
    }
    throw Error("InvalidTemplate", fmt::format("{} {:?}, column {}: unknown placeholder {{{}}}; expected {}",
                                               template_name, pattern, column, name, expected));
  }

  std::vector<Part> parts_;
  /// The literal runs, unescaped, one after the other.
  std::string literals_;
};

}  // namespace qlora::detail
