// SampleEncoder against XTuner 0.2.0's encode_fn (after openai_map_fn +
// template_map_fn, or pretrain_map_fn) and its "no label >= 0" filter, and
// against the Phi-2 tutorial's tokenize, all run with the toy tokenizer
// (tests/reference/chat_templates.py; its C++ twin is data/toy_tokenizer.hpp):
// ids and labels equal, for every fixture case and every max_length the script
// tried (no cut, the last token cut, halfway, just before the first learned
// token, three tokens into the first answer), and the same samples dropped.
// Then the truncation policies, the statistics (RoleOrder::xtuner's dropped
// and joined messages counted by hand), the special-token checks and the
// errors, thrown with the line or handed to a handler.
#include <qlora/data/sample_encoder.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <qlora/data/phi2_chatml.hpp>
#include <qlora/data/pretrain.hpp>
#include <qlora/data/turn_template.hpp>

#include "data/chat_template_fixture.hpp"
#include "data/test_support.hpp"
#include "data/toy_tokenizer.hpp"

using qlora::ChatML;
using qlora::Conversation;
using qlora::EncodedSample;
using qlora::EncodeOptions;
using qlora::EncodeStats;
using qlora::ignore_index;
using qlora::InternLM2Chat;
using qlora::Message;
using qlora::Phi2ChatML;
using qlora::Pretrain;
using qlora::Role;
using qlora::RoleOrder;
using qlora::SampleEncoder;
using qlora::TokenId;
using qlora::Truncation;
using qlora::TurnTemplate;
using qlora::test::chat_template_fixture;
using qlora::test::fixture_conversation;
using qlora::test::require_error;
using qlora::test::ToyTokenizer;
using Ids = std::vector<TokenId>;

namespace {

const std::vector<std::string> chatml_tokens{"<|im_start|>", "<|im_end|>"};

Conversation chat(std::uint64_t line, std::initializer_list<std::pair<Role, const char*>> messages) {
  Conversation out;
  out.line = line;
  for (const auto& [role, content] : messages) out.messages.push_back(Message{role, content, true});
  return out;
}

std::uint64_t supervised_count(const Ids& labels, std::size_t from = 0) {
  return static_cast<std::uint64_t>(std::count_if(labels.begin() + static_cast<std::ptrdiff_t>(from), labels.end(),
                                                  [](TokenId label) { return label != ignore_index; }));
}

/// The toy tokenizer, failing on text that holds "boom": a stand-in for a
/// tokenizer error (the real ones throw for input they cannot encode).
class FailingTokenizer : public ToyTokenizer {
 public:
  using ToyTokenizer::ToyTokenizer;
  void encode_into(std::string_view text, Ids& out) const {
    qlora::check(text.find("boom") == std::string_view::npos, "TokenizerFailure", "cannot encode {:?}", text);
    ToyTokenizer::encode_into(text, out);
  }
};

}  // namespace

TEST_CASE("ids and labels are XTuner's encode_fn and the tutorial's tokenize, truncation and filter included") {
  const ToyTokenizer tokenizer = qlora::test::fixture_tokenizer();
  std::size_t checked = 0;
  for (const auto& test_case : chat_template_fixture()["cases"]) {
    const Conversation conversation = fixture_conversation(test_case["conversation"].get<std::string>());
    // The encoding with no cut, for the expected truncation counts.
    const auto& encodings = test_case["encodings"];
    const auto full_labels = encodings[0]["labels"].get<Ids>();
    REQUIRE(encodings[0]["max_length"] == 4096);
    for (const auto& encoding : encodings) {
      const auto max_length = encoding["max_length"].get<std::size_t>();
      INFO(qlora::test::case_name(test_case) << ", max_length " << max_length);
      qlora::test::with_case_template(test_case, [&](const auto& chat_template) {
        SampleEncoder encoder(tokenizer, chat_template, EncodeOptions{.max_length = max_length});
        const std::optional<EncodedSample> sample = encoder.encode(conversation);
        const bool kept = encoding["kept"].get<bool>();
        REQUIRE(sample.has_value() == kept);
        if (kept) {
          CHECK(sample->input_ids == encoding["input_ids"].get<Ids>());
          CHECK(sample->labels == encoding["labels"].get<Ids>());
        }
        const EncodeStats& stats = encoder.stats();
        const bool cut = full_labels.size() > max_length;
        CHECK(stats.samples_seen == 1);
        CHECK(stats.samples_kept == (kept ? 1u : 0u));
        CHECK(stats.dropped_no_supervised_tokens == (kept ? 0u : 1u));
        CHECK(stats.truncated_samples == (cut ? 1u : 0u));
        CHECK(stats.truncated_tokens == (cut ? full_labels.size() - max_length : 0u));
        CHECK(stats.truncated_supervised_tokens == (cut ? supervised_count(full_labels, max_length) : 0u));
        CHECK(stats.kept_tokens == (kept ? std::min(full_labels.size(), max_length) : 0u));
        CHECK(stats.dropped_too_long == 0);
        CHECK(stats.rejected_samples == 0);
      });
      ++checked;
    }
  }
  CHECK(checked > 200);
}

