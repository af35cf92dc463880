// qlora-train's settings: every hyper-parameter of the two tutorials (the
// Phi-2 + PEFT one and XTuner's InternLM2 one), from a JSON config file
// (`--config run.json`, keys as below) and/or flags (`--lora_r 32`,
// `--lora_r=32`; flags win). Lists are JSON arrays in the file and
// comma-separated on the command line.
//
// With no arguments the defaults fine-tune the tiny model shipped in
// examples/assets/tiny-phi on the self-identity set in examples/assets — the
// README's first command. The demo's eval set and prompts are used only when
// --data is not given: a user's own data never gets the demo's evaluation.
//
// Settings whose right value depends on the architecture (LoRA targets,
// modules_to_save, chat template, added tokens) default to the tutorial of
// that architecture once config.json's model_type is known
// (apply_architecture_defaults): Phi → the Phi-2 + PEFT tutorial, InternLM2 →
// XTuner's internlm2_chat QLoRA config.
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/io/detail/json.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <set>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#ifndef QLORA_EXAMPLE_ASSETS
#define QLORA_EXAMPLE_ASSETS "examples/assets"
#endif

namespace qlora::train_example {

struct TrainConfig {
  // Model and data.
  std::string model = QLORA_EXAMPLE_ASSETS "/tiny-phi";
  std::string tokenizer;  ///< folder with tokenizer.json or tokenizer.model; "" = the model's
  std::string data = QLORA_EXAMPLE_ASSETS "/self_identity/train.jsonl";
  std::string eval_data;   ///< "" and no eval_split: no evaluation (the demo's set when --data is not given)
  double eval_split = 0;  ///< without eval_data: this fraction of the training samples is held out
  std::string eval_prompts;  ///< "": none (the demo's prompts when --data is not given)
  std::string format = "detect";       ///< detect | xtuner | openai | messages | text
  std::string chat_template = "chatml";  ///< chatml | internlm2_chat | phi2_chatml | pretrain
  std::string system;                  ///< a system prompt for the eval prompts
  // Tokens added before training (the Phi-2 tutorial adds <|im_start|>, <PAD> and makes <|im_end|> EOS).
  std::vector<std::string> add_tokens{"<|im_start|>", "<|im_end|>", "<PAD>"};
  std::string eos_token = "<|im_end|>";
  std::string pad_token = "<PAD>";
  std::int64_t pad_to_multiple_of = 64;  ///< resize the embeddings to a multiple of this (0: no resize)
  std::size_t max_length = 256;
  std::string packing = "bin";  ///< none (padded, the Phi-2 tutorial) | bin | xtuner (XTuner's pack_to_max_length)
  // LoRA.
  int lora_r = 16;
  double lora_alpha = 32;
  double lora_dropout = 0.05;
  std::vector<std::string> target_modules{"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"};
  std::vector<std::string> modules_to_save{"lm_head", "embed_tokens"};
  std::string quant = "nf4";      ///< nf4 (fp4 is a library option, not offered here)
  std::string compute = "fp32";   ///< fp32 | bf16: the linears' compute dtype
  bool double_quant = true;
  std::int64_t blocksize = 64;
  // Optimisation.
  double learning_rate = 1e-3;
  std::string lr_scheduler = "constant";  ///< constant | constant_with_warmup | linear | cosine
  double warmup_ratio = 0.03;
  double weight_decay = 0;
  double max_grad_norm = 1.0;
  std::size_t batch_size = 2;  ///< packed rows (or padded samples) per micro-batch
  std::size_t gradient_accumulation_steps = 1;  ///< per rank: a step takes ranks x this many micro-batches
  int zero_stage = 2;  ///< under mpirun: ZeRO stage 1 or 2 (optim/zero_optimizer.hpp)
  int epochs = 3;
  std::int64_t max_steps = 0;  ///< > 0: stop after this many optimizer steps
  bool gradient_checkpointing = false;
  std::string on_non_finite = "stop";  ///< stop | skip
  std::uint64_t seed = 42;
  unsigned threads = 0;  ///< 0: all hardware threads
  // Output and monitoring.
  std::string output_dir = "qlora-run";
  std::int64_t eval_steps = 0;    ///< 0: at the end of each epoch
  std::int64_t sample_steps = 0;  ///< 0: before and after training only
  std::int64_t save_steps = 0;    ///< 0: at the end of each epoch
  int save_total_limit = 2;
  int max_new_tokens = 40;
  bool resume = true;  ///< continue from output_dir's latest checkpoint when there is one

