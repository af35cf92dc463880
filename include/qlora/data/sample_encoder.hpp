// SampleEncoder: a conversation to a training sample (input_ids and labels),
// through a ChatTemplate and a Tokenizer, as XTuner's encode_fn and its
// filter in process() do:
//   - each segment the template renders is tokenized on its own (no BOS/EOS
//     added by the tokenizer); BOS/EOS markers become the tokenizer's ids;
//   - labels are the ids of supervised segments and ignore_index elsewhere;
//   - a sample longer than max_length is cut at the right (XTuner, the Phi-2
//     tutorial: possibly mid-answer, with no EOS after), dropped, or refused
//     with Error("SampleTooLong"), per EncodeOptions::truncation;
//   - a sample left with no supervised token (an answer truncated away, every
//     answer with loss = false, a conversation RoleOrder::xtuner empties) is
//     dropped: it would add nothing to the loss but a division by zero.
// Everything cut or dropped is counted in EncodeStats, so that a run can say
// what it lost instead of losing it silently: samples, tokens, and the
// messages RoleOrder::xtuner dropped or joined.
//
// The constructor checks the template against the tokenizer: each of the
// template's special tokens must exist and be split out of text as that one id
// (otherwise BPE would silently spell <|im_start|> as a dozen pieces), and BOS/EOS
// must be defined where the template uses them: Error("UnknownSpecialToken")
// naming the token. An error while encoding a conversation (the template's
// role-order errors, the tokenizer's, SampleTooLong) carries the conversation's
// source line; a caller that locates errors itself, and may skip them, passes
// an error handler instead (BatchStream gives them to its reader, which names
// file:line and applies BadLinePolicy).
//
// Not thread-safe: it reuses its buffers and counts. Use one encoder per thread
// and add the stats up.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>  // fmt::join

#include <qlora/core/error.hpp>
#include <qlora/data/chat_template.hpp>
#include <qlora/data/conversation.hpp>
#include <qlora/data/encoded_sample.hpp>
#include <qlora/data/template_segment.hpp>
#include <qlora/data/tokenizer.hpp>

namespace qlora {

/// What happens to a sample longer than max_length.
enum class Truncation : std::uint8_t {
  /// Keep the first max_length tokens (XTuner, the Phi-2 tutorial).
  truncate_right,
  /// Drop the sample (counted in EncodeStats::dropped_too_long).
  drop,
  /// Error("SampleTooLong") naming the line and the length.
  error,
};

struct EncodeOptions {
  /// The most tokens a sample keeps (XTuner's max_length; its configs use 2048).
  std::size_t max_length = 2048;
  Truncation truncation = Truncation::truncate_right;
};

/// What an encoder did with the conversations it saw. Every truncated sample
/// is counted in truncated_*, whether the filter then kept it or not.
struct EncodeStats {
  /// Conversations given to the encoder, those that threw included.
  std::uint64_t samples_seen = 0;
  std::uint64_t samples_kept = 0;
  /// Tokens (and supervised tokens) in the kept samples.
  std::uint64_t kept_tokens = 0;
  std::uint64_t kept_supervised_tokens = 0;
  std::uint64_t truncated_samples = 0;
  /// Tokens cut by truncation, and how many of them were supervised.
  std::uint64_t truncated_tokens = 0;
  std::uint64_t truncated_supervised_tokens = 0;
  /// Samples over max_length under Truncation::drop.
  std::uint64_t dropped_too_long = 0;
  /// Samples with no supervised token (after truncation).
  std::uint64_t dropped_no_supervised_tokens = 0;
  /// Conversations whose encoding failed (a role-order error, a tokenizer
  /// error, SampleTooLong): thrown, or skipped by the caller's error handler.
  std::uint64_t rejected_samples = 0;
  /// Messages RoleOrder::xtuner dropped (leading answers, messages after the
  /// last answer, system messages a later one replaced) and user messages it
  /// joined to the one before, in the conversations it rendered.
  std::uint64_t dropped_messages = 0;
  std::uint64_t joined_messages = 0;

  bool operator==(const EncodeStats&) const = default;

