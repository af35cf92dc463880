// A training sample before templating: the messages of one conversation, or
// one plain text for pre-training. Every reader (data/dataset_formats.hpp)
// produces this; every ChatTemplate (data/chat_template.hpp) consumes it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace qlora {

/// Who speaks. `text` is an un-structured document (pre-training, {"text": ...}).
enum class Role : std::uint8_t { system, user, assistant, text };

[[nodiscard]] constexpr std::string_view role_name(Role role) noexcept {
  switch (role) {
    case Role::system:
      return "system";
    case Role::user:
      return "user";
    case Role::assistant:
      return "assistant";
    case Role::text:
      return "text";
  }
  return "?";
}

struct Message {
  Role role = Role::user;
  /// UTF-8, validated by the reader.
  std::string content;
  /// Whether this message's tokens are learned (assistant and text messages
  /// only): XTuner's per-turn `output_with_loss`, OpenAI-style `"loss"`.
  bool loss = true;
};

struct Conversation {
  std::vector<Message> messages;
  /// 1-based line of the record in its source file (0 when not from a file),
  /// so that errors raised after reading can still name the line.
  std::uint64_t line = 0;
};

}  // namespace qlora
