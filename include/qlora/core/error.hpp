// qlora::Error: the one exception type of the library. Every error carries a
// stable code (a short CamelCase name tests and callers can match on, e.g.
// "InvalidOffset") and a message that names the file, tensor or argument and
// what was expected. Context is added as the error travels outwards
// ("while loading model.safetensors: ...").
#pragma once

#include <qlora/config.hpp>  // first: it prepares fmt for nvcc

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace qlora {

class Error : public std::runtime_error {
 public:
  /// `code` must outlive the error: pass a string literal.
  Error(const char* code, std::string message)
      : std::runtime_error(compose(code, message)), code_(code), message_(std::move(message)) {}

  /// Stable machine-readable name of what went wrong.
  [[nodiscard]] std::string_view code() const noexcept { return code_; }
  /// The message without the "[code] " prefix and without added context.
  [[nodiscard]] const std::string& message() const noexcept { return message_; }

  /// A copy of this error whose what() starts with `context`: used when a
  /// lower layer's error passes through a layer that knows the file or tensor.
  [[nodiscard]] Error with_context(std::string_view context) const {
    return Error(code_, fmt::format("{}: {}", context, message_));
  }

 private:
  static std::string compose(const char* code, const std::string& message) {
    return fmt::format("[{}] {}", code, message);
  }

  const char* code_;
  std::string message_;
};

/// Throws Error(code, formatted message) unless `condition` holds.
/// Formatting happens only on failure.
template <class... Args>
inline void check(bool condition, const char* code, fmt::format_string<Args...> format, Args&&... args) {
  if (!condition) [[unlikely]] {
    throw Error(code, fmt::format(format, std::forward<Args>(args)...));
  }
}

}  // namespace qlora
