// BatchStream end to end, JSONL file to batches, against two real pipelines
// (tests/reference/data_pipeline.py):
//   - the Phi-2 tutorial's: transformers' tokenizer on the Phi-2-like stand-in
//     with the tutorial's additions, its tokenize (truncation included) and its
//     collate, batches of 3: ids, labels and attention masks must be equal;
//   - XTuner's: openai_map_fn, internlm2_chat, encode_fn with the InternLM2-like
//     SentencePiece stand-in, then Packer with varlen: rows, labels,
//     position_ids, cumulative_len and the dropped tail must be equal.
// Both are exact: every step is deterministic integer work.
// Also: the padded path over packed rows, bad records located, and a stream
// that ends empty.
#include <qlora/data/batch_stream.hpp>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <qlora/data/byte_level_bpe.hpp>
#include <qlora/data/phi2_chatml.hpp>
#include <qlora/data/sentencepiece_tokenizer.hpp>
#include <qlora/data/turn_template.hpp>

#include "data/test_support.hpp"
#include "io/test_support.hpp"

using qlora::Batch;
using qlora::BatchStream;
using qlora::BatchStreamOptions;
using qlora::test::data_fixture;
using qlora::test::Json;
using qlora::test::load_json;
using Ids = std::vector<qlora::TokenId>;

namespace {

qlora::ByteLevelBpeTokenizer tutorial_tokenizer() {
  auto tokenizer = qlora::ByteLevelBpeTokenizer::from_pretrained(data_fixture("bpe/phi2_like"));
  const std::string added[] = {"<|im_start|>", "<PAD>"};
  tokenizer.add_tokens(added, qlora::AddedTokenKind::normal);
  tokenizer.set_special_token(qlora::SpecialRole::pad, "<PAD>");
  const std::string eos[] = {"<|im_end|>"};
  tokenizer.add_tokens(eos, qlora::AddedTokenKind::special);
  tokenizer.set_special_token(qlora::SpecialRole::eos, "<|im_end|>");
  return tokenizer;
}

/// Row `r` of a [batch, length] array as a vector.
template <class T>
std::vector<T> row(const Batch& batch, const std::vector<T>& values, std::size_t r) {
  const auto span = batch.row(values, r);
  return {span.begin(), span.end()};
}

}  // namespace

TEST_CASE("the Phi-2 tutorial's tokenize + collate, batch for batch", "[batch_stream]") {
  const Json expected = load_json(data_fixture("pipeline/riddles_batches.json"));
  const auto tokenizer = tutorial_tokenizer();
  REQUIRE(tokenizer.special_ids().pad == expected["pad_id"].get<int>());
  REQUIRE(tokenizer.special_ids().eos == expected["eos_id"].get<int>());

  BatchStreamOptions options;
  options.format = qlora::DatasetFormat::alternating;
  options.encode.max_length = expected["max_length"].get<std::size_t>();
  options.packing = qlora::Packing::none;
  options.collation = qlora::Collation::padded;
  options.rows_per_batch = expected["batch_size"].get<std::size_t>();
  BatchStream stream(data_fixture("pipeline/riddles.jsonl"), tokenizer, qlora::Phi2ChatML{}, options);

  std::size_t count = 0;
  for (const Json& want : expected["batches"]) {
    INFO("batch " << count);
    const std::optional<Batch> batch = stream.next();
    REQUIRE(batch.has_value());
    REQUIRE(batch->batch_size == want["input_ids"].size());
    for (std::size_t r = 0; r < batch->batch_size; ++r) {
      INFO("row " << r);
      CHECK(row(*batch, batch->input_ids, r) == want["input_ids"][r].get<Ids>());
      CHECK(row(*batch, batch->labels, r) == want["labels"][r].get<Ids>());
      CHECK(row(*batch, batch->attention_mask, r) == want["attention_mask"][r].get<std::vector<std::int32_t>>());
    }
    ++count;
  }
  CHECK_FALSE(stream.next().has_value());
  CHECK(stream.encode_stats().truncated_samples > 0);  // the fixture is built to truncate
}

