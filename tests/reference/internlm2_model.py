"""Tiny InternLM2 checkpoint (remote-code format) and QLoRA + PEFT reference results for it.

Writes (run: ``nice -n 10 .venv/bin/python tests/reference/internlm2_model.py``; ~40 s on 1 core)
  tests/data/models/tiny_internlm2/config.json
  tests/data/models/tiny_internlm2/model-0000{1,2}-of-00002.safetensors, model.safetensors.index.json
      An InternLM2ForCausalLM checkpoint laid out exactly like ``internlm/internlm2_5-7b-chat``
      (remote-code config with auto_map, InternLM2 key names, packed ``attention.wqkv``, bf16, two
      shards + HF index), but tiny: hidden 64, 2 layers, 4 query heads, 2 KV heads (GQA, head_dim
      16), intermediate 160, vocab 250, rms_norm_eps 1e-5, rope_theta 1e6, rope_scaling
      {"type": "dynamic", "factor": 2.0}, max_position_embeddings 16, no bias, untied output.
  tests/data/models/tiny_internlm2_reference.safetensors
      the QLoRA reference results in the shared model-fixture format (see "Tensors" below).

Why: transformers has no InternLM2 class and the hub's remote code cannot be downloaded here.
InternLM2 is Llama with renamed keys and a packed wqkv (``InternLM/InternLM: tools/convert2llama.py``
converts one into the other by renaming and splitting wqkv), so the references run the real
``transformers.LlamaForCausalLM`` + ``peft`` on the converted weights.  The weights are generated
on a Llama model (portable splitmix64 values, bf16-representable), written in InternLM2 form by
``llama_to_internlm2`` (the exact inverse of convert2llama.py), and then EVERYTHING below is rebuilt
from the written folder: shards read through the index, converted back by ``internlm2_to_llama``
(convert2llama.py's mapping) and loaded into LlamaForCausalLM.  The script asserts that this round
trip is bit-exact and that the reloaded model reproduces the generating model's logits exactly.

wqkv layout (InternLM2 ``rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=2+G, d=16)``): rows are
grouped per KV head g (2 groups of 4 slots of 16 rows): [q head 2g | q head 2g+1 | k head g |
v head g], i.e. rows 0-31 q heads 0,1; 32-47 k head 0; 48-63 v head 0; 64-95 q heads 2,3;
96-111 k head 1; 112-127 v head 1.

QLoRA base: every InternLM2 Linear except ``output`` (wqkv, wo, w1, w2, w3) is replaced by
``bitsandbytes.functional.dequantize_4bit(*quantize_4bit(W_fp32, blocksize=64,
compress_statistics=True, quant_type="nf4"))`` in fp32: with compute dtype float32 bitsandbytes
dequantizes to fp32 and multiplies, so this is exactly QLoRA's forward and backward.  wqkv is
quantized as ONE tensor in its InternLM2 layout (what loading the real checkpoint with a
BitsAndBytesConfig does) and only then split into q/k/v: double quantization takes the mean of all
128 wqkv block absmax values, so quantizing q/k/v separately would give different weights.
Embeddings, norms and output stay fp32 (bf16 values).  The W_fp32 given to quantize_4bit is the
bf16 checkpoint value cast to fp32; the script records whether quantizing the bf16 tensor gives
the same bytes (``nf4_bf16_input_same_bytes``).

LoRA (InternLM2 PEFT: r=4, lora_alpha=8 (scaling 2), dropout 0, target_modules
[wqkv, wo, w1, w2, w3], modules_to_save [output]) is run as PEFT LoRA on the Llama model with
target_modules [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] and
modules_to_save [lm_head].  InternLM2's LoRA on wqkv has ONE A [4, 64] and ONE B [128, 4] (rows in
the interleaved order above): delta(wqkv x) = 2 B (A x), whose q/k/v row blocks are 2 B_q (A x),
2 B_k (A x), 2 B_v (A x).  So the Llama model gets A_q = A_k = A_v = A (PEFT's three lora_A
modules are made to share one Parameter) and B_q/B_k/B_v = the row blocks of B.  By the chain rule
the gradient of the shared A is grad A_q + grad A_k + grad A_v (autograd accumulates it into the
shared Parameter; the script also checks it against three untied copies), and grad B is the
interleave of the three B grads (B's rows are disjoint, so it is a permutation).  Both are exact.
AdamW is elementwise and gradient clipping uses the global norm (invariant under that permutation,
the shared A counted once), so training the tied Llama model IS training InternLM2's adapter.

Cases (fixture tensors as int32 / float32):
  padded  2 rows (13 and 9 real tokens, right-padded with pad id 2 to 13), attention_mask,
          labels -100 on the prompts (first 4 / 3 tokens) and on padding, position_ids = arange(13)
          for both rows (transformers' default: it does not derive positions from the mask; the
          pad positions' logits are stored too, computed with the pad keys masked).  Computed with
          model(input_ids, attention_mask, position_ids, labels): logits, the model's loss (token
          mean over shifted labels != -100) and .backward() grads.
  packed  one row of 3 samples, lengths 7, 1, 12 (20 tokens), positions restarting at 0 per
          sample, labels -100 on the prompts (2 / 0 / 5 tokens), cu_seqlens [0, 7, 8, 20].
          Computed with model(input_ids, position_ids, labels) and NO attention_mask: transformers
          5 then detects the packed row from the position restarts (masking_utils
          find_packed_sequence_indices) and builds the block-diagonal causal mask (only without a
          KV cache, hence use_cache=False in the Llama config, as in training), and the loss is
          the model's own row-level shift, which crosses sample boundaries (the last token of a
          sample predicts the next sample's first label, counted when that label is not -100).  The
          script checks the logits against running each sample alone and concatenating.  Note: the
          row is 20 tokens long (> max_position_embeddings 16) but its largest position is 11;
          transformers and InternLM2's remote code both take the rope length as
          max(position_ids) + 1 = 12, so dynamic NTK is OFF here.
  long    one unpacked row of 24 tokens, positions arange(24), labels = input_ids: max position
          + 1 = 24 > 16, so dynamic NTK is ON.  Logits and loss only (no grads).

Dynamic NTK: InternLM2's remote code (InternEvo-HFModels modeling_internlm2.py,
InternLM2DynamicNTKScalingRotaryEmbedding) computes, for seq_len = max(position_ids) + 1 >
max_position_embeddings, base' = base * ((factor * seq_len / max_pos) - (factor - 1)) **
(dim / (dim - 2)) with seq_len an int64 tensor (so the arithmetic is float32), and inv_freq =
1 / base' ** (arange(0, dim, 2) / dim).  transformers 5.23's _compute_dynamic_ntk_parameters uses
the same formula with the same seq_len (max(position_ids) + 1, a tensor, float32 arithmetic);
``internlm2_inv_freq`` below re-implements InternLM2's code and the script asserts that
transformers' inv_freq for the long case is bit-identical (metadata ``rope``).  The differences
are only in state kept between calls, which a single forward on a fresh model never sees:
transformers recomputes only when the length grows past the longest seen so far and resets to the
original frequencies when a later input is shorter than max_pos; InternLM2 recomputes for every
input longer than max_pos and never resets.  The long case runs on a copy of the model so no
rotary state leaks into the other cases.  Everything else (RMSNorm cast order, rotate_half rope on
all 16 dims, repeat_kv, 1/sqrt(16) = 0.25 scaling, fp32 softmax, SiLU MLP, CE loss) is the same
maths in both codes.  As an independent check, ``internlm2_forward`` evaluates InternLM2's forward
directly on the InternLM2-named tensors (packed wqkv, InternLM2 LoRA keys) and the script asserts
that its logits, losses and autograd grads agree with the fixtures.

Curve: 20 optimizer steps from lora_init, 2 micro-batches per step (curve.batch<2s>,
curve.batch<2s+1> for step s): each micro-batch is one packed row of <= 16 tokens (so NTK stays
off), samples start with BOS and have their first len//3 tokens masked.  transformers >= 4.46
gradient accumulation: num_items = number of labels[..., 1:] != -100 over BOTH micro-batches, each
micro-batch loss = sum CE / num_items (model(..., num_items_in_batch=num_items)), backward each;
then torch.nn.utils.clip_grad_norm_(params, 1.0) (coef = min(1, 1.0 / (norm + 1e-6))), optimizer
step, zero_grad.  curve.losses[s] = sum of the two micro-batch losses (what the Trainer logs:
the token mean over the window), before step s.  Optimizer: bitsandbytes.optim.AdamW(lr=1e-3,
betas=(0.9, 0.999), eps=1e-8, weight_decay=0, optim_bits=32) on CPU; the script also runs
torch.optim.AdamW and records the largest difference (metadata ``curve``).  Constant LR.

Tensors in tiny_internlm2_reference.safetensors (<key> = an InternLM2 PEFT key:
  base_model.model.model.layers.{i}.attention.wqkv.lora_A.weight  [4, 64]
  base_model.model.model.layers.{i}.attention.wqkv.lora_B.weight  [128, 4] (interleaved rows)
  base_model.model.model.layers.{i}.attention.wo.lora_{A,B}.weight [4, 64] / [64, 4]
  base_model.model.model.layers.{i}.feed_forward.w1.lora_{A,B}.weight [4, 64] / [160, 4]
  base_model.model.model.layers.{i}.feed_forward.w3.lora_{A,B}.weight [4, 64] / [160, 4]
  base_model.model.model.layers.{i}.feed_forward.w2.lora_{A,B}.weight [4, 160] / [64, 4]
  base_model.model.output.weight [250, 64] (modules_to_save, plain path))
  lora_init.<key>            F32  adapter the cases and the curve start from (A ~ normalish scale
                                  1/sqrt(in), B ~ normalish scale 0.05, output = base output)
  nf4.<checkpoint key>       F32  the NF4-dequantized base weight of each quantized Linear, InternLM2
                                  names (e.g. nf4.model.layers.0.attention.wqkv.weight [128, 64])
  <c>.input_ids, <c>.labels, <c>.position_ids  I32 [B, S]   for c in padded, packed, long
  padded.attention_mask I32 [2, 13];  packed.cu_seqlens I32 [4]
  <c>.logits F32 [B, S, 250], <c>.loss F32 [1]
  <c>.grad.<key>             F32  for c in padded, packed
  curve.batch<i>.input_ids/labels/position_ids I32 [1, S_i], curve.batch<i>.cu_seqlens I32, i < 40
  curve.losses F32 [20], curve.final.<key> F32
Metadata: lora_config, quantization, curve, cases, rope, checks, model (JSON), package versions.

Determinism: no RNG outside _refcommon's generators (torch.manual_seed only for transformers'
init, which is overwritten); single thread; re-runs give byte-identical files.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F

import _refcommon as rc

MODELS_DIR = os.path.join(rc.DATA_DIR, "models")
MODEL_DIR = os.path.join(MODELS_DIR, "tiny_internlm2")
REF_PATH = os.path.join(MODELS_DIR, "tiny_internlm2_reference.safetensors")
REF_MAX_BYTES = 3 << 19  # 1.5 MiB

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = 64, 2, 4, 2, 160, 250
HEAD_DIM = HIDDEN // HEADS  # InternLM2 derives head_dim; it has no config field for it
GROUP = HEADS // KV_HEADS  # query heads per KV head
MAX_POS, ROPE_THETA, ROPE_FACTOR, EPS = 16, 1000000, 2.0, 1e-5
BOS, EOS, PAD = 1, 2, 2

R, ALPHA = 4, 8
SCALING = ALPHA / R
INTERNLM2_TARGETS = ["wqkv", "wo", "w1", "w2", "w3"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_PREFIX = "base_model.model."
OUTPUT_KEY = PEFT_PREFIX + "output.weight"

CURVE_STEPS, CURVE_ACCUM, CURVE_ROW_MAX = 20, 2, 16
LR, BETAS, ADAM_EPS, MAX_GRAD_NORM = 1e-3, (0.9, 0.999), 1e-8, 1.0

# InternLM2 module suffix inside a layer -> Llama's (tools/convert2llama.py)
LAYER_RENAMES = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_RENAMES = {"model.tok_embeddings": "model.embed_tokens", "output": "lm_head", "model.norm": "model.norm"}
LINEAR_MODULES = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2"]
LAYER_ORDER = LINEAR_MODULES + ["attention_norm", "ffn_norm"]


# ----------------------------------------------------------------------------- wqkv packing
def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[q | k | v] row blocks -> InternLM2's interleaved rows (per KV group: G q heads, k, v).

    The exact inverse of convert2llama.py's split; works for weights [rows, in] and lora_B [rows, r].
    """
    cols = q.shape[1]
    parts = (q.reshape(KV_HEADS, GROUP, HEAD_DIM, cols), k.reshape(KV_HEADS, 1, HEAD_DIM, cols),
             v.reshape(KV_HEADS, 1, HEAD_DIM, cols))
    return torch.cat(parts, dim=1).reshape(KV_HEADS * (GROUP + 2) * HEAD_DIM, cols)


