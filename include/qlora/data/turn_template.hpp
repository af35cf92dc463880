// TurnTemplate: XTuner's prompt templates (xtuner/utils/templates.py), built
// from their strings, rendered as XTuner's template_map_fn and encode_fn do:
//
//   turn i:  [BOS]  SYSTEM(system) + INSTRUCTION(input, round = i + 1)   masked
//                   answer + SUFFIX                                      learned
//                   [EOS]                                                learned
//                   SEP                                                  masked
//
//   - SYSTEM is prepended to the instruction of every turn whose system text
//     is not empty (a system message sets the system of the turn it opens);
//   - SUFFIX_AS_EOS: the suffix ends the answer and no EOS follows; otherwise
//     the tokenizer's EOS follows every answer, learned with it;
//   - BOS (when the template uses it) opens the first turn and every turn after
//     an EOS: once per conversation for suffix-as-EOS templates (InternLM2),
//     every turn for the others; never for Qwen-style templates;
//   - an assistant message with loss = false (XTuner's output_with_loss) keeps
//     its tokens in the context but masks them, its EOS included.
// The instruction, the answer and the separator are separate segments, since
// XTuner tokenizes them separately (see data/template_segment.hpp).
//
// The strings use Python str.format placeholders ({system}; {input} and
// {round}; {{ and }} for literal braces), checked at construction:
// Error("InvalidTemplate") for an unknown placeholder, an unbalanced brace, an
// INSTRUCTION without {input} or a SYSTEM without {system} (either would drop
// the message's text from every sample). A template with no SYSTEM string has
// no place for a system prompt: a conversation with a non-empty system message
// is then Error("TemplateHasNoSystem") rather than a sample without its prompt.
// Under RoleOrder::xtuner, the messages it drops and joins are counted in the
// segments (TemplateSegments::count_cuts) for SampleEncoder's EncodeStats.
//
// InternLM2Chat and ChatML are XTuner's internlm2_chat and qwen_chat (standard
// ChatML): the same strings; InternLM2 opens a conversation with BOS, Qwen
// does not (XTuner's get_bos_eos_token_ids gives Qwen tokenizers no BOS).
#pragma once

#include <charconv>
#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <qlora/core/error.hpp>
#include <qlora/data/chat_template.hpp>
#include <qlora/data/chat_turns.hpp>
#include <qlora/data/conversation.hpp>
#include <qlora/data/detail/template_pattern.hpp>
#include <qlora/data/template_segment.hpp>

namespace qlora {

/// One XTuner PROMPT_TEMPLATE entry, plus what XTuner decides from the tokenizer.
/// (Every member has an initializer, so designated initializers may leave any out.)
struct TurnTemplateConfig {
  /// SYSTEM, with {system}; empty when the template has no system prompt.
  std::string system{};
  /// INSTRUCTION, with {input} (the user's message) and optionally {round}
  /// (the 1-based turn number).
  std::string instruction{};
  /// SUFFIX: appended to every answer and learned with it.
  std::string suffix{};
  /// SUFFIX_AS_EOS: the suffix replaces the tokenizer's EOS.
  bool suffix_as_eos = false;
  /// SEP: after every turn, masked.
  std::string sep{};
  /// Whether turns open with the tokenizer's BOS (false for Qwen-style models).
  bool bos = true;
  /// Added tokens the strings rely on (<|im_start|>, ...), checked against the
  /// tokenizer by SampleEncoder.
  std::vector<std::string> special_tokens{};
};

class TurnTemplate {
 public:
  explicit TurnTemplate(TurnTemplateConfig config, RoleOrder role_order = RoleOrder::strict)
      : config_(std::move(config)),
        role_order_(role_order),
        system_(config_.system, "SYSTEM", {"system"}),
        instruction_(config_.instruction, "INSTRUCTION", {"input", "round"}) {
    check(instruction_.uses(input_field), "InvalidTemplate",
          "INSTRUCTION {:?} has no {{input}} placeholder: the user's messages would be dropped", config_.instruction);
    check(system_.empty() || system_.uses(system_field), "InvalidTemplate",
          "SYSTEM {:?} has no {{system}} placeholder: system prompts would be dropped", config_.system);
  }

