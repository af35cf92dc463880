// BatchStream end to end, JSONL file to batches, against two real pipelines
// (tests/reference/data_pipeline.py):
//   - the Phi-2 tutorial's: transformers' tokenizer on the Phi-2-like stand-in
//     with the tutorial's additions, its tokenize (truncation included) and its
//     collate, batches of 3: ids, labels and attention masks must be equal;
//   - XTuner's: openai_map_fn, internlm2_chat, encode_fn with the InternLM2-like
//     SentencePiece stand-in, then Packer with varlen: rows, labels,
//     position_ids, cumulative_len and the dropped tail must be equal.
// Both are exact: every step is deterministic integer work. The tutorial's
// pipeline also runs on riddles ending with unanswered questions, which it keeps
// masked (Phi2ChatML::keep_trailing_question).
// Also: the padded path over packed rows, bad records located (those that do
// not encode too, skipped and counted under BadLinePolicy::skip), the tutorial's
// trailing questions, and data-parallel ranks whose batches partition the
// single-rank stream.
#include <qlora/data/batch_stream.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <tuple>
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

/// Checks the batches of `stream` against those data_pipeline.py's tutorial
/// pipeline made of the same file (`expected`), and that there are no more.
template <class Stream>
void check_tutorial_batches(Stream& stream, const Json& expected) {
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
}

BatchStreamOptions tutorial_options(const Json& expected) {
  BatchStreamOptions options;
  options.format = qlora::DatasetFormat::alternating;
  options.encode.max_length = expected["max_length"].get<std::size_t>();
  options.packing = qlora::Packing::none;
  options.collation = qlora::Collation::padded;
  options.rows_per_batch = expected["batch_size"].get<std::size_t>();
  return options;
}

}  // namespace

TEST_CASE("the Phi-2 tutorial's tokenize + collate, batch for batch", "[batch_stream]") {
  const Json expected = load_json(data_fixture("pipeline/riddles_batches.json"));
  const auto tokenizer = tutorial_tokenizer();
  REQUIRE(tokenizer.special_ids().pad == expected["pad_id"].get<int>());
  REQUIRE(tokenizer.special_ids().eos == expected["eos_id"].get<int>());
  BatchStream stream(data_fixture("pipeline/riddles.jsonl"), tokenizer, qlora::Phi2ChatML{}, tutorial_options(expected));
  check_tutorial_batches(stream, expected);
  CHECK(stream.encode_stats().truncated_samples > 0);  // the fixture is built to truncate
}

