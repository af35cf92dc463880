// XTuner's packing, token for token: `xtuner.dataset.utils.Packer` as
// `pack_dataset` runs it (`Dataset.map(Packer(max_length), batched=True,
// num_proc=map_num_proc)`), so that a run moved from XTuner to qlora trains on
// the same rows. Samples are concatenated into one stream and cut at fixed
// offsets into max_length chunks; a sample that crosses a cut is split, and its
// continuation starts a new segment at position 0 (what XTuner's
// cumulative_len/position_ids give varlen attention). Whatever is left after the
// last full chunk of a call waits for the next call; a call whose stream is
// shorter than max_length emits it as one short chunk. What XTuner does not
// report, we count: the tail that is silently lost when the last call of a
// worker ended with a full chunk (PackTail::drop, the default for fidelity;
// PackTail::flush keeps it as a short final row).
//
// Where the chunks fall depends on how datasets.map hands samples to the
// Packer: batches of map_batch_size (datasets' default 1000), and with
// map_num_proc > 1 one contiguous shard per worker process, each with its own
// Packer copy, so residuals never cross shards and each shard may lose a tail.
// xtuner_pack() reproduces both. The segment structure is always recorded;
// XTuner's use_varlen_attn only decides whether training uses it (varlen_batch
// in varlen_batch.hpp) or attends across the whole row (PadCollator).
//
// Shuffle before pack: XTuner calls dataset.shuffle() with no seed, which draws
// one from numpy's global state, so its order cannot be reproduced by anyone;
// ours is a pure function of shuffle_seed. The reference fixtures therefore
// test the packer on a given order (shuffle_before_pack = false).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include <qlora/core/error.hpp>
#include <qlora/data/detail/sample_checks.hpp>
#include <qlora/data/detail/seeded_permutation.hpp>
#include <qlora/data/encoded_sample.hpp>
#include <qlora/data/packed_sequence.hpp>
#include <qlora/data/tokenizer.hpp>

namespace qlora {

/// What becomes of the tokens still waiting when the data ends.
enum class PackTail : std::uint8_t {
  /// XTuner's behaviour: they are lost (and counted in dropped_tokens).
  drop,
  /// They become one last, short sequence.
  flush,
};

/// One XTuner Packer: the state a datasets.map worker keeps between batches.
class XtunerPacker {
 public:
  explicit XtunerPacker(std::size_t max_length) : max_length_(max_length) {
    check(max_length > 0 && max_length <= PackedSequence::max_tokens, "InvalidMaxLength",
          "max_length {} is out of range; expected 1..{}", max_length, PackedSequence::max_tokens);
  }

  /// Appends a sample of the current batch to the stream.
  void add(const EncodedSample& sample) {
    detail::check_sample(sample, samples_added_);
    ++samples_added_;
    ++samples_in_batch_;
    stream_ids_.insert(stream_ids_.end(), sample.input_ids.begin(), sample.input_ids.end());
    stream_labels_.insert(stream_labels_.end(), sample.labels.begin(), sample.labels.end());
    sample_ends_.push_back(stream_ids_.size());
  }

  /// Ends the batch (returns what one Packer.__call__ returns): every full
  /// max_length chunk of the stream, keeping the rest for the next batch; or,
  /// when the stream is shorter than max_length, all of it as one short chunk.
  /// An empty batch with nothing waiting gives nothing (datasets never makes one).
  [[nodiscard]] std::vector<PackedSequence> end_batch() {
    samples_in_batch_ = 0;
    std::vector<PackedSequence> chunks;
    const std::size_t stream_length = stream_ids_.size();
    if (stream_length >= max_length_) {
      const std::size_t chunk_count = stream_length / max_length_;
      chunks.reserve(chunk_count);
      for (std::size_t k = 0; k < chunk_count; ++k) chunks.push_back(cut(k * max_length_, (k + 1) * max_length_));
      consume(chunk_count * max_length_);
    } else if (stream_length > 0) {
      chunks.push_back(cut(0, stream_length));
      consume(stream_length);
    }
    return chunks;
  }

  /// One Packer call on `batch`.
  [[nodiscard]] std::vector<PackedSequence> pack_batch(std::span<const EncodedSample> batch) {
    for (const EncodedSample& sample : batch) add(sample);
    return end_batch();
  }

  /// End of data. A batch still open is ended first (its rows are returned);
  /// then the tokens still waiting become one short last row (flush) or are
  /// counted in dropped_tokens (drop).
  [[nodiscard]] std::vector<PackedSequence> finish(PackTail tail) {
    std::vector<PackedSequence> rows;
    if (samples_in_batch_ > 0) rows = end_batch();
    const std::size_t waiting = stream_ids_.size();
    if (waiting == 0) return rows;
    if (tail == PackTail::flush) {
      rows.push_back(cut(0, waiting));
    } else {
      dropped_tokens_ += waiting;
    }
    consume(waiting);
    return rows;
  }

  /// Tokens carried to the next batch (XTuner's residual).
  [[nodiscard]] std::size_t pending_tokens() const noexcept { return stream_ids_.size(); }
  [[nodiscard]] std::size_t dropped_tokens() const noexcept { return dropped_tokens_; }

