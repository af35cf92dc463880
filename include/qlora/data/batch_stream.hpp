// BatchStream: a JSONL file to training batches in one pass and constant
// memory, the composition of the data engine's parts:
//
//   ConversationReader ─► SampleEncoder (ChatTemplate + Tokenizer)
//     ─► packing: none (one sample per row), XtunerPacker or BinPacker
//     ─► varlen_batch (packed rows end to end, cu_seqlens) or PadCollator
//
// Memory is bounded by one record, the packer's window (BinPacker) or residual
// (XtunerPacker), and the rows of one batch, whatever the file size: nothing
// keeps the whole dataset. That makes it the preprocessing pass (statistics,
// a token cache) and the benchmark's subject; training over several epochs
// packs an in-memory dataset and orders it with EpochSampler (epoch_order.hpp).
//
// Samples keep the file's order: XTuner's shuffle before packing needs the
// whole dataset (xtuner_pack / bin_pack do it), BinPacker's window reorders
// only locally.
//
// A record that cannot be encoded (a role-order error, a tokenizer error,
// SampleTooLong) is handed back to the reader, which names file:line and, under
// BadLinePolicy::skip, skips and logs it with the lines it could not parse
// (reader().bad_lines(); encode_stats().rejected_samples counts them too).
//
// Data-parallel ranks: with world_size > 1, rank r keeps batches r, r + w,
// r + 2w, ... of the one stream every rank forms. Every rank reads and encodes
// the whole file, so that all ranks pack the same rows and the ranks' batches
// are exactly a partition of the single-rank stream. Sharding samples instead
// would save each rank the encoding of the others' samples, but each rank
// would pack its own, giving different rows and batch counts that differ by
// more than one. Batches of other ranks are formed but not collated. The last
// round (one batch per rank) may be incomplete, leaving some ranks one batch
// short, which hangs the collective ops of data-parallel training:
// drop_incomplete_round drops it on every rank (dropped_batches() counts the
// batch this rank lost).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <iterator>
#include <optional>
#include <span>
#include <utility>
#include <variant>
#include <vector>

#include <qlora/core/error.hpp>
#include <qlora/data/batch.hpp>
#include <qlora/data/bin_packer.hpp>
#include <qlora/data/chat_template.hpp>
#include <qlora/data/conversation.hpp>
#include <qlora/data/conversation_reader.hpp>
#include <qlora/data/encoded_sample.hpp>
#include <qlora/data/packed_sequence.hpp>
#include <qlora/data/pad_collator.hpp>
#include <qlora/data/sample_encoder.hpp>
#include <qlora/data/tokenizer.hpp>
#include <qlora/data/varlen_batch.hpp>
#include <qlora/data/xtuner_packer.hpp>

namespace qlora {

enum class Packing : std::uint8_t {
  /// One sample per row (the Phi-2 tutorial: padded batches).
  none,
  /// XTuner's Packer: fixed max_length chunks, samples split across them.
  xtuner,
  /// BinPacker: whole samples, best fit, rows of at most max_length.
  bin,
};

enum class Collation : std::uint8_t {
  /// The batch's rows end to end in one unpadded row with cu_seqlens.
  varlen,
  /// PadCollator: pad to the longest row, attention_mask 0 on padding.
  padded,
};

struct BatchStreamOptions {
  DatasetFormat format = DatasetFormat::detect;
  JsonlReaderOptions reader;
  /// max_length is also the packers' row length.
  EncodeOptions encode;
  Packing packing = Packing::bin;
  Collation collation = Collation::varlen;
  /// Rows per batch (samples, under Packing::none).
  std::size_t rows_per_batch = 1;
  /// BinPacker's look-ahead and open rows (its max_length is encode.max_length).
  std::size_t bin_window = 1000;
  std::size_t bin_open_rows = 64;
  /// XtunerPacker: samples per Packer call (datasets.map's batch_size) and the tail rule.
  std::size_t xtuner_map_batch_size = 1000;
  PackTail xtuner_tail = PackTail::drop;
  /// Collation::padded: the pad id (default: the tokenizer's) and the multiple.
  std::optional<TokenId> pad_id;
  std::size_t pad_to_multiple_of = 1;
  /// Data-parallel ranks: this rank keeps batches rank, rank + world_size, ...
  std::size_t world_size = 1;
  std::size_t rank = 0;
  /// Drop the last round of world_size batches when it is incomplete, so that
  /// every rank gets the same number of batches.
  bool drop_incomplete_round = false;
};

template <Tokenizer Tok, ChatTemplate Template>
class BatchStream {
 public:
  /// Keeps a reference to `tokenizer`, which must outlive the stream.
  BatchStream(std::filesystem::path file, const Tok& tokenizer, Template chat_template,
              const BatchStreamOptions& options = {})
      : options_(options),
        reader_(std::move(file), options.format, options.reader),
        encoder_(tokenizer, std::move(chat_template), options.encode),
        packer_(make_packer(options)) {
    check(options.rows_per_batch > 0, "InvalidArgument", "BatchStreamOptions::rows_per_batch must be at least 1");
    check(options.rank < options.world_size, "InvalidShard",
          "BatchStreamOptions::rank {} is out of range for world_size {}", options.rank, options.world_size);
    if (options.collation == Collation::padded) {
      collator_.emplace(options.pad_id ? options.pad_id : tokenizer.special_ids().pad, options.pad_to_multiple_of);
    }
  }
  BatchStream(std::filesystem::path, const Tok&&, Template, const BatchStreamOptions& = {}) = delete;

