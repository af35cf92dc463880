// Pretrain: a {"text"} document (one Role::text message) as a pre-training
// sample, as XTuner's pretrain_map_fn + encode_fn make it:
//
//   BOS                              masked (nothing predicts a sample's first token)
//   the text, stripped               learned
//   [EOS]                            learned, with append_eos
//
// The text is stripped as Python's str.strip() does (pretrain_map_fn), Unicode
// spaces included (data/detail/python_strip.hpp). XTuner appends no EOS since
// v0.1.20; append_eos gives what older XTuner and most pre-training setups do,
// so that documents packed together are separated by a learned EOS.
// `bos = false` is for tokenizers without BOS (Qwen-style, as XTuner's
// get_bos_eos_token_ids). A message with loss = false masks the text.
//
// Anything but exactly one text message is Error("WrongRoleOrder") (a chat
// record belongs to a chat template), no message at all Error("EmptyConversation").
#pragma once

#include <cstddef>
#include <span>
#include <string>

#include <qlora/core/error.hpp>
#include <qlora/data/chat_template.hpp>
#include <qlora/data/conversation.hpp>
#include <qlora/data/detail/python_strip.hpp>
#include <qlora/data/template_segment.hpp>

namespace qlora {

struct Pretrain {
  /// Whether the document opens with the tokenizer's BOS.
  bool bos = true;
  /// Whether the document ends with the tokenizer's EOS (learned).
  bool append_eos = false;

  void render(const Conversation& conversation, TemplateSegments& out) const {
    check(!conversation.messages.empty(), "EmptyConversation", "the document has no messages");
    for (std::size_t i = 0; i < conversation.messages.size(); ++i) {
      const Role role = conversation.messages[i].role;
      check(role == Role::text, "WrongRoleOrder",
            "messages[{}] is '{}': Pretrain renders one 'text' document (a chat record needs a chat template)", i,
            role_name(role));
      check(i == 0, "WrongRoleOrder", "messages[{}] is a second 'text' message: Pretrain renders one document", i);
    }
    const Message& document = conversation.messages.front();
    out.clear();
    if (bos) out.add_bos();
    out.add_text(detail::python_strip(document.content), document.loss);
    if (append_eos) out.add_eos(document.loss);
  }

  [[nodiscard]] std::span<const std::string> special_tokens() const noexcept { return {}; }
  [[nodiscard]] bool uses_bos() const noexcept { return bos; }
  [[nodiscard]] bool uses_eos() const noexcept { return append_eos; }
};

static_assert(ChatTemplate<Pretrain>);

}  // namespace qlora
