// qlora-quantize: quantizes the linear-layer weights of a safetensors
// checkpoint to 4 bits (NF4 or FP4, optionally with double quantization) in
// bitsandbytes' layout — a file transformers loads as a bnb-4bit model — and
// reports, per tensor and in total, the quantization error and the size.
//
//   qlora-quantize [INPUT] [OUTPUT] [--quant nf4|fp4] [--blocksize N]
//                  [--no-double-quant] [--skip SUBSTRING]... [--threads N]
//
// INPUT is a .safetensors file or an HF model folder (model.safetensors or a
// sharded index). With no INPUT it quantizes a small bundled model.
#include <qlora/qlora.hpp>

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

namespace {

using namespace qlora;

struct Options {
  std::filesystem::path input = QLORA_EXAMPLE_DEFAULT_INPUT;
  std::filesystem::path output;
  QuantType quant_type = QuantType::nf4;
  std::int64_t blocksize = 64;
  bool double_quant = true;
  // transformers keeps embeddings, the LM head and norms in full precision.
  std::vector<std::string> skip = {"embed", "lm_head", "norm", "wte"};
  unsigned threads = default_thread_count();
};

void print_usage() {
  fmt::print(
      "usage: qlora-quantize [INPUT] [OUTPUT] [--quant nf4|fp4] [--blocksize N] [--no-double-quant]\n"
      "                      [--skip SUBSTRING]... [--threads N]\n"
      "Quantizes every 2-D floating-point `*.weight` tensor (except names containing a --skip\n"
      "substring; default: embed, lm_head, norm, wte) to 4 bits in bitsandbytes' checkpoint layout.\n"
      "INPUT: a .safetensors file or an HF model folder (default: a bundled tiny model).\n"
      "OUTPUT: the .safetensors file to write (default: <temp dir>/qlora-quantize/model.safetensors).\n");
}

std::int64_t parse_integer(const std::string& flag, const std::string& text) {
  std::size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  check(used == text.size() && value > 0, "InvalidArgument", "{} expects a positive integer, got \"{}\"", flag, text);
  return value;
}

Options parse_options(int argc, char** argv) {
  Options options;
  std::vector<std::string> positional;
  bool custom_skip = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> std::string {
      check(i + 1 < argc, "InvalidArgument", "{} needs a value", arg);
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      print_usage();
      std::exit(0);
    } else if (arg == "--quant") {
      options.quant_type = parse_quant_type(value());
    } else if (arg == "--blocksize") {
      options.blocksize = parse_integer(arg, value());
      check(is_valid_4bit_blocksize(options.blocksize), "InvalidBlocksize",
            "--blocksize {} is not a power of two in [32, 4096]", options.blocksize);
    } else if (arg == "--no-double-quant") {
      options.double_quant = false;
    } else if (arg == "--skip") {
      if (!custom_skip) options.skip.clear();
      custom_skip = true;
      options.skip.push_back(value());
    } else if (arg == "--threads") {
      options.threads = static_cast<unsigned>(parse_integer(arg, value()));
    } else {
      check(!arg.starts_with("--"), "InvalidArgument", "unknown option {} (see --help)", arg);
      positional.push_back(arg);
    }
  }
  check(positional.size() <= 2, "InvalidArgument", "expected at most INPUT and OUTPUT, got {} paths", positional.size());
  if (!positional.empty()) options.input = positional[0];
  options.output = positional.size() == 2 ? std::filesystem::path(positional[1])
                                          : std::filesystem::temp_directory_path() / "qlora-quantize" / "model.safetensors";
  return options;
}

bool is_float_dtype(DType dtype) { return dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16; }

/// The tensor's values as float (exact for all three float types).
std::vector<float> to_floats(const SafetensorsTensor& tensor) {
  return visit_float_dtype(tensor.dtype, [&]<class T>(T) {
    std::vector<float> out;
    for (const T v : tensor.read<T>()) out.push_back(to_float(v));
    return out;
  }, tensor.name);
}

/// Quantizes `tensor` in its own dtype, as bitsandbytes would from that dtype.
Quantized4bit quantize(const SafetensorsTensor& tensor, const Options& options) {
  const Quantize4bitOptions q{.blocksize = options.blocksize, .double_quant = options.double_quant, .threads = options.threads};
  return visit_quant_type(options.quant_type, [&]<class Q>(Q) {
    return visit_float_dtype(tensor.dtype, [&]<class T>(T) {
      return quantize_4bit<Q, T>(tensor.read<T>(), tensor.shape, q);
    }, tensor.name);
  });
}

struct ErrorStats {
  double sum_squared_error = 0, sum_squared = 0, max_abs_error = 0;
  void add(const std::vector<float>& original, const std::vector<float>& restored) {
    for (std::size_t i = 0; i < original.size(); ++i) {
      const double error = double(restored[i]) - double(original[i]);
      sum_squared_error += error * error;
      sum_squared += double(original[i]) * double(original[i]);
      max_abs_error = std::max(max_abs_error, std::abs(error));
    }
  }
  [[nodiscard]] double relative_rms() const { return sum_squared > 0 ? std::sqrt(sum_squared_error / sum_squared) : 0.0; }
};

