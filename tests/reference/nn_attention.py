"""Reference fixtures for rotary position embedding and packed causal attention (torch + transformers, CPU, fp32).

Writes (run: ``.venv/bin/python tests/reference/nn_attention.py``; a few seconds)
  tests/data/nn/rotary.safetensors     RoPE forward and its gradient, three cases
  tests/data/nn/attention.safetensors  causal attention forward, logsumexp and gradients, three cases

Why: ``include/qlora/nn/rotary.hpp`` and ``include/qlora/nn/attention.hpp`` must give what
transformers gives for Phi-2 and InternLM2 training on packed rows.

Rotary cases (x [T, heads, head_dim] float32, positions [T] int32, dy like x; y = RoPE(x),
dx = autograd gradient of sum(y * dy)):
  phi        head_dim 80, PhiConfig(partial_rotary_factor=0.4) -> rotary dims 32, theta 1e4;
             transformers' PhiRotaryEmbedding + apply_rotary_pos_emb on the first 32 dims, the
             rest passed through, exactly as PhiAttention does.  Positions of a packed row
             (0..5, 0, 0..7) plus 2047 (the last position Phi-2 was trained with).
  ntk_long   head_dim 16, theta 1e6, rope "dynamic" factor 2, max_position_embeddings 64,
             seq_len 100 > 64, so the NTK base applies.  InternLM2's remote code
             (InternLM2DynamicNTKScalingRotaryEmbedding) computes
                 base = theta * ((factor*seq_len/max_pos) - (factor-1)) ** (dim/(dim-2))
             in Python float64 (seq_len is an int there); transformers' own "dynamic" rope
             (LlamaRotaryEmbedding) takes seq_len = max(position_ids)+1 as a tensor and so
             evaluates the same formula in float32, which moves inv_freq by an ulp or so.
             qlora follows InternLM2, so this case is InternLM2's code written in torch
             (InternLM2DynamicRope below) with transformers' apply_rotary_pos_emb.  The
             positions have max 99, so ntk_long_transformers (the same inputs through
             transformers' LlamaRotaryEmbedding) is recorded too, for a looser comparison.
  ntk_short  same config, positions with max 63: seq_len 64 <= max_pos, plain RoPE.
Each case also records inv_freq [rotary_dim/2] as transformers computed it.

Attention cases (q [T,Hq,D], k and v [T,Hkv,D], dout [T,Hq,D], cu_seqlens [n+1] int32, scale
1/sqrt(D)): torch.nn.functional.scaled_dot_product_attention in fp32 with a block-diagonal
causal boolean mask (token i attends to j iff same sequence and j <= i) and K/V repeated with
transformers' repeat_kv (GQA); out, dq, dk, dv by autograd; logsumexp [T, Hq] of the scaled,
masked scores via torch.logsumexp.
  single       one sequence of 16, Hq = Hkv = 2, D = 80 (Phi-2's head_dim)
  packed_gqa   three sequences 5, 1, 9 (length 1 included), Hq 8, Hkv 2 (GQA 4:1), D 16
  long_gqa     sequences 3, 1, 196 (longer than the C++ tiles, so tile edges are exercised),
               Hq 4, Hkv 1, D 16

Inputs are _refcommon.normalish draws (seeds in the code), stored in the fixtures.
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _refcommon import DATA_DIR, normalish, save  # noqa: E402

from transformers import LlamaConfig, PhiConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402
from transformers.models.llama.modeling_llama import repeat_kv  # noqa: E402
from transformers.models.phi.modeling_phi import PhiRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402


def draw(shape, seed, scale=1.0):
    n = math.prod(shape)
    return torch.from_numpy(normalish(n, seed, scale)).reshape(shape)


def rope_case(prefix, rotary_module, rotary_dim, heads, head_dim, positions, seed, out):
    t = len(positions)
    x = draw((t, heads, head_dim), seed).requires_grad_(True)
    dy = draw((t, heads, head_dim), seed + 1)
    pos = torch.tensor(positions, dtype=torch.int64)[None, :]
    # transformers' layout: [batch, heads, seq, head_dim]
    xb = x.transpose(0, 1)[None]
    cos, sin = rotary_module(xb, pos)
    x_rot, x_pass = xb[..., :rotary_dim], xb[..., rotary_dim:]
    # apply_rotary_pos_emb rotates q and k alike; k is not needed here
    y_rot, _ = apply_rotary_pos_emb(x_rot, x_rot, cos, sin)
    y = torch.cat((y_rot, x_pass), dim=-1)[0].transpose(0, 1).contiguous()
    (y * dy).sum().backward()
    out[f"{prefix}.x"] = x.detach()
    out[f"{prefix}.dy"] = dy
    out[f"{prefix}.positions"] = torch.tensor(positions, dtype=torch.int32)
    out[f"{prefix}.y"] = y.detach()
    out[f"{prefix}.dx"] = x.grad.detach()
    out[f"{prefix}.inv_freq"] = rotary_module.inv_freq.detach().clone()


class InternLM2DynamicRope(torch.nn.Module):
    """InternLM2's InternLM2DynamicNTKScalingRotaryEmbedding (remote code, modeling_internlm2.py) for one
    seq_len: the NTK base in Python float64 arithmetic (seq_len is an int there), then fp32 as transformers."""

    def __init__(self, theta, dim, factor, max_pos, seq_len):
        super().__init__()
        base = theta
        if seq_len > max_pos:
            base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotary_fixtures():
    out = {}
    phi = PhiConfig(hidden_size=80 * 3, num_attention_heads=3, partial_rotary_factor=0.4, rope_theta=10000.0)
    phi_positions = list(range(6)) + [0] + list(range(8)) + [2047]
    rope_case("phi", PhiRotaryEmbedding(phi), 32, 3, 80, phi_positions, 11, out)

    def llama_dynamic():
        config = LlamaConfig(
            hidden_size=16 * 2,
            num_attention_heads=2,
            max_position_embeddings=64,
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6},
        )
        return LlamaRotaryEmbedding(config)

    long_positions = list(range(0, 40, 3)) + list(range(0, 60, 7)) + [98, 99]
    long_rope = llama_dynamic()
    rope_case("ntk_long_transformers", long_rope, 16, 2, 16, long_positions, 21, out)
    rope_case("ntk_long", InternLM2DynamicRope(theta=1e6, dim=16, factor=2.0, max_pos=64, seq_len=100), 16, 2, 16,
              long_positions, 21, out)
    # transformers evaluates the NTK base in float32 (seq_len is a tensor there), InternLM2 in float64
    print("ntk inv_freq, transformers vs InternLM2 formula:", long_rope.inv_freq, out["ntk_long.inv_freq"])

    short_positions = list(range(0, 64, 5)) + [63]
    rope_case("ntk_short", llama_dynamic(), 16, 2, 16, short_positions, 31, out)
    metadata = {
        "cases": ["phi", "ntk_long", "ntk_long_transformers", "ntk_short"],
        "phi": {"head_dim": 80, "rotary_dim": 32, "theta": 10000.0, "seq_len": 2048},
        "ntk_long": {"head_dim": 16, "rotary_dim": 16, "theta": 1e6, "factor": 2.0, "max_position_embeddings": 64,
                     "seq_len": 100},
        "ntk_long_transformers": {"head_dim": 16, "rotary_dim": 16, "theta": 1e6, "factor": 2.0,
                                  "max_position_embeddings": 64, "seq_len": 100},
        "ntk_short": {"head_dim": 16, "rotary_dim": 16, "theta": 1e6, "factor": 2.0, "max_position_embeddings": 64,
                      "seq_len": 64},
    }
    save(os.path.join(DATA_DIR, "nn", "rotary.safetensors"), out, metadata)


def packed_causal_mask(cu_seqlens):
    t = cu_seqlens[-1]
    seq_of = torch.zeros(t, dtype=torch.int64)
    for s in range(len(cu_seqlens) - 1):
        seq_of[cu_seqlens[s]:cu_seqlens[s + 1]] = s
    idx = torch.arange(t)
    return (seq_of[:, None] == seq_of[None, :]) & (idx[None, :] <= idx[:, None])


def attention_case(prefix, cu_seqlens, hq, hkv, d, seed, out):
    t = cu_seqlens[-1]
    q = draw((t, hq, d), seed).requires_grad_(True)
    k = draw((t, hkv, d), seed + 1).requires_grad_(True)
    v = draw((t, hkv, d), seed + 2).requires_grad_(True)
    dout = draw((t, hq, d), seed + 3)
    scale = 1.0 / math.sqrt(d)
    mask = packed_causal_mask(cu_seqlens)
    qb = q.transpose(0, 1)[None]
    kb = repeat_kv(k.transpose(0, 1)[None], hq // hkv)
    vb = repeat_kv(v.transpose(0, 1)[None], hq // hkv)
    o = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
    o = o[0].transpose(0, 1).contiguous()
    (o * dout).sum().backward()
    with torch.no_grad():
        scores = (qb @ kb.transpose(-1, -2)) * scale
        lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)[0].transpose(0, 1).contiguous()
    for name, tensor in [("q", q), ("k", k), ("v", v), ("dout", dout), ("out", o), ("logsumexp", lse),
                         ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)]:
        out[f"{prefix}.{name}"] = tensor.detach()
    out[f"{prefix}.cu_seqlens"] = torch.tensor(cu_seqlens, dtype=torch.int32)
    return {"query_heads": hq, "kv_heads": hkv, "head_dim": d, "scale": scale}


def attention_fixtures():
    out = {}
    metadata = {
        "cases": ["single", "packed_gqa", "long_gqa"],
        "single": attention_case("single", [0, 16], 2, 2, 80, 101, out),
        "packed_gqa": attention_case("packed_gqa", [0, 5, 6, 15], 8, 2, 16, 201, out),
        "long_gqa": attention_case("long_gqa", [0, 3, 4, 200], 4, 1, 16, 301, out),
    }
    save(os.path.join(DATA_DIR, "nn", "attention.safetensors"), out, metadata)


if __name__ == "__main__":
    torch.set_num_threads(1)
    rotary_fixtures()
    attention_fixtures()
