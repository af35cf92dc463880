// qlora-chat: talk to a model — a Hugging Face folder, optionally with a PEFT
// adapter trained by qlora or peft — on the CPU, streaming the answer.
//
//   qlora-chat --model DIR [--adapter DIR] [--tokenizer DIR|FILE]
//              [--template phi2_chatml|chatml|internlm2_chat|none] [--system TEXT]
//              [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
//              [--repetition-penalty R] [--seed S] [--prompt TEXT]
//
// With --prompt it answers once and exits; otherwise it reads one message per
// line from stdin and keeps the conversation (an empty line or "/reset" starts
// a new one). The prompt is what training saw up to the answer
// (SampleEncoder::encode_prompt with the data layer's templates) — for ChatML,
// the history then "<|im_start|>assistant\n". Generation stops at the tokenizer's and the
// config's eos and at the template's end of turn (<|im_end|>). Greedy unless
// --temperature > 0; sampling then follows transformers' generate (top-k 50
// by default, as its GenerationConfig). Each turn re-sends the whole
// conversation, and the KV cache keeps the part it already holds.
//
// The tokenizer comes from --tokenizer, else the adapter folder when it has
// one (training may add tokens), else the model folder: tokenizer.json (byte-
// level BPE) or tokenizer.model (SentencePiece), with tokenizer_config.json.
// An adapter whose embedding or lm_head has another row count than the model
// (the tutorial adds tokens and resizes to a multiple of 64, which may grow or
// shrink it) makes the model resize first.
//
// Errors print the qlora::Error and exit with status 1; a bad command line
// exits with status 2.
#include <qlora/data/byte_level_bpe.hpp>
#include <qlora/data/conversation.hpp>
#include <qlora/data/phi2_chatml.hpp>
#include <qlora/data/sample_encoder.hpp>
#include <qlora/data/sentencepiece_tokenizer.hpp>
#include <qlora/data/turn_template.hpp>
#include <qlora/lora/peft_adapter.hpp>
#include <qlora/models/detail/config_fields.hpp>
#include <qlora/models/generation.hpp>
#include <qlora/models/internlm2.hpp>
#include <qlora/models/phi.hpp>

#include <fmt/format.h>

#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>
#include <vector>

#include <unistd.h>

#include "chat_settings.hpp"

namespace {

using namespace qlora;
namespace fs = std::filesystem;

enum class TemplateKind { phi2_chatml, chatml, internlm2_chat, none };

struct Options {
  fs::path model;
  std::optional<fs::path> adapter;
  std::optional<fs::path> tokenizer;
  /// Not given: the model's qlora_chat.json (chat_settings.hpp), else the architecture's own.
  std::optional<TemplateKind> chat_template;
  std::optional<std::string> system;
  int max_new_tokens = 256;
  SamplingOptions sampling{.top_k = 50};  // transformers' GenerationConfig default, used once temperature > 0
  std::optional<std::string> prompt;
};

void print_usage(std::FILE* to) {
  fmt::print(to,
             "usage: qlora-chat --model DIR [--adapter DIR] [--tokenizer DIR|FILE]\n"
             "                  [--template phi2_chatml|chatml|internlm2_chat|none] [--system TEXT]\n"
             "                  [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]\n"
             "                  [--repetition-penalty R] [--seed S] [--prompt TEXT]\n"
             "Chats with a Hugging Face model folder (Phi or InternLM2), optionally with a PEFT LoRA adapter.\n"
             "  --template          how messages become the prompt (default: the qlora_chat.json qlora-train\n"
             "                      wrote with the adapter or merged model, else phi2_chatml for Phi and\n"
             "                      internlm2_chat for InternLM2; none: raw text)\n"
             "  --max-new-tokens    most tokens per answer (default 256)\n"
             "  --temperature       0 (default): greedy; > 0: sample\n"
             "  --top-k, --top-p    sampling filters (defaults 50 and 1, as transformers' generate)\n"
             "  --prompt            answer this one message and exit (else: read messages from stdin)\n");
}

[[noreturn]] void usage_error(std::string_view message) {
  print_usage(stderr);
  fmt::print(stderr, "qlora-chat: {}\n", message);
  std::exit(2);
}

template <class Number>
Number parse_number(std::string_view flag, std::string_view text) {
  Number value{};
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc() || end != text.data() + text.size()) {
    usage_error(fmt::format("{} expects a number, got \"{}\"", flag, text));
  }
  return value;
}

