// One QLoRA optimizer step of a Phi model on the CPU, against transformers +
// PEFT + bitsandbytes on the same model, tokens and LoRA config in the same
// run; and the peak resident set of one step at Phi-2's real shape against
// the analytic floor.
//
//   training_step/<model>/<compute>
//       train_step (forward_backward, clip 1.0, AdamW 32-bit) of Phi<NF4, Compute>,
//       LoRA r 16 / alpha 32 / dropout 0 on q,k,v,dense,fc1,fc2:
//         tiny: examples/assets/tiny-phi (1.3 M parameters), 4 packed rows of
//               256 tokens (samples of 100, 90 and 66), modules_to_save
//               lm_head and embed_tokens (as the default training run has);
//         mid:  a random Phi (hidden 1024, 8 layers, 16 heads, intermediate
//               4096, vocab 8192, 32 rotary dims per head; 118 M parameters) written in fp16 to
//               $TMPDIR/qlora_bench_models/ on first use, one row of 512.
//       One warm-up step, then timed steps. Then bench/models/torch_peft_step.py
//       runs the same steps on the same folder and tokens (the batch is written
//       to a safetensors file it reads) with torch on the same thread count.
//       Counters: tok_per_s, torch_tok_per_s and vs_torch = ours / torch's.
//       Without Python ($QLORA_PYTHON or .venv/bin/python) the label says so
//       and there is no ratio.
//   phi2_shape_memory/checkpointing:<off|on>
//       A random Phi of microsoft/phi-2's shape written as a bitsandbytes 4-bit
//       checkpoint (~1.8 GB, by a child process, deleted afterwards), loaded by
//       Phi<NF4, bf16> with LoRA r 32 on q,k,v,dense,fc1,fc2 and no
//       modules_to_save, then one step on one row of 1024 tokens. Reports the
//       resident set per phase (after load, after the optimizer's state, the
//       step's peak) against the floor that analytic_floor() derives. Run each
//       case in its own process (--benchmark_filter) so that the process-wide
//       ru_maxrss means that case alone.
#include <benchmark/benchmark.h>

#include <qlora/core/heap_retention.hpp>
#include <qlora/models/phi.hpp>
#include <qlora/optim/adamw.hpp>
#include <qlora/train/training_step.hpp>

#include <fmt/format.h>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "models/python_baseline.hpp"
#include "models/random_phi_checkpoint.hpp"

