// Resizing a model's vocabulary (embedding rows, lm_head rows and bias) as
// transformers' resize_token_embeddings(new_num_tokens, pad_to_multiple_of)
// does (design note §6): the size is rounded up to the multiple, may shrink
// (Phi-2: 50297 tokens → 50304 < 51200), kept rows are copied, and new rows
// are the mean of the old ones (mean_resizing; transformers adds noise of
// variance 1e-9·Σ on top, which is far below fp32 resolution of the mean for
// real embeddings, and which we leave out so results are reproducible).
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/core/tensor.hpp>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace qlora {

/// ceil(tokens / multiple) · multiple; multiple ≤ 1 leaves `tokens` as is.
inline std::int64_t padded_vocab_size(std::int64_t tokens, std::int64_t multiple) {
  check(tokens > 0, "InvalidArgument", "a vocabulary of {} tokens", tokens);
  if (multiple <= 1) return tokens;
  return (tokens + multiple - 1) / multiple * multiple;
}

/// `table` (F32 [rows, ...] or [rows]) resized to `new_rows` rows: the first
/// min(old, new) rows kept, new rows set to the mean of the old rows (in double).
inline void resize_rows(Tensor& table, std::int64_t new_rows) {
  check(new_rows > 0, "InvalidArgument", "resize to {} rows", new_rows);
  const std::int64_t old_rows = table.shape()[0];
  const std::int64_t width = table.shape().rank() == 2 ? table.shape()[1] : 1;
  Tensor resized(DType::F32, table.shape().rank() == 2 ? Shape{new_rows, width} : Shape{new_rows});
  const auto old_values = table.span<const float>();
  const auto new_values = resized.span<float>();
  const std::int64_t kept = std::min(old_rows, new_rows);
  std::copy_n(old_values.begin(), kept * width, new_values.begin());
  if (new_rows > old_rows) {
    std::vector<double> mean(static_cast<std::size_t>(width), 0.0);
    for (std::int64_t r = 0; r < old_rows; ++r) {
      for (std::int64_t c = 0; c < width; ++c) mean[c] += old_values[r * width + c];
    }
    for (std::int64_t r = old_rows; r < new_rows; ++r) {
      for (std::int64_t c = 0; c < width; ++c) new_values[r * width + c] = static_cast<float>(mean[c] / old_rows);
    }
  }
  table = std::move(resized);
}

}  // namespace qlora