TemplateKind parse_template(std::string_view name) {
  if (name == "phi2_chatml") return TemplateKind::phi2_chatml;
  if (name == "chatml") return TemplateKind::chatml;
  if (name == "internlm2_chat") return TemplateKind::internlm2_chat;
  if (name == "none") return TemplateKind::none;
  usage_error(fmt::format("unknown template \"{}\" (expected phi2_chatml, chatml, internlm2_chat or none)", name));
}

Options parse_options(int argc, char** argv) {
  Options options;
  bool have_model = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const auto value = [&]() -> std::string_view {
      if (i + 1 == argc) usage_error(fmt::format("{} needs a value", arg));
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      print_usage(stdout);
      std::exit(0);
    } else if (arg == "--model") {
      options.model = value();
      have_model = true;
    } else if (arg == "--adapter") {
      options.adapter = fs::path(value());
    } else if (arg == "--tokenizer") {
      options.tokenizer = fs::path(value());
    } else if (arg == "--template") {
      options.chat_template = parse_template(value());
    } else if (arg == "--system") {
      options.system = value();
    } else if (arg == "--max-new-tokens") {
      options.max_new_tokens = parse_number<int>(arg, value());
    } else if (arg == "--temperature") {
      options.sampling.temperature = parse_number<float>(arg, value());
    } else if (arg == "--top-k") {
      options.sampling.top_k = parse_number<int>(arg, value());
    } else if (arg == "--top-p") {
      options.sampling.top_p = parse_number<double>(arg, value());
    } else if (arg == "--repetition-penalty") {
      options.sampling.repetition_penalty = parse_number<float>(arg, value());
    } else if (arg == "--seed") {
      options.sampling.seed = parse_number<std::uint64_t>(arg, value());
    } else if (arg == "--prompt") {
      options.prompt = std::string(value());
    } else {
      usage_error(fmt::format("unknown argument {}", arg));
    }
  }
  if (!have_model) usage_error("--model is required");
  if (options.max_new_tokens < 1) usage_error("--max-new-tokens must be at least 1");
  if (options.chat_template == TemplateKind::none && options.system && !options.system->empty()) {
    usage_error("--system needs a chat template (--template none has no place for it)");
  }
  try {
    options.sampling.validate();
  } catch (const Error& e) {
    usage_error(e.message());
  }
  return options;
}

// ---- tokenizer ---------------------------------------------------------------------------------

using AnyTokenizer = std::variant<ByteLevelBpeTokenizer, SentencePieceTokenizer>;

bool has_tokenizer(const fs::path& dir) {
  return fs::is_regular_file(dir / "tokenizer.json") || fs::is_regular_file(dir / "tokenizer.model");
}

/// A tokenizer.json / tokenizer.model file, or a folder holding one (with its tokenizer_config.json).
AnyTokenizer load_tokenizer(const fs::path& source) {
  if (fs::is_regular_file(source)) {
    if (source.extension() == ".model") return SentencePieceTokenizer::from_file(source);
    return ByteLevelBpeTokenizer::from_file(source);
  }
  if (fs::is_regular_file(source / "tokenizer.json")) return ByteLevelBpeTokenizer::from_pretrained(source);
  if (fs::is_regular_file(source / "tokenizer.model")) return SentencePieceTokenizer::from_pretrained(source);
  throw Error("MissingTokenizer", fmt::format("{} has no tokenizer.json or tokenizer.model (give one with --tokenizer)",
                                              source.string()));
}

fs::path tokenizer_source(const Options& options) {
  if (options.tokenizer) return *options.tokenizer;
  if (options.adapter && has_tokenizer(*options.adapter)) return *options.adapter;
  return options.model;
}

// ---- prompts -----------------------------------------------------------------------------------

/// The ChatML templates' end of turn: generation stops there.
constexpr std::string_view end_of_turn = "<|im_end|>";

/// Turns a conversation (ending with the user's message) into prompt ids: the chosen template's
/// SampleEncoder::encode_prompt, tokenized as training samples are; none: the last message's text.
template <Tokenizer Tok>
class PromptBuilder {
 public:
  /// The encoder's constructor checks the template's special tokens (and BOS/EOS) against the tokenizer.
  PromptBuilder(TemplateKind kind, const Tok& tokenizer) : tokenizer_(tokenizer), encoder_(make(kind, tokenizer)) {}

