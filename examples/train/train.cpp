// qlora-train: QLoRA fine-tuning of a Phi or InternLM2 model, the C++ run of
// both tutorials' flow — load an HF folder (4-bit on load), add tokens and
// resize as the Phi-2 tutorial does, encode a JSONL dataset with a chat
// template (loss on answers only), pack it, train LoRA (+ modules_to_save)
// with bitsandbytes' paged AdamW 32-bit maths, clip 1.0 and a schedule,
// checkpoint atomically and resume exactly, export a PEFT adapter.
//
// What it prints: the settings, the data statistics, the answers to the eval
// prompts before training, a progress bar (loss, tokens/s, ETA), eval losses,
// answers during training when asked, the answers after training, and where
// the adapter, metrics.jsonl and loss_curve.svg are.
#include <qlora/qlora.hpp>
#include <qlora/models/generation.hpp>
#include <qlora/models/sampling.hpp>

#include <fmt/format.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <unistd.h>
#include <variant>
#include <vector>

#include "../chat/chat_settings.hpp"
#include "job.hpp"
#include "train_config.hpp"

namespace {

using namespace qlora;
using train_example::Job;
using train_example::TrainConfig;

/// What the model side needs of the data side, with the tokenizer's and the
/// template's types erased.
struct PreparedData {
  std::vector<EncodedSample> train, eval;
  std::vector<std::string> prompts;
  std::vector<std::vector<TokenId>> prompt_ids;
  std::vector<TokenId> stop_ids;
  std::size_t vocab_size = 0;
  std::optional<TokenId> pad_id;
  bool tokens_added = false;
  std::filesystem::path tokenizer_dir;
  std::vector<AddedToken> added_tokens;         ///< what the run added, for the adapter's tokenizer files
  std::map<std::string, std::string> token_roles;  ///< "eos_token" → "<|im_end|>", ...
  std::function<std::string(std::span<const TokenId>)> decode;
};

/// A collated Batch and the TokenBatch view a model reads.
struct ModelBatch {
  Batch batch;
  std::vector<std::int32_t> segments;

  explicit ModelBatch(Batch b) : batch(std::move(b)) {
    segments = batch.varlen() ? batch.cu_seqlens
                              : attention_segments(batch.attention_mask, static_cast<std::int64_t>(batch.length));
  }
  [[nodiscard]] TokenBatch view() const {
    return {batch.input_ids, batch.labels, batch.position_ids, segments, static_cast<std::int64_t>(batch.length)};
  }
};

std::vector<std::string> read_prompts(const std::string& path) {
  std::vector<std::string> prompts;
  if (path.empty()) return prompts;
  std::ifstream in(path);
  check(in.good(), "IoError", "cannot read the eval prompts file {}", path);
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (!line.empty()) prompts.push_back(line);
  }
  return prompts;
}

template <class Tok, class Template>
std::vector<EncodedSample> encode_file(const std::string& path, const Tok& tokenizer, const Template& chat_template,
                                       const TrainConfig& config, std::string_view what) {
  SampleEncoder encoder(tokenizer, chat_template, {.max_length = config.max_length});
  ConversationReader reader(path, parse_dataset_format(config.format));
  std::vector<EncodedSample> samples;
  Conversation conversation;
  EncodedSample sample;
  while (reader.next(conversation)) {
    if (encoder.encode_into(conversation, sample)) samples.push_back(sample);
  }
  fmt::print("{} data {}: {}\n", what, path, encoder.stats().summary());
  check(!samples.empty(), "EmptyDataset", "{}: no sample left to train on (see the statistics above)", path);
  return samples;
}