  /// The settings given by the config file or a flag (the rest are defaults).
  std::set<std::string> given;

  /// Every setting as text, in a fixed order (for the run summary and the checkpoint).
  [[nodiscard]] std::map<std::string, std::string> as_text() const;
  /// Throws InvalidArgument naming the first setting out of its range or set of choices.
  void validate() const;
  /// Sets the architecture-dependent defaults the user did not give (model_type "phi", "phi-msft" or "internlm2").
  void apply_architecture_defaults(std::string_view model_type);
};

namespace detail {

inline std::vector<std::string> split_list(std::string_view text) {
  std::vector<std::string> items;
  std::string item;
  std::istringstream in{std::string(text)};
  while (std::getline(in, item, ',')) {
    if (!item.empty()) items.push_back(item);
  }
  return items;
}

/// One setting: how to read it from a flag's text or a JSON value, and print it.
struct Setting {
  std::string_view help;
  std::function<void(const std::string&)> from_text;
  std::function<void(const qlora::detail::Json&)> from_json;
  std::function<std::string()> to_text;
};

template <class T>
Setting setting(T& field, std::string_view help) {
  Setting s;
  s.help = help;
  s.from_text = [&field](const std::string& text) {
    if constexpr (std::is_same_v<T, std::string>) {
      field = text;
    } else if constexpr (std::is_same_v<T, bool>) {
      check(text == "true" || text == "false" || text == "1" || text == "0", "InvalidArgument",
            "expected true or false, got \"{}\"", text);
      field = text == "true" || text == "1";
    } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
      field = split_list(text);
    } else if constexpr (std::is_integral_v<T>) {
      // Read wide and range-check: a stream would wrap "-1" into a huge unsigned value.
      std::istringstream in(text);
      long long value = 0;
      in >> value;
      check(!in.fail() && in.eof(), "InvalidArgument", "expected an integer, got \"{}\"", text);
      check(value >= static_cast<long long>(std::numeric_limits<T>::min()) &&
                static_cast<unsigned long long>(std::max(value, 0LL)) <=
                    static_cast<unsigned long long>(std::numeric_limits<T>::max()),
            "InvalidArgument", "{} is out of range [{}, {}]", text, std::numeric_limits<T>::min(),
            std::numeric_limits<T>::max());
      field = static_cast<T>(value);
    } else {
      std::istringstream in(text);
      T value{};
      in >> value;
      check(!in.fail() && in.eof(), "InvalidArgument", "expected a number, got \"{}\"", text);
      field = value;
    }
  };
  s.from_json = [&field, from_text = s.from_text](const qlora::detail::Json& value) {
    if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
      // The same range checks as a flag: the JSON integer's text goes through from_text.
      check(value.is_number_integer(), "InvalidArgument", "has the wrong type ({}): expected an integer", value.dump());
      from_text(value.dump());
    } else {
      try {
        field = value.get<T>();
      } catch (const std::exception&) {
        throw Error("InvalidArgument", fmt::format("has the wrong type ({})", value.dump()));
      }
    }
  };
  s.to_text = [&field] {
    if constexpr (std::is_same_v<T, std::vector<std::string>>) {
      return fmt::format("{}", fmt::join(field, ","));
    } else {
      return fmt::format("{}", field);
    }
  };
  return s;
}

