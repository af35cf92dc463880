// IWYU pragma: private
// Pre-token -> ids, so that a word seen before costs one hash lookup instead
// of a merge loop (tokenizers keeps the same cache, 10,000 words per model).
//
// encode is const and may run on several threads at once, so the cache is
// split into shards by hash, each behind its own mutex: threads rarely wait
// on one another, and one thread pays an uncontended lock per word. Bounded:
// a shard that fills up is emptied, which is cheap and follows the text at
// hand. Long pre-tokens are not kept (they rarely repeat).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <qlora/data/tokenizer.hpp>

namespace qlora::detail {

class BpeWordCache {
 public:
  /// Words kept at most, over all shards.
  static constexpr std::size_t capacity = std::size_t{1} << 16;
  /// Longer pre-tokens are not cached (tokenizers' MAX_LENGTH).
  static constexpr std::size_t max_word_bytes = 256;

  BpeWordCache() = default;
  BpeWordCache(const BpeWordCache&) = delete;
  BpeWordCache& operator=(const BpeWordCache&) = delete;

  /// Appends the cached ids of `word` to `out`; false (and `out` untouched)
  /// when `word` is not cached.
  bool append_cached(std::string_view word, std::vector<TokenId>& out) const {
    const std::size_t hash = std::hash<std::string_view>{}(word);
    Shard& shard = shard_of(hash);
    const std::lock_guard lock(shard.mutex);
    const auto found = shard.words.find(Probe{word, hash});
    if (found == shard.words.end()) return false;
    const auto first = shard.ids.begin() + found->second.offset;
    out.insert(out.end(), first, first + found->second.count);
    return true;
  }

  /// Keeps `ids` as the encoding of `word`.
  void insert(std::string_view word, std::span<const TokenId> ids) const {
    if (word.size() > max_word_bytes) return;
    const std::size_t hash = std::hash<std::string_view>{}(word);
    Shard& shard = shard_of(hash);
    const std::lock_guard lock(shard.mutex);
    if (shard.words.size() >= capacity / shard_count) {
      shard.words.clear();
      shard.ids.clear();
    }
    const auto [entry, inserted] = shard.words.try_emplace(
        Key{std::string(word), hash},
        Span{static_cast<std::uint32_t>(shard.ids.size()), static_cast<std::uint32_t>(ids.size())});
    if (inserted) shard.ids.insert(shard.ids.end(), ids.begin(), ids.end());
  }

 private:
  static constexpr std::size_t shard_count = 16;

  /// A word with its hash, computed once for the shard and the map.
  template <class Text>
  struct BasicKey {
    Text text;
    std::size_t hash;
  };
  using Key = BasicKey<std::string>;
  using Probe = BasicKey<std::string_view>;
  struct KeyHash {
    using is_transparent = void;
    template <class Text>
    std::size_t operator()(const BasicKey<Text>& key) const noexcept {
      return key.hash;
    }
  };
  struct KeyEqual {
    using is_transparent = void;
    template <class A, class B>
    bool operator()(const BasicKey<A>& a, const BasicKey<B>& b) const noexcept {
      return a.hash == b.hash && std::string_view(a.text) == std::string_view(b.text);
    }
  };
  /// Where a word's ids are in its shard's `ids`.
  struct Span {
    std::uint32_t offset;
    std::uint32_t count;
  };
  struct Shard {
    std::mutex mutex;
    std::unordered_map<Key, Span, KeyHash, KeyEqual> words;
    std::vector<TokenId> ids;
  };

  Shard& shard_of(std::size_t hash) const noexcept { return shards_[(hash >> 7) % shard_count]; }

  mutable std::array<Shard, shard_count> shards_;
};

}  // namespace qlora::detail