def split_wqkv(w: torch.Tensor):
    """convert2llama.py: '(h gs d) dim -> h gs d dim', split gs into [G, 1, 1], flatten each."""
    g = w.reshape(KV_HEADS, GROUP + 2, HEAD_DIM, w.shape[1])
    q, k, v = torch.split(g, [GROUP, 1, 1], dim=1)
    return tuple(t.reshape(-1, w.shape[1]).clone() for t in (q, k, v))


def llama_to_internlm2(sd: dict) -> dict:
    """Llama state dict -> InternLM2 checkpoint keys, in InternLM2's module order."""
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"]}
    for i in range(LAYERS):
        lp, ip = f"model.layers.{i}.", f"model.layers.{i}."
        for mod in LAYER_ORDER:
            if mod == "attention.wqkv":
                out[ip + mod + ".weight"] = pack_wqkv(*(sd[lp + f"self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")))
            else:
                out[ip + mod + ".weight"] = sd[lp + LAYER_RENAMES[mod] + ".weight"]
    out["model.norm.weight"] = sd["model.norm.weight"]
    out["output.weight"] = sd["lm_head.weight"]
    return out


def internlm2_to_llama(sd: dict) -> dict:
    """tools/convert2llama.py's key mapping and wqkv split."""
    out = {}
    for key, v in sd.items():
        module = key[: -len(".weight")]
        if key.startswith("model.layers."):
            layer, suffix = module.split(".", 3)[2], module.split(".", 3)[3]
            prefix = f"model.layers.{layer}."
            if suffix == "attention.wqkv":
                for name, part in zip(("q_proj", "k_proj", "v_proj"), split_wqkv(v)):
                    out[prefix + f"self_attn.{name}.weight"] = part
            else:
                out[prefix + LAYER_RENAMES[suffix] + ".weight"] = v
        else:
            out[TOP_RENAMES[module] + ".weight"] = v
    return out