  /// Adds another encoder's counts (one encoder per thread).
  EncodeStats& operator+=(const EncodeStats& other) noexcept {
    samples_seen += other.samples_seen;
    samples_kept += other.samples_kept;
    kept_tokens += other.kept_tokens;
    kept_supervised_tokens += other.kept_supervised_tokens;
    truncated_samples += other.truncated_samples;
    truncated_tokens += other.truncated_tokens;
    truncated_supervised_tokens += other.truncated_supervised_tokens;
    dropped_too_long += other.dropped_too_long;
    dropped_no_supervised_tokens += other.dropped_no_supervised_tokens;
    rejected_samples += other.rejected_samples;
    dropped_messages += other.dropped_messages;
    joined_messages += other.joined_messages;
    return *this;
  }

  /// One line for a log, e.g. "kept 97 of 100 samples (20480 tokens, 9120
  /// supervised); truncated 3 (cut 700 tokens, 650 supervised); dropped 0 too
  /// long, 2 with no supervised token, 1 rejected by an error; role order
  /// dropped 4 messages, joined 1".
  [[nodiscard]] std::string summary() const {
    return fmt::format(
        "kept {} of {} samples ({} tokens, {} supervised); truncated {} (cut {} tokens, {} supervised); "
        "dropped {} too long, {} with no supervised token, {} rejected by an error; role order dropped {} messages, "
        "joined {}",
        samples_kept, samples_seen, kept_tokens, kept_supervised_tokens, truncated_samples, truncated_tokens,
        truncated_supervised_tokens, dropped_too_long, dropped_no_supervised_tokens, rejected_samples,
        dropped_messages, joined_messages);
  }
};

template <Tokenizer Tok, ChatTemplate Template>
class SampleEncoder {
 public:
  /// Keeps a reference to `tokenizer`, which must outlive the encoder.
  SampleEncoder(const Tok& tokenizer, Template chat_template, EncodeOptions options = {})
      : tokenizer_(&tokenizer), template_(std::move(chat_template)), options_(options) {
    check(options_.max_length > 0, "InvalidArgument", "EncodeOptions::max_length must be at least 1");
    for (const std::string& token : template_.special_tokens()) check_special_token(token);
    const SpecialTokenIds ids = tokenizer.special_ids();
    if (template_.uses_bos()) {
      check(ids.bos.has_value(), "UnknownSpecialToken",
            "the template opens turns with BOS, but the tokenizer has no BOS token (set one with set_special_token, "
            "or use a template without BOS)");
      bos_ = *ids.bos;
    }
    if (template_.uses_eos()) {
      check(ids.eos.has_value(), "UnknownSpecialToken",
            "the template ends answers with EOS, but the tokenizer has no EOS token (set one with set_special_token)");
      eos_ = *ids.eos;
    }
  }
  /// A temporary tokenizer would not outlive the encoder. (const Tok&&, not
  /// Tok&&: a forwarding reference would deduce Tok as a reference type.)
  SampleEncoder(const Tok&&, Template, EncodeOptions = {}) = delete;

  /// Encodes `conversation` into `out` (its buffers reused); false when the
  /// sample is dropped (too long under Truncation::drop, or nothing supervised).
  /// An error names the conversation's line (unless it is 0: not from a file).
  bool encode_into(const Conversation& conversation, EncodedSample& out) {
    return encode_into(conversation, out, [&conversation](const Error& error) -> void {
      throw conversation.line == 0 ? error : error.with_context(fmt::format("line {}", conversation.line));
    });
  }

  /// The ids a model continues from to answer `conversation` (which ends with
  /// a user message): the conversation as the template renders it, then the
  /// template's opening of an assistant turn (e.g. "<|im_start|>assistant\n"),
  /// tokenized piece by piece exactly as training samples are — so generation
  /// sees the same ids the model was trained on. No truncation.
  [[nodiscard]] std::vector<TokenId> encode_prompt(const Conversation& conversation) {
    // Render the conversation with an answer whose text is a marker, then cut at the marker.
    static constexpr std::string_view marker = "\x1f\x1fqlora-answer\x1f\x1f";
    Conversation with_answer = conversation;
    with_answer.messages.push_back({Role::assistant, std::string(marker), true});
    template_.render(with_answer, segments_);
    EncodedSample out;
    for (std::size_t i = 0; i < segments_.size(); ++i) {
      TemplateSegment segment = segments_[i];
      const std::size_t at = segment.kind == SegmentKind::text ? segment.text.find(marker) : std::string_view::npos;
      if (at != std::string_view::npos) segment.text = segment.text.substr(0, at);
      append_segment(segment, out);
      if (at != std::string_view::npos) return std::move(out.input_ids);
    }
    throw Error("TemplateHasNoAnswer", "the template rendered no assistant answer to prompt for");
  }

