// Packing that never splits a sample: bin packing of whole samples into rows of
// at most max_length tokens (the rest of a row is padding, or nothing at all
// under varlen attention). XTuner's packer (xtuner_packer.hpp) cuts samples at
// fixed offsets, so the continuation of a cut sample is trained without its
// prompt; here every sample keeps its context and its own segment.
//
// Algorithm: best-fit decreasing over a bounded look-ahead. Samples are taken
// `window` at a time, sorted longest first, and each goes into the open row
// whose free space fits it most tightly (a new row when none fits). Rows stay
// open across windows so later short samples can fill their gaps; when more
// than max_open_bins are open, the fullest are emitted. Memory is therefore
// bounded by the window plus the open rows, whatever the dataset size: the
// packer works on a stream. Everything is deterministic: ties go to the earlier
// sample and the older row, and bin_pack's shuffle is a pure function of the seed.
//
// Samples longer than max_length are an error: the encoder truncates or drops
// them (by its policy, with counts) before packing, and silently cutting them
// here would lose data.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <numeric>
#include <set>
#include <span>
#include <tuple>
#include <utility>
#include <vector>

#include <qlora/core/error.hpp>
#include <qlora/data/detail/sample_checks.hpp>
#include <qlora/data/detail/seeded_permutation.hpp>
#include <qlora/data/encoded_sample.hpp>
#include <qlora/data/packed_sequence.hpp>

namespace qlora {

struct BinPackOptions {
  std::size_t max_length = 2048;
  /// Samples sorted and placed together: a longer look-ahead packs tighter.
  std::size_t window = 1000;
  /// Rows kept open between windows for later samples to fill.
  std::size_t max_open_bins = 64;
  /// bin_pack only: shuffle the dataset (pure function of seed) before packing,
  /// so that each window is a mix of the whole dataset.
  bool shuffle = true;
  std::uint64_t seed = 0;
};

/// How full the emitted rows are.
struct PackingStats {
  std::size_t sequences = 0;
  /// Real (non-pad) tokens.
  std::size_t tokens = 0;
  std::size_t max_length = 0;

  /// Real tokens over the tokens of the rows padded to max_length.
  [[nodiscard]] double fill_ratio() const noexcept {
    return sequences == 0 ? 0.0 : static_cast<double>(tokens) / static_cast<double>(sequences * max_length);
  }
};

namespace detail {

inline void check_fits(const EncodedSample& sample, std::size_t index, std::size_t max_length) {
  check_sample(sample, index);
  check(sample.input_ids.size() <= max_length, "SampleTooLong",
        "{}: {} tokens do not fit in max_length {}; the bin packer never splits a sample, so truncate or drop it "
        "when encoding",
        describe_sample(index, sample.line), sample.input_ids.size(), max_length);
}

}  // namespace detail

/// The streaming packer: add samples, collect the rows they complete, finish.
class BinPacker {
 public:
  explicit BinPacker(const BinPackOptions& options) : options_(options) {
    check(options.max_length > 0 && options.max_length <= PackedSequence::max_tokens, "InvalidMaxLength",
          "max_length {} is out of range; expected 1..{}", options.max_length, PackedSequence::max_tokens);
    check(options.window > 0, "InvalidPackOptions", "window must hold at least 1 sample");
    stats_.max_length = options.max_length;
    window_.reserve(options.window);
  }

  /// Adds one sample; returns the rows completed by it (none until a window is full).
  [[nodiscard]] std::vector<PackedSequence> add(EncodedSample sample) {
    detail::check_fits(sample, samples_added_, options_.max_length);
    ++samples_added_;
    window_.push_back(std::move(sample));
    if (window_.size() < options_.window) return {};
    place_window();
    return emit_while([this] { return open_.size() > options_.max_open_bins; });
  }

  /// Places the last, partial window and emits every open row.
  [[nodiscard]] std::vector<PackedSequence> finish() {
    place_window();
    return emit_while([] { return true; });
  }

  [[nodiscard]] const PackingStats& stats() const noexcept { return stats_; }

 private:
  void place_window() {
    std::vector<std::size_t> longest_first(window_.size());
    std::iota(longest_first.begin(), longest_first.end(), std::size_t{0});
    std::stable_sort(longest_first.begin(), longest_first.end(), [this](std::size_t a, std::size_t b) {
      return window_[a].input_ids.size() > window_[b].input_ids.size();
    });
    for (const std::size_t index : longest_first) {
      const EncodedSample& sample = window_[index];
      const std::size_t length = sample.input_ids.size();
      // Tightest fit: the least free space that is still enough, the oldest row on a tie.
      auto fit = free_space_.lower_bound({length, 0});
      std::uint64_t bin;
      std::size_t free_space;
      if (fit == free_space_.end()) {
        bin = rows_created_++;
        free_space = options_.max_length;
      } else {
        std::tie(free_space, bin) = *fit;
        free_space_.erase(fit);
      }
      open_[bin].append_segment(sample.input_ids, sample.labels);
      free_space_.insert({free_space - length, bin});
    }
    window_.clear();
  }

  /// Emits the fullest open row (full rows first, the oldest first among
  /// equals) as long as `more` says so.
  template <class Predicate>
  [[nodiscard]] std::vector<PackedSequence> emit_while(Predicate more) {
    std::vector<PackedSequence> rows;
    while (!free_space_.empty() && (free_space_.begin()->first == 0 || more())) {
      const std::uint64_t bin = free_space_.begin()->second;
      free_space_.erase(free_space_.begin());
      auto row = open_.find(bin);
      stats_.sequences += 1;
      stats_.tokens += row->second.size();
      rows.push_back(std::move(row->second));
      open_.erase(row);
    }
    return rows;
  }

  BinPackOptions options_;
  std::vector<EncodedSample> window_;
  /// Open rows by creation number.
  std::map<std::uint64_t, PackedSequence> open_;
  /// (free tokens, creation number) of every open row.
  std::set<std::pair<std::size_t, std::uint64_t>> free_space_;
  std::uint64_t rows_created_ = 0;
  std::size_t samples_added_ = 0;
  PackingStats stats_;
};

struct BinPackResult {
  std::vector<PackedSequence> sequences;
  PackingStats stats;
};

/// Packs a whole dataset: shuffled by options.seed (when options.shuffle), then
/// streamed through a BinPacker.
[[nodiscard]] inline BinPackResult bin_pack(std::span<const EncodedSample> samples, const BinPackOptions& options) {
  for (std::size_t index = 0; index < samples.size(); ++index) {
    detail::check_fits(samples[index], index, options.max_length);  // named by input index, before shuffling
  }
  const std::vector<std::size_t> order =
      detail::shuffled_or_identity(samples.size(), options.shuffle, options.seed, detail::pack_shuffle_stream);
  BinPacker packer(options);
  BinPackResult result;
  const auto keep = [&result](std::vector<PackedSequence>&& rows) {
    for (PackedSequence& row : rows) result.sequences.push_back(std::move(row));
  };
  for (const std::size_t index : order) keep(packer.add(samples[index]));
  keep(packer.finish());
  result.stats = packer.stats();
  return result;
}

}  // namespace qlora
