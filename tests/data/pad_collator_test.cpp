// PadCollator against the collators it stands in for
// (tests/reference/xtuner_packing.py): XTuner's default_collate_fn without
// varlen attention, the Phi-2 tutorial's collate, transformers'
// DataCollatorForSeq2Seq with pad_to_multiple_of, and transformers' refusal to
// pad without a pad token; and the bounds that keep the padded length from
// wrapping around.
#include <qlora/data/pad_collator.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "data/packing_test_support.hpp"

using qlora::Batch;
using qlora::EncodedSample;
using qlora::PackedSequence;
using qlora::PadCollator;
using qlora::TokenId;
using qlora::test::collate_case;
using qlora::test::flat;
using qlora::test::Json;
using qlora::test::require_error;

namespace {

void require_padded_like(const Batch& batch, const Json& expected) {
  const Json& ids = expected.at("input_ids");
  REQUIRE(batch.batch_size == ids.size());
  REQUIRE(batch.length == ids[0].size());
  CHECK(batch.input_ids == flat(ids));
  CHECK(batch.labels == flat(expected.at("labels")));
  CHECK(batch.attention_mask == flat(expected.at("attention_mask")));
  CHECK_FALSE(batch.varlen());
  CHECK(batch.max_seqlen == 0);
}

}  // namespace

TEST_CASE("padded batches match XTuner's default_collate_fn") {
  const Json fixture = qlora::test::packing_fixture("collate.json");
  const Json& expected = collate_case(fixture, "xtuner_padded");
  const std::vector<EncodedSample> samples = qlora::test::samples_from(expected.at("samples"));
  const Batch batch = PadCollator(expected.at("pad_id").get<TokenId>())(samples);
  require_padded_like(batch, expected);
  // arange(seq_len) on every row, padding included.
  CHECK(batch.position_ids == flat(expected.at("position_ids")));
  CHECK(batch.row(batch.input_ids, 1)[1] == 25);
}

TEST_CASE("padded batches match the Phi-2 tutorial's collate") {
  const Json fixture = qlora::test::packing_fixture("collate.json");
  const Json& expected = collate_case(fixture, "phi2_tutorial");
  const std::vector<EncodedSample> samples = qlora::test::samples_from(expected.at("samples"));
  require_padded_like(PadCollator(expected.at("pad_id").get<TokenId>())(samples), expected);
}

TEST_CASE("pad_to_multiple_of matches transformers' DataCollatorForSeq2Seq") {
  const Json fixture = qlora::test::packing_fixture("collate.json");
  const Json& expected = collate_case(fixture, "transformers_seq2seq_multiple_of_8");
  const std::vector<EncodedSample> samples = qlora::test::samples_from(expected.at("samples"));
  const Batch batch =
      PadCollator(expected.at("pad_id").get<TokenId>(), expected.at("pad_to_multiple_of").get<std::size_t>())(samples);
  require_padded_like(batch, expected);
  CHECK(batch.length == 8);
}

TEST_CASE("packed rows pad like samples, attending across the row as XTuner does without varlen attention") {
  const Json fixture = qlora::test::packing_fixture("collate.json");
  const PackedSequence packed = qlora::test::packed_from_chunk(collate_case(fixture, "xtuner_varlen").at("chunk"));
  PackedSequence shorter = packed;
  shorter.input_ids.resize(5);
  shorter.labels.resize(5);
  shorter.position_ids.resize(5);
  shorter.cu_seqlens = {0, 3, 5};
  const std::vector<PackedSequence> rows{packed, shorter};
  const Batch padded = PadCollator(0)(rows);
  CHECK(padded.length == 8);
  CHECK(padded.row(padded.input_ids, 0)[7] == packed.input_ids[7]);
  CHECK(padded.row(padded.attention_mask, 1)[4] == 1);
  CHECK(padded.row(padded.attention_mask, 1)[5] == 0);
  // 0..length-1, not the packed positions: the segments see each other.
  CHECK(padded.row(padded.position_ids, 0)[3] == 3);
  CHECK(padded.row(padded.position_ids, 1)[7] == 7);
  CHECK(padded.cu_seqlens.empty());
}

