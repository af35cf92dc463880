// TurnTemplate, InternLM2Chat and ChatML against XTuner 0.2.0: the segments of
// every fixture conversation are the strings XTuner's openai_map_fn +
// template_map_fn made, in encode_fn's order and with its flags
// (tests/reference/chat_templates.py). Covers internlm2_chat, qwen_chat,
// default (EOS + BOS every turn), gemma (suffix and EOS), chatglm2 ({round})
// and a custom template with {{ }} escapes and no SEP, on the whitespace edge
// cases (CRLF, leading/trailing spaces, {input}-looking braces, an empty
// answer, an empty system prompt, loss = false) and XTuner's lenient role order.
// Then the counts of messages the lenient order dropped and joined, the
// template-string checks (InvalidTemplate) and the system-prompt rule.
#include <qlora/data/turn_template.hpp>

#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "data/chat_template_fixture.hpp"
#include "data/test_support.hpp"

using qlora::ChatML;
using qlora::Conversation;
using qlora::InternLM2Chat;
using qlora::Message;
using qlora::Role;
using qlora::RoleOrder;
using qlora::TemplateSegments;
using qlora::TurnTemplate;
using qlora::TurnTemplateConfig;
using qlora::test::chat_template_fixture;
using qlora::test::describe;
using qlora::test::require_error;

namespace {

bool is_turn_template(const std::string& name) { return chat_template_fixture()["xtuner_templates"].contains(name); }

TurnTemplateConfig config_with(std::string system, std::string instruction) {
  return {.system = std::move(system), .instruction = std::move(instruction)};
}

}  // namespace

TEST_CASE("templates render XTuner's template_map_fn strings, in encode_fn's segments") {
  std::size_t cases = 0;
  TemplateSegments segments;  // one buffer for all: render must leave nothing behind
  for (const auto& test_case : chat_template_fixture()["cases"]) {
    if (!is_turn_template(test_case["template"].get<std::string>())) continue;
    ++cases;
    INFO(qlora::test::case_name(test_case));
    const Conversation conversation = qlora::test::fixture_conversation(test_case["conversation"].get<std::string>());
    qlora::test::with_case_template(test_case, [&](const auto& chat_template) {
      chat_template.render(conversation, segments);
      CHECK(describe(segments) == qlora::test::describe_fixture_segments(test_case));
    });
  }
  CHECK(cases == 6 * 5 + 3);  // six templates x five conversations, three lenient ones
}

TEST_CASE("InternLM2Chat and ChatML are XTuner's internlm2_chat and qwen_chat") {
  for (const auto& [name, config] :
       {std::pair{"internlm2_chat", InternLM2Chat().config()}, std::pair{"qwen_chat", ChatML().config()}}) {
    INFO(name);
    const TurnTemplateConfig xtuner = qlora::test::xtuner_template_config(name);
    CHECK(config.system == xtuner.system);
    CHECK(config.instruction == xtuner.instruction);
    CHECK(config.suffix == xtuner.suffix);
    CHECK(config.suffix_as_eos == xtuner.suffix_as_eos);
    CHECK(config.sep == xtuner.sep);
    CHECK(config.bos == xtuner.bos);
    CHECK(config.special_tokens == xtuner.special_tokens);
  }
  CHECK(InternLM2Chat().uses_bos());
  CHECK_FALSE(ChatML().uses_bos());
  CHECK_FALSE(InternLM2Chat().uses_eos());  // <|im_end|> is the EOS
  CHECK(InternLM2Chat(RoleOrder::xtuner).role_order() == RoleOrder::xtuner);
}

TEST_CASE("the lenient conversations are errors under the default strict order") {
  TemplateSegments segments;
  for (const char* name : {"lenient", "lenient_unanswered", "lenient_double_answer"}) {
    INFO(name);
    const Conversation conversation = qlora::test::fixture_conversation(name);
    require_error([&] { InternLM2Chat().render(conversation, segments); }, "WrongRoleOrder", "messages[");
  }
}

TEST_CASE("the segments carry what RoleOrder::xtuner dropped and joined") {
  TemplateSegments segments;
  // "lenient": the leading answer and the trailing question dropped, "b" and "c" joined to "a ".
  InternLM2Chat(RoleOrder::xtuner).render(qlora::test::fixture_conversation("lenient"), segments);
  CHECK(segments.dropped_messages() == 2);
  CHECK(segments.joined_messages() == 2);
  // Each render starts the counts afresh.
  InternLM2Chat(RoleOrder::xtuner).render(qlora::test::fixture_conversation("canonical"), segments);
  CHECK(segments.dropped_messages() == 0);
  CHECK(segments.joined_messages() == 0);
}

TEST_CASE("template strings are checked as Python's str.format would read them") {
  const auto instruction_error = [](const std::string& instruction, const char* part1, const char* part2) {
    require_error([&] { TurnTemplate(config_with("{system}", instruction)); }, "InvalidTemplate", part1, part2);
  };
  instruction_error("Q: {inptu}", "INSTRUCTION \"Q: {inptu}\", column 4",
                    "unknown placeholder {inptu}; expected {input} or {round}");
  instruction_error("{input} {system}", "column 9", "unknown placeholder {system}");
  instruction_error("{input} {", "column 9", "'{' is not closed by '}'");
  instruction_error("{input {round}", "column 1", "'{' is not closed");
  instruction_error("{input} }", "column 9", "single '}'");
  // Python's conversions, format specs and positional fields have no use in a template.
  instruction_error("{input!r}", "column 1", "unknown placeholder {input!r}");
  instruction_error("{input:>9}", "column 1", "unknown placeholder {input:>9}");
  instruction_error("{} {input}", "column 1", "unknown placeholder {}");
  instruction_error("no placeholder", "has no {input} placeholder", "dropped");
  instruction_error("{{input}}", "has no {input} placeholder", "dropped");  // escaped: literal text

  require_error([] { TurnTemplate(config_with("System: {input}\n", "{input}")); }, "InvalidTemplate",
                "SYSTEM \"System: {input}\\n\", column 9", "expected {system}");
  require_error([] { TurnTemplate(config_with("System prompt\n", "{input}")); }, "InvalidTemplate",
                "SYSTEM \"System prompt\\n\" has no {system} placeholder");
  CHECK_NOTHROW(TurnTemplate(config_with("", "{input}")));
  CHECK_NOTHROW(TurnTemplate(config_with("{{{system}}}", "{{{input}}} {round}{round}")));
}

TEST_CASE("a template without SYSTEM refuses a system prompt rather than drop it") {
  const TurnTemplate no_system(config_with("", "<{input}>"));
  TemplateSegments segments;
  Conversation c{
      {Message{Role::system, "be brief", true}, Message{Role::user, "Q", true}, Message{Role::assistant, "A", true}},
      7};
  require_error([&] { no_system.render(c, segments); }, "TemplateHasNoSystem",
                "messages[0] is a system prompt, but this template has no SYSTEM string");
  // An empty system message asks for nothing (XTuner skips empty systems too).
  c.messages[0].content.clear();
  no_system.render(c, segments);
  CHECK(describe(segments) == std::vector<std::string>{"bos-", "text- \"<Q>\"", "text+ \"A\"", "eos+"});
}