  [[nodiscard]] bool keeps_history() const noexcept { return !std::holds_alternative<std::monostate>(encoder_); }

  [[nodiscard]] std::vector<TokenId> prompt(const Conversation& conversation) {
    return std::visit(
        [&](auto& encoder) -> std::vector<TokenId> {
          if constexpr (std::is_same_v<std::decay_t<decltype(encoder)>, std::monostate>) {
            return tokenizer_.encode(conversation.messages.back().content);
          } else {
            return encoder.encode_prompt(conversation);
          }
        },
        encoder_);
  }

 private:
  using Encoder = std::variant<std::monostate, SampleEncoder<Tok, Phi2ChatML>, SampleEncoder<Tok, ChatML>,
                               SampleEncoder<Tok, InternLM2Chat>>;

  static Encoder make(TemplateKind kind, const Tok& tokenizer) {
    switch (kind) {
      case TemplateKind::phi2_chatml:
        return Encoder(std::in_place_index<1>, tokenizer, Phi2ChatML{});
      case TemplateKind::chatml:
        return Encoder(std::in_place_index<2>, tokenizer, ChatML{});
      case TemplateKind::internlm2_chat:
        return Encoder(std::in_place_index<3>, tokenizer, InternLM2Chat{});
      case TemplateKind::none:
        break;
    }
    return Encoder();
  }

  const Tok& tokenizer_;
  Encoder encoder_;
};

// ---- the conversation --------------------------------------------------------------------------

/// Prints an answer as it grows: the decoded text's new part, held back while it ends in the middle
/// of a UTF-8 character (decode shows that as U+FFFD), as transformers' TextStreamer does.
template <Tokenizer Tok>
class AnswerStream {
 public:
  AnswerStream(const Tok& tokenizer, std::span<const TokenId> stop_ids) : tokenizer_(tokenizer), stop_ids_(stop_ids) {}

  void operator()(TokenId id) {
    if (std::ranges::find(stop_ids_, id) != stop_ids_.end()) return;
    ids_.push_back(id);
    const std::string text = tokenizer_.decode(ids_, true);
    if (text.ends_with("\xEF\xBF\xBD")) return;
    if (text.size() > printed_) std::fwrite(text.data() + printed_, 1, text.size() - printed_, stdout);
    std::fflush(stdout);
    printed_ = text.size();
  }

  [[nodiscard]] std::string text() const { return tokenizer_.decode(ids_, true); }

 private:
  const Tok& tokenizer_;
  std::span<const TokenId> stop_ids_;
  std::vector<TokenId> ids_;
  std::size_t printed_ = 0;
};

template <class Model, Tokenizer Tok>
void converse(const Model& model, const Tok& tokenizer, const Options& options) {
  const TemplateKind kind = options.chat_template.value();  // resolved by run_model_folder
  const std::string system = options.system.value_or("");
  PromptBuilder<Tok> prompts(kind, tokenizer);
  std::vector<TokenId> stop_ids{static_cast<TokenId>(model.config().eos_token_id)};
  if (const auto eos = tokenizer.special_ids().eos) stop_ids.push_back(*eos);
  if (kind != TemplateKind::none) {
    if (const auto id = tokenizer.token_to_id(end_of_turn)) stop_ids.push_back(*id);
  }

  Conversation conversation;
  const auto restart = [&] {
    conversation.messages.clear();
    if (!system.empty()) conversation.messages.push_back({Role::system, system, false});
  };
  restart();
  KvCache cache;
  const auto answer = [&](std::string message) {
    if (!prompts.keeps_history()) restart();
    conversation.messages.push_back({Role::user, std::move(message), false});
    const std::vector<TokenId> prompt = prompts.prompt(conversation);
    for (const TokenId id : prompt) {
      check(id >= 0 && id < model.vocab_size(), "TokenOutOfRange",
            "the prompt holds token {} ({:?}), outside the model's vocabulary of {}: the tokenizer does not match "
            "the model (an adapter that added tokens needs its own tokenizer: --tokenizer)",
            id, tokenizer.id_to_token(id), model.vocab_size());
    }
    AnswerStream<Tok> stream(tokenizer, stop_ids);
    (void)generate(model, cache, prompt, options.max_new_tokens, stop_ids, options.sampling, std::ref(stream));
    std::fputc('\n', stdout);
    std::fflush(stdout);
    conversation.messages.push_back({Role::assistant, stream.text(), true});
  };

  if (options.prompt) return answer(*options.prompt);
  const bool interactive = ::isatty(::fileno(stdin)) == 1;
  if (interactive) fmt::print(stderr, "Type a message and press Enter; an empty line or /reset starts over, Ctrl-D quits.\n");
  std::string line;
  while (true) {
    if (interactive) fmt::print(stderr, "> ");
    if (!std::getline(std::cin, line)) break;
    if (line.empty() || line == "/reset") {
      restart();
      continue;
    }
    answer(line);
  }
}

