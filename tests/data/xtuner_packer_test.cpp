// XtunerPacker and xtuner_pack against XTuner's real Packer
// (tests/reference/xtuner_packing.py): the spec's toy vectors call by call with
// the residual left behind, and a realistic stream packed through datasets.map
// with several batch sizes and worker counts, where chunks, segment boundaries,
// positions and the tokens XTuner drops must all match exactly.
#include <qlora/data/xtuner_packer.hpp>

#include <cstddef>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "data/packing_test_support.hpp"

using qlora::EncodedSample;
using qlora::PackedSequence;
using qlora::PackTail;
using qlora::XtunerPacker;
using qlora::XtunerPackOptions;
using qlora::XtunerPackResult;
using qlora::test::Json;
using qlora::test::require_error;

namespace {

std::vector<qlora::TokenId> concatenated_ids(const std::vector<PackedSequence>& sequences) {
  std::vector<qlora::TokenId> ids;
  for (const PackedSequence& sequence : sequences) ids.insert(ids.end(), sequence.input_ids.begin(), sequence.input_ids.end());
  return ids;
}

XtunerPackOptions stream_options(const Json& fixture, const Json& pack_case) {
  XtunerPackOptions options;
  options.max_length = fixture.at("max_length").get<std::size_t>();
  options.map_batch_size = pack_case.at("map_batch_size").get<std::size_t>();
  options.map_num_proc = pack_case.at("map_num_proc").get<std::size_t>();
  options.shuffle_before_pack = false;  // XTuner's seedless shuffle cannot be reproduced: the fixture gives the order
  return options;
}

}  // namespace

TEST_CASE("XtunerPacker reproduces XTuner's Packer on the spec's toy vectors, call by call") {
  const Json fixture = qlora::test::packing_fixture("xtuner_packer_toy.json");
  for (const Json& toy : fixture.at("cases")) {
    const std::string name = toy.at("name").get<std::string>();
    INFO("case " << name);
    XtunerPacker packer(toy.at("max_length").get<std::size_t>());
    for (const Json& call : toy.at("calls")) {
      const std::vector<PackedSequence> chunks = packer.pack_batch(qlora::test::batch_from(call.at("batch")));
      REQUIRE(chunks.size() == call.at("chunks").size());
      for (std::size_t k = 0; k < chunks.size(); ++k) qlora::test::require_same_chunk(chunks[k], call.at("chunks")[k]);

      // XTuner's residual after the call is what a flush would emit now: the
      // waiting tokens, their labels and the boundaries it carries over.
      const Json& residual = call.at("residual");
      CHECK(packer.pending_tokens() == residual.at("input_ids").size());
      XtunerPacker flushed = packer;
      const std::vector<PackedSequence> tail = flushed.finish(PackTail::flush);
      REQUIRE(tail.size() == (residual.at("input_ids").empty() ? 0u : 1u));
      if (!tail.empty()) qlora::test::require_same_chunk(tail.front(), residual);
      XtunerPacker dropped = packer;
      CHECK(dropped.finish(PackTail::drop).empty());
      CHECK(dropped.dropped_tokens() == residual.at("input_ids").size());
      CHECK(dropped.pending_tokens() == 0);
    }
  }
}

TEST_CASE("xtuner_pack reproduces datasets.map(Packer) on a realistic stream, tails dropped as XTuner drops them") {
  const Json fixture = qlora::test::packing_fixture("xtuner_packer_stream.json");
  const std::vector<EncodedSample> samples = qlora::test::samples_from(fixture.at("samples"));
  for (const Json& pack_case : fixture.at("cases")) {
    INFO("case " << pack_case.at("name").get<std::string>());
    const XtunerPackResult packed = qlora::xtuner_pack(samples, stream_options(fixture, pack_case));
    const Json& chunks = pack_case.at("chunks");
    REQUIRE(packed.sequences.size() == chunks.size());
    for (std::size_t k = 0; k < chunks.size(); ++k) {
      INFO("chunk " << k);
      qlora::test::require_same_chunk(packed.sequences[k], chunks[k]);
    }
    CHECK(packed.input_tokens == fixture.at("total_tokens").get<std::size_t>());
    CHECK(packed.dropped_tokens == pack_case.at("dropped_tokens").get<std::size_t>());
  }
}