TEST_CASE("the tutorial's trailing questions, kept and masked, batch for batch", "[batch_stream]") {
  const Json expected = load_json(data_fixture("pipeline/riddles_trailing_batches.json"));
  const auto tokenizer = tutorial_tokenizer();
  BatchStream stream(data_fixture("pipeline/riddles_trailing.jsonl"), tokenizer,
                     qlora::Phi2ChatML{.keep_trailing_question = true}, tutorial_options(expected));
  check_tutorial_batches(stream, expected);
  // The lone question: a sample in the tutorial, with nothing to learn; dropped here as by XTuner.
  CHECK(stream.encode_stats().dropped_no_supervised_tokens == expected["dropped_no_supervised"].get<std::uint64_t>());
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

TEST_CASE("an encoding error names file:line and honours BadLinePolicy::skip", "[batch_stream]") {
  // Line 2 ends with an unanswered question, which Phi2ChatML refuses by default.
  qlora::test::TempDir dir;
  const auto path = dir.path() / "trailing.jsonl";
  qlora::test::write_bytes(path,
                           "{\"messages\": [\"q1\", \"a1\"]}\n"
                           "{\"messages\": [\"q2\", \"a2\", \"q3\"]}\n"
                           "{\"messages\": [\"q4\", \"a4\"]}\n");
  const auto tokenizer = tutorial_tokenizer();
  BatchStreamOptions options;
  options.format = qlora::DatasetFormat::alternating;
  options.packing = qlora::Packing::none;

  BatchStream strict(path, tokenizer, qlora::Phi2ChatML{}, options);
  REQUIRE(strict.next().has_value());
  const qlora::Error error = qlora::test::thrown_by([&] { (void)strict.next(); });
  INFO(error.what());
  CHECK(error.code() == "WrongRoleOrder");
  CHECK(error.message().starts_with(path.string() + ":2: messages[2] is 'user' and ends the conversation"));
  // The hint names Phi2ChatML's own setting, not TurnTemplate's RoleOrder::xtuner.
  CHECK(error.message().find("RoleOrder::xtuner") == std::string::npos);
  CHECK(error.message().find("Phi2ChatML::keep_trailing_question") != std::string::npos);

  options.reader.bad_lines = qlora::BadLinePolicy::skip;
  BatchStream lenient(path, tokenizer, qlora::Phi2ChatML{}, options);
  std::vector<std::uint64_t> rows;
  while (const std::optional<Batch> batch = lenient.next()) rows.push_back(batch->batch_size);
  CHECK(rows == std::vector<std::uint64_t>{1, 1});
  const qlora::BadLineLog& log = lenient.reader().bad_lines();
  REQUIRE(log.count() == 1);
  CHECK(log.count("WrongRoleOrder") == 1);
  CHECK(log.first().at(0).line == 2);
  CHECK(log.first().at(0).message.starts_with(path.string() + ":2: messages[2] is 'user'"));
  CHECK(lenient.reader().records() == 2);
  CHECK(lenient.encode_stats().samples_seen == 3);
  CHECK(lenient.encode_stats().samples_kept == 2);
  CHECK(lenient.encode_stats().rejected_samples == 1);

  // The tutorial's tokenize keeps the trailing question, masked.
  options.reader.bad_lines = qlora::BadLinePolicy::error;
  BatchStream tutorial(path, tokenizer, qlora::Phi2ChatML{.keep_trailing_question = true}, options);
  std::size_t batches = 0;
  while (tutorial.next()) ++batches;
  CHECK(batches == 3);
  CHECK(tutorial.encode_stats().samples_kept == 3);
}

namespace {

/// Every batch of a stream, as (input_ids, labels, cu_seqlens) for comparison.
using BatchContents = std::tuple<Ids, Ids, std::vector<std::int32_t>>;

template <class Template>
std::vector<BatchContents> all_batches(const std::filesystem::path& path, const qlora::SentencePieceTokenizer& tokenizer,
                                       const Template& chat_template, const BatchStreamOptions& options,
                                       std::size_t* dropped_batches = nullptr) {
  BatchStream stream(path, tokenizer, chat_template, options);
  std::vector<BatchContents> out;
  while (const std::optional<Batch> batch = stream.next()) out.emplace_back(batch->input_ids, batch->labels, batch->cu_seqlens);
  if (dropped_batches != nullptr) *dropped_batches = stream.dropped_batches();
  return out;
}

}  // namespace

TEST_CASE("data-parallel ranks take every world_size-th batch of the one stream", "[batch_stream]") {
  const auto tokenizer = qlora::SentencePieceTokenizer::from_pretrained(data_fixture("sentencepiece/internlm2_like"));
  const auto path = data_fixture("pipeline/conversations.jsonl");
  for (const auto packing : {qlora::Packing::none, qlora::Packing::bin}) {
    BatchStreamOptions options;
    options.format = qlora::DatasetFormat::openai;
    options.encode.max_length = 64;
    options.packing = packing;
    options.collation = qlora::Collation::varlen;
    options.rows_per_batch = 2;
    const std::vector<BatchContents> single = all_batches(path, tokenizer, qlora::InternLM2Chat{}, options);
    REQUIRE(single.size() >= 2);
    for (const std::size_t world_size : {2, 3, 5}) {
      INFO("packing " << static_cast<int>(packing) << ", world_size " << world_size << ", " << single.size()
                      << " batches");
      std::vector<std::vector<BatchContents>> ranks;
      for (std::size_t rank = 0; rank < world_size; ++rank) {
        options.world_size = world_size;
        options.rank = rank;
        options.drop_incomplete_round = false;
        ranks.push_back(all_batches(path, tokenizer, qlora::InternLM2Chat{}, options));
        // drop_incomplete_round: whole rounds only, the same count on every rank.
        options.drop_incomplete_round = true;
        std::size_t dropped = 0;
        const std::vector<BatchContents> even = all_batches(path, tokenizer, qlora::InternLM2Chat{}, options, &dropped);
        CHECK(even.size() == single.size() / world_size);
        CHECK(std::equal(even.begin(), even.end(), ranks.back().begin()));
        CHECK(dropped == ranks.back().size() - even.size());
      }
      // Batch i of the single stream is batch i / world_size of rank i % world_size, and no rank has more.
      std::size_t taken = 0;
      for (std::size_t i = 0; i < single.size(); ++i) {
        const auto& rank = ranks[i % world_size];
        REQUIRE(i / world_size < rank.size());
        CHECK(rank[i / world_size] == single[i]);
        ++taken;
      }
      std::size_t total = 0;
      for (const auto& rank : ranks) total += rank.size();
      CHECK(total == taken);
    }
  }
  BatchStreamOptions bad;
  bad.world_size = 2;
  bad.rank = 2;
  qlora::test::require_error([&] { BatchStream s(path, tokenizer, qlora::InternLM2Chat{}, bad); }, "InvalidShard",
                             "rank 2 is out of range for world_size 2");
}
