// Umbrella for nn/: the ops of a decoder layer besides the linears, each with
// forward and backward on fp32 CPU tensors — embedding, LayerNorm, RMSNorm,
// gelu_new / SiLU / SwiGLU, rotary embeddings, causal attention over packed
// sequences, the lm_head and the chunked causal-LM cross-entropy.
#pragma once

#include <qlora/nn/activations.hpp>
#include <qlora/nn/attention.hpp>
#include <qlora/nn/cross_entropy.hpp>
#include <qlora/nn/embedding.hpp>
#include <qlora/nn/layer_norm.hpp>
#include <qlora/nn/lm_head.hpp>
#include <qlora/nn/rms_norm.hpp>
#include <qlora/nn/rotary.hpp>