namespace {

namespace fs = std::filesystem;
using qlora::bench::PhiShape;
using clock_type = std::chrono::steady_clock;

constexpr double learning_rate = 1e-4;
const std::vector<std::string> lora_targets = {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"};

fs::path bench_models_dir() {
  const fs::path dir = fs::temp_directory_path() / "qlora_bench_models";
  fs::create_directories(dir);
  return dir;
}

/// Rows of packed samples: token ids from a fixed hash, every token supervised
/// (labels = ids; the model shifts them), positions restarting at each sample,
/// one attention segment per sample.
struct PackedRows {
  std::int64_t rows = 0, row_length = 0;
  std::vector<std::int32_t> input_ids, labels, position_ids, cu_seqlens{0};

  PackedRows(std::int64_t row_count, const std::vector<std::int32_t>& sample_lengths, std::int64_t vocab)
      : rows(row_count) {
    for (const std::int32_t length : sample_lengths) row_length += length;
    for (std::int64_t row = 0; row < rows; ++row) {
      for (const std::int32_t length : sample_lengths) {
        for (std::int32_t position = 0; position < length; ++position) {
          const auto index = static_cast<std::uint64_t>(input_ids.size());
          input_ids.push_back(static_cast<std::int32_t>((index * 2654435761u + 12345u) % static_cast<std::uint64_t>(vocab)));
          position_ids.push_back(position);
        }
        cu_seqlens.push_back(static_cast<std::int32_t>(input_ids.size()));
      }
    }
    labels = input_ids;
  }
  [[nodiscard]] std::int64_t tokens() const { return rows * row_length; }
  [[nodiscard]] qlora::TokenBatch batch() const { return {input_ids, labels, position_ids, cu_seqlens, row_length}; }

  /// input_ids, labels, position_ids as I32 [rows, row_length], for the Python side.
  void save(const fs::path& path) const {
    qlora::SafetensorsWriter writer;
    writer.add("input_ids", {rows, row_length}, input_ids);
    writer.add("labels", {rows, row_length}, labels);
    writer.add("position_ids", {rows, row_length}, position_ids);
    writer.write(path);
  }
};

qlora::ModelOptions lora_options(int r, std::vector<std::string> modules_to_save, bool checkpointing) {
  qlora::ModelOptions options;
  options.lora.r = r;
  options.lora.lora_alpha = 2.0 * r;
  options.lora.lora_dropout = 0.0;
  options.lora.target_modules = lora_targets;
  options.lora.modules_to_save = std::move(modules_to_save);
  options.quantize = {.blocksize = 64, .double_quant = true};
  options.gradient_checkpointing = checkpointing;
  return options;
}

/// AdamW (bitsandbytes' 32-bit maths, weight decay 0 as the Trainer's default) over every trainable tensor.
template <class Model>
qlora::AdamW make_optimizer(Model& model) {
  qlora::AdamW optimizer(qlora::AdamWOptions{});
  for (const qlora::TrainableParameter& parameter : model.trainable_parameters()) {
    optimizer.add(parameter.name, parameter.value, parameter.grad, parameter.decay);
  }
  return optimizer;
}

// ---- training_step --------------------------------------------------------

struct TrainingCase {
  std::string name;
  std::function<fs::path()> folder;  ///< the model folder (created on first use)
  std::int64_t rows;
  std::vector<std::int32_t> sample_lengths;
  std::vector<std::string> modules_to_save;
};

// partial_rotary_factor 0.5, not Phi-2's 0.4: head_dim is 64 here (80 in Phi-2), and 0.4 of 64 is 25.6, which
// no implementation accepts (rotary dims must be even); 0.5 rotates 32 dims per head, as Phi-2 does.
const PhiShape mid_shape{.hidden = 1024, .layers = 8, .heads = 16, .intermediate = 4096, .vocab = 8192,
                         .partial_rotary_factor = 0.5, .max_positions = 2048};

fs::path mid_model_folder() {
  const fs::path folder = bench_models_dir() / "phi_mid_h1024_l8_fp16";
  if (!fs::exists(folder / "model.safetensors")) qlora::bench::write_random_phi_fp16(folder, mid_shape);
  return folder;
}

/// Runs the torch + PEFT baseline; its tokens/s, or nullopt with the reason in the label.
std::optional<double> torch_tokens_per_s(benchmark::State& state, const TrainingCase& c, const fs::path& folder,
                                         const fs::path& batch_file, bool bf16_compute, std::int64_t steps) {
  const std::optional<std::string> python = qlora::bench::python_path();
  if (!python) {
    state.SetLabel("no Python (set QLORA_PYTHON to one with torch, transformers, peft, bitsandbytes): no ratio");
    return std::nullopt;
  }
  std::string modules;
  for (const std::string& module : c.modules_to_save) modules += " " + module;
  const std::string arguments = fmt::format(
      "'{}' '{}' --compute-dtype {} --r 16 --alpha 32 --threads {} --warmup 1 --steps {}{}", folder.string(),
      batch_file.string(), bf16_compute ? "bf16" : "fp32", qlora::default_thread_count(), steps,
      modules.empty() ? "" : " --modules-to-save" + modules);
  std::string error;
  const auto result = qlora::bench::run_python_json(
      *python, fs::path(QLORA_SOURCE_DIR) / "bench/models/torch_peft_step.py", arguments, error);
  if (!result) {
    state.SetLabel(error);
    return std::nullopt;
  }
  state.SetLabel(fmt::format("torch: {}", (*result)["optimizer"].get<std::string>()));
  state.counters["torch_loss"] = (*result)["loss"].get<double>();
  return (*result)["tokens_per_s"].get<double>();
}

template <qlora::FloatStorage Compute>
void training_step(benchmark::State& state, const TrainingCase& c) {
  using Model = qlora::Phi<qlora::NF4, Compute>;
  const fs::path folder = c.folder();
  Model model = Model::load(folder, lora_options(16, c.modules_to_save, false));
  qlora::AdamW optimizer = make_optimizer(model);
  const PackedRows rows(c.rows, c.sample_lengths, model.vocab_size());
  const qlora::MicroBatch window[] = {{rows.batch(), c.name}};
  std::uint64_t step = 0;
  (void)qlora::train_step(model, optimizer, window, learning_rate, step++);  // warm-up, as torch gets one
  double seconds = 0, loss = 0;
  for (auto _ : state) {
    const auto start = clock_type::now();
    loss = qlora::train_step(model, optimizer, window, learning_rate, step++).loss;
    const double elapsed = std::chrono::duration<double>(clock_type::now() - start).count();
    state.SetIterationTime(elapsed);
    seconds += elapsed;
  }
  const auto steps = static_cast<std::int64_t>(state.iterations());
  const double ours = static_cast<double>(rows.tokens() * steps) / seconds;
  state.counters["tok_per_s"] = ours;
  state.counters["loss"] = loss;
  const fs::path batch_file = bench_models_dir() / fmt::format("batch_{}.safetensors", c.name);
  rows.save(batch_file);
  if (const auto theirs = torch_tokens_per_s(state, c, folder, batch_file, std::is_same_v<Compute, qlora::bf16>, steps)) {
    state.counters["torch_tok_per_s"] = *theirs;
    state.counters["vs_torch"] = ours / *theirs;
  }
}

// ---- phi2_shape_memory ----------------------------------------------------

double mib(double bytes) { return bytes / (1 << 20); }

std::size_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::size_t pages_total = 0, pages_resident = 0;
  statm >> pages_total >> pages_resident;
  return pages_resident * static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
}
/// VmHWM: the resident set's high-water mark since start or the last reset_peak_resident().
std::size_t peak_resident_bytes() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.starts_with("VmHWM:")) return std::stoull(line.substr(6)) * 1024;
  }
  return 0;
}
/// Resets VmHWM to the current resident set (Linux ≥ 4.0: "5" > clear_refs).
bool reset_peak_resident() {
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5";
  clear.flush();
  return static_cast<bool>(clear);
}
/// getrusage's ru_maxrss. Linux reads it from the same high-water mark that reset_peak_resident()
/// resets, so after a reset it is the peak since then, not the process's lifetime peak.
double max_rss_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) * 1024;
}

