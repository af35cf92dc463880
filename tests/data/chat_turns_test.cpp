// Role-order rules: every way a strict conversation can be out of order is
// Error("WrongRoleOrder") naming the message index and the roles; RoleOrder::xtuner
// cuts turns as XTuner's openai_map_fn does (the rendered result is compared
// with XTuner's in turn_template_test.cpp; here, the turns themselves) and
// counts the messages it drops and joins (counted by hand in the comments).
#include <qlora/data/chat_turns.hpp>

#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include "data/test_support.hpp"

using qlora::ChatTurn;
using qlora::Conversation;
using qlora::Message;
using qlora::Role;
using qlora::RoleOrder;
using qlora::test::require_error;

namespace {

Conversation conversation(std::initializer_list<std::pair<Role, const char*>> messages) {
  Conversation out;
  for (const auto& [role, content] : messages) out.messages.push_back(Message{role, content, true});
  return out;
}

struct TurnSummary {
  std::size_t first_index;
  std::size_t number;
  std::string system;
  std::string input;
  std::string answer;
  bool operator==(const TurnSummary&) const = default;
};

std::vector<TurnSummary> turns(const Conversation& c, RoleOrder order, qlora::ChatTurnCuts* cuts = nullptr) {
  std::vector<TurnSummary> out;
  const qlora::ChatTurnCuts made = qlora::for_each_chat_turn(c, order, [&](const ChatTurn& turn) {
    TurnSummary summary{turn.first_index, turn.number, turn.system() ? turn.system()->content : "<none>", "",
                        turn.answer().content};
    turn.for_each_input([&](std::string_view piece) { summary.input += piece; });
    out.push_back(summary);
  });
  if (cuts != nullptr) *cuts = made;
  return out;
}

std::pair<std::size_t, std::size_t> xtuner_cuts(const Conversation& c) {
  qlora::ChatTurnCuts cuts;
  turns(c, RoleOrder::xtuner, &cuts);
  return {cuts.dropped_messages, cuts.joined_messages};
}

void require_strict_error(const Conversation& c, const char* part1, const char* part2) {
  require_error([&] { turns(c, RoleOrder::strict); }, "WrongRoleOrder", part1, part2);
}

}  // namespace

namespace Catch {
template <>
struct StringMaker<TurnSummary> {
  static std::string convert(const TurnSummary& t) {
    return fmt::format("{{{}, {}, system {:?}, input {:?}, answer {:?}}}", t.first_index, t.number, t.system, t.input,
                       t.answer);
  }
};
}  // namespace Catch

TEST_CASE("a strict conversation is cut into system? user assistant turns") {
  const Conversation c = conversation({{Role::system, "S"},
                                       {Role::user, "Q1"},
                                       {Role::assistant, "A1"},
                                       {Role::user, "Q2"},
                                       {Role::assistant, "A2"},
                                       {Role::system, "S3"},
                                       {Role::user, "Q3"},
                                       {Role::assistant, "A3"}});
  const std::vector<TurnSummary> expected{
      {0, 0, "S", "Q1", "A1"}, {3, 1, "<none>", "Q2", "A2"}, {5, 2, "S3", "Q3", "A3"}};
  qlora::ChatTurnCuts cuts{9, 9};
  CHECK(turns(c, RoleOrder::strict, &cuts) == expected);
  CHECK(cuts.dropped_messages == 0);
  CHECK(cuts.joined_messages == 0);
  // A well-formed conversation is cut the same way under both policies, and loses nothing.
  CHECK(turns(c, RoleOrder::xtuner, &cuts) == expected);
  CHECK(cuts.dropped_messages == 0);
  CHECK(cuts.joined_messages == 0);
}

