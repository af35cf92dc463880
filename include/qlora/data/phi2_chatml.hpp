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
// masked. Role order is RoleOrder::strict (the tutorial's data alternates
// user/assistant; a system message may open a turn).
#pragma once

#include <array>
#include <span>
#include <string>

#include <qlora/data/chat_template.hpp>
#include <qlora/data/chat_turns.hpp>
#include <qlora/data/conversation.hpp>
#include <qlora/data/template_segment.hpp>

namespace qlora {

struct Phi2ChatML {
  void render(const Conversation& conversation, TemplateSegments& out) const {
    out.clear();
    for_each_chat_turn(conversation, RoleOrder::strict, [&out](const ChatTurn& turn) {
      for (const Message& message : turn.messages) {
        out.begin_text(message.role == Role::assistant && message.loss);
        out.append("<|im_start|>");
        out.append(role_name(message.role));
        out.append("\n");
        out.append(message.content);
        out.append("<|im_end|>");
      }
    });
  }

  [[nodiscard]] std::span<const std::string> special_tokens() const {
    static const std::array<std::string, 2> tokens{"<|im_start|>", "<|im_end|>"};
    return tokens;
  }
  [[nodiscard]] bool uses_bos() const noexcept { return false; }
  [[nodiscard]] bool uses_eos() const noexcept { return false; }
};

static_assert(ChatTemplate<Phi2ChatML>);

}  // namespace qlora