  /// This rank's next batch, or nullopt once the file is used up. The last
  /// batch may have fewer rows.
  std::optional<Batch> next() {
    while (batches_formed_ % options_.world_size != options_.rank) {
      if (!next_rows(other_rows_)) return std::nullopt;
    }
    if (!next_rows(batch_rows_)) return std::nullopt;
    if (options_.drop_incomplete_round) {
      while (batches_formed_ % options_.world_size != 0) {  // the rest of this batch's round
        if (!next_rows(other_rows_)) {
          ++dropped_batches_;
          return std::nullopt;
        }
      }
    }
    return collator_ ? (*collator_)(std::span<const PackedSequence>(batch_rows_)) : varlen_batch(batch_rows_);
  }

  /// What the encoder kept, cut and dropped so far.
  [[nodiscard]] const EncodeStats& encode_stats() const noexcept { return encoder_.stats(); }
  /// The reader: progress (bytes_consumed, file_size), and the lines skipped
  /// under BadLinePolicy::skip (bad_lines(): unparsable, unconvertible and
  /// unencodable records, counted per error code).
  [[nodiscard]] const JsonlReader& reader() const noexcept { return reader_.jsonl(); }
  /// Tokens XtunerPacker dropped at the end of data (PackTail::drop); 0 otherwise.
  [[nodiscard]] std::size_t dropped_tokens() const noexcept {
    const auto* xtuner = std::get_if<XtunerPacker>(&packer_);
    return xtuner == nullptr ? 0 : xtuner->dropped_tokens();
  }
  /// This rank's batches dropped by drop_incomplete_round (0 or 1).
  [[nodiscard]] std::size_t dropped_batches() const noexcept { return dropped_batches_; }

 private:
  using Packer = std::variant<std::monostate, XtunerPacker, BinPacker>;

  static Packer make_packer(const BatchStreamOptions& options) {
    check(options.xtuner_map_batch_size > 0, "InvalidArgument",
          "BatchStreamOptions::xtuner_map_batch_size must be at least 1");
    switch (options.packing) {
      case Packing::none:
        return std::monostate{};
      case Packing::xtuner:
        return XtunerPacker(options.encode.max_length);
      case Packing::bin:
        return BinPacker(BinPackOptions{.max_length = options.encode.max_length,
                                        .window = options.bin_window,
                                        .max_open_bins = options.bin_open_rows,
                                        .shuffle = false,
                                        .seed = 0});
    }
    throw Error("InvalidArgument", "unknown Packing value");
  }

  /// Reads and encodes records until the packer gives rows or the file ends.
  void pull() {
    if (!reader_.next(conversation_)) {
      finish();
      return;
    }
    if (!encoder_.encode_into(conversation_, sample_, [this](const Error& error) { reader_.reject(error); })) return;
    if (auto* xtuner = std::get_if<XtunerPacker>(&packer_)) {
      xtuner->add(sample_);
      if (++samples_in_map_batch_ == options_.xtuner_map_batch_size) {
        samples_in_map_batch_ = 0;
        keep(xtuner->end_batch());
      }
    } else if (auto* bin = std::get_if<BinPacker>(&packer_)) {
      keep(bin->add(sample_));
    } else {
      PackedSequence row;
      row.append_segment(sample_.input_ids, sample_.labels);
      ready_.push_back(std::move(row));
    }
  }

  /// Moves the next batch's rows (rows_per_batch, fewer at the end) into
  /// `rows`; false once the file is used up.
  bool next_rows(std::vector<PackedSequence>& rows) {
    while (ready_.size() < options_.rows_per_batch && !finished_) pull();
    if (ready_.empty()) return false;
    const auto count = static_cast<std::ptrdiff_t>(std::min(options_.rows_per_batch, ready_.size()));
    rows.assign(std::make_move_iterator(ready_.begin()), std::make_move_iterator(ready_.begin() + count));
    ready_.erase(ready_.begin(), ready_.begin() + count);
    ++batches_formed_;
    return true;
  }

  void finish() {
    finished_ = true;
    if (auto* xtuner = std::get_if<XtunerPacker>(&packer_)) keep(xtuner->finish(options_.xtuner_tail));
    if (auto* bin = std::get_if<BinPacker>(&packer_)) keep(bin->finish());
  }

  void keep(std::vector<PackedSequence>&& rows) {
    for (PackedSequence& row : rows) ready_.push_back(std::move(row));
  }

  BatchStreamOptions options_;
  ConversationReader reader_;
  SampleEncoder<Tok, Template> encoder_;
  Packer packer_;
  std::optional<PadCollator> collator_;
  Conversation conversation_;
  EncodedSample sample_;
  std::deque<PackedSequence> ready_;
  std::vector<PackedSequence> batch_rows_;
  std::vector<PackedSequence> other_rows_;  // a batch of another rank, or one this rank may drop
  std::size_t batches_formed_ = 0;  // by all ranks
  std::size_t dropped_batches_ = 0;
  std::size_t samples_in_map_batch_ = 0;
  bool finished_ = false;
};

}  // namespace qlora
