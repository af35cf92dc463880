// Helpers shared by the packing and collation tests: the fixtures written by
// tests/reference/xtuner_packing.py (tests/data/data/packing/) and comparing
// what qlora built with what XTuner, torch or transformers built.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include <qlora/data/encoded_sample.hpp>
#include <qlora/data/packed_sequence.hpp>

#include "data/test_support.hpp"
#include "io/test_support.hpp"

namespace qlora::test {

/// tests/data/data/packing/<name>, parsed.
inline Json packing_fixture(const std::string& name) { return load_json(data_fixture("packing/" + name)); }

inline std::vector<std::int32_t> ints(const Json& values) { return values.get<std::vector<std::int32_t>>(); }

/// A fixture sample {"input_ids": [...], "labels": [...]}.
inline EncodedSample sample_from(const Json& sample) {
  EncodedSample result;
  result.input_ids = ints(sample.at("input_ids"));
  result.labels = ints(sample.at("labels"));
  return result;
}

inline std::vector<EncodedSample> samples_from(const Json& samples) {
  std::vector<EncodedSample> result;
  for (const Json& sample : samples) result.push_back(sample_from(sample));
  return result;
}

/// The sample list of one Packer call's batch ({"input_ids": [[...]...], "labels": [[...]...]}).
inline std::vector<EncodedSample> batch_from(const Json& batch) {
  std::vector<EncodedSample> result;
  for (std::size_t i = 0; i < batch.at("input_ids").size(); ++i) {
    EncodedSample sample;
    sample.input_ids = ints(batch.at("input_ids")[i]);
    sample.labels = ints(batch.at("labels")[i]);
    result.push_back(std::move(sample));
  }
  return result;
}

/// A chunk XTuner built with use_varlen_attn, as it is: its ids, labels,
/// position_ids and cumulative_len (unchecked, so that tests can break it).
inline PackedSequence packed_from_chunk(const Json& chunk) {
  PackedSequence packed;
  packed.input_ids = ints(chunk.at("input_ids"));
  packed.labels = ints(chunk.at("labels"));
  packed.position_ids = ints(chunk.at("position_ids"));
  packed.cu_seqlens = ints(chunk.at("cumulative_len"));
  return packed;
}

/// The case named `name` of collate.json.
inline const Json& collate_case(const Json& fixture, const std::string& name) {
  for (const Json& entry : fixture.at("cases")) {
    if (entry.at("name") == name) return entry;
  }
  FAIL("no collate case " << name);
  throw std::logic_error("unreachable");
}

/// A [batch, length] fixture array, flattened row-major as Batch holds it.
inline std::vector<std::int32_t> flat(const Json& rows) {
  std::vector<std::int32_t> values;
  for (const Json& row : rows) {
    const std::vector<std::int32_t> cells = ints(row);
    values.insert(values.end(), cells.begin(), cells.end());
  }
  return values;
}

/// `packed` is XTuner's chunk: same ids and labels, and when the chunk records
/// them (use_varlen_attn) the same cumulative_len and position_ids.
inline void require_same_chunk(const PackedSequence& packed, const Json& chunk) {
  CHECK(packed.input_ids == ints(chunk.at("input_ids")));
  CHECK(packed.labels == ints(chunk.at("labels")));
  if (chunk.contains("cumulative_len")) {
    CHECK(packed.cu_seqlens == ints(chunk.at("cumulative_len")));
    CHECK(packed.position_ids == ints(chunk.at("position_ids")));
  }
  packed.validate();
}

}  // namespace qlora::test