  /// As encode_into, but an error goes to on_error(const Error&), unlocated,
  /// and the sample counts as rejected; false unless on_error throws.
  template <class OnError>
  bool encode_into(const Conversation& conversation, EncodedSample& out, OnError&& on_error) {
    ++stats_.samples_seen;
    try {
      return encode_or_throw(conversation, out);
    } catch (const Error& error) {
      ++stats_.rejected_samples;
      on_error(error);
      return false;
    }
  }

  /// The sample of `conversation`, or nullopt when it is dropped.
  std::optional<EncodedSample> encode(const Conversation& conversation) {
    EncodedSample sample;
    if (!encode_into(conversation, sample)) return std::nullopt;
    return sample;
  }

  [[nodiscard]] const EncodeStats& stats() const noexcept { return stats_; }
  [[nodiscard]] const EncodeOptions& options() const noexcept { return options_; }

 private:
  bool encode_or_throw(const Conversation& conversation, EncodedSample& out) {
    out.input_ids.clear();
    out.labels.clear();
    out.line = conversation.line;
    template_.render(conversation, segments_);
    stats_.dropped_messages += segments_.dropped_messages();
    stats_.joined_messages += segments_.joined_messages();
    for (std::size_t i = 0; i < segments_.size(); ++i) append_segment(segments_[i], out);

    if (out.input_ids.size() > options_.max_length) {
      check(options_.truncation != Truncation::error, "SampleTooLong", "{} tokens, more than max_length {}",
            out.input_ids.size(), options_.max_length);
      if (options_.truncation == Truncation::drop) {
        ++stats_.dropped_too_long;
        return false;
      }
      truncate(out);
    }
    const auto supervised = static_cast<std::uint64_t>(
        out.labels.size() - static_cast<std::size_t>(std::count(out.labels.begin(), out.labels.end(), ignore_index)));
    if (supervised == 0) {
      ++stats_.dropped_no_supervised_tokens;
      return false;
    }
    ++stats_.samples_kept;
    stats_.kept_tokens += out.input_ids.size();
    stats_.kept_supervised_tokens += supervised;
    return true;
  }

  void check_special_token(const std::string& token) const {
    const std::optional<TokenId> id = tokenizer_->token_to_id(token);
    check(id.has_value(), "UnknownSpecialToken",
          "the template's token {:?} is not in the tokenizer's vocabulary (add it with add_tokens, or use a template "
          "made for this tokenizer)",
          token);
    const std::vector<TokenId> ids = tokenizer_->encode(token);
    check(ids.size() == 1 && ids.front() == *id, "UnknownSpecialToken",
          "the template's token {:?} (id {}) is not split out of text: the tokenizer encodes it as {} ids [{}] "
          "(register it as an added token)",
          token, *id, ids.size(), fmt::join(ids, ", "));
  }

  void append_segment(const TemplateSegment& segment, EncodedSample& out) const {
    const std::size_t begin = out.input_ids.size();
    switch (segment.kind) {
      case SegmentKind::text:
        if (!segment.text.empty()) tokenizer_->encode_into(segment.text, out.input_ids);
        break;
      case SegmentKind::bos:
        out.input_ids.push_back(bos_);
        break;
      case SegmentKind::eos:
        out.input_ids.push_back(eos_);
        break;
    }
    if (segment.supervised) {
      out.labels.insert(out.labels.end(), out.input_ids.begin() + static_cast<std::ptrdiff_t>(begin),
                        out.input_ids.end());
    } else {
      out.labels.resize(out.input_ids.size(), ignore_index);
    }
  }

  void truncate(EncodedSample& out) {
    const auto cut_begin = out.labels.begin() + static_cast<std::ptrdiff_t>(options_.max_length);
    ++stats_.truncated_samples;
    stats_.truncated_tokens += out.input_ids.size() - options_.max_length;
    stats_.truncated_supervised_tokens += static_cast<std::uint64_t>(
        std::count_if(cut_begin, out.labels.end(), [](TokenId label) { return label != ignore_index; }));
    out.input_ids.resize(options_.max_length);
    out.labels.resize(options_.max_length);
  }

  const Tok* tokenizer_;
  Template template_;
  EncodeOptions options_;
  TokenId bos_ = 0;
  TokenId eos_ = 0;
  TemplateSegments segments_;
  EncodeStats stats_;
};

}  // namespace qlora