TEST_CASE("PackTail::flush keeps every token XTuner drops, as one short row per worker tail") {
  const Json fixture = qlora::test::packing_fixture("xtuner_packer_stream.json");
  const std::vector<EncodedSample> samples = qlora::test::samples_from(fixture.at("samples"));
  std::vector<qlora::TokenId> stream;
  for (const EncodedSample& sample : samples) stream.insert(stream.end(), sample.input_ids.begin(), sample.input_ids.end());
  for (const Json& pack_case : fixture.at("cases")) {
    INFO("case " << pack_case.at("name").get<std::string>());
    XtunerPackOptions options = stream_options(fixture, pack_case);
    options.tail = PackTail::flush;
    const XtunerPackResult flushed = qlora::xtuner_pack(samples, options);
    CHECK(flushed.dropped_tokens == 0);
    // Nothing lost or reordered: workers take contiguous shards in order, so
    // the rows laid end to end are the input stream.
    CHECK(concatenated_ids(flushed.sequences) == stream);

    // The rows are XTuner's chunks with the dropped tails slotted in after them.
    const Json& chunks = pack_case.at("chunks");
    std::size_t matched = 0, tail_tokens = 0;
    for (const PackedSequence& row : flushed.sequences) {
      if (matched < chunks.size() && row.input_ids == qlora::test::ints(chunks[matched].at("input_ids"))) {
        ++matched;
      } else {
        CHECK(row.size() < options.max_length);
        tail_tokens += row.size();
      }
    }
    CHECK(matched == chunks.size());
    CHECK(tail_tokens == pack_case.at("dropped_tokens").get<std::size_t>());
  }
}

TEST_CASE("finish ends a batch left open before handling the tail") {
  const Json fixture = qlora::test::packing_fixture("xtuner_packer_toy.json");
  const Json& two_calls = fixture.at("cases")[0];  // spec_two_calls: C = 8, batches 3,5,6,2,4 then 7,1
  REQUIRE(two_calls.at("name") == "spec_two_calls");
  XtunerPacker packer(8);
  for (const EncodedSample& sample : qlora::test::batch_from(two_calls.at("calls")[0].at("batch"))) packer.add(sample);
  const std::vector<PackedSequence> rows = packer.finish(PackTail::drop);
  const Json& chunks = two_calls.at("calls")[0].at("chunks");
  REQUIRE(rows.size() == chunks.size());
  for (std::size_t k = 0; k < rows.size(); ++k) qlora::test::require_same_chunk(rows[k], chunks[k]);
  CHECK(packer.dropped_tokens() == two_calls.at("calls")[0].at("residual").at("input_ids").size());
}

TEST_CASE("the shuffle before packing is a pure function of the seed") {
  const Json fixture = qlora::test::packing_fixture("xtuner_packer_stream.json");
  const std::vector<EncodedSample> samples = qlora::test::samples_from(fixture.at("samples"));
  XtunerPackOptions options;
  options.max_length = 64;
  options.map_num_proc = 1;
  options.tail = PackTail::flush;
  options.shuffle_seed = 7;
  const XtunerPackResult first = qlora::xtuner_pack(samples, options);
  const XtunerPackResult again = qlora::xtuner_pack(samples, options);
  CHECK(concatenated_ids(first.sequences) == concatenated_ids(again.sequences));
  options.shuffle_seed = 8;
  const XtunerPackResult other_seed = qlora::xtuner_pack(samples, options);
  CHECK(concatenated_ids(first.sequences) != concatenated_ids(other_seed.sequences));
  CHECK(concatenated_ids(first.sequences).size() == fixture.at("total_tokens").get<std::size_t>());
}

TEST_CASE("the Packer's input errors name the sample") {
  EncodedSample good{{5, 6}, {-100, 6}, 3};
  EncodedSample empty{{}, {}, 7};
  EncodedSample short_labels{{5, 6, 7}, {5}, 9};
  const std::vector<EncodedSample> with_empty{good, empty};
  const std::vector<EncodedSample> with_short{good, good, short_labels};
  require_error([&] { (void)qlora::xtuner_pack(with_empty, XtunerPackOptions{}); }, "EmptySample", "sample 1 (line 7)");
  require_error([&] { (void)qlora::xtuner_pack(with_short, XtunerPackOptions{}); }, "LabelsLengthMismatch",
                "sample 2 (line 9)", "1 labels for 3 input_ids");
  require_error([] { XtunerPacker packer(0); }, "InvalidMaxLength", "max_length 0");
  XtunerPackOptions no_batches;
  no_batches.map_batch_size = 0;
  require_error([&] { (void)qlora::xtuner_pack(with_short, no_batches); }, "InvalidPackOptions", "map_batch_size 0");
  CHECK(qlora::xtuner_pack({}, XtunerPackOptions{}).sequences.empty());
}
