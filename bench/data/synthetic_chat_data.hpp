// A deterministic stand-in for the Phi-2 tutorial's riddles dataset
// ({"number": n, "messages": [user, assistant, user, assistant]}), written to
// a JSONL file of a requested size, so the C++ pipeline and the tutorial's
// Python pipeline read the same bytes. Message lengths are skewed like chat
// data (most answers a few sentences, a tail of long ones), and the text mixes
// words, numbers, punctuation, code-ish lines and a little Chinese so every
// pre-tokenizer class is exercised. Words follow Zipf's law over a vocabulary
// of 48 common words and 30 000 made-up ones (syllable strings), as natural
// text does: frequent words hit both tokenizers' word caches, the long tail
// does not, so the benchmark does not measure a cache alone.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/io/detail/json.hpp>

namespace qlora::bench {

namespace detail {

inline std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline constexpr std::array<std::string_view, 48> chat_words{
    "the",      "answer",   "riddle",  "is",      "a",        "flower",  "that",    "grows",
    "in",       "dirt",     "but",     "blooms",  "into",     "beauty",  "sky",     "bell",
    "noise",    "flies",    "cannot",  "be",      "seen",     "think",   "step",    "by",
    "explain",  "simple",   "question", "what",   "why",      "because", "water",   "light",
    "shadow",   "mountain", "river",   "echo",    "time",     "clock",   "number",  "letter",
    "it's",     "you're",   "don't",   "we've",   "sunflower", "wind",   "12",      "2024"};

inline constexpr std::array<std::string_view, 6> chat_tails{".", "?", "!", ",", ":", "..."};

inline constexpr std::array<std::string_view, 16> chat_syllables{"ka", "lo", "mi", "ne", "ru", "ta", "shi", "ven",
                                                                 "dor", "pla", "qu", "est", "ion", "ar", "eth", "um"};
inline constexpr std::size_t zipf_vocabulary = chat_words.size() + 30000;

/// Word `rank` of the Zipf vocabulary: the common words first, then syllable strings.
inline void append_word(std::string& out, std::size_t rank) {
  if (rank < chat_words.size()) {
    out += chat_words[rank];
    return;
  }
  for (std::size_t rest = rank - chat_words.size() + chat_syllables.size(); rest > 0; rest /= chat_syllables.size()) {
    out += chat_syllables[rest % chat_syllables.size()];
  }
}

/// Draws Zipf(1.0) ranks by inverting the cumulative weights 1/(rank+1).
class ZipfRanks {
 public:
  ZipfRanks() : cumulative_(zipf_vocabulary) {
    double sum = 0;
    for (std::size_t rank = 0; rank < zipf_vocabulary; ++rank) cumulative_[rank] = sum += 1.0 / double(rank + 1);
  }
  [[nodiscard]] std::size_t draw(std::uint64_t random) const {
    const double target = static_cast<double>(random >> 11) / 9007199254740992.0 * cumulative_.back();
    return static_cast<std::size_t>(std::upper_bound(cumulative_.begin(), cumulative_.end(), target) -
                                    cumulative_.begin());
  }

 private:
  std::vector<double> cumulative_;
};

/// One message of `words` words: sentences with punctuation and capitals,
/// sometimes a numbered list, a code line or a Chinese sentence.
inline void append_message(std::string& out, std::uint64_t& state, unsigned words, const ZipfRanks& ranks) {
  bool sentence_start = true;
  std::string word;
  for (unsigned w = 0; w < words; ++w) {
    const std::uint64_t r = splitmix64(state);
    word.clear();
    append_word(word, std::min(ranks.draw(splitmix64(state)), zipf_vocabulary - 1));
    if (w > 0) out += (r >> 40) % 23 == 0 ? "\n" : " ";
    if ((r >> 20) % 97 == 0) out += fmt::format("{}. ", (r >> 8) % 9 + 1);
    if ((r >> 28) % 211 == 0) out += "今天天气很好，我们去公园散步吧。";
    if ((r >> 36) % 307 == 0) out += "def f(x):\n    return x * 2\n";
    if (sentence_start && word[0] >= 'a' && word[0] <= 'z') word[0] = static_cast<char>(word[0] - 'a' + 'A');
    out += word;
    sentence_start = (r >> 12) % 9 == 0;
    if (sentence_start) out += chat_tails[(r >> 16) % chat_tails.size()];
  }
}

/// Word count of a message: mostly 8-80, one in 16 up to 600 (long answers).
inline unsigned message_words(std::uint64_t& state, bool assistant) {
  const std::uint64_t r = splitmix64(state);
  const unsigned base = assistant ? 20 : 8;
  if (r % 16 == 0) return base + static_cast<unsigned>((r >> 8) % 600);
  return base + static_cast<unsigned>((r >> 8) % (assistant ? 120 : 40));
}

}  // namespace detail

/// Writes records until the file holds at least `bytes` bytes; returns the
/// record count. The same (bytes, seed) always gives the same file.
inline std::size_t write_synthetic_chat_jsonl(const std::filesystem::path& path, std::size_t bytes,
                                              std::uint64_t seed = 0) {
  std::FILE* file = std::fopen(path.c_str(), "wb");
  check(file != nullptr, "IoError", "cannot create {}", path.string());
  std::uint64_t state = seed;
  std::size_t written = 0, records = 0;
  std::string line, message;
  const detail::ZipfRanks ranks;
  while (written < bytes) {
    line = fmt::format(R"({{"number": {}, "messages": [)", records);
    for (int m = 0; m < 4; ++m) {
      message.clear();
      detail::append_message(message, state, detail::message_words(state, m % 2 == 1), ranks);
      if (m > 0) line += ", ";
      qlora::detail::append_json_string(line, message, qlora::detail::JsonEscape::minimal);
    }
    line += "]}\n";
    check(std::fwrite(line.data(), 1, line.size(), file) == line.size(), "IoError", "cannot write {}",
          path.string());
    written += line.size();
    ++records;
  }
  check(std::fclose(file) == 0, "IoError", "cannot close {}", path.string());
  return records;
}

}  // namespace qlora::bench
