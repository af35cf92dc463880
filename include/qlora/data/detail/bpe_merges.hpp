// IWYU pragma: private
// The BPE merge rules (pair of ids -> rank and merged id) and the merge loop
// that applies them to one pre-token, with tokenizers' order: always the pair
// of lowest rank, the leftmost when several pairs share it (models/bpe/word.rs,
// a min-heap on (rank, position)).
//
// Two loops give that same order: short words (nearly all) rescan an array of
// pair ranks, which needs no allocation; long ones (runs of one character,
// long numbers or blobs) use tokenizers' linked list and heap, so that a
// 100 KB pre-token does not cost a quadratic scan.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <queue>
#include <vector>

#include <qlora/data/tokenizer.hpp>

namespace qlora::detail {

/// One merge rule's effect: lower ranks merge first.
struct BpeMerge {
  std::uint32_t rank = 0;
  TokenId merged = 0;
};

class BpeMerges {
 public:
  /// Room for `count` rules (an open-addressing table at most half full).
  explicit BpeMerges(std::size_t count) {
    const std::size_t capacity = std::bit_ceil(std::max<std::size_t>(16, count * 2));
    slots_.resize(capacity);
    shift_ = 64 - std::countr_zero(capacity);
  }

  /// Sets the rule for (left, right) (ids >= 0). Setting a pair again
  /// replaces its rule, as tokenizers' HashMap built from the merges list does
  /// (the last occurrence wins).
  void set(TokenId left, TokenId right, BpeMerge merge) {
    const std::uint64_t key = key_of(left, right);
    for (std::size_t slot = home_of(key);; slot = (slot + 1) & (slots_.size() - 1)) {
      if (slots_[slot].key == key || slots_[slot].key == empty_key) {
        slots_[slot] = {key, merge};
        return;
      }
    }
  }

  [[nodiscard]] const BpeMerge* find(TokenId left, TokenId right) const noexcept {
    const std::uint64_t key = key_of(left, right);
    for (std::size_t slot = home_of(key);; slot = (slot + 1) & (slots_.size() - 1)) {
      if (slots_[slot].key == key) return &slots_[slot].merge;
      if (slots_[slot].key == empty_key) return nullptr;
    }
  }

  /// Merges the `count` symbols at `symbols` in place until no rule applies;
  /// returns how many symbols are left.
  std::size_t apply(TokenId* symbols, std::size_t count) const {
    return count <= short_word_limit ? apply_short(symbols, count) : apply_long(symbols, count);
  }

 private:
  static constexpr std::uint64_t empty_key = ~std::uint64_t{0};  // ids are >= 0: no real key has both top bits
  static constexpr std::size_t short_word_limit = 48;
  static constexpr std::uint32_t no_rank = std::numeric_limits<std::uint32_t>::max();

  struct Slot {
    std::uint64_t key = empty_key;
    BpeMerge merge;
  };

  static constexpr std::uint64_t key_of(TokenId left, TokenId right) noexcept {
    return std::uint64_t{static_cast<std::uint32_t>(left)} << 32 | static_cast<std::uint32_t>(right);
  }
  [[nodiscard]] std::size_t home_of(std::uint64_t key) const noexcept {
    return static_cast<std::size_t>((key * 0x9E3779B97F4A7C15u) >> shift_);
  }

  /// Rescans the ranks of adjacent pairs; pair i is (symbols[i], symbols[i + 1]).
  std::size_t apply_short(TokenId* symbols, std::size_t count) const {
    std::array<BpeMerge, short_word_limit> pairs;
    const auto rule_at = [&](std::size_t i) {
      const BpeMerge* merge = find(symbols[i], symbols[i + 1]);
      pairs[i] = merge != nullptr ? *merge : BpeMerge{no_rank, 0};
    };
    for (std::size_t i = 0; i + 1 < count; ++i) rule_at(i);
    while (count > 1) {
      std::size_t best = 0;
      for (std::size_t i = 1; i + 1 < count; ++i) {
        if (pairs[i].rank < pairs[best].rank) best = i;  // strict: ties keep the leftmost
      }
      if (pairs[best].rank == no_rank) break;
      symbols[best] = pairs[best].merged;
      // Drop symbol best + 1 and the pair that started at it.
      std::copy(symbols + best + 2, symbols + count, symbols + best + 1);
      for (std::size_t i = best + 1; i + 2 < count; ++i) pairs[i] = pairs[i + 1];
      --count;
      if (best > 0) rule_at(best - 1);
      if (best + 1 < count) rule_at(best);
    }
    return count;
  }

  /// tokenizers' Word::merge_all: symbols in a linked list, candidate merges
  /// in a min-heap on (rank, position); entries made stale by an earlier
  /// merge are recognised and skipped when they come up.
  std::size_t apply_long(TokenId* symbols, std::size_t count) const {
    struct Node {
      TokenId id;
      std::int64_t prev;  // -1: none
      std::int64_t next;  // -1: none
      bool alive;
    };
    struct Candidate {
      std::uint32_t rank;
      std::size_t pos;
      TokenId merged;
      bool operator>(const Candidate& other) const noexcept {
        return rank != other.rank ? rank > other.rank : pos > other.pos;
      }
    };
    std::vector<Node> nodes(count);
    for (std::size_t i = 0; i < count; ++i) {
      nodes[i] = {symbols[i], static_cast<std::int64_t>(i) - 1, i + 1 < count ? static_cast<std::int64_t>(i + 1) : -1,
                  true};
    }
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
    const auto push_pair = [&](std::size_t left) {
      if (nodes[left].next < 0) return;
      if (const BpeMerge* merge = find(nodes[left].id, nodes[static_cast<std::size_t>(nodes[left].next)].id)) {
        queue.push({merge->rank, left, merge->merged});
      }
    };
    for (std::size_t i = 0; i + 1 < count; ++i) push_pair(i);
    while (!queue.empty()) {
      const Candidate top = queue.top();
      queue.pop();
      Node& left = nodes[top.pos];
      if (!left.alive || left.next < 0) continue;
      Node& right = nodes[static_cast<std::size_t>(left.next)];
      const BpeMerge* current = find(left.id, right.id);
      if (current == nullptr || current->merged != top.merged) continue;  // stale: a neighbour changed
      left.id = top.merged;
      right.alive = false;
      left.next = right.next;
      if (right.next >= 0) nodes[static_cast<std::size_t>(right.next)].prev = static_cast<std::int64_t>(top.pos);
      if (left.prev >= 0) push_pair(static_cast<std::size_t>(left.prev));
      push_pair(top.pos);
    }
    std::size_t kept = 0;
    for (std::int64_t i = 0; i >= 0; i = nodes[static_cast<std::size_t>(i)].next) {
      symbols[kept++] = nodes[static_cast<std::size_t>(i)].id;
    }
    return kept;
  }

  std::vector<Slot> slots_;
  int shift_ = 0;
};

}  // namespace qlora::detail
