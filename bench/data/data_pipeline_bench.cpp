// JSONL → batches, qlora's data engine against the Phi-2 tutorial's Python
// pipeline (bench/data/phi2_tutorial_pipeline.py: transformers' fast tokenizer
// on HF tokenizers, datasets.map(tokenize), the tutorial's collate) on the same
// file with the same tokenizer, in the same run.
//
//   pipeline_vs_python/<MiB>/<python processes>
//       One pass of each over a generated riddles-like file (synthetic_chat_data.hpp).
//       qlora runs single-threaded twice: `padded` is the tutorial's semantics
//       (Phi2ChatML, max_length 1024, one sample per row, padded batches of 8),
//       `packed` adds BinPacker rows of 1024 with varlen batches. Both must
//       count exactly the tokens Python counts, less those of the samples with
//       nothing supervised that SampleEncoder drops (a cheap end-to-end check:
//       a mismatch is an error, not a number). Counters: tokens/s of each, and
//       vs_python_* = Python's seconds / qlora's seconds for the same tokens.
//       Python's time excludes its imports and tokenizer load (see the script).
//   streaming_memory/<MiB>
//       The packed pass alone over files of growing size, sampling the resident
//       set every 256 batches: rss_growth_MiB (peak minus the RSS before the pass)
//       must stay flat as the file grows from 64 MiB to 1 GiB.
//
// The tokenizer is the Phi-2-like stand-in of tests/data/data/bpe/phi2_like with
// the tutorial's run-time additions. Python is $QLORA_PYTHON, else the
// repository's .venv/bin/python (needs transformers, datasets, torch); without
// one the Python benchmark is skipped with a message. Generated files go to
// $TMPDIR/qlora_bench_data/ and are reused across runs.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <unistd.h>

#include <fmt/format.h>

#include <qlora/data/batch_stream.hpp>
#include <qlora/data/byte_level_bpe.hpp>
#include <qlora/data/phi2_chatml.hpp>
#include <qlora/io/detail/json.hpp>

#include "data/synthetic_chat_data.hpp"

namespace {

namespace fs = std::filesystem;
using qlora::BatchStream;
using qlora::BatchStreamOptions;
using qlora::ByteLevelBpeTokenizer;
using qlora::Phi2ChatML;

const fs::path tokenizer_dir = fs::path(QLORA_SOURCE_DIR) / "tests/data/data/bpe/phi2_like";
constexpr std::size_t max_length = 1024;  // the tutorial's
constexpr std::size_t padded_batch = 8;

/// The stand-in tokenizer after the tutorial's additions: <|im_start|> and <PAD>
/// added, <PAD> as pad, <|im_end|> added as the special EOS.
const ByteLevelBpeTokenizer& tutorial_tokenizer() {
  static const ByteLevelBpeTokenizer tokenizer = [] {
    ByteLevelBpeTokenizer t = ByteLevelBpeTokenizer::from_pretrained(tokenizer_dir);
    const std::string normal[] = {"<|im_start|>", "<PAD>"};
    t.add_tokens(normal, qlora::AddedTokenKind::normal);
    t.set_special_token(qlora::SpecialRole::pad, "<PAD>");
    const std::string eos[] = {"<|im_end|>"};
    t.add_tokens(eos, qlora::AddedTokenKind::special);
    t.set_special_token(qlora::SpecialRole::eos, "<|im_end|>");
    return t;
  }();
  return tokenizer;
}

fs::path data_file(std::size_t mib) {
  const fs::path dir = fs::temp_directory_path() / "qlora_bench_data";
  fs::create_directories(dir);
  const fs::path path = dir / fmt::format("riddles_zipf_{}MiB.jsonl", mib);
  if (!fs::exists(path)) {
    const fs::path partial = path.string() + ".partial";
    qlora::bench::write_synthetic_chat_jsonl(partial, mib << 20);
    fs::rename(partial, path);
  }
  return path;
}

std::size_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::size_t pages_total = 0, pages_resident = 0;
  statm >> pages_total >> pages_resident;
  return pages_resident * static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
}

struct PassResult {
  double seconds = 0;
  std::uint64_t tokens = 0;  // real (non-pad) tokens in the batches
  std::size_t batches = 0;
  std::size_t peak_rss = 0;
};

