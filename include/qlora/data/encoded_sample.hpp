// One tokenized training sample: what SampleEncoder produces and the packers
// and collators consume.
#pragma once

#include <cstdint>
#include <vector>

#include <qlora/data/tokenizer.hpp>

namespace qlora {

struct EncodedSample {
  std::vector<TokenId> input_ids;
  /// Same length as input_ids: the id where the position is learned, else
  /// ignore_index (-100). Not shifted: position t's label is the token at t,
  /// as in transformers (the loss shifts).
  std::vector<TokenId> labels;
  /// Source line (Conversation::line), for errors and statistics.
  std::uint64_t line = 0;
};

}  // namespace qlora
