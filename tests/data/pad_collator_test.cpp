// PadCollator and varlen_batch against the collators they stand in for
// (tests/reference/xtuner_packing.py): XTuner's default_collate_fn, padded and
// varlen; the Phi-2 tutorial's collate; transformers' DataCollatorForSeq2Seq
// with pad_to_multiple_of; and transformers' refusal to pad without a pad token.
#include <qlora/data/pad_collator.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "data/packing_test_support.hpp"

using qlora::Batch;
using qlora::EncodedSample;
using qlora::PackedSequence;
using qlora::PadCollator;
using qlora::TokenId;
using qlora::test::Json;
using qlora::test::require_error;

namespace {

const Json& collate_case(const Json& fixture, const std::string& name) {
  for (const Json& entry : fixture.at("cases")) {
    if (entry.at("name") == name) return entry;
  }
  FAIL("no collate case " << name);
  throw std::logic_error("unreachable");
}

/// A [batch, length] fixture array, flattened row-major.
std::vector<std::int32_t> flat(const Json& rows) {
  std::vector<std::int32_t> values;
  for (const Json& row : rows) {
    const std::vector<std::int32_t> cells = qlora::test::ints(row);
    values.insert(values.end(), cells.begin(), cells.end());
  }
  return values;
}

PackedSequence packed_from(const Json& chunk) {
  PackedSequence packed;
  packed.input_ids = qlora::test::ints(chunk.at("input_ids"));
  packed.labels = qlora::test::ints(chunk.at("labels"));
  packed.position_ids = qlora::test::ints(chunk.at("position_ids"));
  packed.cu_seqlens = qlora::test::ints(chunk.at("cumulative_len"));
  return packed;
}

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

TEST_CASE("packed rows collate padded (attention across the row) and varlen as XTuner does") {
  const Json fixture = qlora::test::packing_fixture("collate.json");
  const Json& expected = collate_case(fixture, "xtuner_varlen");
  const PackedSequence packed = packed_from(expected.at("chunk"));

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

  // Two rows (XTuner allows one) lie end to end: the second row's boundaries
  // move by the first row's length, its positions stay its own.
  const std::vector<PackedSequence> two{packed, packed};
  const Batch joined = qlora::varlen_batch(two);
  CHECK(joined.length == 2 * packed.size());
  CHECK(joined.cu_seqlens == std::vector<std::int32_t>{0, 3, 5, 8, 11, 13, 16});
  CHECK(joined.row(joined.position_ids, 0).subspan(8, 3)[2] == 2);
  CHECK(joined.max_seqlen == varlen.max_seqlen);

  // Without varlen attention XTuner pads packed rows like samples.
  PackedSequence shorter = packed;
  shorter.input_ids.resize(5);
  shorter.labels.resize(5);
  shorter.position_ids.resize(5);
  shorter.cu_seqlens = {0, 3, 5};
  const std::vector<PackedSequence> rows{packed, shorter};
  const Batch padded = PadCollator(0)(rows);
  CHECK(padded.length == 8);
  CHECK(padded.row(padded.attention_mask, 1)[4] == 1);
  CHECK(padded.row(padded.attention_mask, 1)[5] == 0);
  CHECK(padded.row(padded.position_ids, 1)[7] == 7);
  CHECK(padded.cu_seqlens.empty());
}

TEST_CASE("no pad token is the error transformers gives") {
  const Json fixture = qlora::test::packing_fixture("collate.json");
  const std::string message = fixture.at("missing_pad_message").get<std::string>();
  const std::string first_sentence = message.substr(0, message.find(". "));
  require_error([] { PadCollator collator(std::nullopt); }, "MissingPadToken", first_sentence, "SpecialRole::pad");
}

TEST_CASE("collation input errors are named") {
  require_error([] { PadCollator collator(0, 0); }, "InvalidPadMultiple", "pad_to_multiple_of");
  const std::vector<EncodedSample> none;
  require_error([&] { (void)PadCollator(0)(none); }, "EmptyBatch", "empty batch");
  require_error([] { (void)qlora::varlen_batch({}); }, "EmptyBatch", "empty batch");
  const std::vector<EncodedSample> mismatched{EncodedSample{{1, 2}, {1, 2}, 0}, EncodedSample{{1, 2}, {1}, 5}};
  require_error([&] { (void)PadCollator(0)(mismatched); }, "LabelsLengthMismatch", "sample 1 (line 5)");
  PackedSequence broken;
  broken.input_ids = {1, 2};
  broken.labels = {1, 2};
  broken.position_ids = {0, 1};
  broken.cu_seqlens = {0, 1};
  const std::vector<PackedSequence> rows{broken};
  require_error([&] { (void)qlora::varlen_batch(rows); }, "InvalidCuSeqlens", "packed row 0", "ends at 1");
}