template <class Tok, class Template>
PreparedData prepare_data(Tok& tokenizer, const Template& chat_template, const TrainConfig& config) {
  PreparedData data;
  data.train = encode_file(config.data, tokenizer, chat_template, config, "train");
  if (!config.eval_data.empty()) {
    data.eval = encode_file(config.eval_data, tokenizer, chat_template, config, "eval");
  } else if (config.eval_split > 0) {
    const auto held_out = static_cast<std::size_t>(std::ceil(config.eval_split * static_cast<double>(data.train.size())));
    check(held_out < data.train.size(), "InvalidArgument", "eval_split {} leaves no training sample", config.eval_split);
    // A seeded shuffle first (datasets' train_test_split shuffles too): a file sorted by topic or
    // length must not hold out only its tail.
    std::vector<EncodedSample> shuffled;
    shuffled.reserve(data.train.size());
    for (const std::size_t i : epoch_permutation(data.train.size(), config.seed, 0)) shuffled.push_back(std::move(data.train[i]));
    data.eval.assign(std::make_move_iterator(shuffled.end() - static_cast<std::ptrdiff_t>(held_out)),
                     std::make_move_iterator(shuffled.end()));
    shuffled.resize(shuffled.size() - held_out);
    data.train = std::move(shuffled);
  }
  data.prompts = read_prompts(config.eval_prompts);
  if constexpr (!std::is_same_v<Template, Pretrain>) {
    SampleEncoder encoder(tokenizer, chat_template, {.max_length = config.max_length});
    for (const std::string& prompt : data.prompts) {
      Conversation conversation;
      if (!config.system.empty()) conversation.messages.push_back({Role::system, config.system, false});
      conversation.messages.push_back({Role::user, prompt, false});
      data.prompt_ids.push_back(encoder.encode_prompt(conversation));
    }
  } else {
    for (const std::string& prompt : data.prompts) data.prompt_ids.push_back(tokenizer.encode(prompt));
  }
  const SpecialTokenIds specials = tokenizer.special_ids();
  if (specials.eos) data.stop_ids.push_back(*specials.eos);
  for (const char* end_of_turn : {"<|im_end|>", "<|endoftext|>"}) {
    if (const auto id = tokenizer.token_to_id(end_of_turn)) data.stop_ids.push_back(*id);
  }
  data.vocab_size = tokenizer.vocab_size();
  data.pad_id = specials.pad;
  data.decode = [&tokenizer](std::span<const TokenId> ids) { return tokenizer.decode(ids, true); };
  return data;
}

/// The packed (or, without packing, one-sample) rows the loader draws from.
std::vector<PackedSequence> training_rows(const PreparedData& data, const TrainConfig& config) {
  if (config.packing == "bin") {
    BinPackOptions options;
    options.max_length = config.max_length;
    options.seed = config.seed;
    return bin_pack(data.train, options).sequences;
  }
  if (config.packing == "xtuner") {
    XtunerPackOptions options;
    options.max_length = config.max_length;
    return xtuner_pack(data.train, options).sequences;
  }
  check(config.packing == "none", "InvalidArgument", "packing \"{}\": expected none, bin or xtuner", config.packing);
  std::vector<PackedSequence> rows(data.train.size());
  for (std::size_t i = 0; i < rows.size(); ++i) rows[i].append_segment(data.train[i].input_ids, data.train[i].labels);
  return rows;
}

template <class Model>
double eval_loss(const Model& model, const PreparedData& data) {
  double loss = 0;
  std::int64_t count = 0;
  for (const EncodedSample& sample : data.eval) {
    PackedSequence row;
    row.append_segment(sample.input_ids, sample.labels);
    const TokenBatch batch{row.input_ids, row.labels, row.position_ids, row.cu_seqlens,
                           static_cast<std::int64_t>(row.size())};
    const CrossEntropySums sums = model.evaluate(batch);
    loss += sums.loss_sum;
    count += sums.count;
  }
  return count == 0 ? std::nan("") : loss / static_cast<double>(count);
}

template <class Model>
std::vector<std::string> answer_prompts(const Model& model, const PreparedData& data, const TrainConfig& config,
                                        std::string_view when, MetricsLog* log, std::int64_t step) {
  std::vector<std::string> answers;
  if (data.prompts.empty()) return answers;
  fmt::print("Answers {}:\n", when);
  for (std::size_t i = 0; i < data.prompts.size(); ++i) {
    std::vector<TokenId> ids = generate(model, data.prompt_ids[i], config.max_new_tokens, data.stop_ids, SamplingOptions{});
    if (!ids.empty() && std::ranges::find(data.stop_ids, ids.back()) != data.stop_ids.end()) ids.pop_back();
    answers.push_back(data.decode(ids));
    fmt::print("  > {}\n    {}\n", data.prompts[i], answers.back());
    if (log != nullptr) log->log(SampleAnswer{.step = step, .prompt = data.prompts[i], .answer = answers.back()});
  }
  std::fflush(stdout);
  return answers;
}

