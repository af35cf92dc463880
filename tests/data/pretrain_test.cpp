// Pretrain against XTuner 0.2.0's pretrain_map_fn (+ encode_fn's BOS/EOS
// placement): the document stripped as Python's str.strip() strips it, BOS
// masked, optional EOS learned (older XTuner), no BOS for Qwen-style tokenizers;
// detail::python_strip against str.strip() around every character Python calls
// whitespace (and some it does not); the role rules.
#include <qlora/data/pretrain.hpp>

#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <qlora/data/detail/python_strip.hpp>

#include "data/chat_template_fixture.hpp"
#include "data/test_support.hpp"

using qlora::Conversation;
using qlora::Message;
using qlora::Pretrain;
using qlora::Role;
using qlora::TemplateSegments;
using qlora::test::chat_template_fixture;
using qlora::test::describe;
using qlora::test::require_error;

TEST_CASE("Pretrain renders documents as pretrain_map_fn + encode_fn") {
  std::size_t cases = 0;
  TemplateSegments segments;
  for (const auto& test_case : chat_template_fixture()["cases"]) {
    if (!test_case["template"].get<std::string>().starts_with("pretrain")) continue;
    ++cases;
    INFO(qlora::test::case_name(test_case));
    const Conversation conversation = qlora::test::fixture_conversation(test_case["conversation"].get<std::string>());
    qlora::test::with_case_template(test_case, [&](const auto& chat_template) {
      chat_template.render(conversation, segments);
      CHECK(describe(segments) == qlora::test::describe_fixture_segments(test_case));
    });
  }
  CHECK(cases == 3 * 5);  // plain, with EOS, without BOS; five documents
}

TEST_CASE("python_strip strips what Python's str.strip() strips") {
  std::size_t cases = 0;
  for (const auto& pair : chat_template_fixture()["python_strip"]) {
    const auto text = pair[0].get<std::string>();
    INFO(text);
    CHECK(qlora::detail::python_strip(text) == pair[1].get<std::string>());
    ++cases;
  }
  CHECK(cases > 29);  // the 29 whitespace characters of Python 3.11, and more
  // Bytes that are not UTF-8 are never taken for (part of) a space.
  CHECK(qlora::detail::python_strip(" \xE2\x80 x \x80\xC2") == "\xE2\x80 x \x80\xC2");
  CHECK(qlora::detail::python_strip("\xC2") == "\xC2");
}

TEST_CASE("a masked document and the template's needs") {
  TemplateSegments segments;
  const Conversation masked{{Message{Role::text, " doc ", false}}, 0};
  Pretrain{.append_eos = true}.render(masked, segments);
  CHECK(describe(segments) == std::vector<std::string>{"bos-", "text- \"doc\"", "eos-"});
  CHECK(Pretrain{}.special_tokens().empty());
  CHECK(Pretrain{}.uses_bos());
  CHECK_FALSE(Pretrain{}.uses_eos());
  CHECK_FALSE(Pretrain{.bos = false}.uses_bos());
  CHECK(Pretrain{.append_eos = true}.uses_eos());
}

TEST_CASE("Pretrain takes exactly one text message") {
  TemplateSegments segments;
  require_error([&] { Pretrain{}.render(qlora::test::fixture_conversation("canonical"), segments); }, "WrongRoleOrder",
                "messages[0] is 'system'", "chat template");
  const Conversation two{{Message{Role::text, "a", true}, Message{Role::text, "b", true}}, 0};
  require_error([&] { Pretrain{}.render(two, segments); }, "WrongRoleOrder", "messages[1] is a second 'text' message");
  require_error([&] { Pretrain{}.render(Conversation{}, segments); }, "EmptyConversation", "no messages");
}