  void render(const Conversation& conversation, TemplateSegments& out) const {
    out.clear();
    bool next_needs_bos = true;
    const auto append = [&out](std::string_view piece) { out.append(piece); };
    const ChatTurnCuts cuts = for_each_chat_turn(conversation, role_order_, [&](const ChatTurn& turn) {
      if (config_.bos && next_needs_bos) out.add_bos();
      out.begin_text(false);
      render_system(turn, conversation, out);
      instruction_.render(append, [&](std::size_t field) {
        if (field == input_field) {
          turn.for_each_input(append);
        } else {
          append_number(turn.number + 1, out);
        }
      });
      const Message& answer = turn.answer();
      out.begin_text(answer.loss);
      out.append(answer.content);
      out.append(config_.suffix);
      next_needs_bos = !config_.suffix_as_eos;
      if (next_needs_bos) out.add_eos(answer.loss);
      if (!config_.sep.empty()) out.add_text(config_.sep, false);
    });
    out.count_cuts(cuts.dropped_messages, cuts.joined_messages);
  }

  [[nodiscard]] std::span<const std::string> special_tokens() const noexcept { return config_.special_tokens; }
  [[nodiscard]] bool uses_bos() const noexcept { return config_.bos; }
  [[nodiscard]] bool uses_eos() const noexcept { return !config_.suffix_as_eos; }
  [[nodiscard]] const TurnTemplateConfig& config() const noexcept { return config_; }
  [[nodiscard]] RoleOrder role_order() const noexcept { return role_order_; }

 private:
  /// Placeholder numbers, in the order given to the TemplatePatterns.
  static constexpr std::size_t system_field = 0;  // SYSTEM: {system}
  static constexpr std::size_t input_field = 0;   // INSTRUCTION: {input}, then {round}

  void render_system(const ChatTurn& turn, const Conversation& conversation, TemplateSegments& out) const {
    const Message* system = turn.system();
    if (system == nullptr || system->content.empty()) return;
    check(!system_.empty(), "TemplateHasNoSystem",
          "messages[{}] is a system prompt, but this template has no SYSTEM string to render it",
          static_cast<std::size_t>(system - conversation.messages.data()));
    system_.render([&out](std::string_view piece) { out.append(piece); },
                   [&](std::size_t) { out.append(system->content); });
  }

  static void append_number(std::size_t number, TemplateSegments& out) {
    char digits[24];
    const auto end = std::to_chars(digits, digits + sizeof digits, number).ptr;
    out.append(std::string_view(digits, static_cast<std::size_t>(end - digits)));
  }

  TurnTemplateConfig config_;
  RoleOrder role_order_;
  detail::TemplatePattern system_;
  detail::TemplatePattern instruction_;
};

namespace detail {

/// The ChatML strings XTuner's internlm2_chat and qwen_chat share.
inline TurnTemplateConfig chatml_turns(bool bos) {
  return {
      .system = "<|im_start|>system\n{system}<|im_end|>\n",
      .instruction = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
      .suffix = "<|im_end|>",
      .suffix_as_eos = true,
      .sep = "\n",
      .bos = bos,
      .special_tokens = {"<|im_start|>", "<|im_end|>"},
  };
}

}  // namespace detail

/// XTuner's internlm2_chat: ChatML, BOS once at the start, <|im_end|> as EOS.
struct InternLM2Chat : TurnTemplate {
  explicit InternLM2Chat(RoleOrder role_order = RoleOrder::strict)
      : TurnTemplate(detail::chatml_turns(true), role_order) {}
};

/// Standard ChatML, XTuner's qwen_chat: InternLM2Chat's strings without BOS.
struct ChatML : TurnTemplate {
  explicit ChatML(RoleOrder role_order = RoleOrder::strict) : TurnTemplate(detail::chatml_turns(false), role_order) {}
};

static_assert(ChatTemplate<TurnTemplate> && ChatTemplate<InternLM2Chat> && ChatTemplate<ChatML>);

}  // namespace qlora