/// Runs `work` in a forked child and waits: what it allocates never counts in our resident set.
void in_child_process(const std::function<void()>& work) {
  std::fflush(nullptr);
  const pid_t child = fork();
  qlora::check(child >= 0, "IoError", "fork failed");
  if (child == 0) {
    try {
      work();
      std::fflush(nullptr);
      _exit(0);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s\n", e.what());
      _exit(1);
    }
  }
  int status = 0;
  waitpid(child, &status, 0);
  qlora::check(WIFEXITED(status) && WEXITSTATUS(status) == 0, "IoError", "the child process failed");
}

/// The least memory one QLoRA step can hold at its peak, in bytes, by part.
///
///   weights     = Σ_linears (out·in/2 + ⌈out·in/64⌉ + 4·⌈out·in/(64·256)⌉ + 4·out)   NF4 codes, 8-bit absmax
///                 codes, fp32 second-level absmax, fp32 bias (double quant, blocksize 64)
///               + 4·(2·V·H + V) + 4·2H·(L + 1)          fp32 embedding, lm_head (+ bias), LayerNorms
///   lora        = 16 · r · Σ_targets (in + out)          A and B, their gradients, Adam m and v: fp32 each
///   activations = what backward reads, per layer, with c = sizeof(Compute):
///                   c·T·H      u = LayerNorm(h), the input of q/k/v/fc1 (x̂ for the LayerNorm's backward is
///                              (u − β)/γ; 2·4·T for its mean and rstd)
///                 + 4·3·T·H    q, k (rotated), v, fp32 as the attention computes them
///                 + c·T·H      the attention output o (dense's input; flash-style backward needs o)
///                 + 4·T·nh     the softmax log-sum-exp per query and head
///                 + 4·T·I      fc1's output (gelu_new's backward; fc2's input is recomputed from it)
///                 + 4·6·T·r    x·Aᵀ of each LoRA linear (B's gradient)
///               × L layers; with gradient checkpointing instead 4·T·H per layer (its fp32 input) + one
///               layer's worth (the layer being recomputed).
/// Transient workspaces (a loss chunk's logits, dh, per-thread tiles) are not in the floor.
struct MemoryFloor {
  double weights = 0, lora = 0, activations = 0;
  [[nodiscard]] double total() const { return weights + lora + activations; }
};

