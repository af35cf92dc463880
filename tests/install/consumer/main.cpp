// Prints the version of the qlora headers it was built with. Uses fmt, which it
// gets only through qlora's usage requirements (so that path is tested too), and
// calls into both tokenizers so that SentencePiece and PCRE2 must link through
// those requirements as well: each refuses its bad input with a qlora::Error.
#if __has_include(<qlora/qlora.hpp>)
#include <qlora/qlora.hpp>
#else
#include <qlora/version.hpp>
#endif

#include <fmt/format.h>

#include <vector>

int main() {
  constexpr auto v = qlora::version();
  static_assert(QLORA_VERSION == v.major * 10000 + v.minor * 100 + v.patch);
  fmt::print("qlora {}.{}.{}\n", v.major, v.minor, v.patch);
#if __has_include(<qlora/qlora.hpp>)
  // A two-token byte-level BPE: encoding runs the GPT-2 regex through PCRE2.
  const auto bpe = qlora::ByteLevelBpeTokenizer::from_json(
      R"({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
          "decoder": {"type": "ByteLevel"},
          "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}})",
      "inline tokenizer.json");
  if (bpe.encode("ab") != std::vector<qlora::TokenId>{2}) return 1;
  // A missing model file: SentencePiece's loader reports it.
  try {
    (void)qlora::SentencePieceTokenizer::from_file("no-such-tokenizer.model");
    return 1;
  } catch (const qlora::Error& e) {
    if (e.code() != "InvalidTokenizer") return 1;
  }
#endif
  return 0;
}
