// Cutting a conversation into turns (its system and user messages, then the
// assistant's answer) and the role-order rules that say which conversations
// can be cut at all. The chat templates render turn by turn; checking the
// order here, once, keeps a malformed record from becoming a silently wrong
// training sample (an unanswered question, an answer learned without its
// question).
//
// Two policies:
//   - RoleOrder::strict (the default): `system? user assistant`, repeated; a
//     system message may open any turn and sets that turn's system text.
//     Anything else is Error("WrongRoleOrder") naming the message index and
//     the roles.
//   - RoleOrder::xtuner: what XTuner's openai_map_fn does, for data prepared
//     for XTuner: leading assistant messages are dropped, consecutive user
//     messages are joined with nothing between them, the last system message
//     before an answer is its turn's system, an assistant message with no user
//     message before it gets an empty input, and messages after the last answer
//     are dropped. Nothing is reported; a conversation that keeps no turn
//     renders to nothing (and SampleEncoder drops it, as XTuner does).
// In both, a conversation with no message is Error("EmptyConversation") (a
// reader that produces one has lost a record), and a `text` message, which no
// chat template can render, is Error("WrongRoleOrder").
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include <qlora/core/error.hpp>
#include <qlora/data/conversation.hpp>

namespace qlora {

enum class RoleOrder : std::uint8_t { strict, xtuner };

/// One turn: messages[0..n-2] are its system and user messages, messages[n-1]
/// the answer.
struct ChatTurn {
  std::span<const Message> messages;
  /// Index of messages.front() in the conversation (for error messages).
  std::size_t first_index = 0;
  /// 0-based position of the turn in the conversation (XTuner's round - 1).
  std::size_t number = 0;

  [[nodiscard]] const Message& answer() const noexcept { return messages.back(); }

  /// The turn's system message (the last one before the answer), or nullptr.
  [[nodiscard]] const Message* system() const noexcept {
    const Message* found = nullptr;
    for (const Message& message : messages.first(messages.size() - 1)) {
      if (message.role == Role::system) found = &message;
    }
    return found;
  }

  /// Calls append(content) for each user message, in order: the turn's input is
  /// their concatenation (one message under RoleOrder::strict).
  template <class Append>
  void for_each_input(Append&& append) const {
    for (const Message& message : messages.first(messages.size() - 1)) {
      if (message.role == Role::user) append(std::string_view(message.content));
    }
  }
};

namespace detail {

/// What may come after `previous` in a strict conversation, for error messages.
constexpr std::string_view strict_successors(Role previous) noexcept {
  switch (previous) {
    case Role::system:
      return "'user'";
    case Role::user:
      return "'assistant'";
    default:
      return "'system' or 'user'";
  }
}

inline void check_chat_role(const std::vector<Message>& messages, std::size_t index) {
  check(messages[index].role != Role::text, "WrongRoleOrder",
        "messages[{}] has role 'text', which a chat template cannot render (a {{\"text\"}} document is for Pretrain)",
        index);
}

/// Throws Error("WrongRoleOrder") unless `messages` is `(system? user assistant)+`.
inline void check_strict_role_order(const std::vector<Message>& messages) {
  for (std::size_t i = 0; i < messages.size(); ++i) {
    check_chat_role(messages, i);
    const Role role = messages[i].role;
    if (i == 0) {
      check(role != Role::assistant, "WrongRoleOrder",
            "messages[0] is 'assistant': a conversation opens with 'system' or 'user' "
            "(RoleOrder::xtuner drops leading answers)");
      continue;
    }
    const Role previous = messages[i - 1].role;
    const bool follows = role == Role::assistant ? previous == Role::user
                         : role == Role::user    ? previous != Role::user
                                                 : previous == Role::assistant;
    check(follows, "WrongRoleOrder", "messages[{}] is '{}' after messages[{}] '{}'; expected {}{}", i, role_name(role),
          i - 1, role_name(previous), strict_successors(previous),
          role == Role::user && previous == Role::user ? " (RoleOrder::xtuner joins consecutive user messages)" : "");
  }
  const std::size_t last = messages.size() - 1;
  check(messages[last].role == Role::assistant, "WrongRoleOrder",
        "messages[{}] is '{}' and ends the conversation; expected an 'assistant' answer last "
        "(RoleOrder::xtuner drops messages after the last answer)",
        last, role_name(messages[last].role));
}

}  // namespace detail

/// Calls visit(const ChatTurn&) for each turn of `conversation`, in order,
/// after checking the role order of the whole conversation (so that an error
/// comes before any turn is visited).
template <class Visit>
void for_each_chat_turn(const Conversation& conversation, RoleOrder role_order, Visit&& visit) {
  const std::vector<Message>& messages = conversation.messages;
  check(!messages.empty(), "EmptyConversation", "the conversation has no messages");
  std::size_t begin = 0;
  if (role_order == RoleOrder::strict) {
    detail::check_strict_role_order(messages);
  } else {
    for (std::size_t i = 0; i < messages.size(); ++i) detail::check_chat_role(messages, i);
    while (begin < messages.size() && messages[begin].role == Role::assistant) ++begin;
  }
  std::size_t number = 0;
  for (std::size_t i = begin; i < messages.size(); ++i) {
    if (messages[i].role != Role::assistant) continue;
    const ChatTurn turn{std::span<const Message>(messages).subspan(begin, i + 1 - begin), begin, number++};
    visit(turn);
    begin = i + 1;
  }
}

}  // namespace qlora
