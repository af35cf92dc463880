// PackedSequence: several samples (or pieces of samples) laid end to end in one
// training row, with the segment structure varlen attention needs: cu_seqlens
// (flash-attn's name; XTuner's cumulative_len) gives the segment boundaries and
// position_ids restart at 0 in every segment, so each segment is attended to and
// rotary-embedded as if it were alone. The packers (xtuner_packer.hpp,
// bin_packer.hpp) build it; the collators (pad_collator.hpp, varlen_batch.hpp)
// consume it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/detail/sample_checks.hpp>
#include <qlora/data/tokenizer.hpp>

namespace qlora {

struct PackedSequence {
  std::vector<TokenId> input_ids;
  /// One per token, unshifted (EncodedSample's convention).
  std::vector<TokenId> labels;
  /// 0, 1, ... within each segment.
  std::vector<std::int32_t> position_ids;
  /// Segment boundaries: 0, the end of each segment, size(); strictly increasing.
  std::vector<std::int32_t> cu_seqlens;

  [[nodiscard]] std::size_t size() const noexcept { return input_ids.size(); }
  [[nodiscard]] std::size_t segment_count() const noexcept { return cu_seqlens.empty() ? 0 : cu_seqlens.size() - 1; }

  /// The longest segment: flash-attn's max_seqlen, XTuner's max(diff(cumulative_len)).
  [[nodiscard]] std::int32_t max_seqlen() const noexcept {
    std::int32_t longest = 0;
    for (std::size_t s = 1; s < cu_seqlens.size(); ++s) longest = std::max(longest, cu_seqlens[s] - cu_seqlens[s - 1]);
    return longest;
  }

  /// Appends one segment: its tokens and labels, positions 0..n-1, its end boundary.
  void append_segment(std::span<const TokenId> segment_ids, std::span<const TokenId> segment_labels) {
    detail::check_labelled_tokens(segment_ids.size(), segment_labels.size(),
                                  [this] { return fmt::format("packed segment {}", segment_count()); });
    check(segment_ids.size() <= max_tokens - size(), "PackedSequenceTooLong",
          "a packed sequence of {} tokens cannot take a segment of {}: cu_seqlens are int32, at most {} tokens",
          size(), segment_ids.size(), max_tokens);
    if (cu_seqlens.empty()) cu_seqlens.push_back(0);
    input_ids.insert(input_ids.end(), segment_ids.begin(), segment_ids.end());
    labels.insert(labels.end(), segment_labels.begin(), segment_labels.end());
    for (std::size_t position = 0; position < segment_ids.size(); ++position) {
      position_ids.push_back(static_cast<std::int32_t>(position));
    }
    cu_seqlens.push_back(static_cast<std::int32_t>(size()));
  }

  /// Checks the invariants above; each broken one is its own error code, naming
  /// the offending index and what was expected.
  void validate() const {
    check(labels.size() == size() && position_ids.size() == size(), "PackedLengthMismatch",
          "packed sequence of {} input_ids has {} labels and {} position_ids; expected one of each per token", size(),
          labels.size(), position_ids.size());
    check(size() > 0, "EmptyPackedSequence", "packed sequence has no tokens; expected at least one segment");
    check(cu_seqlens.size() >= 2 && cu_seqlens.front() == 0, "InvalidCuSeqlens",
          "cu_seqlens of a {}-token sequence must start with 0 and hold at least one segment end; got {} values", size(),
          cu_seqlens.size());
    check(cu_seqlens.back() >= 0 && static_cast<std::size_t>(cu_seqlens.back()) == size(), "InvalidCuSeqlens",
          "cu_seqlens ends at {}; expected the sequence length {}", cu_seqlens.back(), size());
    for (std::size_t s = 1; s < cu_seqlens.size(); ++s) {
      check(cu_seqlens[s] > cu_seqlens[s - 1], "InvalidCuSeqlens",
            "cu_seqlens[{}] = {} after cu_seqlens[{}] = {}; expected strictly increasing boundaries", s, cu_seqlens[s],
            s - 1, cu_seqlens[s - 1]);
      for (std::int32_t t = cu_seqlens[s - 1]; t < cu_seqlens[s]; ++t) {
        const std::int32_t expected = t - cu_seqlens[s - 1];
        check(position_ids[static_cast<std::size_t>(t)] == expected, "InvalidPositionIds",
              "position_ids[{}] = {} in segment {} (tokens {}..{}); expected {}: positions restart at 0 per segment", t,
              position_ids[static_cast<std::size_t>(t)], s - 1, cu_seqlens[s - 1], cu_seqlens[s] - 1, expected);
      }
    }
  }

  /// The most tokens a sequence can hold with int32 cu_seqlens.
  static constexpr std::size_t max_tokens = std::numeric_limits<std::int32_t>::max();
};

}  // namespace qlora