template <class Tensors>
int run(const Tensors& tensors, const Options& options) {
  fmt::print("qlora-quantize {}.{}.{}: {} -> {} ({}, blocksize {}, double quantization {})\n", version().major,
             version().minor, version().patch, options.input.string(), options.output.string(),
             quant_type_name(options.quant_type), options.blocksize, options.double_quant ? "on" : "off");
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::pair<const SafetensorsTensor*, Quantized4bit>> quantized;
  std::vector<const SafetensorsTensor*> kept;
  for (const SafetensorsTensor& tensor : tensors) {
    const bool skipped = std::ranges::any_of(options.skip, [&](const std::string& s) { return tensor.name.find(s) != std::string::npos; });
    if (tensor.shape.size() == 2 && tensor.name.ends_with(".weight") && is_float_dtype(tensor.dtype) && !skipped) {
      quantized.emplace_back(&tensor, quantize(tensor, options));
    } else {
      kept.push_back(&tensor);
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  check(!quantized.empty(), "NothingToQuantize", "{} has no 2-D float `*.weight` tensor outside the --skip list",
        options.input.string());

  // Write the checkpoint: 4-bit weights in bitsandbytes' layout, the rest unchanged.
  SafetensorsWriter writer;
  std::vector<Bnb4bitTensors> entries;
  entries.reserve(quantized.size());
  for (const auto& [tensor, q] : quantized) entries.emplace_back(tensor->name, q);
  for (const auto& entry : entries) entry.add_to(writer);
  for (const auto* tensor : kept) writer.add(*tensor);
  std::filesystem::create_directories(options.output.parent_path().empty() ? "." : options.output.parent_path());
  writer.write(options.output);

  // Read it back, dequantize, and measure what quantization cost.
  const auto written = SafetensorsReader::open(options.output);
  ErrorStats total;
  std::size_t original_bytes = 0, quantized_bytes = 0, parameters = 0;
  fmt::print("{:<52} {:>14} {:>10} {:>10}\n", "tensor", "shape", "rel. RMS", "max |err|");
  for (const auto& [tensor, q] : quantized) {
    const Quantized4bit reloaded = read_bnb_4bit(written, tensor->name);
    std::vector<float> restored(static_cast<std::size_t>(reloaded.state.numel()));
    dequantize_4bit<float>(reloaded.packed, reloaded.state, std::span<float>(restored), options.threads);
    const std::vector<float> original = to_floats(*tensor);
    ErrorStats stats;
    stats.add(original, restored);
    total.add(original, restored);
    fmt::print("{:<52} {:>14} {:>10.4f} {:>10.3g}\n", tensor->name, fmt::format("{}x{}", tensor->shape[0], tensor->shape[1]),
               stats.relative_rms(), stats.max_abs_error);
    original_bytes += tensor->data.size();
    parameters += static_cast<std::size_t>(tensor->numel());
    const Bnb4bitKeys keys = Bnb4bitKeys::of(tensor->name, q.state.quant_type);
    for (const auto& name : {keys.weight, keys.absmax, keys.quant_map, keys.nested_absmax, keys.nested_quant_map, keys.quant_state}) {
      if (const auto* t = written.find(name)) quantized_bytes += t->data.size();
    }
  }
  fmt::print("\nquantized {} tensors ({} parameters) in {:.3f} s; {} other tensors kept as they were\n", quantized.size(),
             parameters, seconds, kept.size());
  fmt::print("error: relative RMS {:.4f}, max |error| {:.3g}\n", total.relative_rms(), total.max_abs_error);
  fmt::print("size of the quantized weights: {:.2f} MiB -> {:.2f} MiB ({:.2f}x smaller, {:.3f} bits per parameter)\n",
             original_bytes / 1048576.0, quantized_bytes / 1048576.0, double(original_bytes) / double(quantized_bytes),
             8.0 * double(quantized_bytes) / double(parameters));
  fmt::print("wrote {} ({:.2f} MiB)\n", options.output.string(), std::filesystem::file_size(options.output) / 1048576.0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options options = parse_options(argc, argv);
    if (std::filesystem::is_directory(options.input)) {
      const auto checkpoint = ShardedCheckpoint::open(options.input);
      std::vector<SafetensorsTensor> tensors;
      for (const auto& shard : checkpoint.shards()) tensors.insert(tensors.end(), shard.tensors().begin(), shard.tensors().end());
      return run(tensors, options);
    }
    const auto file = SafetensorsReader::open(options.input);
    return run(file.tensors(), options);
  } catch (const Error& e) {
    fmt::print(stderr, "qlora-quantize: {}\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "qlora-quantize: {}\n", e.what());
    return 1;
  }
}