TEST_CASE("one encoder and one output sample serve many conversations") {
  // Buffers are reused: a long conversation then a short one must leave no trace.
  const ToyTokenizer tokenizer = qlora::test::fixture_tokenizer();
  SampleEncoder encoder(tokenizer, InternLM2Chat(), EncodeOptions{.max_length = 4096});
  EncodedSample sample;
  EncodeStats expected;
  for (const char* name : {"canonical", "special_in_content", "no_loss", "empty_system"}) {
    const auto& cases = chat_template_fixture()["cases"];
    const auto found = std::find_if(cases.begin(), cases.end(), [&](const auto& c) {
      return c["template"] == "internlm2_chat" && c["conversation"] == name;
    });
    REQUIRE(found != cases.end());
    const auto& full = (*found)["encodings"][0];
    INFO(name);
    const bool kept = encoder.encode_into(fixture_conversation(name), sample);
    REQUIRE(kept == full["kept"].get<bool>());
    ++expected.samples_seen;
    if (kept) {
      CHECK(sample.input_ids == full["input_ids"].get<Ids>());
      CHECK(sample.labels == full["labels"].get<Ids>());
      ++expected.samples_kept;
      expected.kept_tokens += sample.input_ids.size();
      expected.kept_supervised_tokens += supervised_count(sample.labels);
    } else {
      ++expected.dropped_no_supervised_tokens;
    }
  }
  CHECK(encoder.stats() == expected);
}

TEST_CASE("Truncation::drop and Truncation::error refuse what truncate_right cuts") {
  const ToyTokenizer tokenizer(chatml_tokens);
  // 5 user bytes, 2 answer bytes: with ChatML's strings (21 ids), 28 tokens.
  const Conversation c = chat(42, {{Role::user, "Hello"}, {Role::assistant, "Hi"}});
  const std::size_t length = SampleEncoder(tokenizer, ChatML()).encode(c)->input_ids.size();
  REQUIRE(length == 28);

  SampleEncoder fits(tokenizer, ChatML(), EncodeOptions{.max_length = length, .truncation = Truncation::error});
  CHECK(fits.encode(c).has_value());

  SampleEncoder drop(tokenizer, ChatML(), EncodeOptions{.max_length = length - 1, .truncation = Truncation::drop});
  CHECK_FALSE(drop.encode(c).has_value());
  CHECK(drop.stats().dropped_too_long == 1);
  CHECK(drop.stats().truncated_samples == 0);
  CHECK(drop.stats().samples_kept == 0);

  SampleEncoder refuse(tokenizer, ChatML(), EncodeOptions{.max_length = length - 1, .truncation = Truncation::error});
  require_error([&] { refuse.encode(c); }, "SampleTooLong",
                fmt::format("line 42: {} tokens, more than max_length {}", length, length - 1));
}

TEST_CASE("EncodeStats add up and read as one line") {
  EncodeStats a{.samples_seen = 11,
                .samples_kept = 7,
                .kept_tokens = 700,
                .kept_supervised_tokens = 300,
                .truncated_samples = 2,
                .truncated_tokens = 50,
                .truncated_supervised_tokens = 40,
                .dropped_too_long = 1,
                .dropped_no_supervised_tokens = 2,
                .rejected_samples = 1,
                .dropped_messages = 3,
                .joined_messages = 4};
  EncodeStats b = a;
  b += a;
  CHECK(b.samples_seen == 22);
  CHECK(b.dropped_no_supervised_tokens == 4);
  CHECK(b.truncated_supervised_tokens == 80);
  CHECK(b.rejected_samples == 2);
  CHECK(b.dropped_messages == 6);
  CHECK(b.joined_messages == 8);
  CHECK(a.summary() ==
        "kept 7 of 11 samples (700 tokens, 300 supervised); truncated 2 (cut 50 tokens, 40 supervised); "
        "dropped 1 too long, 2 with no supervised token, 1 rejected by an error; role order dropped 3 messages, "
        "joined 4");
}