TEST_CASE("XTuner's encode_fn + Packer (varlen), row for row", "[batch_stream]") {
  const Json expected = load_json(data_fixture("pipeline/xtuner_packed.json"));
  const auto tokenizer = qlora::SentencePieceTokenizer::from_pretrained(data_fixture("sentencepiece/internlm2_like"));

  BatchStreamOptions options;
  options.format = qlora::DatasetFormat::openai;
  options.encode.max_length = expected["max_length"].get<std::size_t>();
  options.packing = qlora::Packing::xtuner;
  options.collation = qlora::Collation::varlen;
  BatchStream stream(data_fixture("pipeline/conversations.jsonl"), tokenizer, qlora::InternLM2Chat{}, options);

  std::size_t count = 0;
  for (const Json& want : expected["rows"]) {
    INFO("row " << count);
    const std::optional<Batch> batch = stream.next();
    REQUIRE(batch.has_value());
    CHECK(batch->input_ids == want["input_ids"].get<Ids>());
    CHECK(batch->labels == want["labels"].get<Ids>());
    CHECK(batch->position_ids == want["position_ids"].get<std::vector<std::int32_t>>());
    CHECK(batch->cu_seqlens == want["cumulative_len"].get<std::vector<std::int32_t>>());
    ++count;
  }
  CHECK_FALSE(stream.next().has_value());
  CHECK(stream.dropped_tokens() == expected["dropped_tokens"].get<std::size_t>());
  CHECK(stream.encode_stats().samples_kept == expected["samples"].size());
  CHECK(stream.encode_stats().dropped_no_supervised_tokens == 1);  // the all-masked conversation
}

TEST_CASE("bin-packed rows keep every sample whole, in padded or varlen batches", "[batch_stream]") {
  const auto tokenizer = qlora::SentencePieceTokenizer::from_pretrained(data_fixture("sentencepiece/internlm2_like"));
  const Json expected = load_json(data_fixture("pipeline/xtuner_packed.json"));
  std::vector<Ids> samples;
  for (const Json& sample : expected["samples"]) samples.push_back(sample["input_ids"].get<Ids>());

  for (const auto collation : {qlora::Collation::varlen, qlora::Collation::padded}) {
    BatchStreamOptions options;
    options.format = qlora::DatasetFormat::openai;
    options.encode.max_length = 64;
    options.packing = qlora::Packing::bin;
    options.collation = collation;
    options.rows_per_batch = 2;
    BatchStream stream(data_fixture("pipeline/conversations.jsonl"), tokenizer, qlora::InternLM2Chat{}, options);
    std::vector<Ids> seen;
    while (const std::optional<Batch> batch = stream.next()) {
      if (collation == qlora::Collation::varlen) {
        for (std::size_t s = 1; s < batch->cu_seqlens.size(); ++s) {
          seen.emplace_back(batch->input_ids.begin() + batch->cu_seqlens[s - 1],
                            batch->input_ids.begin() + batch->cu_seqlens[s]);
        }
      } else {
        CHECK(batch->length <= 64);
        CHECK(batch->cu_seqlens.empty());
      }
    }
    if (collation == qlora::Collation::varlen) {
      // XTuner's samples, whole, each once (order is the packer's).
      std::sort(seen.begin(), seen.end());
      std::sort(samples.begin(), samples.end());
      CHECK(seen == samples);
    }
  }
}

TEST_CASE("bad records are located; a padded stream needs a pad id", "[batch_stream]") {
  qlora::test::TempDir dir;
  const auto path = dir.path() / "bad.jsonl";
  qlora::test::write_bytes(path, "{\"messages\": [\"q\", \"a\"]}\n{\"messages\": [\"q\", 7]}\n");
  const auto tokenizer = tutorial_tokenizer();
  BatchStreamOptions options;
  options.packing = qlora::Packing::none;
  options.collation = qlora::Collation::varlen;
  options.rows_per_batch = 2;
  BatchStream stream(path, tokenizer, qlora::Phi2ChatML{}, options);
  qlora::test::require_error([&] { (void)stream.next(); }, "WrongType", "bad.jsonl:2", "messages[1]");

  auto no_pad = qlora::SentencePieceTokenizer::from_file(data_fixture("sentencepiece/internlm2_like/tokenizer.model"));
  REQUIRE_FALSE(no_pad.special_ids().pad.has_value());
  options.collation = qlora::Collation::padded;
  qlora::test::require_error([&] { BatchStream s(path, no_pad, qlora::InternLM2Chat{}, options); },
                             "MissingPadToken", "padding token");
}