// ---- the model ---------------------------------------------------------------------------------

/// The rows of the adapter's embedding or lm_head copy (modules_to_save), if it has one.
template <class Architecture>
std::optional<std::int64_t> adapter_vocab_size(const PeftAdapter& adapter) {
  for (const auto& [key, tensor] : adapter.saved_tensors) {
    if (key == fmt::format("{}.weight", Architecture::embed_path) || key == fmt::format("{}.weight", Architecture::lm_head_path)) {
      return tensor.shape()[0];
    }
  }
  return std::nullopt;
}

template <class Architecture>
void run(const Options& options) {
  using Model = CausalLm<Architecture, NF4, float>;  // fp32 compute: CPU inference, as transformers' fp32 model
  ModelOptions model_options;
  std::optional<PeftAdapter> adapter;
  if (options.adapter) {
    adapter = read_peft_adapter(*options.adapter);
    model_options.lora = adapter->config.lora;
    model_options.lora.lora_dropout = 0;  // inference
  }
  Model model = Model::load(options.model, model_options);
  if (adapter) {
    // Either way: Phi-2's resize to a multiple of 64 can shrink the vocabulary (51200 → 50304).
    if (const auto rows = adapter_vocab_size<Architecture>(*adapter); rows && *rows != model.vocab_size()) {
      model.resize_token_embeddings(*rows);
    }
    model.load_adapter(*adapter);
  }
  const AnyTokenizer tokenizer = load_tokenizer(tokenizer_source(options));
  std::visit([&](const auto& tok) { converse(model, tok, options); }, tokenizer);
}

/// The template and system prompt not given on the command line: the adapter's (else the
/// model folder's) qlora_chat.json, else the architecture's own template.
void resolve_prompting(Options& options, std::string_view model_type) {
  std::optional<examples::ChatSettings> recorded;
  if (options.adapter) recorded = examples::read_chat_settings(*options.adapter);
  if (!recorded) recorded = examples::read_chat_settings(options.model);
  if (!options.chat_template) {
    if (recorded) {
      // qlora-train's "pretrain" template is raw text here.
      options.chat_template = recorded->chat_template == "pretrain" ? TemplateKind::none
                                                                   : parse_template(recorded->chat_template);
    } else {
      options.chat_template = model_type == "internlm2" ? TemplateKind::internlm2_chat : TemplateKind::phi2_chatml;
    }
  }
  if (!options.system && recorded && *options.chat_template != TemplateKind::none) options.system = recorded->system;
}

/// Picks the architecture from config.json's model_type.
void run_model_folder(Options options) {
  check(fs::is_directory(options.model), "IoError", "--model {}: no such folder", options.model.string());
  const std::string model_type = detail::ConfigFields::open(options.model / "config.json").string("model_type", "");
  const bool phi = model_type == "phi" || model_type == "phi-msft";
  check(phi || model_type == "internlm2", "UnsupportedArchitecture",
        "{}: qlora-chat runs Phi and InternLM2 models (model_type \"phi\" or \"internlm2\"), not \"{}\"",
        (options.model / "config.json").string(), model_type);
  resolve_prompting(options, model_type);
  if (phi) return run<PhiArchitecture>(options);
  run<InternLM2Architecture>(options);
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse_options(argc, argv);
  try {
    run_model_folder(options);
    return 0;
  } catch (const Error& e) {
    std::fflush(stdout);
    fmt::print(stderr, "qlora-chat: {}\n", e.what());
  } catch (const std::exception& e) {
    std::fflush(stdout);
    fmt::print(stderr, "qlora-chat: {}\n", e.what());
  }
  return 1;
}
