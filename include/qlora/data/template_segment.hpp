// TemplateSegments: what a chat template makes of a conversation, before any
// tokenizer is involved. An ordered list of segments, each a text piece or a
// BOS/EOS marker, each supervised (its tokens are labelled) or not.
//
// Why pieces and not one string: XTuner tokenizes a turn's input, its output
// and the separator separately, and the Phi-2 tutorial tokenizes each message
// separately; BPE merges and SentencePiece's dummy prefix differ at piece
// boundaries, so SampleEncoder must tokenize exactly these pieces, one at a
// time, to give the same ids. BOS/EOS are markers, not text, because they are
// the tokenizer's ids (which differ per model) and must never be spelled out
// and re-tokenized.
//
// The buffer is reused across conversations (clear() keeps its capacity), so
// rendering allocates nothing once it has grown to the largest conversation.
// It also carries what the template did not render as it was (RoleOrder::xtuner's
// dropped and joined messages), for SampleEncoder to count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace qlora {

enum class SegmentKind : std::uint8_t { text, bos, eos };

/// One segment; `text` is empty for BOS/EOS and points into the TemplateSegments
/// it came from (valid until that buffer changes).
struct TemplateSegment {
  SegmentKind kind = SegmentKind::text;
  /// Whether the segment's tokens are learned (labels = ids) or masked (-100).
  bool supervised = false;
  std::string_view text;
};

class TemplateSegments {
 public:
  void clear() noexcept {
    text_.clear();
    entries_.clear();
    dropped_messages_ = 0;
    joined_messages_ = 0;
  }

  /// Starts a text segment; append() extends it. A segment built from several
  /// pieces (SYSTEM + INSTRUCTION with the message inserted) is still one
  /// piece for the tokenizer, as the concatenated string is in XTuner.
  void begin_text(bool supervised) { entries_.push_back({SegmentKind::text, supervised, text_.size(), 0}); }

  /// Appends to the text segment begun last.
  void append(std::string_view piece) {
    text_.append(piece);
    entries_.back().size += piece.size();
  }

  void add_text(std::string_view text, bool supervised) {
    begin_text(supervised);
    append(text);
  }

  /// BOS is never supervised: XTuner labels it -100 (nothing predicts the
  /// first token of a sample).
  void add_bos() { entries_.push_back({SegmentKind::bos, false, text_.size(), 0}); }

  /// EOS is learned with the answer it ends (XTuner's need_eos_token turns), or
  /// masked with it.
  void add_eos(bool supervised) { entries_.push_back({SegmentKind::eos, supervised, text_.size(), 0}); }

  /// Records messages of the conversation the template left out of the
  /// segments, and user messages it joined to the one before them.
  void count_cuts(std::size_t dropped_messages, std::size_t joined_messages) noexcept {
    dropped_messages_ += dropped_messages;
    joined_messages_ += joined_messages;
  }
  [[nodiscard]] std::size_t dropped_messages() const noexcept { return dropped_messages_; }
  [[nodiscard]] std::size_t joined_messages() const noexcept { return joined_messages_; }

  [[nodiscard]] std::size_t size() const noexcept { return entries_.size(); }
  [[nodiscard]] bool empty() const noexcept { return entries_.empty(); }

  [[nodiscard]] TemplateSegment operator[](std::size_t index) const noexcept {
    const Entry& entry = entries_[index];
    return {entry.kind, entry.supervised, std::string_view(text_).substr(entry.offset, entry.size)};
  }

 private:
  struct Entry {
    SegmentKind kind;
    bool supervised;
    std::size_t offset;
    std::size_t size;
  };

  /// All text segments, one after the other.
  std::string text_;
  std::vector<Entry> entries_;
  std::size_t dropped_messages_ = 0;
  std::size_t joined_messages_ = 0;
};

}  // namespace qlora
