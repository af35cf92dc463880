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
//     before an answer is its turn's system (earlier ones in the turn are
//     dropped), an assistant message with no user message before it gets an
//     empty input, and messages after the last answer are dropped. XTuner
//     drops them silently; here for_each_chat_turn returns how many messages
//     were dropped and joined (ChatTurnCuts), which SampleEncoder adds to
//     EncodeStats. A conversation that keeps no turn renders to nothing (and
//     SampleEncoder drops it, as XTuner does).
// In both, a conversation with no message is Error("EmptyConversation") (a
// reader that produces one has lost a record), and a `text` message, which no
// chat template can render, is Error("WrongRoleOrder").
//
// A strict error's hint names the setting that would accept the conversation,
// but only a setting the template has (detail::RoleOrderHints): TurnTemplate
// offers RoleOrder::xtuner, Phi2ChatML its own keep_trailing_question.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/conversation.hpp>

namespace qlora {

enum class RoleOrder : std::uint8_t { strict, xtuner };

/// What RoleOrder::xtuner did not keep as it was (always zero under strict).
struct ChatTurnCuts {
  /// Leading answers, messages after the last answer, system messages a later
  /// one in the same turn replaced.
  std::size_t dropped_messages = 0;
  /// User messages appended to the previous user message of their turn.
  std::size_t joined_messages = 0;
};

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

/// The settings a template offers for conversations strict order refuses,
/// named in the errors; empty where the template has none (a hint must name
/// a setting that exists). (Every member has an initializer, so designated
/// initializers may leave any out.)
struct RoleOrderHints {
  /// messages[0] is an answer.
  std::string_view leading_answer{};
  /// A user message follows a user message.
  std::string_view consecutive_users{};
  /// The conversation ends with a question (a user message).
  std::string_view trailing_question{};
  /// The conversation ends with a system message.
  std::string_view trailing_system{};
};

/// for_each_chat_turn's: a TurnTemplate can be given RoleOrder::xtuner.
inline constexpr RoleOrderHints xtuner_role_order_hints{
    .leading_answer = "RoleOrder::xtuner drops leading answers",
    .consecutive_users = "RoleOrder::xtuner joins consecutive user messages",
    .trailing_question = "RoleOrder::xtuner drops messages after the last answer",
    .trailing_system = "RoleOrder::xtuner drops messages after the last answer",
};

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

/// " (hint)", or "" for no hint.
inline std::string in_parentheses(std::string_view hint) {
  return hint.empty() ? std::string() : fmt::format(" ({})", hint);
}

inline void check_chat_role(const std::vector<Message>& messages, std::size_t index) {
  check(messages[index].role != Role::text, "WrongRoleOrder",
        "messages[{}] has role 'text', which a chat template cannot render (a {{\"text\"}} document is for Pretrain)",
        index);
}

/// Throws Error("WrongRoleOrder") unless `messages` is `(system? user assistant)+`,
/// or, with `trailing_question`, `(system? user assistant)* (system? user)?`
/// (the Phi-2 tutorial's order: a last question may go unanswered).
inline void check_strict_role_order(const std::vector<Message>& messages, const RoleOrderHints& hints,
                                    bool trailing_question = false) {
  for (std::size_t i = 0; i < messages.size(); ++i) {
    check_chat_role(messages, i);
    const Role role = messages[i].role;
    if (i == 0) {
      check(role != Role::assistant, "WrongRoleOrder",
            "messages[0] is 'assistant': a conversation opens with 'system' or 'user'{}",
            in_parentheses(hints.leading_answer));
      continue;
    }
    const Role previous = messages[i - 1].role;
    const bool follows = role == Role::assistant ? previous == Role::user
                         : role == Role::user    ? previous != Role::user
                                                 : previous == Role::assistant;
    check(follows, "WrongRoleOrder", "messages[{}] is '{}' after messages[{}] '{}'; expected {}{}", i, role_name(role),
          i - 1, role_name(previous), strict_successors(previous),
          in_parentheses(role == Role::user && previous == Role::user ? hints.consecutive_users : ""));
  }
  const std::size_t last = messages.size() - 1;
  const Role last_role = messages[last].role;
  check(last_role == Role::assistant || (trailing_question && last_role == Role::user), "WrongRoleOrder",
        "messages[{}] is '{}' and ends the conversation; expected {} last{}", last, role_name(last_role),
        trailing_question ? "an 'assistant' answer or a 'user' question" : "an 'assistant' answer",
        in_parentheses(last_role == Role::user ? hints.trailing_question : hints.trailing_system));
}

/// Adds what RoleOrder::xtuner joins in one turn's messages, and the system
/// messages the turn's last one replaced.
inline void count_turn_cuts(std::span<const Message> turn, ChatTurnCuts& cuts) {
  std::size_t users = 0;
  std::size_t systems = 0;
  for (const Message& message : turn) {
    users += message.role == Role::user ? 1 : 0;
    systems += message.role == Role::system ? 1 : 0;
  }
  if (users > 1) cuts.joined_messages += users - 1;
  if (systems > 1) cuts.dropped_messages += systems - 1;
}

}  // namespace detail

/// Calls visit(const ChatTurn&) for each turn of `conversation`, in order,
/// after checking the role order of the whole conversation (so that an error
/// comes before any turn is visited). Returns what RoleOrder::xtuner dropped
/// and joined.
template <class Visit>
ChatTurnCuts for_each_chat_turn(const Conversation& conversation, RoleOrder role_order, Visit&& visit) {
  const std::vector<Message>& messages = conversation.messages;
  check(!messages.empty(), "EmptyConversation", "the conversation has no messages");
  ChatTurnCuts cuts;
  std::size_t begin = 0;
  if (role_order == RoleOrder::strict) {
    detail::check_strict_role_order(messages, detail::xtuner_role_order_hints);
  } else {
    for (std::size_t i = 0; i < messages.size(); ++i) detail::check_chat_role(messages, i);
    while (begin < messages.size() && messages[begin].role == Role::assistant) ++begin;
    cuts.dropped_messages = begin;
  }
  std::size_t number = 0;
  for (std::size_t i = begin; i < messages.size(); ++i) {
    if (messages[i].role != Role::assistant) continue;
    const ChatTurn turn{std::span<const Message>(messages).subspan(begin, i + 1 - begin), begin, number++};
    detail::count_turn_cuts(turn.messages, cuts);
    visit(turn);
    begin = i + 1;
  }
  cuts.dropped_messages += messages.size() - begin;  // after the last answer
  return cuts;
}

}  // namespace qlora
