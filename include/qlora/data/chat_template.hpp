// The ChatTemplate concept: what SampleEncoder needs from a template. A
// template is a small policy object, a template argument of the encoder, so
// rendering is a direct (inlinable) call with no virtual dispatch per sample.
//
// The templates:
//   - TurnTemplate (data/turn_template.hpp): XTuner's SYSTEM/INSTRUCTION/
//     SUFFIX/SEP templates from strings, with InternLM2Chat and ChatML;
//   - Phi2ChatML (data/phi2_chatml.hpp): the Phi-2 QLoRA tutorial's ChatML;
//   - Pretrain (data/pretrain.hpp): {"text"} documents for pre-training.
#pragma once

#include <concepts>
#include <span>
#include <string>

#include <qlora/data/conversation.hpp>
#include <qlora/data/template_segment.hpp>

namespace qlora {

template <class T>
concept ChatTemplate = requires(const T& chat_template, const Conversation& conversation, TemplateSegments& out) {
  /// Replaces `out` with the segments of `conversation` (and the counts of
  /// messages it dropped or joined); throws Error("EmptyConversation"),
  /// Error("WrongRoleOrder") or Error("TemplateHasNoSystem") for one it cannot render.
  { chat_template.render(conversation, out) } -> std::same_as<void>;
  /// The tokens the template's strings rely on (<|im_start|>, ...): SampleEncoder
  /// checks that the tokenizer splits each out as one id.
  { chat_template.special_tokens() } -> std::convertible_to<std::span<const std::string>>;
  /// Whether rendered segments may hold BOS / EOS markers (the tokenizer must
  /// then define those ids).
  { chat_template.uses_bos() } -> std::same_as<bool>;
  { chat_template.uses_eos() } -> std::same_as<bool>;
};

}  // namespace qlora
