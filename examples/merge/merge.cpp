// qlora-merge: merges a PEFT LoRA adapter into its base model and writes a
// model folder that transformers loads (AutoModelForCausalLM.from_pretrained),
// as XTuner's `xtuner convert merge` and the Phi-2 tutorial's
// merge_and_unload + save_pretrained do.
//
//   qlora-merge --base <hf folder> --adapter <peft dir> --out <dir>
//               [--max-shard-size 2GB] [--dtype auto|float16|bfloat16|float32] [--overwrite]
//
// The maths and the files written are include/qlora/lora/merge_adapter.hpp's.
// Exit status: 0 merged, 1 the merge failed (the message names the file,
// module or tensor), 2 a command line it cannot use.
#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/lora/merge_adapter.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

namespace {

using namespace qlora;

struct Options {
  std::filesystem::path base, adapter, out;
  MergeOptions merge;
};

void print_usage(std::FILE* to) {
  fmt::print(to,
             "usage: qlora-merge --base BASE --adapter ADAPTER --out OUT [--max-shard-size 2GB]\n"
             "                   [--dtype auto|float16|bfloat16|float32] [--overwrite]\n"
             "Merges the PEFT LoRA adapter in ADAPTER (adapter_config.json + adapter_model.safetensors) into the\n"
             "Hugging Face model in BASE and writes the merged model to OUT.\n"
             "  --max-shard-size  largest weights file: bytes, or a number with KB, MB, GB (or KiB, MiB, GiB)\n"
             "  --dtype           dtype of the written weights; auto keeps the base's (a 4-bit base: the dtype\n"
             "                    it was quantized from)\n"
             "  --overwrite       replace OUT when it exists and is not empty\n");
}

/// Exit status 2, as Python's argparse, for a command line it cannot use.
[[noreturn]] void usage_error(std::string_view message) {
  print_usage(stderr);
  fmt::print(stderr, "qlora-merge: {}\n", message);
  std::exit(2);
}

Options parse_options(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 == argc) usage_error(fmt::format("{} needs a value", arg));
      return argv[++i];
    };
    try {
      if (arg == "-h" || arg == "--help") {
        print_usage(stdout);
        std::exit(0);
      } else if (arg == "--base") {
        options.base = value();
      } else if (arg == "--adapter") {
        options.adapter = value();
      } else if (arg == "--out") {
        options.out = value();
      } else if (arg == "--max-shard-size") {
        options.merge.max_shard_size = parse_shard_size(value());
      } else if (arg == "--dtype") {
        options.merge.dtype = parse_merge_dtype(value());
      } else if (arg == "--overwrite") {
        options.merge.overwrite = true;
      } else {
        usage_error(fmt::format("unknown argument {}", arg));
      }
    } catch (const Error& e) {
      usage_error(e.message());
    }
  }
  if (options.base.empty() || options.adapter.empty() || options.out.empty()) {
    usage_error("--base, --adapter and --out are required");
  }
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse_options(argc, argv);
  try {
    const AdapterMergeReport report = merge_adapter(options.base, options.adapter, options.out, options.merge);
    if (report.converted_remote_code) {
      fmt::print("converted the adapter from the remote-code Phi names (Wqkv, out_proj, ...) to transformers' names\n");
    }
    fmt::print("merged {} LoRA module{} of {} into the base {} (written to {})\n", report.lora_modules,
               report.lora_modules == 1 ? "" : "s", options.adapter.string(), options.base.string(), options.out.string());
    fmt::print("replaced {} tensor{} with the adapter's (modules_to_save, trained biases); copied {}; dequantized {} "
               "4-bit weight{}\n",
               report.replaced_tensors, report.replaced_tensors == 1 ? "" : "s", report.copied_tensors,
               report.dequantized_tensors, report.dequantized_tensors == 1 ? "" : "s");
    if (report.resized_vocab) fmt::print("vocabulary resized by the adapter: vocab_size = {}\n", *report.resized_vocab);
    fmt::print("wrote {}: {}\n", options.out.string(), fmt::join(report.weight_files, ", "));
    fmt::print("      {}\n", fmt::join(report.other_files, ", "));
    return 0;
  } catch (const Error& e) {
    fmt::print(stderr, "qlora-merge: [{}] {}\n", e.code(), e.message());
  } catch (const std::exception& e) {
    fmt::print(stderr, "qlora-merge: {}\n", e.what());
  }
  return 1;
}
