// varlen_batch against XTuner's default_collate_fn(use_varlen_attn=True) on one
// packed chunk (tests/reference/xtuner_packing.py: collate.json), and what it
// does beyond XTuner: several rows end to end, each keeping its own segments.
#include <qlora/data/varlen_batch.hpp>

#include <cstdint>
#include <vector>

#include <catch2/catch.hpp>

#include "data/packing_test_support.hpp"

using qlora::Batch;
using qlora::PackedSequence;
using qlora::test::flat;
using qlora::test::Json;
using qlora::test::require_error;

TEST_CASE("one packed row collates as XTuner's varlen default_collate_fn") {
  const Json fixture = qlora::test::packing_fixture("collate.json");
  const Json& expected = qlora::test::collate_case(fixture, "xtuner_varlen");
  const PackedSequence packed = qlora::test::packed_from_chunk(expected.at("chunk"));

  const std::vector<PackedSequence> one{packed};
  const Batch varlen = qlora::varlen_batch(one);
  CHECK(varlen.batch_size == 1);
  CHECK(varlen.length == packed.size());
  CHECK(varlen.input_ids == flat(expected.at("input_ids")));
  CHECK(varlen.labels == flat(expected.at("labels")));
  CHECK(varlen.position_ids == flat(expected.at("position_ids")));
  CHECK(varlen.cu_seqlens == qlora::test::ints(expected.at("cumulative_len")));
  CHECK(varlen.max_seqlen == expected.at("max_seqlen").get<std::int32_t>());
  CHECK(expected.at("attention_mask").is_null());
  CHECK(varlen.attention_mask.empty());
  CHECK(varlen.varlen());
}

TEST_CASE("several packed rows lie end to end, each keeping its segments") {
  const Json fixture = qlora::test::packing_fixture("collate.json");
  const PackedSequence packed =
      qlora::test::packed_from_chunk(qlora::test::collate_case(fixture, "xtuner_varlen").at("chunk"));
  REQUIRE(packed.cu_seqlens == std::vector<std::int32_t>{0, 3, 5, 8});
  // Two rows (XTuner allows one): the second row's boundaries move by the
  // first row's length, its positions stay its own.
  const std::vector<PackedSequence> two{packed, packed};
  const Batch joined = qlora::varlen_batch(two);
  CHECK(joined.batch_size == 1);
  CHECK(joined.length == 2 * packed.size());
  CHECK(joined.cu_seqlens == std::vector<std::int32_t>{0, 3, 5, 8, 11, 13, 16});
  CHECK(joined.row(joined.position_ids, 0).subspan(8, 3)[2] == 2);
  CHECK(joined.row(joined.input_ids, 0).subspan(8, 8).front() == packed.input_ids.front());
  CHECK(joined.max_seqlen == packed.max_seqlen());
}

TEST_CASE("rows laid end to end keep the targets of stacked rows") {
  // A causal LM shifts targets within a row, so the last token of the first row predicts nothing;
  // end to end it would predict the second row's first token unless that label is -100.
  const std::vector<qlora::TokenId> first{11, 12, 13}, second{21, 22};
  PackedSequence a, b;
  a.append_segment(first, first);
  b.append_segment(second, second);
  const std::vector<PackedSequence> rows{a, b};
  const Batch joined = qlora::varlen_batch(rows);
  CHECK(joined.input_ids == std::vector<qlora::TokenId>{11, 12, 13, 21, 22});
  CHECK(joined.labels == std::vector<qlora::TokenId>{11, 12, 13, qlora::ignore_index, 22});
}

TEST_CASE("varlen input errors are named") {
  require_error([] { (void)qlora::varlen_batch({}); }, "EmptyBatch", "empty batch");
  PackedSequence broken;
  broken.input_ids = {1, 2};
  broken.labels = {1, 2};
  broken.position_ids = {0, 1};
  broken.cu_seqlens = {0, 1};
  PackedSequence good;
  const std::vector<qlora::TokenId> ids{4, 5};
  good.append_segment(ids, ids);
  const std::vector<PackedSequence> rows{good, broken};
  require_error([&] { (void)qlora::varlen_batch(rows); }, "InvalidCuSeqlens", "packed row 1", "ends at 1");
}
