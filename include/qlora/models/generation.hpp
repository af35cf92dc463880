// generate: text generation with a KV cache, as transformers'
// model.generate(input_ids, max_new_tokens, eos_token_id=stop_ids, ...) with
// use_cache=True: the prompt runs through the model once, then each new token
// alone, its keys and values joining the cache (models/kv_cache.hpp); the next
// token is chosen by sample_next (models/sampling.hpp) with every token so far
// as the repetition penalty's history. It stops after max_new_tokens tokens or
// at the first stop id, which is returned (and reported) as the last token, as
// transformers keeps the eos in its output.
//
// The form with a caller's KvCache serves a conversation: give it the whole
// context each turn, and only the part the cache does not already hold (the
// longest common prefix is kept) runs through the model.
//
// on_token(id) is called for each generated id as soon as it is chosen (for
// streaming); if it returns bool, false stops generation after that token.
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/models/kv_cache.hpp>
#include <qlora/models/sampling.hpp>

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

namespace qlora {

/// A model generate() can drive: CausalLm and anything with its decode().
template <class Model>
concept DecodingModel = requires(const Model& model, std::span<const std::int32_t> ids, KvCache& cache) {
  { model.decode(ids, cache) } -> std::same_as<Tensor>;
};

/// An on_token callback that does nothing.
struct IgnoreTokens {
  void operator()(std::int32_t) const noexcept {}
};

/// Generates after `context` (>= 1 token), reusing what `cache` holds of it.
template <DecodingModel Model, class OnToken = IgnoreTokens>
std::vector<std::int32_t> generate(const Model& model, KvCache& cache, std::span<const std::int32_t> context,
                                   int max_new_tokens, std::span<const std::int32_t> stop_ids,
                                   const SamplingOptions& sampling, OnToken&& on_token = {}) {
  sampling.validate();
  check(!context.empty(), "InvalidArgument", "generate needs a prompt of at least one token");
  check(max_new_tokens >= 0, "InvalidArgument", "max_new_tokens = {}: expected >= 0", max_new_tokens);
  std::vector<std::int32_t> generated;
  if (max_new_tokens == 0) return generated;

  // Keep the cached prefix of the context, but run at least its last token: its logits are needed.
  const std::span<const std::int32_t> cached = cache.tokens();
  const std::size_t limit = std::min(cached.size(), context.size() - 1);
  const auto reused = static_cast<std::size_t>(
      std::mismatch(context.begin(), context.begin() + static_cast<std::ptrdiff_t>(limit), cached.begin()).first -
      context.begin());
  cache.truncate(static_cast<std::int64_t>(reused));

  std::vector<std::int32_t> history(context.begin(), context.end());
  history.reserve(context.size() + static_cast<std::size_t>(max_new_tokens));
  generated.reserve(static_cast<std::size_t>(max_new_tokens));
  Tensor logits = model.decode(context.subspan(reused), cache);
  while (true) {
    const std::int64_t vocab = logits.shape()[1];
    const std::span<const float> last = logits.span<const float>().subspan(
        static_cast<std::size_t>((logits.shape()[0] - 1) * vocab), static_cast<std::size_t>(vocab));
    const std::int32_t next = sample_next(last, sampling, history.size(), history);
    generated.push_back(next);
    history.push_back(next);
    bool go_on = true;
    if constexpr (std::is_same_v<std::invoke_result_t<OnToken&, std::int32_t>, bool>) {
      go_on = on_token(next);
    } else {
      on_token(next);
    }
    const bool stop = std::find(stop_ids.begin(), stop_ids.end(), next) != stop_ids.end();
    if (stop || !go_on || generated.size() == static_cast<std::size_t>(max_new_tokens)) return generated;
    logits = model.decode(std::span<const std::int32_t>(&generated.back(), 1), cache);
  }
}

/// Generates after `prompt` (>= 1 token) with a cache of its own.
template <DecodingModel Model, class OnToken = IgnoreTokens>
std::vector<std::int32_t> generate(const Model& model, std::span<const std::int32_t> prompt, int max_new_tokens,
                                   std::span<const std::int32_t> stop_ids, const SamplingOptions& sampling,
                                   OnToken&& on_token = {}) {
  KvCache cache(static_cast<std::int64_t>(prompt.size()) + std::max(max_new_tokens, 0));
  return generate(model, cache, prompt, max_new_tokens, stop_ids, sampling, std::forward<OnToken>(on_token));
}

}  // namespace qlora