/// A checkpoint continues only the run that wrote it: every setting that
/// changes the trajectory (data, model, hyper-parameters) must be the same, or
/// "the same losses after a resume" would silently stop being true. `settings`
/// are this run's (TrainConfig::as_text and micro_batches_per_step).
void check_resumable(const TrainingCheckpoint& checkpoint, const std::map<std::string, std::string>& settings) {
  // What may change between the two processes: where and how often things are reported or kept, how
  // long the run goes on (the caller reports a schedule that changed with it), and how a step's
  // micro-batches are shared out (ranks x gradient_accumulation_steps: micro_batches_per_step must stay).
  static const std::set<std::string> free = {"resume", "threads", "eval_steps", "sample_steps", "save_steps",
                                             "save_total_limit", "max_new_tokens", "eval_prompts", "output_dir",
                                             "max_steps", "epochs", "gradient_accumulation_steps", "zero_stage"};
  std::vector<std::string> changed;
  for (const auto& [name, value] : checkpoint.state.hyper_parameters) {
    if (free.contains(name)) continue;
    const auto it = settings.find(name);
    if (it == settings.end() || it->second != value) {
      changed.push_back(fmt::format("{} was \"{}\", now \"{}\"", name, value, it == settings.end() ? "" : it->second));
    }
  }
  check(changed.empty(), "ResumeMismatch", "{} was written with other settings ({}); resume with the same settings, "
        "or pass --resume false with a new output_dir", checkpoint.dir.string(), fmt::join(changed, "; "));
}

/// A fingerprint of a run's settings, for the ranks to compare at start.
std::uint64_t settings_fingerprint(const std::map<std::string, std::string>& settings) {
  DatasetFingerprint fingerprint;
  for (const auto& [name, value] : settings) fingerprint.add(name).add(value);
  return fingerprint.value();
}

