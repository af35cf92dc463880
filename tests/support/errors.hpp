// Looking at the qlora::Error an action throws: its stable code and the parts
// of its message (the file, line, key or tensor it must name).
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

#include <catch2/catch.hpp>

#include <qlora/core/error.hpp>

namespace qlora::test {

/// The qlora::Error `action` throws; fails the test when it throws none.
template <class Action>
Error thrown_by(Action&& action) {
  try {
    action();
  } catch (const Error& e) {
    return e;
  }
  FAIL("expected a qlora::Error");
  throw std::logic_error("unreachable");
}

/// Requires `action` to throw a qlora::Error with `code` whose message holds
/// each of `parts` (the file, the key, the shapes...).
template <class Action, class... Parts>
void require_error(Action&& action, std::string_view code, const Parts&... parts) {
  const Error error = thrown_by(std::forward<Action>(action));
  INFO("message: " << error.what());
  CHECK(error.code() == code);
  const auto check_part = [&error](std::string_view part) {
    INFO("expected in the message: " << part);
    CHECK(error.message().find(part) != std::string::npos);
  };
  (check_part(parts), ...);
}

}  // namespace qlora::test
