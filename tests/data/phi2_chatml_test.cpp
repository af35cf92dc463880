// Phi2ChatML against the Phi-2 tutorial's `templates[...].format(msg=...)`
// (reproduced in tests/reference/chat_templates.py): one segment per message,
// the assistant's learned whole, no BOS/EOS, on the fixture's conversations
// (whitespace edge cases, system prompts, loss = false, added tokens inside
// content). Role order is always strict.
#include <qlora/data/phi2_chatml.hpp>

#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "data/chat_template_fixture.hpp"
#include "data/test_support.hpp"

using qlora::Conversation;
using qlora::Phi2ChatML;
using qlora::TemplateSegments;
using qlora::test::chat_template_fixture;
using qlora::test::describe;
using qlora::test::require_error;

TEST_CASE("Phi2ChatML renders each message as the tutorial's templates do") {
  std::size_t cases = 0;
  TemplateSegments segments;
  for (const auto& test_case : chat_template_fixture()["cases"]) {
    if (test_case["template"] != "phi2_chatml") continue;
    ++cases;
    INFO(qlora::test::case_name(test_case));
    const Conversation conversation = qlora::test::fixture_conversation(test_case["conversation"].get<std::string>());
    Phi2ChatML{}.render(conversation, segments);
    CHECK(describe(segments) == qlora::test::describe_fixture_segments(test_case));
  }
  CHECK(cases == 5);
}

TEST_CASE("Phi2ChatML needs <|im_start|> and <|im_end|>, and no BOS or EOS") {
  const Phi2ChatML chat_template;
  CHECK(std::vector<std::string>(chat_template.special_tokens().begin(), chat_template.special_tokens().end()) ==
        std::vector<std::string>{"<|im_start|>", "<|im_end|>"});
  CHECK_FALSE(chat_template.uses_bos());
  CHECK_FALSE(chat_template.uses_eos());
}

TEST_CASE("Phi2ChatML takes only strictly ordered chat conversations") {
  TemplateSegments segments;
  require_error([&] { Phi2ChatML{}.render(qlora::test::fixture_conversation("lenient"), segments); }, "WrongRoleOrder",
                "messages[0] is 'assistant'");
  require_error([&] { Phi2ChatML{}.render(qlora::test::fixture_conversation("spaces"), segments); }, "WrongRoleOrder",
                "messages[0] has role 'text'");
  require_error([&] { Phi2ChatML{}.render(Conversation{}, segments); }, "EmptyConversation", "no messages");
}