/// Trains on `comm`'s ranks (one: AdamW; more: ZeroOptimizer at config.zero_stage). Rank 0 leads:
/// it alone logs, checkpoints, answers the prompts and writes the adapter (job.hpp).
template <class Model, class Comm>
int train_on(const TrainConfig& config, const PreparedData& data, Comm& comm) {
  const bool leader = comm.rank() == 0;
  ModelOptions options;
  options.lora.r = config.lora_r;
  options.lora.lora_alpha = config.lora_alpha;
  options.lora.lora_dropout = config.lora_dropout;
  options.lora.target_modules = config.target_modules;
  options.lora.modules_to_save = config.modules_to_save;
  options.quantize = {.blocksize = config.blocksize, .double_quant = config.double_quant};
  options.gradient_checkpointing = config.gradient_checkpointing;
  options.seed = config.seed;
  if (config.threads > 0) options.threads = config.threads;
  Model model = Model::load(config.model, options);
  // The Phi-2 tutorial: model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64).
  if (config.pad_to_multiple_of > 0 && (data.tokens_added || static_cast<std::int64_t>(data.vocab_size) > model.vocab_size())) {
    const std::int64_t size = padded_vocab_size(static_cast<std::int64_t>(data.vocab_size), config.pad_to_multiple_of);
    fmt::print("Vocabulary: {} tokens; embeddings resized from {} to {} rows\n", data.vocab_size, model.vocab_size(), size);
    model.resize_token_embeddings(size);
    if (config.modules_to_save.empty()) {
      fmt::print("Warning: modules_to_save is empty, so the adapter will not hold the resized embedding and "
                 "output rows; train them (modules_to_save) to use the added tokens after training\n");
    }
  }

  EpochBatchesOptions loader_options;
  loader_options.order.seed = config.seed;
  loader_options.rows_per_batch = config.batch_size;
  if (config.packing == "none") loader_options.padding = PadCollator(data.pad_id);
  EpochBatches loader(training_rows(data, config), loader_options);
  // Ranks that start with other settings or data would average gradients of different runs.
  std::map<std::string, std::string> settings = config.as_text();
  const auto ranks = static_cast<std::int64_t>(comm.size());
  const auto micro_per_step = static_cast<std::int64_t>(config.gradient_accumulation_steps) * ranks;
  settings["micro_batches_per_step"] = std::to_string(micro_per_step);
  check_same_on_every_rank(comm, "settings", settings_fingerprint(settings));
  check_same_on_every_rank(comm, "training data",
                           DatasetFingerprint().add(dataset_fingerprint(loader.rows())).value());
  // As transformers (>= 4.46) does: an optimizer step never spans two epochs; an epoch's last
  // step takes the micro-batches left (ceil(batches / micro-batches per step) steps). A step's
  // micro-batches go to the ranks in turn: micro-batch i to rank i mod ranks.
  const auto batches_per_epoch = static_cast<std::int64_t>(loader.batches_per_epoch());
  const std::int64_t steps_per_epoch = (batches_per_epoch + micro_per_step - 1) / micro_per_step;
  const auto window_size = [&](std::int64_t step) {
    return std::min(micro_per_step, batches_per_epoch - (step % steps_per_epoch) * micro_per_step);
  };
  const std::int64_t total_steps = config.max_steps > 0 ? config.max_steps : steps_per_epoch * config.epochs;
  check(total_steps > 0, "InvalidArgument", "nothing to train: epochs {} and max_steps {}", config.epochs, config.max_steps);
  LrSchedule schedule{.kind = LrSchedule::parse(config.lr_scheduler),
                      .peak_lr = config.learning_rate,
                      .warmup_steps = warmup_steps_from_ratio(config.warmup_ratio, total_steps),
                      .total_steps = total_steps};
  schedule.validate();

  const auto fit = [&](auto& optimizer) {
    std::int64_t trainable = 0;
    for (const TrainableParameter& parameter : model.trainable_parameters()) {
      optimizer.add(parameter.name, parameter.value, parameter.grad, parameter.decay);
      trainable += parameter.value.numel();
    }
    const std::string length = config.max_steps > 0 ? fmt::format("max_steps; {} per epoch", steps_per_epoch)
                                                    : fmt::format("{} epochs x {}", config.epochs, steps_per_epoch);
    const std::string sharing = ranks == 1 ? fmt::format("accumulation {}", micro_per_step)
                                           : fmt::format("{} ranks x accumulation {}, ZeRO stage {}", ranks,
                                                         config.gradient_accumulation_steps, config.zero_stage);
    fmt::print("Training {} parameters: {} rows in {} batches per epoch, {} steps ({}, {})\n", trainable,
               loader.rows().size(), loader.batches_per_epoch(), total_steps, length, sharing);

    const std::filesystem::path run_dir = config.output_dir;
    std::int64_t start_step = 0;
    std::int64_t tokens_seen = 0;
    std::optional<MetricsLog> log;  // the leader's
    bool resumed = false;
    if (config.resume) {
      if (const std::optional<ResumePoint> point = latest_checkpoint(run_dir)) {
        for (const std::string& skipped : point->skipped) fmt::print("Skipping {}\n", skipped);
        const TrainingCheckpoint& checkpoint = point->checkpoint;
        check_resumable(checkpoint, settings);
        if (checkpoint.state.schedule.total_steps != schedule.total_steps) {
          fmt::print("Note: the run now has {} steps (the checkpoint's had {}); where the schedule depends on the "
                     "length, learning rates differ from the uninterrupted run's\n",
                     schedule.total_steps, checkpoint.state.schedule.total_steps);
        }
        model.load_adapter(checkpoint.adapter());
        optimizer.load_state(checkpoint.optimizer_state_file());
        loader.restore(Cursor::from_json(checkpoint.state.data_cursor, checkpoint.dir.string()));
        start_step = checkpoint.state.step;
        if (const auto it = checkpoint.state.metrics.find("tokens_seen"); it != checkpoint.state.metrics.end()) {
          tokens_seen = static_cast<std::int64_t>(it->second);
        }
        if (leader) log.emplace(MetricsLog::resume(run_dir / "metrics.jsonl", start_step));
        resumed = true;
        fmt::print("Resumed from {} (step {})\n", checkpoint.dir.string(), start_step);
      }
    }
    if (!resumed) {
      check(config.resume || !latest_checkpoint(run_dir), "OutputDirNotEmpty",
            "{} holds checkpoints of an earlier run and resume is off: starting afresh would overwrite its "
            "metrics; choose another output_dir or remove that one", run_dir.string());
      if (leader) {
        std::filesystem::create_directories(run_dir);
        log.emplace(MetricsLog::create(run_dir / "metrics.jsonl"));
      }
    }
    MetricsLog* const metrics = log ? &*log : nullptr;
    if (start_step == 0 && leader) {
      (void)answer_prompts(model, data, config, "before training", metrics, 0);
    }

    // Collective under ZeRO: every rank's optimizer state goes to the leader, which writes the checkpoint.
    const auto save = [&](std::int64_t step, double epoch, double loss) {
      if (!leader) {
        optimizer.save_state(run_dir / "optimizer-state-written-by-rank-0");  // the path is rank 0's to use
        return std::filesystem::path();
      }
      TrainerState state;
      state.step = step;
      state.epoch = epoch;
      state.data_cursor = loader.cursor().to_json();
      state.seed = config.seed;
      state.schedule = schedule;
      state.hyper_parameters = settings;
      state.metrics = {{"tokens_seen", static_cast<double>(tokens_seen)}, {"loss", loss}};
      return save_checkpoint(run_dir, model.adapter(config.model),
                             [&](const std::filesystem::path& file) { optimizer.save_state(file); }, state,
                             {.keep_last = config.save_total_limit});
    };
    const TrainStepOptions step_options{.max_grad_norm = config.max_grad_norm,
                                        .on_non_finite = config.on_non_finite == "skip" ? NonFinitePolicy::skip_step
                                                                                        : NonFinitePolicy::stop};
    const bool tty = ::isatty(::fileno(stdout)) != 0;
    ProgressBarOptions bar_options;
    bar_options.start_step = start_step;
    ProgressBar bar(total_steps, stdout, tty, bar_options);
    std::vector<ModelBatch> window_batches;
    std::vector<std::uint32_t> positions;  // each kept micro-batch's place in the step's whole window
    std::vector<MicroBatch> window;
    for (std::int64_t step = start_step; step < total_steps; ++step) {
      window_batches.clear();
      positions.clear();
      window.clear();
      for (std::int64_t micro = 0; micro < window_size(step); ++micro) {
        auto batch = loader.next();  // every rank reads the whole window, and keeps its share
        if (micro % ranks != comm.rank()) continue;
        window_batches.emplace_back(std::move(batch));
        positions.push_back(static_cast<std::uint32_t>(micro));
      }
      for (std::size_t i = 0; i < window_batches.size(); ++i) {
        window.push_back(
            {window_batches[i].view(), fmt::format("step {} micro-batch {}", step, positions[i]), positions[i]});
      }
      const double lr = lr_at(schedule, step);
      const TrainStepResult result =
          train_step(model, optimizer, window, lr, static_cast<std::uint64_t>(step), step_options);
      tokens_seen += result.input_tokens;
      const double epoch = static_cast<double>(step + 1) / static_cast<double>(steps_per_epoch);
      if (result.skipped) {
        bar.message(fmt::format("step {}: skipped (loss {}, grad norm {})", step + 1, result.loss, result.grad_norm));
      }
      StepProgress progress;
      progress.loss = result.loss;
      progress.tokens = result.input_tokens;
      bar.update(step + 1, progress);
      if (metrics != nullptr) {
        metrics->log(TrainMetrics{.step = step + 1, .epoch = epoch, .loss = result.loss, .lr = lr,
                                  .grad_norm = result.grad_norm, .tokens = tokens_seen,
                                  .tokens_per_second = bar.tokens_per_second()});
      }
      const bool epoch_end = (step + 1) % steps_per_epoch == 0 || step + 1 == total_steps;
      const auto due = [&](std::int64_t every) { return every > 0 ? (step + 1) % every == 0 : epoch_end; };
      // Evaluation and samples are the leader's; the other ranks wait for it at the next step.
      if (leader && !data.eval.empty() && due(config.eval_steps)) {
        const double loss = eval_loss(model, data);
        metrics->log(EvalMetrics{.step = step + 1, .eval_loss = loss});
        bar.message(fmt::format("step {}: eval loss {:.4f}", step + 1, loss));
      }
      if (leader && config.sample_steps > 0 && (step + 1) % config.sample_steps == 0 && step + 1 != total_steps) {
        bar.message("");
        (void)answer_prompts(model, data, config, fmt::format("at step {}", step + 1), metrics, step + 1);
      }
      if (due(config.save_steps)) {
        const std::filesystem::path saved = save(step + 1, epoch, result.loss);
        if (leader) bar.message(fmt::format("saved {}", saved.string()));
      }
    }
    bar.finish();
    if (!leader) return 0;

    (void)answer_prompts(model, data, config, "after training", metrics, total_steps);
    const std::filesystem::path adapter_dir = run_dir / "adapter";
    write_peft_adapter(adapter_dir, model.adapter(config.model));
    // The tokenizer as trained (with the added tokens), as the tutorial's tokenizer.save_pretrained.
    save_tokenizer_files(data.tokenizer_dir, adapter_dir, data.added_tokens, data.token_roles);
    // How the adapter was prompted, so that qlora-chat prompts it the same way.
    examples::write_chat_settings(adapter_dir, {.chat_template = config.chat_template, .system = config.system});
    write_loss_curve_svg(run_dir / "loss_curve.svg", metrics->train_curve(), metrics->eval_curve());
    fmt::print("Adapter: {}\nMetrics: {}\nLoss curve: {}\n", adapter_dir.string(),
               (run_dir / "metrics.jsonl").string(), (run_dir / "loss_curve.svg").string());
    return 0;
  };

  const AdamWOptions adamw_options{.weight_decay = config.weight_decay};
  if (ranks == 1) {
    AdamW optimizer(adamw_options);
    return fit(optimizer);
  }
  if (config.zero_stage == 1) {
    ZeroOptimizer<AdamW, ZeroStage1, Comm> optimizer(comm, adamw_options);
    return fit(optimizer);
  }
  ZeroOptimizer<AdamW, ZeroStage2, Comm> optimizer(comm, adamw_options);
  return fit(optimizer);
}

