// IWYU pragma: private
// The AdamW state file, written by AdamW::save_state and ZeroOptimizer's (so a
// state saved by N ranks loads on any other number, or by a plain AdamW):
// safetensors with `<name>.exp_avg` and `<name>.exp_avg_sq` (F32, the
// parameter's shape) per parameter, and in the metadata the step count and
// the options a resumed run must share (betas, eps, weight decay, decay order,
// the no-decay group). Reading checks all of it before anything is used.
#pragma once

#include <algorithm>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/tensor_view.hpp>
#include <qlora/io/detail/json.hpp>
#include <qlora/io/detail/safetensors_format.hpp>
#include <qlora/io/safetensors_reader.hpp>
#include <qlora/io/safetensors_writer.hpp>
#include <qlora/optim/adamw_options.hpp>

namespace qlora::detail {

/// One parameter's entry: what a file must hold for it, and (when writing) its moments.
struct AdamWStateEntry {
  std::string_view name;
  Shape shape;
  bool decay = true;
  std::span<const float> exp_avg;     ///< writing only
  std::span<const float> exp_avg_sq;  ///< writing only
};

inline constexpr std::string_view exp_avg_suffix = ".exp_avg";
inline constexpr std::string_view exp_avg_sq_suffix = ".exp_avg_sq";

/// A double as text that parses back to the same bits (fmt's shortest round trip).
inline std::string exact_text(double value) { return fmt::format("{}", value); }

/// What must match between a state file and the optimizer loading it.
inline SafetensorsMetadata adamw_state_metadata(const AdamWOptions& options,
                                                std::span<const AdamWStateEntry> entries) {
  std::vector<std::string> no_decay;
  for (const AdamWStateEntry& entry : entries) {
    if (!entry.decay) no_decay.emplace_back(entry.name);
  }
  std::ranges::sort(no_decay);
  return {{"format", "pt"},
          {"optimizer", "qlora.AdamW"},
          {"beta1", exact_text(options.beta1)},
          {"beta2", exact_text(options.beta2)},
          {"eps", exact_text(options.eps)},
          {"weight_decay", exact_text(options.weight_decay)},
          {"decay_order", std::string(decay_order_name(options.decay_order))},
          {"no_decay", Json(no_decay).dump()}};
}

/// Writes the state file atomically (SafetensorsWriter::write).
inline void write_adamw_state(const std::filesystem::path& file, const AdamWOptions& options, std::int64_t steps,
                              std::span<const AdamWStateEntry> entries) {
  SafetensorsWriter writer;
  for (const AdamWStateEntry& entry : entries) {
    const auto extents = entry.shape.extents();
    const std::vector<std::int64_t> shape(extents.begin(), extents.end());
    writer.add(std::string(entry.name) + std::string(exp_avg_suffix), DType::F32, shape,
               std::as_bytes(entry.exp_avg));
    writer.add(std::string(entry.name) + std::string(exp_avg_sq_suffix), DType::F32, shape,
               std::as_bytes(entry.exp_avg_sq));
  }
  SafetensorsMetadata metadata = adamw_state_metadata(options, entries);
  metadata.emplace_back("step", std::to_string(steps));
  writer.set_metadata(std::move(metadata));
  writer.write(file);
}

/// A state file opened and checked against the optimizer that loads it: the
/// options, the step count, and exactly one exp_avg and exp_avg_sq of the
/// right shape per entry (and nothing else), else Error("OptimizerStateMismatch")
/// naming the file and what differs.
class AdamWStateFile {
 public:
  AdamWStateFile(const std::filesystem::path& file, const AdamWOptions& options,
                 std::span<const AdamWStateEntry> entries)
      : reader_(SafetensorsReader::open(file)), source_(file.string()) {
    for (const auto& [key, expected] : adamw_state_metadata(options, entries)) {
      const auto found = reader_.metadata_value(key);
      check(found.has_value(), "OptimizerStateMismatch", "{}: no `{}` in the metadata; not an AdamW state file",
            source_, key);
      check(same_value(key, *found, expected), "OptimizerStateMismatch", "{}: saved with {} = {}, this optimizer has {}",
            source_, key, *found, expected);
    }
    steps_ = parse_steps();
    check(reader_.tensors().size() == 2 * entries.size(), "OptimizerStateMismatch",
          "{}: holds {} tensors, expected {} (exp_avg and exp_avg_sq of {} parameters)", source_,
          reader_.tensors().size(), 2 * entries.size(), entries.size());
    for (const AdamWStateEntry& entry : entries) {
      moments_.push_back(saved_moment(entry, exp_avg_suffix));
      moments_.push_back(saved_moment(entry, exp_avg_sq_suffix));
    }
  }

  [[nodiscard]] std::int64_t steps() const noexcept { return steps_; }
  /// Copies entry i's first and second moments (checked: F32, the entry's shape) into `out`,
  /// which has the entry's element count.
  void read_exp_avg(std::size_t i, std::span<float> out) const { copy(*moments_[2 * i], out); }
  void read_exp_avg_sq(std::size_t i, std::span<float> out) const { copy(*moments_[2 * i + 1], out); }

 private:
  static void copy(const SafetensorsTensor& saved, std::span<float> out) {
    // memcpy: a tensor's offset in the file need not be 4-byte aligned.
    std::memcpy(out.data(), saved.data.data(), std::min(saved.data.size(), out.size_bytes()));
  }

  /// Numbers compare by value (so "0.10" and "0.1" agree), the rest as text.
  static bool same_value(std::string_view key, std::string_view saved, const std::string& expected) {
    if (key == "beta1" || key == "beta2" || key == "eps" || key == "weight_decay") {
      double value = 0;
      const auto [end, error] = std::from_chars(saved.data(), saved.data() + saved.size(), value);
      return error == std::errc() && end == saved.data() + saved.size() && exact_text(value) == expected;
    }
    if (key == "no_decay") {
      const Json parsed = Json::parse(saved.begin(), saved.end(), nullptr, /*allow_exceptions=*/false);
      return parsed.is_array() && parsed.dump() == expected;
    }
    return saved == expected;
  }

  std::int64_t parse_steps() const {
    const auto text = reader_.metadata_value("step");
    check(text.has_value(), "OptimizerStateMismatch", "{}: no `step` in the metadata", source_);
    std::int64_t steps = -1;
    const auto [end, error] = std::from_chars(text->data(), text->data() + text->size(), steps);
    check(error == std::errc() && end == text->data() + text->size() && steps >= 0, "OptimizerStateMismatch",
          "{}: step `{}` is not a count ≥ 0", source_, *text);
    return steps;
  }

  const SafetensorsTensor* saved_moment(const AdamWStateEntry& entry, std::string_view suffix) const {
    const std::string key = std::string(entry.name) + std::string(suffix);
    const SafetensorsTensor* saved = reader_.find(key);
    check(saved != nullptr, "OptimizerStateMismatch", "{}: no `{}`; the file was saved for other parameters", source_,
          key);
    const auto extents = entry.shape.extents();
    const bool same_shape = std::ranges::equal(saved->shape, extents);
    check(saved->dtype == DType::F32 && same_shape, "OptimizerStateMismatch",
          "{}: `{}` is {} {}, parameter `{}` needs F32 {}", source_, key, dtype_name(saved->dtype),
          shape_string(saved->shape), entry.name, entry.shape.to_string());
    return saved;
  }

  SafetensorsReader reader_;
  std::string source_;
  std::int64_t steps_ = 0;
  std::vector<const SafetensorsTensor*> moments_;  ///< exp_avg, exp_avg_sq per entry
};

}  // namespace qlora::detail