# ----------------------------------------------------------------------------- the checkpoint
def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=VOCAB, rms_norm_eps=EPS,
                       rope_theta=float(ROPE_THETA), rope_scaling={"type": "dynamic", "factor": ROPE_FACTOR},
                       max_position_embeddings=MAX_POS, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                       hidden_act="silu", bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                       attn_implementation="eager", use_cache=False)


def new_llama(state_dict=None):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)  # transformers' init only; every weight is overwritten
    model = LlamaForCausalLM(llama_config()).float().eval()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


def generated_weights(model) -> None:
    """Portable, bf16-representable values for every parameter (stored as fp32)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            n, seed = p.numel(), 7000 + i
            if name.endswith("norm.weight"):
                v = 1.0 + rc.normalish(n, seed, 0.1)
            elif "embed_tokens" in name:
                v = rc.normalish(n, seed, 1.0)
            else:
                gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0  # visible rope effects
                v = rc.normalish(n, seed, gain / math.sqrt(p.shape[1]))
            p.copy_(torch.from_numpy(v.astype(np.float32)).reshape(p.shape).to(torch.bfloat16).float())


def internlm2_config() -> dict:
    """config.json as internlm/internlm2_5-7b-chat ships it (remote code), with the tiny sizes."""
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "bias": False,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTER,
        "max_position_embeddings": MAX_POS,
        "model_type": "internlm2",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "pad_token_id": PAD,
        "pretraining_tp": 1,
        "rms_norm_eps": EPS,
        "rope_scaling": {"type": "dynamic", "factor": ROPE_FACTOR},
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def write_checkpoint(sd: dict) -> None:
    """Two bf16 shards (embeddings + layer 0 | the rest) and HF's model.safetensors.index.json."""
    from safetensors.torch import save_file

    shutil.rmtree(MODEL_DIR, ignore_errors=True)
    os.makedirs(MODEL_DIR)
    names = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    first = [k for k in sd if k.startswith("model.tok_embeddings") or k.startswith("model.layers.0.")]
    shards = {names[0]: {k: sd[k] for k in first}, names[1]: {k: v for k, v in sd.items() if k not in first}}
    weight_map, total = {}, 0
    for fname, tensors in shards.items():
        bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
        save_file(bf16, os.path.join(MODEL_DIR, fname), metadata={"format": "pt"})
        for k, v in bf16.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(MODEL_DIR, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh, indent=2)
        fh.write("\n")
    with open(os.path.join(MODEL_DIR, "config.json"), "w") as fh:
        json.dump(internlm2_config(), fh, indent=2, sort_keys=True)
        fh.write("\n")
    for fname in os.listdir(MODEL_DIR):
        os.chmod(os.path.join(MODEL_DIR, fname), 0o644)
        print(f"wrote {os.path.relpath(os.path.join(MODEL_DIR, fname), rc.REPO_ROOT)}")