template <class Model>
int train(const TrainConfig& config, const PreparedData& data, Job& job) {
  return job.visit([&](auto& comm) { return train_on<Model>(config, data, comm); });
}

template <class Model32, class ModelBf16>
int train_with_compute(const TrainConfig& config, const PreparedData& data, Job& job) {
  if (config.compute == "fp32") return train<Model32>(config, data, job);
  check(config.compute == "bf16", "InvalidArgument", "compute \"{}\": expected fp32 or bf16", config.compute);
  return train<ModelBf16>(config, data, job);
}

/// config.json's model_type, if qlora-train knows it.
std::string model_type_of(const std::string& model) {
  const auto fields = detail::ConfigFields::open(std::filesystem::path(model) / "config.json");
  std::string type = fields.string("model_type", "");
  check(type == "phi" || type == "phi-msft" || type == "internlm2", "UnsupportedArchitecture",
        "{}: model_type \"{}\"; qlora-train knows phi and internlm2", fields.source(), type);
  return type;
}

int train_model(const TrainConfig& config, const PreparedData& data, Job& job) {
  if (model_type_of(config.model) == "internlm2") {
    return train_with_compute<InternLM2<NF4, float>, InternLM2<NF4, bf16>>(config, data, job);
  }
  return train_with_compute<Phi<NF4, float>, Phi<NF4, bf16>>(config, data, job);
}