MemoryFloor analytic_floor(const PhiShape& s, std::int64_t r, std::int64_t tokens, std::size_t compute_bytes,
                           bool checkpointing) {
  const double h = static_cast<double>(s.hidden), inner = static_cast<double>(s.intermediate);
  const double v = static_cast<double>(s.vocab), layers = static_cast<double>(s.layers);
  const double t = static_cast<double>(tokens), c = static_cast<double>(compute_bytes), rank = static_cast<double>(r);
  const auto linear_bytes = [](double out, double in) {
    const double n = out * in;
    return n / 2 + std::ceil(n / 64) + 4 * std::ceil(n / (64 * 256)) + 4 * out;
  };
  MemoryFloor floor;
  const double per_layer_linears = 4 * linear_bytes(h, h) + linear_bytes(inner, h) + linear_bytes(h, inner);
  floor.weights = layers * per_layer_linears + 4 * (2 * v * h + v) + 4 * 2 * h * (layers + 1);
  const double lora_per_layer = rank * (4 * (h + h) + 2 * (h + inner));
  floor.lora = 16 * layers * lora_per_layer;
  const double per_layer_activations = c * t * h + 2 * 4 * t + 4 * 3 * t * h + c * t * h +
                                       4 * t * static_cast<double>(s.heads) + 4 * t * inner + 4 * 6 * t * rank;
  floor.activations = checkpointing ? layers * 4 * t * h + per_layer_activations : layers * per_layer_activations;
  return floor;
}

/// Bytes the model's objects hold: every linear (codes, statistics, bias, LoRA factors and
/// their gradients), the LayerNorms and the tensors around the layers.
template <class Model>
double model_bytes(Model& model) {
  double bytes = 0;
  for (auto& layer : model.layers()) {
    for (auto* linear : layer.linears()) bytes += static_cast<double>(linear->bytes());
    bytes += static_cast<double>(layer.norm_weight.byte_size() + layer.norm_bias.byte_size());
  }
  const qlora::CausalLmWeights& w = model.weights();
  for (const qlora::Tensor* tensor : {&w.embed_tokens, &w.final_norm_weight, &w.final_norm_bias, &w.lm_head_weight,
                                      &w.lm_head_bias}) {
    bytes += static_cast<double>(tensor->byte_size());
  }
  return bytes;
}