def read_checkpoint() -> dict:
    """Reads the folder back through its index, as a loader would (bf16 -> fp32)."""
    from safetensors import safe_open

    with open(os.path.join(MODEL_DIR, "model.safetensors.index.json")) as fh:
        index = json.load(fh)
    cfg = json.load(open(os.path.join(MODEL_DIR, "config.json")))
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == HEAD_DIM and not cfg["bias"]
    sd = {}
    for key, fname in index["weight_map"].items():
        with safe_open(os.path.join(MODEL_DIR, fname), "pt") as f:
            t = f.get_tensor(key)
        assert t.dtype == torch.bfloat16
        sd[key] = t.float()
    return sd


# ----------------------------------------------------------------------------- QLoRA base
def nf4_roundtrip(sd: dict):
    """NF4 (blocksize 64, double quant) round trip of every InternLM2 Linear except output, fp32."""
    import bitsandbytes.functional as bnbf

    out, same_bytes = dict(sd), True
    for key, w in sd.items():
        if not any(f".{m}.weight" in key for m in LINEAR_MODULES):
            continue
        packed, state = bnbf.quantize_4bit(w.float().contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
        packed_bf16, _ = bnbf.quantize_4bit(w.to(torch.bfloat16).contiguous(), blocksize=64, compress_statistics=True,
                                            quant_type="nf4")
        same_bytes &= bool(torch.equal(packed, packed_bf16))
        deq = bnbf.dequantize_4bit(packed, state)
        assert deq.dtype == torch.float32 and deq.shape == w.shape
        out[key] = deq
    return out, same_bytes


# ----------------------------------------------------------------------------- PEFT model and adapter views
def peft_model(llama_sd: dict):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=LLAMA_TARGETS, modules_to_save=["lm_head"],
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(new_llama(llama_sd), cfg).eval()
    return model


def tie_qkv_lora_A(model) -> None:
    """InternLM2 has one lora_A on wqkv: make PEFT's q/k/v lora_A modules share one Parameter."""
    for layer in model.base_model.model.model.layers:
        attn = layer.self_attn
        shared = attn.q_proj.lora_A["default"].weight
        attn.k_proj.lora_A["default"].weight = shared
        attn.v_proj.lora_A["default"].weight = shared


def adapter_modules(model):
    """(InternLM2 PEFT module prefix, [Llama lora modules]) pairs; wqkv maps to q, k, v."""
    pairs = []
    for i, layer in enumerate(model.base_model.model.model.layers):
        p = f"{PEFT_PREFIX}model.layers.{i}."
        a, m = layer.self_attn, layer.mlp
        pairs += [(p + "attention.wqkv", [a.q_proj, a.k_proj, a.v_proj]), (p + "attention.wo", [a.o_proj]),
                  (p + "feed_forward.w1", [m.gate_proj]), (p + "feed_forward.w3", [m.up_proj]),
                  (p + "feed_forward.w2", [m.down_proj])]
    return pairs


def output_param(model):
    return model.base_model.model.lm_head.modules_to_save["default"].weight


def internlm2_adapter(model, grads: bool = False, tied: bool = True) -> dict:
    """The trainable tensors (or their grads) under InternLM2 PEFT names.

    wqkv.lora_A: the shared A (its grad already is grad A_q + grad A_k + grad A_v when tied; with
    untied copies the three grads are summed here).  wqkv.lora_B: the interleave of B_q, B_k, B_v.
    """
    get = (lambda p: p.grad.detach().clone()) if grads else (lambda p: p.detach().clone())
    out = {}
    for prefix, mods in adapter_modules(model):
        a_params = [m.lora_A["default"].weight for m in mods]
        b_params = [m.lora_B["default"].weight for m in mods]
        if len(mods) == 1:
            out[prefix + ".lora_A.weight"], out[prefix + ".lora_B.weight"] = get(a_params[0]), get(b_params[0])
            continue
        if tied:
            assert a_params[0] is a_params[1] is a_params[2]
            out[prefix + ".lora_A.weight"] = get(a_params[0])
        else:
            out[prefix + ".lora_A.weight"] = sum(get(p) for p in a_params)
        out[prefix + ".lora_B.weight"] = pack_wqkv(*(get(p) for p in b_params))
    out[OUTPUT_KEY] = get(output_param(model))
    return out


def load_internlm2_adapter(model, adapter: dict) -> None:
    with torch.no_grad():
        for prefix, mods in adapter_modules(model):
            a, b = adapter[prefix + ".lora_A.weight"], adapter[prefix + ".lora_B.weight"]
            bs = split_wqkv(b) if len(mods) == 3 else (b,)
            for m, bpart in zip(mods, bs):
                m.lora_A["default"].weight.copy_(a)
                m.lora_B["default"].weight.copy_(bpart)
        output_param(model).copy_(adapter[OUTPUT_KEY])


def initial_adapter(base_output: torch.Tensor) -> dict:
    shapes = {}
    for i in range(LAYERS):
        p = f"{PEFT_PREFIX}model.layers.{i}."
        shapes[p + "attention.wqkv"] = (HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
        shapes[p + "attention.wo"] = (HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "feed_forward.w1"] = (HIDDEN, INTER)
        shapes[p + "feed_forward.w3"] = (HIDDEN, INTER)
        shapes[p + "feed_forward.w2"] = (INTER, HIDDEN)
    out = {}
    for i, (prefix, (fan_in, fan_out)) in enumerate(sorted(shapes.items())):
        a = rc.normalish(R * fan_in, 7500 + 2 * i, 1.0 / math.sqrt(fan_in))
        b = rc.normalish(fan_out * R, 7501 + 2 * i, 0.05)  # non-zero so every grad is non-trivial
        out[prefix + ".lora_A.weight"] = torch.from_numpy(a).reshape(R, fan_in)
        out[prefix + ".lora_B.weight"] = torch.from_numpy(b).reshape(fan_out, R)
    out[OUTPUT_KEY] = base_output.clone()  # PEFT's modules_to_save starts as a copy of the base module
    return out


def trainable_params(model):
    seen, params = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


# ----------------------------------------------------------------------------- inputs
def tokens(n: int, seed: int) -> list:
    """n token ids in [3, VOCAB) (0..2 are unk/bos/eos-pad)."""
    return [3 + int(v) for v in rc.random_u32(n, seed) % np.uint32(VOCAB - 3)]


def sample(length: int, seed: int, prompt: int):
    ids = [BOS] + tokens(length - 1, seed)
    return ids, [-100] * prompt + ids[prompt:]


def packed_row(samples):
    ids, labels, pos, cu = [], [], [], [0]
    for s_ids, s_labels in samples:
        ids += s_ids
        labels += s_labels
        pos += list(range(len(s_ids)))
        cu.append(len(ids))
    t = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    return {"input_ids": t(ids), "labels": t(labels), "position_ids": t(pos), "cu_seqlens": torch.tensor(cu, dtype=torch.int64)}


def padded_case():
    rows = [sample(13, 8101, 4), sample(9, 8102, 3)]
    s = max(len(r[0]) for r in rows)
    ids = [r[0] + [PAD] * (s - len(r[0])) for r in rows]
    labels = [r[1] + [-100] * (s - len(r[1])) for r in rows]
    mask = [[1] * len(r[0]) + [0] * (s - len(r[0])) for r in rows]
    t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    return {"input_ids": t(ids), "labels": t(labels), "attention_mask": t(mask),
            "position_ids": torch.arange(s).unsqueeze(0).repeat(len(rows), 1)}


def packed_case():
    return packed_row([sample(7, 8201, 2), sample(1, 8202, 0), sample(12, 8203, 5)])


def long_case():
    ids, _ = sample(24, 8301, 0)
    t = torch.tensor([ids], dtype=torch.int64)
    return {"input_ids": t, "labels": t.clone(), "position_ids": torch.arange(24).unsqueeze(0)}


def curve_batches():
    """40 packed rows of <= 16 tokens, greedily filled from a cycling pool of 10 samples."""
    lengths = [7, 1, 6, 5, 8, 4, 3, 9, 2, 6]
    pool = [sample(n, 8400 + j, n // 3) for j, n in enumerate(lengths)]
    rows, current, used, j = [], [], 0, 0
    while len(rows) < CURVE_STEPS * CURVE_ACCUM:
        nxt = pool[j % len(pool)]
        if used + len(nxt[0]) > CURVE_ROW_MAX:
            rows.append(packed_row(current))
            current, used = [], 0
            continue
        current.append(nxt)
        used += len(nxt[0])
        j += 1
    return rows


def allowed_keys(case) -> torch.Tensor:
    """[B, S, S] bool: causal, within one sample (positions restart), and not a padded key."""
    pos = case["position_ids"]
    seg = torch.cumsum((torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1) != 1).long(), dim=-1)
    s = pos.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    ok = causal & (seg[:, :, None] == seg[:, None, :])
    if "attention_mask" in case:
        ok &= case["attention_mask"].bool()[:, None, :]
    return ok


# ----------------------------------------------------------------------------- independent InternLM2 forward
def internlm2_inv_freq(position_ids: torch.Tensor, dynamic: bool = True) -> torch.Tensor:
    """InternLM2 remote code: InternLM2RotaryEmbedding / InternLM2DynamicNTKScalingRotaryEmbedding.

    dynamic=False gives plain rope at any length (only to measure how much NTK changes the long case).
    """
    exponent = torch.arange(0, HEAD_DIM, 2, dtype=torch.int64).float() / HEAD_DIM
    seq_len = torch.max(position_ids) + 1
    if dynamic and seq_len > MAX_POS:
        base = ROPE_THETA * ((ROPE_FACTOR * seq_len / MAX_POS) - (ROPE_FACTOR - 1)) ** (HEAD_DIM / (HEAD_DIM - 2))
        return 1.0 / (base ** exponent)
    return 1.0 / (ROPE_THETA ** exponent)


def internlm2_forward(w: dict, adapter: dict, case, dynamic_rope: bool = True) -> tuple:
    """InternLM2ForCausalLM's maths (modeling_internlm2.py, eager) on InternLM2-named tensors + LoRA."""
    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))

    def linear(x, module):
        y = x @ w[module + ".weight"].T
        a = adapter.get(PEFT_PREFIX + module + ".lora_A.weight")
        if a is not None:
            y = y + ((x @ a.T) @ adapter[PEFT_PREFIX + module + ".lora_B.weight"].T) * SCALING
        return y

    def rotate_half(x):
        return torch.cat((-x[..., HEAD_DIM // 2:], x[..., : HEAD_DIM // 2]), dim=-1)

    ids, pos = case["input_ids"], case["position_ids"]
    b, s = ids.shape
    freqs = pos[:, :, None].float() * internlm2_inv_freq(pos, dynamic_rope)[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    bias = torch.zeros(b, 1, s, s).masked_fill(~allowed_keys(case)[:, None], torch.finfo(torch.float32).min)
    h = w["model.tok_embeddings.weight"][ids]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        qkv = linear(rms(h, w[p + "attention_norm.weight"]), p + "attention.wqkv").reshape(b, s, KV_HEADS, GROUP + 2, HEAD_DIM)
        q = qkv[..., :GROUP, :].reshape(b, s, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = qkv[..., -2, :].transpose(1, 2), qkv[..., -1, :].transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(GROUP, dim=1), v.repeat_interleave(GROUP, dim=1)
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(HEAD_DIM) + bias, dim=-1)
        h = h + linear((att @ v).transpose(1, 2).reshape(b, s, HIDDEN), p + "attention.wo")
        x = rms(h, w[p + "ffn_norm.weight"])
        h = h + linear(F.silu(linear(x, p + "feed_forward.w1")) * linear(x, p + "feed_forward.w3"), p + "feed_forward.w2")
    logits = rms(h, w["model.norm.weight"]) @ adapter[OUTPUT_KEY].T
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), case["labels"][:, 1:].reshape(-1), ignore_index=-100)
    return logits, loss


# ----------------------------------------------------------------------------- runs
def run_case(model, case, with_grad: bool):
    kwargs = {k: case[k] for k in ("input_ids", "labels", "position_ids", "attention_mask") if k in case}
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(with_grad):
        out = model(**kwargs)
        if with_grad:
            out.loss.backward()
    return out.logits.detach().float(), out.loss.detach().float()


def train_curve(model, batches, optimizer_kind: str):
    import bitsandbytes as bnb

    params = trainable_params(model)
    if optimizer_kind == "bnb":
        opt = bnb.optim.AdamW(params, lr=LR, betas=BETAS, eps=ADAM_EPS, weight_decay=0.0, optim_bits=32)
    else:
        opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=ADAM_EPS, weight_decay=0.0)
    losses = []
    for step in range(CURVE_STEPS):
        window = batches[CURVE_ACCUM * step: CURVE_ACCUM * (step + 1)]
        num_items = sum(int((b["labels"][..., 1:] != -100).sum()) for b in window)
        total = 0.0
        for b in window:
            out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"],
                        num_items_in_batch=torch.tensor(num_items))
            out.loss.backward()
            total += float(out.loss.detach())
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return torch.tensor(losses, dtype=torch.float32)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def max_rel(a: dict, b: dict) -> float:
    return max(max_abs(a[k], b[k]) / max(float(b[k].double().abs().max()), 1e-30) for k in b)


def i32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).contiguous()