using AnyTemplate = std::variant<ChatML, InternLM2Chat, Phi2ChatML, Pretrain>;

AnyTemplate template_named(const std::string& name) {
  if (name == "chatml") return ChatML{};
  if (name == "internlm2_chat") return InternLM2Chat{};
  if (name == "phi2_chatml") return Phi2ChatML{};
  if (name == "pretrain") return Pretrain{};
  throw Error("InvalidArgument",
              fmt::format("chat_template \"{}\": expected chatml, internlm2_chat, phi2_chatml or pretrain", name));
}

template <class Tok>
int run_with_tokenizer(Tok tokenizer, const std::filesystem::path& dir, const TrainConfig& config, Job& job) {
  std::vector<std::string> normal, special;
  for (const std::string& token : config.add_tokens) {
    (token == config.eos_token || token == config.pad_token ? special : normal).push_back(token);
  }
  const std::size_t added = tokenizer.add_tokens(normal, AddedTokenKind::normal) +
                            tokenizer.add_tokens(special, AddedTokenKind::special);
  if (!config.eos_token.empty()) tokenizer.set_special_token(SpecialRole::eos, config.eos_token);
  if (!config.pad_token.empty()) tokenizer.set_special_token(SpecialRole::pad, config.pad_token);
  return std::visit([&](const auto& chat_template) {
    PreparedData data = prepare_data(tokenizer, chat_template, config);
    data.tokens_added = added > 0;
    data.tokenizer_dir = dir;
    for (const std::string& token : config.add_tokens) {
      const bool is_special = std::ranges::find(special, token) != special.end();
      data.added_tokens.push_back({.content = token, .id = *tokenizer.token_to_id(token), .special = is_special,
                                   .normalized = !is_special});
    }
    if (!config.eos_token.empty()) data.token_roles["eos_token"] = config.eos_token;
    if (!config.pad_token.empty()) data.token_roles["pad_token"] = config.pad_token;
    return train_model(config, data, job);
  }, template_named(config.chat_template));
}