TEST_CASE("no pad token is the error transformers gives") {
  const Json fixture = qlora::test::packing_fixture("collate.json");
  const std::string message = fixture.at("missing_pad_message").get<std::string>();
  const std::string first_sentence = message.substr(0, message.find(". "));
  require_error([] { PadCollator collator(std::nullopt); }, "MissingPadToken", first_sentence, "SpecialRole::pad");
}

// (longest + m - 1) / m * m wrapped to 0 for m near SIZE_MAX, and rows were
// then copied into empty arrays. The multiple is now bounded by what int32
// position_ids can count, and the rounded length is checked against it.
TEST_CASE("the padded length is bounded by int32 position_ids and cannot wrap") {
  constexpr std::size_t max_tokens = PackedSequence::max_tokens;  // 2^31 - 1
  require_error([] { PadCollator collator(0, std::numeric_limits<std::size_t>::max()); }, "InvalidPadMultiple",
                "pad_to_multiple_of 18446744073709551615", "2147483647");
  require_error([] { PadCollator collator(0, max_tokens + 1); }, "InvalidPadMultiple", "2147483648");
  require_error([] { PadCollator collator(0, 0); }, "InvalidPadMultiple", "pad_to_multiple_of 0");

  const PadCollator widest(0, max_tokens);
  CHECK(widest.padded_length(1) == max_tokens);
  CHECK(widest.padded_length(max_tokens) == max_tokens);
  require_error([&] { (void)widest.padded_length(max_tokens + 1); }, "BatchTooLong", "2147483648 tokens");
  require_error([&] { (void)widest.padded_length(std::numeric_limits<std::size_t>::max()); }, "BatchTooLong",
                "18446744073709551615 tokens");

  // 2^31 - 1 is odd: rounding it up to an even length leaves int32.
  const PadCollator even(0, 2);
  CHECK(even.padded_length(max_tokens - 1) == max_tokens - 1);
  require_error([&] { (void)even.padded_length(max_tokens); }, "BatchTooLong", "2147483648 tokens long");

  CHECK(PadCollator(0).padded_length(5) == 5);
  CHECK(PadCollator(0, 8).padded_length(8) == 8);
  CHECK(PadCollator(0, 8).padded_length(9) == 16);

  // A large multiple that fits pads for real: every row to 2^16.
  const std::vector<EncodedSample> samples{EncodedSample{{7, 8, 9}, {7, 8, 9}, 0}};
  const Batch wide = PadCollator(3, std::size_t{1} << 16)(samples);
  CHECK(wide.length == std::size_t{1} << 16);
  CHECK(wide.input_ids.size() == wide.length);
  CHECK(wide.input_ids.back() == 3);
  CHECK(std::count(wide.attention_mask.begin(), wide.attention_mask.end(), 1) == 3);
  CHECK(wide.position_ids.back() == (1 << 16) - 1);
}

TEST_CASE("collation input errors are named") {
  const std::vector<EncodedSample> none;
  require_error([&] { (void)PadCollator(0)(none); }, "EmptyBatch", "empty batch");
  const std::vector<EncodedSample> mismatched{EncodedSample{{1, 2}, {1, 2}, 0}, EncodedSample{{1, 2}, {1}, 5}};
  require_error([&] { (void)PadCollator(0)(mismatched); }, "LabelsLengthMismatch", "sample 1 (line 5)");
  PackedSequence broken;
  broken.input_ids = {1, 2};
  broken.labels = {1, 2};
  broken.position_ids = {0, 1};
  broken.cu_seqlens = {0, 1};
  const std::vector<PackedSequence> rows{broken};
  require_error([&] { (void)PadCollator(0)(rows); }, "InvalidCuSeqlens", "packed row 0", "ends at 1");
}