TEST_CASE("RoleOrder::xtuner cuts turns as openai_map_fn does") {
  // Leading answer dropped; users joined with nothing between; the system
  // message inside the turn is its system; the trailing question dropped.
  const Conversation c = conversation({{Role::assistant, "lead"},
                                       {Role::user, "a "},
                                       {Role::user, "b"},
                                       {Role::system, "S"},
                                       {Role::user, "c"},
                                       {Role::assistant, "A"},
                                       {Role::assistant, "A2"},
                                       {Role::user, "trailing"}});
  CHECK(turns(c, RoleOrder::xtuner) == std::vector<TurnSummary>{{1, 0, "S", "a bc", "A"}, {6, 1, "<none>", "", "A2"}});
  // Dropped: "lead" and "trailing"; joined: "b" and "c" to "a ".
  CHECK(xtuner_cuts(c) == std::pair<std::size_t, std::size_t>{2, 2});
  // A conversation with no answer keeps no turn (as XTuner), and both its messages count as dropped.
  const Conversation unanswered = conversation({{Role::system, "S"}, {Role::user, "Q"}});
  CHECK(turns(unanswered, RoleOrder::xtuner).empty());
  CHECK(xtuner_cuts(unanswered) == std::pair<std::size_t, std::size_t>{2, 0});
  // The turn's last system message replaces the one before it ("S1" dropped); "Q2" joined.
  const Conversation two_systems = conversation(
      {{Role::system, "S1"}, {Role::user, "Q1"}, {Role::system, "S2"}, {Role::user, "Q2"}, {Role::assistant, "A"}});
  CHECK(turns(two_systems, RoleOrder::xtuner) == std::vector<TurnSummary>{{0, 0, "S2", "Q1Q2", "A"}});
  CHECK(xtuner_cuts(two_systems) == std::pair<std::size_t, std::size_t>{1, 1});
}

TEST_CASE("strict role order: each violation names the message and the roles") {
  require_strict_error(conversation({{Role::assistant, "A"}, {Role::user, "Q"}, {Role::assistant, "A"}}),
                       "messages[0] is 'assistant'", "opens with 'system' or 'user'");
  require_strict_error(conversation({{Role::user, "Q1"}, {Role::user, "Q2"}, {Role::assistant, "A"}}),
                       "messages[1] is 'user' after messages[0] 'user'; expected 'assistant'",
                       "RoleOrder::xtuner joins");
  require_strict_error(conversation({{Role::user, "Q"}}), "messages[0] is 'user' and ends the conversation",
                       "expected an 'assistant' answer last");
  require_strict_error(conversation({{Role::user, "Q"}, {Role::assistant, "A"}, {Role::user, "Q2"}}),
                       "messages[2] is 'user' and ends the conversation", "drops messages after the last answer");
  require_strict_error(
      conversation({{Role::system, "S"}, {Role::system, "S2"}, {Role::user, "Q"}, {Role::assistant, "A"}}),
      "messages[1] is 'system' after messages[0] 'system'", "expected 'user'");
  require_strict_error(conversation({{Role::user, "Q"}, {Role::system, "S"}, {Role::assistant, "A"}}),
                       "messages[1] is 'system' after messages[0] 'user'", "expected 'assistant'");
  require_strict_error(conversation({{Role::system, "S"}, {Role::assistant, "A"}}),
                       "messages[1] is 'assistant' after messages[0] 'system'", "expected 'user'");
  require_strict_error(conversation({{Role::user, "Q"}, {Role::assistant, "A"}, {Role::assistant, "A2"}}),
                       "messages[2] is 'assistant' after messages[1] 'assistant'", "expected 'system' or 'user'");
  require_strict_error(conversation({{Role::system, "S"}}), "messages[0] is 'system' and ends the conversation",
                       "'assistant'");
}

TEST_CASE("a text message or no message at all is an error under both policies") {
  for (const RoleOrder order : {RoleOrder::strict, RoleOrder::xtuner}) {
    require_error(
        [&] {
          turns(conversation({{Role::user, "Q"}, {Role::text, "doc"}}), order);
        },
        "WrongRoleOrder", "messages[1] has role 'text'", "Pretrain");
    require_error([&] { turns(Conversation{}, order); }, "EmptyConversation", "no messages");
  }
}