int run(TrainConfig config, Job& job) {
  config.apply_architecture_defaults(model_type_of(config.model));
  const std::filesystem::path dir = config.tokenizer.empty() ? config.model : config.tokenizer;
  const Version v = version();
  fmt::print("qlora-train {}.{}.{}: model {}, data {}\n", v.major, v.minor, v.patch, config.model, config.data);
  if (std::filesystem::exists(dir / "tokenizer.json")) return run_with_tokenizer(ByteLevelBpeTokenizer::from_pretrained(dir), dir, config, job);
  if (std::filesystem::exists(dir / "tokenizer.model")) return run_with_tokenizer(SentencePieceTokenizer::from_pretrained(dir), dir, config, job);
  throw Error("TokenizerNotFound", fmt::format("{} holds neither tokenizer.json nor tokenizer.model", dir.string()));
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string_view(argv[i]) == "--help" || std::string_view(argv[i]) == "-h") {
      fmt::print("{}", qlora::train_example::usage());
      return 0;
    }
  }
  // Every step frees and re-allocates the same activations: keep them in the process
  // (core/heap_retention.hpp: about 30% of a tiny-model step otherwise goes to page faults).
  (void)qlora::retain_freed_heap_memory();
  try {
    qlora::train_example::Job job(argc, argv);  // under mpirun: MPI, one rank of a data-parallel run
    try {
      return run(qlora::train_example::parse_arguments(argc, argv), job);
    } catch (const std::exception& e) {
      if (job.size() > 1) {
        fmt::print(stderr, "qlora-train (rank {} of {}): {}\n", job.rank(), job.size(), e.what());
      } else {
        fmt::print(stderr, "qlora-train: {}\n", e.what());
      }
      job.abort_after_error();  // the other ranks would wait for this one until their timeout
      return 1;
    }
  } catch (const std::exception& e) {  // qlora::Error, and what the standard library throws (file system, memory)
    fmt::print(stderr, "qlora-train: {}\n", e.what());
    return 1;
  }
}
