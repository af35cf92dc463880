// Phi2ChatML against the Phi-2 tutorial's `templates[...].format(msg=...)`
// (reproduced in tests/reference/chat_templates.py): one segment per message,
// the assistant's learned whole, no BOS/EOS, on the fixture's conversations
// (whitespace edge cases, system prompts, loss = false, added tokens inside
// content), and, with keep_trailing_question, on conversations ending with an
// unanswered question, which the tutorial's tokenize keeps (the script checks
// its role-tagged copy against the tutorial's own code where the data allows).
// Otherwise the role order is strict, and an error's hint names only the
// setting Phi2ChatML has.
#include <qlora/data/phi2_chatml.hpp>

#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "data/chat_template_fixture.hpp"
#include "data/test_support.hpp"

using qlora::Conversation;
using qlora::Message;
using qlora::Phi2ChatML;
using qlora::Role;
using qlora::TemplateSegments;
using qlora::test::chat_template_fixture;
using qlora::test::describe;
using qlora::test::require_error;

TEST_CASE("Phi2ChatML renders each message as the tutorial's templates do") {
  std::size_t strict_cases = 0;
  std::size_t tutorial_cases = 0;
  TemplateSegments segments;
  for (const auto& test_case : chat_template_fixture()["cases"]) {
    if (test_case["template"] != "phi2_chatml") continue;
    INFO(qlora::test::case_name(test_case));
    const bool tutorial = qlora::test::case_role_order_name(test_case) == "tutorial";
    ++(tutorial ? tutorial_cases : strict_cases);
    const Conversation conversation = qlora::test::fixture_conversation(test_case["conversation"].get<std::string>());
    const auto expected = qlora::test::describe_fixture_segments(test_case);
    Phi2ChatML{.keep_trailing_question = true}.render(conversation, segments);
    CHECK(describe(segments) == expected);
    // keep_trailing_question only adds conversations: a strict one renders the same without it.
    if (!tutorial) {
      Phi2ChatML{}.render(conversation, segments);
      CHECK(describe(segments) == expected);
    }
  }
  CHECK(strict_cases == 5);
  CHECK(tutorial_cases == 3);
}

TEST_CASE("Phi2ChatML needs <|im_start|> and <|im_end|>, and no BOS or EOS") {
  const Phi2ChatML chat_template;
  CHECK(std::vector<std::string>(chat_template.special_tokens().begin(), chat_template.special_tokens().end()) ==
        std::vector<std::string>{"<|im_start|>", "<|im_end|>"});
  CHECK_FALSE(chat_template.uses_bos());
  CHECK_FALSE(chat_template.uses_eos());
}

TEST_CASE("Phi2ChatML refuses a trailing question unless told to keep it, and says how") {
  TemplateSegments segments;
  const Conversation trailing = qlora::test::fixture_conversation("trailing_question");
  const qlora::Error error = qlora::test::thrown_by([&] { Phi2ChatML{}.render(trailing, segments); });
  CHECK(error.code() == "WrongRoleOrder");
  CHECK(error.message() ==
        "messages[2] is 'user' and ends the conversation; expected an 'assistant' answer last "
        "(Phi2ChatML::keep_trailing_question keeps it, masked, as the tutorial's tokenize does)");
  CHECK_NOTHROW(Phi2ChatML{.keep_trailing_question = true}.render(trailing, segments));
}

TEST_CASE("Phi2ChatML takes only strictly ordered chat conversations, a trailing question aside") {
  TemplateSegments segments;
  for (const Phi2ChatML chat_template : {Phi2ChatML{}, Phi2ChatML{.keep_trailing_question = true}}) {
    INFO("keep_trailing_question " << chat_template.keep_trailing_question);
    const auto render = [&](const Conversation& conversation) { chat_template.render(conversation, segments); };
    // No hint: Phi2ChatML has no setting that takes these (RoleOrder::xtuner is TurnTemplate's).
    const qlora::Error leading = qlora::test::thrown_by([&] { render(qlora::test::fixture_conversation("lenient")); });
    CHECK(leading.code() == "WrongRoleOrder");
    CHECK(leading.message() == "messages[0] is 'assistant': a conversation opens with 'system' or 'user'");
    const Conversation two_users{{Message{Role::user, "a", true}, Message{Role::user, "b", true}}, 0};
    const qlora::Error joined = qlora::test::thrown_by([&] { render(two_users); });
    CHECK(joined.message() == "messages[1] is 'user' after messages[0] 'user'; expected 'assistant'");
    const Conversation trailing_system{
        {Message{Role::user, "Q", true}, Message{Role::assistant, "A", true}, Message{Role::system, "S", true}}, 0};
    require_error([&] { render(trailing_system); }, "WrongRoleOrder", "messages[2] is 'system' and ends the conversation");
    CHECK(qlora::test::thrown_by([&] { render(trailing_system); }).message().find('(') == std::string::npos);
    require_error([&] { render(qlora::test::fixture_conversation("spaces")); }, "WrongRoleOrder",
                  "messages[0] has role 'text'");
    require_error([&] { render(Conversation{}); }, "EmptyConversation", "no messages");
  }
}
