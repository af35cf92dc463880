// The fixture tests/reference/chat_templates.py writes
// (tests/data/data/templates/chat_templates.json), read for the template and
// encoder tests: its conversations as qlora::Conversation, its toy tokenizer,
// the template each case names, and segments in a form Catch prints readably.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <qlora/data/conversation.hpp>
#include <qlora/data/phi2_chatml.hpp>
#include <qlora/data/pretrain.hpp>
#include <qlora/data/template_segment.hpp>
#include <qlora/data/turn_template.hpp>

#include "data/test_support.hpp"
#include "data/toy_tokenizer.hpp"
#include "io/test_support.hpp"  // load_json

namespace qlora::test {

inline const Json& chat_template_fixture() {
  static const Json fixture = load_json(data_fixture("templates/chat_templates.json"));
  return fixture;
}

inline Role role_from_name(std::string_view name) {
  for (const Role role : {Role::system, Role::user, Role::assistant, Role::text}) {
    if (role_name(role) == name) return role;
  }
  throw std::invalid_argument(fmt::format("unknown role {:?} in the fixture", name));
}

/// The conversation (chat) or document (pre-training) the fixture calls `name`.
inline Conversation fixture_conversation(std::string_view name) {
  const Json& fixture = chat_template_fixture();
  Conversation conversation;
  if (fixture["documents"].contains(name)) {
    conversation.messages.push_back({Role::text, fixture["documents"][std::string(name)].get<std::string>(), true});
    return conversation;
  }
  for (const Json& message : fixture["conversations"].at(std::string(name))) {
    conversation.messages.push_back({role_from_name(message["role"].get<std::string>()),
                                     message["content"].get<std::string>(), message["loss"].get<bool>()});
  }
  return conversation;
}

/// The toy tokenizer of the fixture, its added tokens registered in its order.
inline ToyTokenizer fixture_tokenizer() {
  const Json& toy = chat_template_fixture()["toy_tokenizer"];
  const auto added = toy["added_tokens"].get<std::vector<std::string>>();
  ToyTokenizer tokenizer(added);
  // The C++ toy must number tokens as the Python one did.
  REQUIRE(tokenizer.token_to_id(added.front()) == toy["first_added_id"].get<TokenId>());
  REQUIRE(ToyTokenizer::byte_offset == toy["byte_offset"].get<TokenId>());
  REQUIRE(ToyTokenizer::bos_id == toy["bos_id"].get<TokenId>());
  REQUIRE(ToyTokenizer::eos_id == toy["eos_id"].get<TokenId>());
  return tokenizer;
}

/// A TurnTemplateConfig from the fixture's copy of an XTuner PROMPT_TEMPLATE entry.
inline TurnTemplateConfig xtuner_template_config(std::string_view name) {
  const Json& strings = chat_template_fixture()["xtuner_templates"].at(std::string(name));
  return {
      .system = strings["SYSTEM"].get<std::string>(),
      .instruction = strings["INSTRUCTION"].get<std::string>(),
      .suffix = strings["SUFFIX"].get<std::string>(),
      .suffix_as_eos = strings["SUFFIX_AS_EOS"].get<bool>(),
      .sep = strings["SEP"].get<std::string>(),
      .bos = strings["bos"].get<bool>(),
      .special_tokens = strings["special_tokens"].get<std::vector<std::string>>(),
  };
}

/// The case's role order: "strict", "xtuner" (TurnTemplate's RoleOrder), or
/// "tutorial" (Phi2ChatML::keep_trailing_question).
inline std::string case_role_order_name(const Json& test_case) { return test_case.value("role_order", "strict"); }

inline RoleOrder case_role_order(const Json& test_case) {
  return case_role_order_name(test_case) == "xtuner" ? RoleOrder::xtuner : RoleOrder::strict;
}

/// Calls use(chat_template) with the template a fixture case names: the
/// library's own for internlm2_chat, qwen_chat, phi2_chatml and pretrain, a
/// TurnTemplate from XTuner's strings for the others, each with the case's
/// role order.
template <class Use>
void with_case_template(const Json& test_case, Use&& use) {
  const std::string name = test_case["template"].get<std::string>();
  const RoleOrder role_order = case_role_order(test_case);
  if (name == "internlm2_chat") {
    use(InternLM2Chat(role_order));
  } else if (name == "qwen_chat") {
    use(ChatML(role_order));
  } else if (name == "phi2_chatml") {
    use(Phi2ChatML{.keep_trailing_question = case_role_order_name(test_case) == "tutorial"});
  } else if (name == "pretrain") {
    use(Pretrain{});
  } else if (name == "pretrain_eos") {
    use(Pretrain{.append_eos = true});
  } else if (name == "pretrain_nobos") {
    use(Pretrain{.bos = false});
  } else {
    use(TurnTemplate(xtuner_template_config(name), role_order));
  }
}

/// One segment as text, e.g. `text+ "A2<|im_end|>"` (+ learned, - masked) or `eos+`.
inline std::string describe(std::string_view kind, bool supervised, std::string_view text) {
  const char flag = supervised ? '+' : '-';
  return kind == "text" ? fmt::format("text{} {:?}", flag, text) : fmt::format("{}{}", kind, flag);
}

/// The segments, leaving out empty texts (they give no tokens, and the fixture
/// leaves them out too).
inline std::vector<std::string> describe(const TemplateSegments& segments) {
  std::vector<std::string> out;
  for (std::size_t i = 0; i < segments.size(); ++i) {
    const TemplateSegment segment = segments[i];
    if (segment.kind == SegmentKind::text && segment.text.empty()) continue;
    const std::string_view kind = segment.kind == SegmentKind::text  ? "text"
                                  : segment.kind == SegmentKind::bos ? "bos"
                                                                     : "eos";
    out.push_back(describe(kind, segment.supervised, segment.text));
  }
  return out;
}

inline std::vector<std::string> describe_fixture_segments(const Json& test_case) {
  std::vector<std::string> out;
  for (const Json& segment : test_case["segments"]) {
    out.push_back(describe(segment["kind"].get<std::string>(), segment["supervised"].get<bool>(),
                           segment.value("text", std::string())));
  }
  return out;
}

/// Catch section name of a case: "internlm2_chat / canonical".
inline std::string case_name(const Json& test_case) {
  return fmt::format("{} / {}", test_case["template"].get<std::string>(), test_case["conversation"].get<std::string>());
}

}  // namespace qlora::test
