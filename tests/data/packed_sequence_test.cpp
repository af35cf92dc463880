// PackedSequence: building segments, max_seqlen, and validate()'s named errors
// for each broken invariant. XTuner's own chunks (tests/reference/
// xtuner_packing.py) must pass validate(), and segments appended the way the
// packers append them must give XTuner's cumulative_len and position_ids.
#include <qlora/data/packed_sequence.hpp>

#include <cstdint>
#include <vector>

#include <catch2/catch.hpp>

#include "data/packing_test_support.hpp"

using qlora::PackedSequence;
using qlora::TokenId;
using qlora::test::Json;
using qlora::test::require_error;

namespace {

/// Three segments of lengths 3, 1, 2.
PackedSequence three_segments() {
  PackedSequence packed;
  const std::vector<TokenId> a{10, 11, 12}, b{20}, c{30, 31};
  const std::vector<TokenId> a_labels{-100, 11, 12}, b_labels{20}, c_labels{-100, -100};
  packed.append_segment(a, a_labels);
  packed.append_segment(b, b_labels);
  packed.append_segment(c, c_labels);
  return packed;
}

}  // namespace

TEST_CASE("append_segment restarts positions and records boundaries") {
  const PackedSequence packed = three_segments();
  CHECK(packed.input_ids == std::vector<TokenId>{10, 11, 12, 20, 30, 31});
  CHECK(packed.labels == std::vector<TokenId>{-100, 11, 12, 20, -100, -100});
  CHECK(packed.position_ids == std::vector<std::int32_t>{0, 1, 2, 0, 0, 1});
  CHECK(packed.cu_seqlens == std::vector<std::int32_t>{0, 3, 4, 6});
  CHECK(packed.size() == 6);
  CHECK(packed.segment_count() == 3);
  CHECK(packed.max_seqlen() == 3);
  packed.validate();
  CHECK(PackedSequence{}.max_seqlen() == 0);
  CHECK(PackedSequence{}.segment_count() == 0);
}

TEST_CASE("XTuner's chunks satisfy the invariants; the collator's max_seqlen is ours") {
  const Json toy = qlora::test::packing_fixture("xtuner_packer_toy.json");
  for (const Json& toy_case : toy.at("cases")) {
    for (const Json& call : toy_case.at("calls")) {
      for (const Json& chunk : call.at("chunks")) qlora::test::packed_from_chunk(chunk).validate();
    }
  }
  const Json collate = qlora::test::packing_fixture("collate.json");
  const Json& varlen = qlora::test::collate_case(collate, "xtuner_varlen");
  CHECK(qlora::test::packed_from_chunk(varlen.at("chunk")).max_seqlen() == varlen.at("max_seqlen").get<std::int32_t>());
}

TEST_CASE("validate names each broken invariant") {
  PackedSequence short_labels = three_segments();
  short_labels.labels.pop_back();
  require_error([&] { short_labels.validate(); }, "PackedLengthMismatch", "6 input_ids has 5 labels");

  require_error([] { PackedSequence{}.validate(); }, "EmptyPackedSequence", "no tokens");

  PackedSequence no_zero = three_segments();
  no_zero.cu_seqlens.front() = 1;
  require_error([&] { no_zero.validate(); }, "InvalidCuSeqlens", "start with 0");

  PackedSequence wrong_end = three_segments();
  wrong_end.cu_seqlens.back() = 5;
  require_error([&] { wrong_end.validate(); }, "InvalidCuSeqlens", "ends at 5", "length 6");

  PackedSequence not_increasing = three_segments();
  not_increasing.cu_seqlens = {0, 3, 3, 6};
  require_error([&] { not_increasing.validate(); }, "InvalidCuSeqlens", "cu_seqlens[2] = 3", "strictly increasing");

  PackedSequence running_positions = three_segments();
  running_positions.position_ids = {0, 1, 2, 3, 4, 5};  // XTuner's non-varlen positions, but cu_seqlens say 3 segments
  require_error([&] { running_positions.validate(); }, "InvalidPositionIds", "position_ids[3] = 3", "expected 0");
}

TEST_CASE("append_segment refuses what would break the invariants") {
  PackedSequence packed;
  const std::vector<TokenId> ids{1, 2}, one_label{1}, none{};
  require_error([&] { packed.append_segment(ids, one_label); }, "LabelsLengthMismatch", "packed segment 0",
                "1 labels for 2 input_ids");
  require_error([&] { packed.append_segment(none, none); }, "EmptySample", "packed segment 0", "no tokens");
  CHECK(packed.size() == 0);
  CHECK(packed.cu_seqlens.empty());
  // The segment is named by its number in the row; the checks are the packers'
  // own (detail/sample_checks.hpp), so a sample and a segment fail alike.
  packed.append_segment(ids, ids);
  require_error([&] { packed.append_segment(ids, one_label); }, "LabelsLengthMismatch", "packed segment 1",
                "expected one label per token");
  CHECK(packed.segment_count() == 1);
}