inline std::map<std::string, Setting> settings_of(TrainConfig& c) {
  return {
      {"model", setting(c.model, "Hugging Face model folder (Phi or InternLM2: config.json + safetensors)")},
      {"tokenizer", setting(c.tokenizer, "tokenizer folder (default: the model folder)")},
      {"data", setting(c.data, "training JSONL")},
      {"eval_data", setting(c.eval_data, "evaluation JSONL (\"\" for none)")},
      {"eval_split", setting(c.eval_split, "without eval_data: fraction of training samples held out")},
      {"eval_prompts", setting(c.eval_prompts, "file of prompts (one per line) answered before, during and after")},
      {"format", setting(c.format, "detect | xtuner | openai | messages | text")},
      {"chat_template", setting(c.chat_template, "chatml | internlm2_chat | phi2_chatml | pretrain")},
      {"system", setting(c.system, "system prompt for the eval prompts")},
      {"add_tokens", setting(c.add_tokens, "tokens added to the tokenizer before training")},
      {"eos_token", setting(c.eos_token, "the EOS token after additions (\"\": keep)")},
      {"pad_token", setting(c.pad_token, "the padding token after additions (\"\": keep)")},
      {"pad_to_multiple_of", setting(c.pad_to_multiple_of, "resize embeddings to a multiple of this (0: never)")},
      {"max_length", setting(c.max_length, "tokens per sample (truncated beyond) and per packed row")},
      {"packing", setting(c.packing, "none | bin | xtuner")},
      {"lora_r", setting(c.lora_r, "LoRA rank")},
      {"lora_alpha", setting(c.lora_alpha, "LoRA alpha (scaling = alpha / r)")},
      {"lora_dropout", setting(c.lora_dropout, "dropout on the LoRA branch input")},
      {"target_modules", setting(c.target_modules, "modules LoRA adapts")},
      {"modules_to_save", setting(c.modules_to_save, "modules trained in full (lm_head, embed_tokens; InternLM2: output, tok_embeddings)")},
      {"quant", setting(c.quant, "nf4")},
      {"compute", setting(c.compute, "fp32 | bf16: the linears' compute dtype")},
      {"double_quant", setting(c.double_quant, "double quantization of the 4-bit absmax")},
      {"blocksize", setting(c.blocksize, "4-bit block size")},
      {"learning_rate", setting(c.learning_rate, "peak learning rate")},
      {"lr_scheduler", setting(c.lr_scheduler, "constant | constant_with_warmup | linear | cosine")},
      {"warmup_ratio", setting(c.warmup_ratio, "warmup steps as a fraction of all steps")},
      {"weight_decay", setting(c.weight_decay, "AdamW weight decay (bitsandbytes: after the step)")},
      {"max_grad_norm", setting(c.max_grad_norm, "gradient clipping norm (0: off)")},
      {"batch_size", setting(c.batch_size, "rows per micro-batch")},
      {"gradient_accumulation_steps", setting(c.gradient_accumulation_steps, "micro-batches per optimizer step and rank")},
      {"zero_stage", setting(c.zero_stage, "under mpirun: 1 (shard optimizer states) | 2 (also gradients)")},
      {"epochs", setting(c.epochs, "epochs")},
      {"max_steps", setting(c.max_steps, "stop after this many optimizer steps (0: epochs decide)")},
      {"gradient_checkpointing", setting(c.gradient_checkpointing, "recompute layers in backward to save memory")},
      {"on_non_finite", setting(c.on_non_finite, "stop | skip: what a NaN/Inf loss or gradient does")},
      {"seed", setting(c.seed, "seed of data order, LoRA init and dropout")},
      {"threads", setting(c.threads, "worker threads (0: all)")},
      {"output_dir", setting(c.output_dir, "run folder: checkpoints, adapter, metrics.jsonl, loss_curve.svg")},
      {"eval_steps", setting(c.eval_steps, "eval loss every N steps (0: each epoch)")},
      {"sample_steps", setting(c.sample_steps, "answer the eval prompts every N steps (0: before and after)")},
      {"save_steps", setting(c.save_steps, "checkpoint every N steps (0: each epoch)")},
      {"save_total_limit", setting(c.save_total_limit, "checkpoints kept (0: all)")},
      {"max_new_tokens", setting(c.max_new_tokens, "tokens generated per eval prompt")},
      {"resume", setting(c.resume, "continue from output_dir's latest checkpoint")},
  };
}

}  // namespace detail

