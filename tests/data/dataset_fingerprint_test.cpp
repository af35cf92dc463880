// DatasetFingerprint: FNV-1a 64 as published (the test vectors of the FNV
// reference page, isthe.com/chongo/tech/comp/fnv), and an encoding in which
// every change that matters to a resume changes the fingerprint.
#include <qlora/data/dataset_fingerprint.hpp>

#include <string>
#include <vector>

#include <catch2/catch.hpp>

using qlora::DatasetFingerprint;
using qlora::EncodedSample;
using qlora::PackedSequence;

TEST_CASE("raw bytes hash to the published FNV-1a 64 values") {
  CHECK(DatasetFingerprint().value() == 0xcbf29ce484222325ull);
  CHECK(DatasetFingerprint().add_bytes("a").value() == 0xaf63dc4c8601ec8cull);
  CHECK(DatasetFingerprint().add_bytes("foobar").value() == 0x85944171f73967e8ull);
  CHECK(DatasetFingerprint().add_bytes("foo").add_bytes("bar").value() == 0x85944171f73967e8ull);
  CHECK(DatasetFingerprint().add_bytes("foobar").hex() == "fnv1a64:85944171f73967e8");
}

TEST_CASE("every difference a resume cares about changes the fingerprint") {
  const std::vector<EncodedSample> base{{{1, 2}, {-100, 2}, 1}, {{3}, {3}, 2}};
  const std::string reference = qlora::dataset_fingerprint(base);
  CHECK(qlora::dataset_fingerprint(base) == reference);

  std::vector<EncodedSample> moved_boundary{{{1}, {-100}, 1}, {{2, 3}, {2, 3}, 2}};
  CHECK(qlora::dataset_fingerprint(moved_boundary) != reference);
  std::vector<EncodedSample> other_label = base;
  other_label[0].labels[0] = 1;
  CHECK(qlora::dataset_fingerprint(other_label) != reference);
  std::vector<EncodedSample> swapped{base[1], base[0]};
  CHECK(qlora::dataset_fingerprint(swapped) != reference);
  std::vector<EncodedSample> other_line = base;  // where a sample came from is not its content
  other_line[1].line = 40;
  CHECK(qlora::dataset_fingerprint(other_line) == reference);

  CHECK(DatasetFingerprint().add("ab").add("c").hex() != DatasetFingerprint().add("a").add("bc").hex());

  PackedSequence one_segment, two_segments;
  const std::vector<qlora::TokenId> ids{1, 2, 3}, first{1}, rest{2, 3};
  one_segment.append_segment(ids, ids);
  two_segments.append_segment(first, first);
  two_segments.append_segment(rest, rest);
  const std::vector<PackedSequence> a{one_segment}, b{two_segments};
  CHECK(qlora::dataset_fingerprint(a) != qlora::dataset_fingerprint(b));
}
