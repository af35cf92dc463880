// One QLoRA layer's training step on the CPU — forward_train + backward with
// dx, NF4 base with double quantization, bf16 compute, 1024 tokens — at
// Llama-style 4096x4096 (r = 64) and Phi-2's 2560 -> 10240 fc1 (r = 32).
//
// Baseline, in the same run and on the same threads: the two dense GEMMs a
// frozen Linear needs anyway, x·Wᵀ and dy·W, in fp32 on a weight that was
// dequantized beforehand (Eigen, split over output / input columns exactly as
// the layer splits its own). `vs_dense_gemm` = layer time / baseline time:
// what the 4-bit base (dequantized per tile), the bf16 conversions and the
// adapter cost on top of the unavoidable GEMMs (the goal: <= 1.3).
//
// Memory counters: `held_bytes` is what the layer holds (NF4 base, A, B, their
// gradients, bias) plus the saved activations; `floor_bytes` is the analytic
// floor NF4 weight + adapter + saved activations (x in bf16, xa in fp32).
#include <qlora/lora/lora_linear.hpp>

#include <benchmark/benchmark.h>

#include <vector>

#include "support/layer_shapes.hpp"
#include "support/same_run_baseline.hpp"

namespace {

using namespace qlora;

Tensor bf16_tensor(const std::vector<bf16>& values, Shape shape) {
  Tensor t(DType::BF16, shape);
  std::ranges::copy(values, t.span<bf16>().begin());
  return t;
}

void lora_linear_step(benchmark::State& state) {
  const std::int64_t out = state.range(0), in = state.range(1), r = state.range(2), tokens = state.range(3);
  const unsigned threads = default_thread_count();
  const Tensor weight = bf16_tensor(bench::random_weight(out, in), {out, in});
  LoraConfig config;
  config.r = static_cast<int>(r);
  config.lora_alpha = 2.0 * static_cast<double>(r);
  LoraLinear<NF4, bf16> layer("proj", FrozenWeight<NF4, bf16>::quantize(weight.view(), {.double_quant = true}),
                              TensorView{}, config, {.threads = threads});
  // A non-zero B so that the adapter's products are real work, not multiplications by zero.
  const Tensor b = bf16_tensor(bench::random_weight(out, r), {out, r});
  layer.set_adapter_weights(layer.lora_A(), b.view());

  const Tensor x = bf16_tensor(bench::random_weight(tokens, in), {tokens, in});
  const Tensor dy = bf16_tensor(bench::random_weight(tokens, out), {tokens, out});
  Tensor y(DType::BF16, {tokens, out}), dx(DType::BF16, {tokens, in});
  std::size_t activation_bytes = 0;

  // The baseline's operands in fp32: W̃ dequantized once, x and dy widened.
  const Tensor dense_weight = layer.merged_weight();  // B·A is tiny next to W; only the shape and cost matter
  std::vector<float> xf(static_cast<std::size_t>(tokens * in)), dyf(static_cast<std::size_t>(tokens * out));
  for (std::size_t i = 0; i < xf.size(); ++i) xf[i] = to_float(x.span<const bf16>()[i]);
  for (std::size_t i = 0; i < dyf.size(); ++i) dyf[i] = to_float(dy.span<const bf16>()[i]);
  std::vector<float> yf(static_cast<std::size_t>(tokens * out)), dxf(static_cast<std::size_t>(tokens * in));
  const float* w = dense_weight.view().data<const float>();

  const auto times = bench::time_alternating(
      state,
      [&] {
        const LoraActivations saved = layer.forward_train(x.view(), y.view());
        layer.backward(saved, dy.view(), dx.view());
        activation_bytes = saved.bytes();
        benchmark::DoNotOptimize(dx.span<bf16>().data());
      },
      [&] {
        parallel_for(out, 64, [&](std::int64_t o0, std::int64_t o1) {
          detail::matrix(yf.data() + o0, tokens, o1 - o0, out).noalias() =
              detail::matrix(xf.data(), tokens, in, in) * detail::matrix(w + o0 * in, o1 - o0, in, in).transpose();
        }, threads);
        parallel_for(in, 64, [&](std::int64_t c0, std::int64_t c1) {
          detail::matrix(dxf.data() + c0, tokens, c1 - c0, in).noalias() =
              detail::matrix(dyf.data(), tokens, out, out) * detail::matrix(w + c0, out, c1 - c0, in);
        }, threads);
        benchmark::DoNotOptimize(dxf.data());
      });
  state.counters["vs_dense_gemm"] = times.operation_seconds / times.baseline_seconds;
  const double adapter = static_cast<double>((r * in + out * r) * sizeof(float));
  const double floor = static_cast<double>(layer.base().bytes()) + adapter +
                       static_cast<double>(tokens * in * sizeof(bf16) + tokens * r * sizeof(float));
  state.counters["held_bytes"] = static_cast<double>(layer.bytes() + activation_bytes);
  state.counters["floor_bytes"] = floor;
  state.counters["held_vs_floor"] = static_cast<double>(layer.bytes() + activation_bytes) / floor;
  // Multiply-adds of the two baseline GEMMs, as FLOP/s of the layer step.
  state.counters["gemm_flops"] = benchmark::Counter(static_cast<double>(4 * tokens * in * out) *
                                                        static_cast<double>(state.iterations()),
                                                    benchmark::Counter::kIsRate);
}

BENCHMARK(lora_linear_step)
    ->Args({4096, 4096, 64, 1024})
    ->Args({10240, 2560, 32, 1024})
    ->ArgNames({"out", "in", "r", "tokens"})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