inline std::map<std::string, std::string> TrainConfig::as_text() const {
  TrainConfig copy = *this;
  std::map<std::string, std::string> text;
  for (const auto& [name, s] : detail::settings_of(copy)) text[name] = s.to_text();
  return text;
}

inline void TrainConfig::validate() const {
  const auto one_of = [](std::string_view name, const std::string& value, std::initializer_list<std::string_view> choices) {
    check(std::ranges::find(choices, value) != choices.end(), "InvalidArgument", "setting \"{}\" is \"{}\": expected {}",
          name, value, fmt::join(choices, " | "));
  };
  one_of("format", format, {"detect", "xtuner", "openai", "messages", "text"});
  one_of("chat_template", chat_template, {"chatml", "internlm2_chat", "phi2_chatml", "pretrain"});
  one_of("packing", packing, {"none", "bin", "xtuner"});
  one_of("quant", quant, {"nf4"});
  one_of("compute", compute, {"fp32", "bf16"});
  one_of("lr_scheduler", lr_scheduler, {"constant", "constant_with_warmup", "linear", "cosine"});
  one_of("on_non_finite", on_non_finite, {"stop", "skip"});
  check(zero_stage == 1 || zero_stage == 2, "InvalidArgument", "setting \"zero_stage\" is {}: expected 1 or 2",
        zero_stage);
  const auto positive = [](std::string_view name, auto value) {
    check(value > 0, "InvalidArgument", "setting \"{}\" is {}: expected a value > 0", name, value);
  };
  const auto non_negative = [](std::string_view name, auto value) {
    check(value >= 0, "InvalidArgument", "setting \"{}\" is {}: expected a value >= 0", name, value);
  };
  positive("max_length", max_length);
  positive("batch_size", batch_size);
  positive("gradient_accumulation_steps", gradient_accumulation_steps);
  positive("lora_r", lora_r);
  positive("learning_rate", learning_rate);
  positive("blocksize", blocksize);
  non_negative("epochs", epochs);
  non_negative("max_steps", max_steps);
  non_negative("eval_steps", eval_steps);
  non_negative("sample_steps", sample_steps);
  non_negative("save_steps", save_steps);
  non_negative("save_total_limit", save_total_limit);
  non_negative("max_new_tokens", max_new_tokens);
  non_negative("pad_to_multiple_of", pad_to_multiple_of);
  non_negative("weight_decay", weight_decay);
  non_negative("max_grad_norm", max_grad_norm);
  check(warmup_ratio >= 0 && warmup_ratio <= 1, "InvalidArgument", "setting \"warmup_ratio\" is {}: expected [0, 1]",
        warmup_ratio);
  check(eval_split >= 0 && eval_split < 1, "InvalidArgument", "setting \"eval_split\" is {}: expected [0, 1)",
        eval_split);
  check(eval_split == 0 || eval_data.empty(), "InvalidArgument",
        "both eval_data ({}) and eval_split ({}) are given: choose one", eval_data, eval_split);
}