TEST_CASE("the messages RoleOrder::xtuner drops and joins are counted, kept sample or not") {
  const ToyTokenizer tokenizer = qlora::test::fixture_tokenizer();
  SampleEncoder encoder(tokenizer, InternLM2Chat(RoleOrder::xtuner));
  // "lenient": the leading answer and the trailing question dropped, "b" and "c" joined to "a ".
  CHECK(encoder.encode(fixture_conversation("lenient")).has_value());
  CHECK(encoder.stats().dropped_messages == 2);
  CHECK(encoder.stats().joined_messages == 2);
  // "lenient_unanswered" keeps no turn: both its messages dropped, and then the sample.
  CHECK_FALSE(encoder.encode(fixture_conversation("lenient_unanswered")).has_value());
  CHECK(encoder.stats().dropped_messages == 4);
  CHECK(encoder.stats().joined_messages == 2);
  CHECK(encoder.stats().dropped_no_supervised_tokens == 1);
  // A well-formed conversation loses nothing.
  CHECK(encoder.encode(fixture_conversation("canonical")).has_value());
  CHECK(encoder.stats().dropped_messages == 4);
  CHECK(encoder.stats().summary().ends_with("role order dropped 4 messages, joined 2"));
}

TEST_CASE("the template's special tokens must be split out by the tokenizer") {
  // No added tokens: <|im_start|> is not in the vocabulary.
  const ToyTokenizer bare;
  require_error([&] { SampleEncoder(bare, InternLM2Chat()); }, "UnknownSpecialToken",
                "\"<|im_start|>\" is not in the tokenizer's vocabulary");
  require_error([&] { SampleEncoder(bare, Phi2ChatML{}); }, "UnknownSpecialToken", "\"<|im_start|>\"");
  // "<s>" is in the vocabulary (id 1) but, not being an added token, is spelled
  // out byte by byte: a template relying on it would silently get 3 ids.
  const TurnTemplate relies_on_bos_text({.instruction = "<s>{input}", .special_tokens = {"<s>"}});
  require_error([&] { SampleEncoder(bare, relies_on_bos_text); }, "UnknownSpecialToken",
                "\"<s>\" (id 1) is not split out of text", "as 3 ids [70, 125, 72]");
  CHECK_NOTHROW(SampleEncoder(bare, Pretrain{}));
}

TEST_CASE("BOS and EOS must exist where the template uses them") {
  qlora::SpecialTokenIds only_eos;
  only_eos.eos = ToyTokenizer::eos_id;
  const ToyTokenizer no_bos(chatml_tokens, only_eos);
  require_error([&] { SampleEncoder(no_bos, InternLM2Chat()); }, "UnknownSpecialToken", "no BOS token");
  CHECK_NOTHROW(SampleEncoder(no_bos, ChatML()));  // no BOS, and <|im_end|> is the EOS
  CHECK_NOTHROW(SampleEncoder(no_bos, Pretrain{.bos = false, .append_eos = true}));

  qlora::SpecialTokenIds only_bos;
  only_bos.bos = ToyTokenizer::bos_id;
  const ToyTokenizer no_eos(chatml_tokens, only_bos);
  require_error([&] { SampleEncoder(no_eos, Pretrain{.append_eos = true}); }, "UnknownSpecialToken", "no EOS token");
  require_error([&] { SampleEncoder(no_eos, TurnTemplate({.instruction = "{input}"})); }, "UnknownSpecialToken",
                "no EOS token");
  CHECK_NOTHROW(SampleEncoder(no_eos, InternLM2Chat()));
}

TEST_CASE("errors while encoding name the conversation's line") {
  const ToyTokenizer tokenizer(chatml_tokens);
  SampleEncoder encoder(tokenizer, InternLM2Chat());
  require_error(
      [&] {
        encoder.encode(chat(12, {{Role::user, "a"}, {Role::user, "b"}}));
      },
      "WrongRoleOrder", "line 12: messages[1] is 'user' after messages[0] 'user'");
  require_error([&] { encoder.encode(chat(13, {})); }, "EmptyConversation", "line 13: ");
  // Not from a file (line 0): no line to name.
  const qlora::Error error = qlora::test::thrown_by([&] { encoder.encode(chat(0, {{Role::user, "a"}})); });
  CHECK(error.message().starts_with("messages[0]"));
  CHECK(encoder.stats().samples_seen == 3);
  CHECK(encoder.stats().samples_kept == 0);
  CHECK(encoder.stats().rejected_samples == 3);
}