void phi2_shape_memory(benchmark::State& state, bool checkpointing) {
  using Model = qlora::Phi<qlora::NF4, qlora::bf16>;
  constexpr std::int64_t rank = 32, sequence = 1024;
  const PhiShape shape = PhiShape::phi2();
  const fs::path folder = bench_models_dir() / "phi2_shape_nf4";
  constexpr std::uintmax_t needed = std::uintmax_t{3} << 30;  // the checkpoint is ~1.8 GB
  if (fs::space(bench_models_dir()).available < needed) {
    state.SkipWithError("less than 3 GiB free in the temp directory for the Phi-2-shape checkpoint");
    return;
  }
  if (!reset_peak_resident()) {
    state.SkipWithError("cannot reset the peak resident set (/proc/self/clear_refs)");
    return;
  }
  // The checkpoint goes as soon as the model is loaded, or when anything fails.
  const struct RemoveOnExit {
    fs::path path;
    ~RemoveOnExit() { fs::remove_all(path); }
  } remove_checkpoint{folder};
  for (auto _ : state) {
    const auto generation_start = clock_type::now();
    in_child_process([&] { qlora::bench::write_random_phi_nf4(folder, shape); });
    state.counters["write_s"] = std::chrono::duration<double>(clock_type::now() - generation_start).count();

    const double baseline = static_cast<double>(resident_bytes());
    reset_peak_resident();
    const auto load_start = clock_type::now();
    Model model = Model::load(folder, lora_options(static_cast<int>(rank), {}, checkpointing));
    state.counters["load_s"] = std::chrono::duration<double>(clock_type::now() - load_start).count();
    fs::remove_all(folder);
    const double load_peak = static_cast<double>(peak_resident_bytes());
    const double loaded = static_cast<double>(resident_bytes());
    qlora::AdamW optimizer = make_optimizer(model);
    const PackedRows rows(1, {static_cast<std::int32_t>(sequence)}, model.vocab_size());
    const qlora::MicroBatch window[] = {{rows.batch(), "phi2-shape row"}};
    const double before_step = static_cast<double>(resident_bytes());

    reset_peak_resident();
    const auto step_start = clock_type::now();
    const qlora::TrainStepResult result = qlora::train_step(model, optimizer, window, learning_rate, 0);
    const double step_seconds = std::chrono::duration<double>(clock_type::now() - step_start).count();
    state.SetIterationTime(step_seconds);
    const double step_peak = static_cast<double>(peak_resident_bytes());
    const double after_step = static_cast<double>(resident_bytes());

    const MemoryFloor floor = analytic_floor(shape, rank, sequence, sizeof(qlora::bf16), checkpointing);
    state.counters["loss"] = result.loss;
    state.counters["baseline_MiB"] = mib(baseline);
    state.counters["load_peak_MiB"] = mib(load_peak);
    state.counters["loaded_MiB"] = mib(loaded);
    state.counters["model_objects_MiB"] = mib(model_bytes(model));
    state.counters["before_step_MiB"] = mib(before_step);
    state.counters["step_peak_MiB"] = mib(step_peak);
    state.counters["after_step_MiB"] = mib(after_step);
    state.counters["ru_maxrss_MiB"] = mib(max_rss_bytes());
    state.counters["floor_weights_MiB"] = mib(floor.weights);
    state.counters["floor_lora_MiB"] = mib(floor.lora);
    state.counters["floor_activations_MiB"] = mib(floor.activations);
    state.counters["floor_MiB"] = mib(floor.total());
    state.counters["peak_vs_floor"] = step_peak / floor.total();
  }
}

/// Runs a case; a qlora::Error becomes the case's error instead of ending the program.
template <class Case>
void guarded(benchmark::State& state, Case&& run_case) {
  try {
    run_case();
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void register_benchmarks() {
  const fs::path tiny = fs::path(QLORA_SOURCE_DIR) / "examples/assets/tiny-phi";
  const TrainingCase cases[] = {
      {"tiny", [tiny] { return tiny; }, 4, {100, 90, 66}, {"lm_head", "embed_tokens"}},
      {"mid", mid_model_folder, 1, {512}, {}},
  };
  for (const TrainingCase& c : cases) {
    const std::int64_t steps = c.name == "tiny" ? 3 : 2;  // torch takes seconds per step even on the tiny model
    benchmark::RegisterBenchmark(("training_step/" + c.name + "/bf16").c_str(),
                                 [c](benchmark::State& state) { guarded(state, [&] { training_step<qlora::bf16>(state, c); }); })
        ->Iterations(steps)->UseManualTime()->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("training_step/" + c.name + "/fp32").c_str(),
                                 [c](benchmark::State& state) { guarded(state, [&] { training_step<float>(state, c); }); })
        ->Iterations(steps)->UseManualTime()->Unit(benchmark::kMillisecond);
  }
  for (const bool checkpointing : {false, true}) {
    benchmark::RegisterBenchmark(
        fmt::format("phi2_shape_memory/checkpointing:{}", checkpointing ? "on" : "off").c_str(),
        [checkpointing](benchmark::State& state) {
          guarded(state, [&] { phi2_shape_memory(state, checkpointing); });
        })
        ->Iterations(1)->UseManualTime()->Unit(benchmark::kSecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  // As qlora-train does (core/heap_retention.hpp); the torch side runs with its defaults.
  (void)qlora::retain_freed_heap_memory();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_benchmarks();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