PassResult run_qlora(const fs::path& file, bool packed, bool watch_memory = false) {
  BatchStreamOptions options;
  options.format = qlora::DatasetFormat::alternating;
  options.encode.max_length = max_length;
  options.packing = packed ? qlora::Packing::bin : qlora::Packing::none;
  options.collation = packed ? qlora::Collation::varlen : qlora::Collation::padded;
  options.rows_per_batch = packed ? 1 : padded_batch;
  PassResult result;
  result.peak_rss = resident_bytes();
  const auto start = std::chrono::steady_clock::now();
  BatchStream stream(file, tutorial_tokenizer(), Phi2ChatML{}, options);
  while (const std::optional<qlora::Batch> batch = stream.next()) {
    benchmark::DoNotOptimize(batch->input_ids.data());
    ++result.batches;
    if (watch_memory && result.batches % 256 == 0) result.peak_rss = std::max(result.peak_rss, resident_bytes());
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.tokens = stream.encode_stats().kept_tokens;
  return result;
}

std::optional<std::string> python_path() {
  if (const char* configured = std::getenv("QLORA_PYTHON")) return std::string(configured);
  const fs::path venv = fs::path(QLORA_SOURCE_DIR) / ".venv/bin/python";
  if (fs::exists(venv)) return venv.string();
  return std::nullopt;
}

/// Runs the tutorial's pipeline; its JSON line, or an error text.
std::optional<qlora::detail::Json> run_python(const std::string& python, const fs::path& file, int processes,
                                              std::string& error) {
  const std::string command =
      fmt::format("'{}' '{}' '{}' '{}' --num-proc {} --batch-size {} --max-length {} 2>&1", python,
                  (fs::path(QLORA_SOURCE_DIR) / "bench/data/phi2_tutorial_pipeline.py").string(),
                  tokenizer_dir.string(), file.string(), processes, padded_batch, max_length);
  std::FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) {
    error = "cannot start " + python;
    return std::nullopt;
  }
  std::string output;
  char buffer[4096];
  while (const std::size_t n = std::fread(buffer, 1, sizeof buffer, pipe)) output.append(buffer, n);
  const int status = pclose(pipe);
  const std::size_t last_line = output.rfind('{');
  if (status != 0 || last_line == std::string::npos) {
    error = "the Python pipeline failed: " + output.substr(output.size() > 2000 ? output.size() - 2000 : 0);
    return std::nullopt;
  }
  return qlora::detail::Json::parse(output.substr(last_line));
}

void pipeline_vs_python(benchmark::State& state) {
  const fs::path file = data_file(static_cast<std::size_t>(state.range(0)));
  const auto processes = static_cast<int>(state.range(1));
  const std::optional<std::string> python = python_path();
  if (!python) {
    state.SkipWithError("no Python: set QLORA_PYTHON to one with transformers, datasets and torch");
    return;
  }
  for (auto _ : state) {
    const PassResult padded = run_qlora(file, false);
    const PassResult packed = run_qlora(file, true);
    std::string error;
    const std::optional<qlora::detail::Json> py = run_python(*python, file, processes, error);
    if (!py) {
      state.SkipWithError(error.c_str());
      return;
    }
    const double python_seconds = (*py)["seconds"].get<double>();
    // The tutorial keeps samples with nothing supervised; SampleEncoder drops them.
    const auto python_tokens =
        (*py)["tokens"].get<std::uint64_t>() - (*py)["unsupervised_tokens"].get<std::uint64_t>();
    if (python_tokens != padded.tokens || python_tokens != packed.tokens) {
      const std::string mismatch = fmt::format("token counts differ: Python {}, qlora padded {}, packed {}",
                                               python_tokens, padded.tokens, packed.tokens);
      state.SkipWithError(mismatch.c_str());
      return;
    }
    state.SetIterationTime(padded.seconds);
    state.counters["tokens"] = static_cast<double>(padded.tokens);
    state.counters["padded_tok_per_s"] = static_cast<double>(padded.tokens) / padded.seconds;
    state.counters["packed_tok_per_s"] = static_cast<double>(packed.tokens) / packed.seconds;
    state.counters["python_tok_per_s"] = static_cast<double>(python_tokens) / python_seconds;
    state.counters["vs_python_padded"] = python_seconds / padded.seconds;
    state.counters["vs_python_packed"] = python_seconds / packed.seconds;
  }
}

void streaming_memory(benchmark::State& state) {
  const fs::path file = data_file(static_cast<std::size_t>(state.range(0)));
  tutorial_tokenizer();  // loaded before the baseline RSS is taken
  for (auto _ : state) {
    const std::size_t before = resident_bytes();
    const PassResult packed = run_qlora(file, true, /*watch_memory=*/true);
    state.SetIterationTime(packed.seconds);
    state.counters["rss_growth_MiB"] = static_cast<double>(packed.peak_rss - std::min(packed.peak_rss, before)) / (1 << 20);
    state.counters["tok_per_s"] = static_cast<double>(packed.tokens) / packed.seconds;
    state.counters["MiB_per_s"] = static_cast<double>(fs::file_size(file)) / (1 << 20) / packed.seconds;
  }
}

BENCHMARK(pipeline_vs_python)
    ->ArgsProduct({{16}, {1, 2}})
    ->ArgNames({"MiB", "py_procs"})
    ->Iterations(1)
    ->UseManualTime()
    ->Unit(benchmark::kSecond);
BENCHMARK(streaming_memory)->Arg(64)->Arg(256)->Arg(1024)->ArgName("MiB")->Iterations(1)->UseManualTime()->Unit(
    benchmark::kSecond);

}  // namespace

BENCHMARK_MAIN();