def main():
    import peft
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    checks = {}

    # 1. generate on Llama, write InternLM2 form, read back, convert back (convert2llama.py)
    gen = new_llama()
    generated_weights(gen)
    gen_sd = {k: v.detach().clone() for k, v in gen.state_dict().items()}
    write_checkpoint(llama_to_internlm2(gen_sd))
    ckpt = read_checkpoint()
    back = internlm2_to_llama(ckpt)
    assert set(back) == set(gen_sd) and all(torch.equal(back[k], gen_sd[k]) for k in gen_sd), "round trip"
    reloaded = new_llama(back)
    probe = padded_case()
    with torch.no_grad():
        same = torch.equal(gen(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits,
                           reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits)
    assert same
    checks["checkpoint_roundtrip_bitexact"] = True
    checks["reloaded_llama_logits_bitexact"] = True

    # 2. QLoRA base (NF4 on the InternLM2 layout) + PEFT with InternLM2's adapter
    nf4_ckpt, nf4_same_bytes = nf4_roundtrip(ckpt)
    model = peft_model(internlm2_to_llama(nf4_ckpt))
    tie_qkv_lora_A(model)
    init = initial_adapter(ckpt["output.weight"])
    load_internlm2_adapter(model, init)
    assert all(torch.equal(v, init[k]) for k, v in internlm2_adapter(model).items())

    cases = {"padded": padded_case(), "packed": packed_case(), "long": long_case()}
    out = {f"lora_init.{k}": v for k, v in init.items()}
    out.update({f"nf4.{k}": v for k, v in nf4_ckpt.items() if any(f".{m}.weight" in k for m in LINEAR_MODULES)})
    results = {}
    for name in ("padded", "packed"):
        logits, loss = run_case(model, cases[name], with_grad=True)
        results[name] = (logits, loss, internlm2_adapter(model, grads=True))
    long_model = copy.deepcopy(model)  # dynamic NTK changes the rotary state: keep it out of the others
    results["long"] = (*run_case(long_model, cases["long"], with_grad=False), None)
    rotary = long_model.base_model.model.model.rotary_emb
    checks["ntk_inv_freq_bitexact_vs_internlm2"] = bool(torch.equal(rotary.inv_freq, internlm2_inv_freq(cases["long"]["position_ids"])))
    assert checks["ntk_inv_freq_bitexact_vs_internlm2"]
    assert torch.equal(model.base_model.model.model.rotary_emb.inv_freq, internlm2_inv_freq(torch.arange(MAX_POS)))

    for name, case in cases.items():
        logits, loss, grads = results[name]
        for k in ("input_ids", "labels", "position_ids", "attention_mask", "cu_seqlens"):
            if k in case:
                out[f"{name}.{k}"] = i32(case[k])
        out[f"{name}.logits"], out[f"{name}.loss"] = logits.contiguous(), loss.reshape(1)
        if grads is not None:
            out.update({f"{name}.grad.{k}": v for k, v in grads.items()})

    # 3. checks: packed = samples alone; tied A grad = sum of untied; independent InternLM2 forward
    p = cases["packed"]
    with torch.no_grad():
        alone = []
        for a, b in zip(p["cu_seqlens"][:-1].tolist(), p["cu_seqlens"][1:].tolist()):
            alone.append(model(input_ids=p["input_ids"][:, a:b], position_ids=p["position_ids"][:, a:b]).logits)
    checks["packed_vs_samples_alone_max_abs"] = max_abs(torch.cat(alone, dim=1), results["packed"][0])
    assert checks["packed_vs_samples_alone_max_abs"] < 1e-5, checks

    untied = peft_model(internlm2_to_llama(nf4_ckpt))
    load_internlm2_adapter(untied, init)
    logits_u, _ = run_case(untied, cases["padded"], with_grad=True)
    checks["untied_vs_tied_logits_max_abs"] = max_abs(logits_u, results["padded"][0])
    checks["untied_grad_sum_vs_tied_max_rel"] = max_rel(internlm2_adapter(untied, grads=True, tied=False), results["padded"][2])
    assert checks["untied_grad_sum_vs_tied_max_rel"] < 1e-5

    for name in ("padded", "packed", "long"):
        adapter = {k: v.clone().requires_grad_(True) for k, v in init.items()}
        logits, loss = internlm2_forward(nf4_ckpt, adapter, cases[name])
        checks[f"internlm2_forward_{name}_logits_max_abs"] = max_abs(logits, results[name][0])
        checks[f"internlm2_forward_{name}_loss_abs"] = abs(float(loss) - float(results[name][1]))
        assert checks[f"internlm2_forward_{name}_logits_max_abs"] < 2e-5, checks
        if results[name][2] is not None:
            loss.backward()
            checks[f"internlm2_forward_{name}_grads_max_rel"] = max_rel({k: v.grad for k, v in adapter.items()}, results[name][2])
            assert checks[f"internlm2_forward_{name}_grads_max_rel"] < 1e-4, checks
    with torch.no_grad():  # how much NTK changes the long row (shows that the case exercises it)
        plain = internlm2_forward(nf4_ckpt, init, cases["long"], dynamic_rope=False)[0]
    checks["long_logits_ntk_vs_plain_rope_max_abs"] = max_abs(plain, results["long"][0])
    assert checks["long_logits_ntk_vs_plain_rope_max_abs"] > 1e-2

    # 4. the curve (bitsandbytes AdamW 32-bit; torch AdamW for comparison)
    batches = curve_batches()
    for i, b in enumerate(batches):
        for k, v in b.items():
            out[f"curve.batch{i}.{k}"] = i32(v)
    trained = {}
    for kind in ("bnb", "torch"):
        m = peft_model(internlm2_to_llama(nf4_ckpt))
        tie_qkv_lora_A(m)
        load_internlm2_adapter(m, init)
        losses = train_curve(m, batches, kind)
        trained[kind] = (losses, internlm2_adapter(m))
    losses, final = trained["bnb"]
    out["curve.losses"] = losses
    out.update({f"curve.final.{k}": v for k, v in final.items()})
    curve_meta = {
        "steps": CURVE_STEPS, "micro_batches_per_step": CURVE_ACCUM, "step_s_uses": "curve.batch<2s>, curve.batch<2s+1>",
        "loss_per_micro_batch": "sum CE over labels[..., 1:] != -100 / num_items (both micro-batches of the window)",
        "losses_entry": "sum of the window's two micro-batch losses, before the step",
        "optimizer": "bitsandbytes.optim.AdamW(optim_bits=32) on CPU", "lr": LR, "lr_schedule": "constant",
        "betas": list(BETAS), "eps": ADAM_EPS, "weight_decay": 0.0, "max_grad_norm": MAX_GRAD_NORM,
        "clip": "torch.nn.utils.clip_grad_norm_: coef = min(1, max_norm / (total_norm + 1e-6))",
        "row_max_tokens": CURVE_ROW_MAX, "dropout": 0.0,
        "torch_adamw_losses_max_abs_diff": max_abs(trained["torch"][0], losses),
        "torch_adamw_final_max_abs_diff": max(max_abs(trained["torch"][1][k], final[k]) for k in final),
    }
    assert float(losses[-1]) < float(losses[0])

    metadata = {
        "description": "QLoRA (NF4, fp32 compute) + PEFT LoRA reference for tests/data/models/tiny_internlm2; "
                       "see tests/reference/internlm2_model.py",
        "model": {"folder": "tests/data/models/tiny_internlm2", "reference_impl": "transformers.LlamaForCausalLM on "
                  "convert2llama.py-converted weights (eager attention, fp32)", "head_dim": HEAD_DIM,
                  "wqkv_rows_per_kv_group": (GROUP + 2) * HEAD_DIM, "wqkv_group_slots": "[q]*%d + [k, v]" % GROUP},
        "lora_config": {"r": R, "lora_alpha": ALPHA, "scaling": SCALING, "lora_dropout": 0.0, "bias": "none",
                        "target_modules": INTERNLM2_TARGETS, "modules_to_save": ["output"],
                        "llama_equivalent": {"target_modules": LLAMA_TARGETS, "modules_to_save": ["lm_head"]}},
        "quantization": {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "float32",
                         "quantized": [f"model.layers.*.{m}.weight" for m in LINEAR_MODULES],
                         "not_quantized": ["model.tok_embeddings.weight", "*norm.weight", "output.weight"],
                         "wqkv_quantized_as": "one [128, 64] tensor in the InternLM2 layout, then split",
                         "input": "bf16 checkpoint values cast to fp32", "nf4_bf16_input_same_bytes": nf4_same_bytes},
        "cases": {
            "padded": "2 right-padded rows (13, 9 tokens), prompts 4/3 masked, position_ids arange; model's own loss",
            "packed": "1 row, samples 7/1/12, positions restart, no attention_mask (transformers packed-row "
                      "detection = block-diagonal causal); row-level label shift crossing samples; rope length = "
                      "max(position_ids)+1 = 12, NTK off although the row has 20 tokens",
            "long": "1 row of 24 tokens, positions arange(24): dynamic NTK on (24 > 16); logits and loss only",
        },
        "rope": {"theta": ROPE_THETA, "scaling": {"type": "dynamic", "factor": ROPE_FACTOR}, "max_position_embeddings": MAX_POS,
                 "ntk_formula": "base' = base * ((factor * L / max_pos) - (factor - 1)) ** (dim / (dim - 2)), "
                                "L = max(position_ids) + 1 (int64 tensor -> float32 arithmetic), only when L > max_pos",
                 "long_case_base_prime": float(ROPE_THETA * ((ROPE_FACTOR * torch.tensor(24) / MAX_POS) - (ROPE_FACTOR - 1))
                                                ** (HEAD_DIM / (HEAD_DIM - 2))),
                 "transformers_vs_internlm2": "same formula and arithmetic (inv_freq bit-identical); differ only in "
                                              "state kept across calls (transformers recomputes on growth and resets "
                                              "below max_pos; InternLM2 recomputes above max_pos, never resets)"},
        "curve": curve_meta,
        "checks": checks,
        "peft": peft.__version__,
    }
    rc.save(REF_PATH, out, metadata, max_bytes=REF_MAX_BYTES)
    print(json.dumps(checks, indent=1))
    print("curve losses", [round(float(x), 4) for x in losses])


if __name__ == "__main__":
    main()
