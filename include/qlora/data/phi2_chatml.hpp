// Phi2ChatML: the ChatML variant of the Phi-2 QLoRA tutorial (its `templates`
// and `tokenize`): every message becomes one segment,
//
//   <|im_start|>user\n{content}<|im_end|>         masked
//   <|im_start|>assistant\n{content}<|im_end|>    learned, markers included
//
// concatenated with no separator and no BOS/EOS (Phi-2's tokenizer has no BOS,
// and the tutorial adds none). Where the tutorial has nothing to say, it is
// extended the ChatML way: a system message is `<|im_start|>system\n...`
// masked like a user message, and an assistant message with loss = false is
// masked.
//
// Role order: strict (data/chat_turns.hpp), `(system? user assistant)+`, by
// default. The tutorial's tokenize takes any number of messages (even ones are
// the user's, odd ones the assistant's), so a conversation ending with a
// question is a sample there, the question masked; keep_trailing_question
// accepts that too (`(system? user assistant)* (system? user)?`), for exactly
// the tutorial's samples. It is off by default because a trailing question is
// more often a record cut short than a choice, and learning nothing from it
// costs tokens; a sample left with no learned token (a lone question) is still
// dropped by SampleEncoder.
#pragma once

#include <array>
#include <span>
#include <string>

#include <qlora/core/error.hpp>
#include <qlora/data/chat_template.hpp>
#include <qlora/data/chat_turns.hpp>
#include <qlora/data/conversation.hpp>
#include <qlora/data/template_segment.hpp>

namespace qlora {

struct Phi2ChatML {
  /// Accept a conversation that ends with an unanswered question, rendered
  /// and masked like any question (the tutorial's tokenize does).
  bool keep_trailing_question = false;

  void render(const Conversation& conversation, TemplateSegments& out) const {
    check(!conversation.messages.empty(), "EmptyConversation", "the conversation has no messages");
    detail::check_strict_role_order(conversation.messages, hints, keep_trailing_question);
    out.clear();
    for (const Message& message : conversation.messages) {
      out.begin_text(message.role == Role::assistant && message.loss);
      out.append("<|im_start|>");
      out.append(role_name(message.role));
      out.append("\n");
      out.append(message.content);
      out.append("<|im_end|>");
    }
  }

  [[nodiscard]] std::span<const std::string> special_tokens() const {
    static const std::array<std::string, 2> tokens{"<|im_start|>", "<|im_end|>"};
    return tokens;
  }
  [[nodiscard]] bool uses_bos() const noexcept { return false; }
  [[nodiscard]] bool uses_eos() const noexcept { return false; }

 private:
  /// Phi2ChatML has no RoleOrder::xtuner: the only other order it offers is
  /// keep_trailing_question.
  static constexpr detail::RoleOrderHints hints{
      .trailing_question = "Phi2ChatML::keep_trailing_question keeps it, masked, as the tutorial's tokenize does"};
};

static_assert(ChatTemplate<Phi2ChatML>);

}  // namespace qlora