TEST_CASE("with an error handler, errors are handed over unlocated and the sample is rejected") {
  const FailingTokenizer tokenizer(chatml_tokens);
  SampleEncoder encoder(tokenizer, ChatML(), EncodeOptions{.max_length = 40, .truncation = Truncation::error});
  std::vector<std::string> errors;
  const auto collect = [&](const qlora::Error& error) {
    errors.push_back(fmt::format("{}: {}", error.code(), error.message()));
  };
  EncodedSample sample;
  CHECK_FALSE(encoder.encode_into(chat(3, {{Role::user, "Q"}}), sample, collect));
  CHECK_FALSE(encoder.encode_into(chat(4, {{Role::user, "boom"}, {Role::assistant, "A"}}), sample, collect));
  // 42 tokens: ChatML's strings are 21 (each added token one id, each other byte one), then 20 + 1 bytes.
  CHECK_FALSE(encoder.encode_into(chat(5, {{Role::user, std::string(20, 'q').c_str()}, {Role::assistant, "A"}}),
                                  sample, collect));
  CHECK(encoder.encode_into(chat(6, {{Role::user, "Q"}, {Role::assistant, "A"}}), sample, collect));
  CHECK(errors == std::vector<std::string>{
                      "WrongRoleOrder: messages[0] is 'user' and ends the conversation; expected an 'assistant' "
                      "answer last (RoleOrder::xtuner drops messages after the last answer)",
                      "TokenizerFailure: cannot encode \"<|im_start|>user\\nboom<|im_end|>\\n<|im_start|>assistant\\n\"",
                      "SampleTooLong: 42 tokens, more than max_length 40"});
  CHECK(sample.line == 6);
  CHECK(encoder.stats().samples_seen == 4);
  CHECK(encoder.stats().rejected_samples == 3);
  CHECK(encoder.stats().samples_kept == 1);
}

TEST_CASE("a tokenizer's error names the conversation's line too") {
  const FailingTokenizer tokenizer(chatml_tokens);
  SampleEncoder encoder(tokenizer, ChatML());
  require_error([&] { encoder.encode(chat(5, {{Role::user, "boom"}, {Role::assistant, "A"}})); }, "TokenizerFailure",
                "line 5: cannot encode");
  CHECK(encoder.encode(chat(6, {{Role::user, "Q"}, {Role::assistant, "A"}})).has_value());
}

TEST_CASE("max_length must be at least 1") {
  const ToyTokenizer tokenizer;
  require_error([&] { SampleEncoder(tokenizer, Pretrain{}, EncodeOptions{.max_length = 0}); }, "InvalidArgument",
                "max_length");
}

TEST_CASE("the encoder's types are deduced from a tokenizer, const or not") {
  ToyTokenizer tokenizer;  // not const: Tok must still be deduced as ToyTokenizer, not a reference
  SampleEncoder encoder(tokenizer, Pretrain{});
  STATIC_REQUIRE(std::is_same_v<decltype(encoder), SampleEncoder<ToyTokenizer, Pretrain>>);
  const Conversation document{{Message{Role::text, "ab", true}}, 0};
  CHECK(encoder.encode(document)->input_ids == Ids{ToyTokenizer::bos_id, 10 + 'a', 10 + 'b'});
}

TEST_CASE("encode_prompt opens the assistant turn exactly as training renders it", "[sample_encoder][prompt]") {
  // The expected strings are XTuner 0.2.0's PROMPT_TEMPLATE (xtuner/utils/templates.py:
  // internlm2_chat / qwen_chat SYSTEM + INSTRUCTION, the prompt `xtuner chat` builds) and
  // the Phi-2 tutorial's ChatML message template; the toy tokenizer is byte-level, so
  // decoding the ids gives back exactly the rendered text.
  const ToyTokenizer tokenizer(chatml_tokens);
  Conversation conversation;
  conversation.messages = {{Role::system, "Be brief.", false}, {Role::user, "Who are you?", false}};
  const auto prompt_text = [&](auto chat_template) {
    SampleEncoder encoder(tokenizer, chat_template);
    return tokenizer.decode(encoder.encode_prompt(conversation), false);
  };
  CHECK(prompt_text(InternLM2Chat{}) ==
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n");
  CHECK(prompt_text(ChatML{}) ==
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n");
  conversation.messages.erase(conversation.messages.begin());  // the tutorial's template has no system turn
  CHECK(prompt_text(Phi2ChatML{}) == "<|im_start|>user\nWho are you?<|im_end|><|im_start|>assistant\n");
  // A multi-turn history keeps the earlier answer.
  conversation.messages.push_back({Role::assistant, "Kestrel.", true});
  conversation.messages.push_back({Role::user, "Again?", false});
  CHECK(prompt_text(Phi2ChatML{}) == "<|im_start|>user\nWho are you?<|im_end|><|im_start|>assistant\nKestrel.<|im_end|>"
                                     "<|im_start|>user\nAgain?<|im_end|><|im_start|>assistant\n");
}