inline void TrainConfig::apply_architecture_defaults(std::string_view model_type) {
  const auto fill = [&](std::string_view name, auto& field, auto value) {
    if (!given.contains(std::string(name))) field = std::move(value);
  };
  if (model_type == "internlm2") {
    // XTuner's internlm2_chat QLoRA configs: LoRA on every linear but the output head, nothing
    // trained in full, its own chat template; the tokenizer already has the ChatML tokens.
    fill("target_modules", target_modules, std::vector<std::string>{"wqkv", "wo", "w1", "w2", "w3"});
    fill("modules_to_save", modules_to_save, std::vector<std::string>{});
    fill("chat_template", chat_template, std::string("internlm2_chat"));
    fill("add_tokens", add_tokens, std::vector<std::string>{});
    fill("eos_token", eos_token, std::string());
    fill("pad_token", pad_token, std::string());
    fill("pad_to_multiple_of", pad_to_multiple_of, std::int64_t{0});
  }
  // Phi (and phi-msft): the struct's defaults are the Phi-2 tutorial's.
  validate();
}

inline std::string usage() {
  TrainConfig defaults;
  std::string text =
      "usage: qlora-train [--config run.json] [--<setting> <value> ...]\n"
      "QLoRA fine-tuning of a Phi or InternLM2 model. Without arguments: the tiny model and\n"
      "self-identity data shipped in examples/assets. Settings (default in brackets):\n";
  for (const auto& [name, s] : detail::settings_of(defaults)) {
    text += fmt::format("  --{:<28} {} [{}]\n", name, s.help, s.to_text());
  }
  return text;
}

/// Reads the config file named by --config (if any), then the flags.
/// Errors (InvalidArgument) name the flag or key and what was expected.
inline TrainConfig parse_arguments(int argc, char** argv) {
  TrainConfig config;
  auto settings = detail::settings_of(config);
  const auto apply = [&](const std::string& name, auto&& action, std::string_view where) {
    const auto it = settings.find(name);
    check(it != settings.end(), "InvalidArgument", "{}: unknown setting \"{}\" (qlora-train --help lists them)",
          where, name);
    try {
      action(it->second);
    } catch (const Error& e) {
      throw Error("InvalidArgument", fmt::format("{}: setting \"{}\" {}", where, name, e.message()));
    }
  };
  std::vector<std::pair<std::string, std::string>> flags;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    check(arg.starts_with("--") && arg.size() > 2, "InvalidArgument",
          "argument {} (\"{}\") is not a --setting; qlora-train --help lists them", i, arg);
    arg = arg.substr(2);
    std::string value;
    if (const auto eq = arg.find('='); eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    } else {
      check(i + 1 < argc, "InvalidArgument", "--{} needs a value", arg);
      value = argv[++i];
    }
    flags.emplace_back(arg, value);
  }
  for (const auto& [name, value] : flags) {
    if (name != "config") continue;
    std::ifstream in(value);
    check(in.good(), "IoError", "cannot read the config file {}", value);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const qlora::detail::Json document = qlora::detail::parse_json_rejecting_duplicates(text, "InvalidArgument", value);
    check(document.is_object(), "InvalidArgument", "{}: expected a JSON object of settings", value);
    for (auto it = document.begin(); it != document.end(); ++it) {
      apply(it.key(), [&](detail::Setting& s) { s.from_json(it.value()); }, value);
      config.given.insert(it.key());
    }
  }
  for (const auto& [name, value] : flags) {
    if (name == "config") continue;
    apply(name, [&](detail::Setting& s) { s.from_text(value); }, "command line");
    config.given.insert(name);
  }
  if (!config.given.contains("data")) {  // the demo: its own eval set and prompts, unless overridden
    if (!config.given.contains("eval_data") && !config.given.contains("eval_split")) {
      config.eval_data = QLORA_EXAMPLE_ASSETS "/self_identity/eval.jsonl";
    }
    if (!config.given.contains("eval_prompts")) config.eval_prompts = QLORA_EXAMPLE_ASSETS "/self_identity/eval_prompts.txt";
  }
  config.validate();
  return config;
}

}  // namespace qlora::train_example