 private:
  /// Stream tokens [begin, end) as one sequence: a segment starts at `begin` and
  /// at every sample end inside the range, so a sample cut at `begin` restarts at
  /// position 0 (XTuner's get_cumulative_len).
  [[nodiscard]] PackedSequence cut(std::size_t begin, std::size_t end) const {
    PackedSequence chunk;
    chunk.input_ids.reserve(end - begin);
    chunk.labels.reserve(end - begin);
    chunk.position_ids.reserve(end - begin);
    std::size_t segment_begin = begin;
    for (auto boundary = std::upper_bound(sample_ends_.begin(), sample_ends_.end(), begin);
         boundary != sample_ends_.end() && *boundary < end; ++boundary) {
      append(chunk, segment_begin, *boundary);
      segment_begin = *boundary;
    }
    append(chunk, segment_begin, end);
    return chunk;
  }

  void append(PackedSequence& chunk, std::size_t begin, std::size_t end) const {
    const std::span<const TokenId> ids(stream_ids_), labels(stream_labels_);
    chunk.append_segment(ids.subspan(begin, end - begin), labels.subspan(begin, end - begin));
  }

  /// Forgets the first `count` stream tokens and rebases the sample ends.
  void consume(std::size_t count) {
    stream_ids_.erase(stream_ids_.begin(), stream_ids_.begin() + static_cast<std::ptrdiff_t>(count));
    stream_labels_.erase(stream_labels_.begin(), stream_labels_.begin() + static_cast<std::ptrdiff_t>(count));
    const auto first_kept = std::upper_bound(sample_ends_.begin(), sample_ends_.end(), count);
    sample_ends_.erase(sample_ends_.begin(), first_kept);
    for (std::size_t& sample_end : sample_ends_) sample_end -= count;
  }

  std::size_t max_length_;
  std::vector<TokenId> stream_ids_;
  std::vector<TokenId> stream_labels_;
  /// Where each sample in the stream ends, ascending.
  std::vector<std::size_t> sample_ends_;
  std::size_t samples_added_ = 0;
  std::size_t samples_in_batch_ = 0;
  std::size_t dropped_tokens_ = 0;
};

struct XtunerPackOptions {
  std::size_t max_length = 2048;
  /// Samples per Packer call: datasets.map(batched=True)'s default batch_size.
  std::size_t map_batch_size = 1000;
  /// datasets.map workers, each packing one contiguous shard (XTuner's
  /// process_hf_dataset default is 32; datasets caps it at the sample count).
  std::size_t map_num_proc = 32;
  /// XTuner's default; our shuffle is reproducible from shuffle_seed.
  bool shuffle_before_pack = true;
  std::uint64_t shuffle_seed = 0;
  PackTail tail = PackTail::drop;
};

struct XtunerPackResult {
  std::vector<PackedSequence> sequences;
  std::size_t input_tokens = 0;
  /// Tokens lost at shard ends under PackTail::drop.
  std::size_t dropped_tokens = 0;
};

/// XTuner's pack_dataset on `samples`, in datasets.map's batches and shards.
[[nodiscard]] inline XtunerPackResult xtuner_pack(std::span<const EncodedSample> samples,
                                                  const XtunerPackOptions& options) {
  check(options.map_batch_size > 0 && options.map_num_proc > 0, "InvalidPackOptions",
        "map_batch_size {} and map_num_proc {} must both be at least 1", options.map_batch_size,
        options.map_num_proc);
  XtunerPackResult result;
  for (std::size_t index = 0; index < samples.size(); ++index) {
    detail::check_sample(samples[index], index);  // here, to name the sample by its input index
    result.input_tokens += samples[index].input_ids.size();
  }
  const std::vector<std::size_t> order = detail::shuffled_or_identity(
      samples.size(), options.shuffle_before_pack, options.shuffle_seed, detail::pack_shuffle_stream);
  // datasets' Dataset.shard(num_shards, index, contiguous=True): the first
  // (size % shards) shards take one extra sample.
  const std::size_t shard_count = std::min(options.map_num_proc, samples.size());
  for (std::size_t shard = 0; shard < shard_count; ++shard) {
    const std::size_t base = samples.size() / shard_count, extra = samples.size() % shard_count;
    const std::size_t shard_begin = base * shard + std::min(shard, extra);
    const std::size_t shard_end = shard_begin + base + (shard < extra ? 1 : 0);
    XtunerPacker packer(options.max_length);
    for (std::size_t batch_begin = shard_begin; batch_begin < shard_end; batch_begin += options.map_batch_size) {
      const std::size_t batch_end = std::min(shard_end, batch_begin + options.map_batch_size);
      for (std::size_t i = batch_begin; i < batch_end; ++i) packer.add(samples[order[i]]);
      for (PackedSequence& chunk : packer.end_batch()) result.sequences.push_back(std::move(chunk));
    }
    for (PackedSequence& last : packer.finish(options.tail)) result.sequences.push_back(std::move(last));
    result.dropped_tokens += packer.dropped_tokens();
  }
  return result;
}

}  // namespace qlora
