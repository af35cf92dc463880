"""Tiny Phi (transformers PhiForCausalLM) + PEFT LoRA/QLoRA references: logits, losses, gradients, a training curve.

Writes (run: ``nice -n 10 .venv/bin/python tests/reference/phi_model.py``; about a minute on one core)
  tests/data/models/tiny_phi/
      config.json, generation_config.json, model-0000{1,2}-of-00002.safetensors, model.safetensors.index.json:
      ``PhiForCausalLM(PhiConfig(hidden 64, 2 layers, 4 heads (head_dim 16), partial_rotary_factor 0.5,
      intermediate 256, vocab 200, gelu_new, layer_norm_eps 1e-5, rope_theta 10000, max_position_embeddings 128,
      bos = eos = 199, tie_word_embeddings false, resid/embd/attention dropout 0 (phi-2 has resid_pdrop 0.1; 0
      here so that training is deterministic)))`` saved fp32 by
      ``save_pretrained(max_shard_size=300 kB)``.  transformers 5 writes rope_theta and partial_rotary_factor
      inside ``rope_parameters`` (the hub's phi-2 config.json, from transformers 4, has them at top level).
      Weights come from ``_refcommon.normalish`` (see base_weight_values and stream), not torch's RNG.
  tests/data/models/tiny_phi_bnb4bit/
      config.json, generation_config.json, model.safetensors: the folder above loaded by transformers with
      ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
      bnb_4bit_compute_dtype=torch.float32)`` on CPU, then ``save_pretrained`` (a pre-quantized checkpoint:
      every Linear but lm_head is packed NF4 with 8-bit double-quantized absmax; embeddings, LayerNorms,
      biases and lm_head stay fp32).
  tests/data/models/tiny_phi_reference.safetensors (format: models_fixture.md of the issue-5 briefs)
      lora_init.<peft key>   the adapter every case starts from (get_peft_model with LORA below, then every
                             value overwritten from normalish; lora_B is non-zero; the modules_to_save copies
                             of lm_head and embed_tokens are the base values plus a small normalish offset, so
                             a replica that reads the base instead of the copy fails).
      padded.*  two right-padded rows (lengths 12 and 8, S = 12, pad id 199, prompts labelled -100,
                attention_mask 0 on pads, position_ids 0..11 in both rows, which is what transformers uses
                when none are given).  logits/loss/grads from the model's own forward with labels.
      packed.*  one row of three samples (lengths 7, 1, 12; positions restart at 0; cu_seqlens [0,7,8,20];
                prompts labelled -100).  Computed by transformers' own packed-row path: forward with
                position_ids and attention_mask=None, from which transformers 5 derives the block-diagonal
                causal mask (masking_utils.find_packed_sequence_indices).  The loss is the model's own:
                labels shifted over the whole row, so the last token of one sample predicts the first label
                of the next (here: sample 0's last token predicts sample 1's token).  The script checks that
                running each sample alone and concatenating gives the same logits (to 2e-6) and loss.
                Every forward passes use_cache=False: with a cache (config use_cache true, the default) transformers 5
                skips the packed-row detection and a packed row gets one causal mask over all its samples.
      <case>.logits F32 [B,S,200], <case>.loss F32 [1], <case>.grad.<peft key> F32 for every trainable tensor.
      curve.batch<i>.{input_ids,labels,position_ids,cu_seqlens} for micro-batches i = 0..39 (packed rows of
                length 32, 2-4 samples of "arithmetic progression" token runs, the first 2 labels of each
                sample -100); step k uses micro-batches 2k and 2k+1.  Micro-batch i repeats micro-batch i mod 4,
                so the 20 steps memorise them and the loss falls clearly (5.65 -> 4.32).
      curve.losses F32 [20]  the loss of each optimizer step = sum over its 2 micro-batches of
                sum(CE) / num_items_in_batch, num_items_in_batch = the step's shifted labels != -100 (the
                transformers >= 4.46 Trainer's gradient-accumulation semantics), measured before the update.
      curve.final.<peft key> the adapter after 20 steps: grads of both micro-batches accumulated,
                clip_grad_norm_(max_norm=1.0), bitsandbytes.optim.AdamW(optim_bits=32, lr 1e-3, betas
                (0.9, 0.999), eps 1e-8, weight_decay 0) on CPU (the non-paged twin of the tutorial's
                paged_adamw_32bit), constant LR, dropout 0.  Metadata curve.same_curve_with_torch_adamw: the
                same run with torch.optim.AdamW drifts from it by ~1e-6 (losses) / ~4e-7 (weights), a scale
                for a replica's tolerance.
      resize.embed_tokens, resize.lm_head.weight, resize.lm_head.bias: the *base* (fp32, unquantized)
                embedding and lm_head after ``resize_token_embeddings(203, pad_to_multiple_of=64)`` (vocab 256).
                Rows 0..199 are copies; rows 200..255 are transformers' mean_resizing draws (torch seed 0):
                N(mu, 1e-9 Sigma) for the matrices and N(mean(bias), (1e-9 std(bias))^2) for the bias, so a
                replica that writes the mean needs a tolerance (metadata resize_max_abs_dev_from_mean: 1.4e-4
                for embed_tokens, whose draws have std <= noise_std_bound 3.4e-5; the bias draws are below
                one ulp of the mean, so the bias rows equal torch's fp32 mean).

QLoRA numerics: every nn.Linear except lm_head is NF4 in QLoRA (transformers' bnb integration skips only the
output embedding); here that is every base linear, and all of them are LoRA targets.  The references use the
fp32 model with each such weight replaced by
``bitsandbytes.functional.dequantize_4bit(*quantize_4bit(W, blocksize=64, compress_statistics=True,
quant_type="nf4"))``: with compute dtype fp32, bitsandbytes' Linear4bit forward is exactly "dequantize, then
F.linear".  The script checks that claim: the real QLoRA model (tiny_phi loaded with the BitsAndBytesConfig
above + the same adapter) gives bit-identical padded logits, loss and gradients.  prepare_model_for_kbit_training
is not called: on an fp32 model it only freezes and casts (no-ops here) and turns on gradient checkpointing,
which recomputes the same values.  Attention is "eager" (softmax in fp32, masked scores + finfo.min).

Other checks (the script fails if one fails): the tiny_phi folder re-loaded with from_pretrained reproduces the
padded logits bit for bit; tiny_phi_bnb4bit re-loaded reproduces the real-QLoRA base logits bit for bit and its
packed weights equal quantize_4bit of the fp32 weights; a float64 central finite difference agrees with three
gradient entries of each case (relative error < 1e-3; measured <= 5e-7, with the model in fp64 including its
softmax); bitsandbytes' AdamW step differs from torch.optim.AdamW by float rounding only.  Re-running the script
gives byte-identical files.

Why: tests/models/*phi* (C++) must load tiny_phi (sharded fp32) and tiny_phi_bnb4bit (pre-quantized), quantize
like bitsandbytes, and reproduce PEFT's forward, loss, gradients and a short training run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil

import numpy as np
import torch

import _refcommon as rc

MODELS_DIR = os.path.join(rc.DATA_DIR, "models")
MODEL_DIR = os.path.join(MODELS_DIR, "tiny_phi")
BNB_DIR = os.path.join(MODELS_DIR, "tiny_phi_bnb4bit")
REFERENCE = os.path.join(MODELS_DIR, "tiny_phi_reference.safetensors")

VOCAB = 200
EOS = 199  # bos = eos = pad, as Phi-2's <|endoftext|>
LAYERS = 2
TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
LORA = dict(r=4, lora_alpha=8, target_modules=list(TARGETS), modules_to_save=["lm_head", "embed_tokens"],
            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
NF4 = dict(blocksize=64, compress_statistics=True, quant_type="nf4")
STEPS, ACCUMULATION, CURVE_LEN = 20, 2, 32
CURVE_DISTINCT = 4  # the 40 micro-batches cycle through 4 rows, so 20 steps visibly learn (memorise) them
OPTIM = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
MAX_GRAD_NORM = 1.0
RESIZE_TO, RESIZE_MULTIPLE = 203, 64


def phi_config():
    from transformers import PhiConfig

    return PhiConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=LAYERS,
                     num_attention_heads=4, num_key_value_heads=4, resid_pdrop=0.0, embd_pdrop=0.0,
                     attention_dropout=0.0, hidden_act="gelu_new", max_position_embeddings=128,
                     layer_norm_eps=1e-5, tie_word_embeddings=False, qk_layernorm=False, bos_token_id=EOS,
                     eos_token_id=EOS,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})


def stream(tag: int) -> int:
    """The _refcommon seed of stream ``tag``.

    splitmix64 seeds s and s + 1 are one stream shifted by one draw, so neighbouring seeds would give
    correlated tensors (q_proj ~ k_proj, row 0 ~ row 1); tags are spread 2^32 draws apart instead.
    """
    return tag << 32


def base_weight_values(name: str, shape, seed: int) -> np.ndarray:
    """Portable base weights, scaled so that attention and the MLP are far from trivial.

    Linear weights have std ~1/sqrt(in) (normalish's std is 0.577 * scale), embeddings std ~1, LayerNorm
    weights 1 +- 0.1.  Parameter k of the sorted name list uses stream(6000 + k).
    """
    n = int(np.prod(shape))
    if "layernorm" in name:
        values = (1.0 + rc.normalish(n, seed, 0.1)) if name.endswith("weight") else rc.normalish(n, seed, 0.1)
    elif name.endswith("bias"):
        values = rc.normalish(n, seed, 0.05)
    elif "embed_tokens" in name:
        values = rc.normalish(n, seed, 1.7)
    else:
        values = rc.normalish(n, seed, 1.7 / math.sqrt(shape[1]))
    return values.astype(np.float32).reshape(shape)


def build_base_model():
    from transformers import PhiForCausalLM

    torch.manual_seed(0)  # only transformers' init, overwritten below
    model = PhiForCausalLM._from_config(phi_config(), attn_implementation="eager").float().eval()
    with torch.no_grad():
        for k, (name, p) in enumerate(sorted(model.named_parameters())):
            p.copy_(torch.from_numpy(base_weight_values(name, tuple(p.shape), stream(6000 + k))))
    return model


def load_folder(path: str, **kwargs):
    from transformers import PhiForCausalLM

    return PhiForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32, **kwargs).eval()


def bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def nf4_round_trip_linears(model) -> None:
    """Replaces every base nn.Linear weight except lm_head by its NF4 round trip (what QLoRA computes with)."""
    import bitsandbytes.functional as F

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(F.dequantize_4bit(*F.quantize_4bit(module.weight.data, **NF4)))


# ----------------------------------------------------------------------------------------------- adapter


def peft_key(parameter_name: str) -> str:
    """named_parameters() name -> the key PEFT writes in adapter_model.safetensors."""
    return parameter_name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


def trainable(peft_model) -> dict:
    return {peft_key(n): p for n, p in peft_model.named_parameters() if p.requires_grad}


def adapter_init_values(peft_model) -> dict:
    """The documented portable start values of every trainable tensor, by PEFT key.

    lora_A of layer l, target m: normalish(stream(7000 + 100 l + 10 m), scale 1/sqrt(in)); lora_B: the
    stream of tag + 1, scale 0.1.  modules_to_save copies: base + normalish(scale 0.01), streams 7500
    (embed_tokens), 7501/7502 (lm_head weight/bias).
    """
    values = {}
    params = trainable(peft_model)
    for layer in range(LAYERS):
        for m, target in enumerate(TARGETS):
            block = "mlp" if target.startswith("fc") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
            a, b = params[prefix + ".lora_A.weight"], params[prefix + ".lora_B.weight"]
            tag = 7000 + 100 * layer + 10 * m
            values[prefix + ".lora_A.weight"] = rc.normalish(a.numel(), stream(tag), 1.0 / math.sqrt(a.shape[1]))
            values[prefix + ".lora_B.weight"] = rc.normalish(b.numel(), stream(tag + 1), 0.1)
    for tag, key in enumerate(["base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight",
                                "base_model.model.lm_head.bias"], start=7500):
        values[key] = params[key].detach().numpy().reshape(-1) + rc.normalish(params[key].numel(), stream(tag), 0.01)
    assert set(values) == set(params), sorted(set(values) ^ set(params))
    return {k: torch.from_numpy(v.astype(np.float32)).reshape(params[k].shape) for k, v in values.items()}


def attach_adapter(model, init: dict | None):
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    peft_model = get_peft_model(model, LoraConfig(**LORA))
    params = trainable(peft_model)
    assert set(params) == set(get_peft_model_state_dict(peft_model)), "peft key naming changed"
    if init is None:
        init = adapter_init_values(peft_model)
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(init[key])
    return peft_model, init


# -------------------------------------------------------------------------------------------------- data


def tokens(n: int, tag: int) -> list:
    """n ordinary token ids in 1..198 (never the eos/pad id 199) from stream(tag)."""
    return [int(v) for v in rc.random_u32(n, stream(tag)) % (VOCAB - 2) + 1]


def padded_case() -> dict:
    rows, prompts, S = [12, 8], [4, 3], 12
    ids = torch.full((2, S), EOS, dtype=torch.int32)
    labels = torch.full((2, S), -100, dtype=torch.int32)
    mask = torch.zeros((2, S), dtype=torch.int32)
    for r, (n, p) in enumerate(zip(rows, prompts)):
        ids[r, :n] = torch.tensor(tokens(n, 8000 + r), dtype=torch.int32)
        labels[r, p:n] = ids[r, p:n]
        mask[r, :n] = 1
    positions = torch.arange(S, dtype=torch.int32).repeat(2, 1)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions}


def pack(samples: list, prompt_lengths: list) -> dict:
    ids, labels, positions, cu = [], [], [], [0]
    for sample, p in zip(samples, prompt_lengths):
        assert 0 <= p < len(sample), (p, len(sample))
        ids += sample
        labels += [-100] * p + sample[p:]
        positions += list(range(len(sample)))
        cu.append(cu[-1] + len(sample))
    as_row = lambda v: torch.tensor([v], dtype=torch.int32)  # noqa: E731
    return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions),
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}


def packed_case() -> dict:
    lengths, prompts = [7, 1, 12], [3, 0, 4]
    return pack([tokens(n, 8100 + i) for i, n in enumerate(lengths)], prompts)


def curve_batch(i: int) -> dict:
    """Packed row of CURVE_LEN tokens: 2-4 samples, each an arithmetic run start + k*step over 1..198."""
    u = rc.uniform01(16, stream(8200 + i))
    count = 2 + int(u[0] * 3)
    spare = CURVE_LEN - 4 * count  # every sample has at least 4 tokens; the rest is split at random points
    points = [0, *sorted(int(u[1 + j] * (spare + 1)) for j in range(count - 1)), spare]
    samples = []
    for j in range(count):
        start, step = int(u[8 + j] * 198), 1 + int(u[12 + j] * 5)
        samples.append([1 + (start + k * step) % 198 for k in range(4 + points[j + 1] - points[j])])
    return pack(samples, [2] * len(samples))


def forward_kwargs(case: dict) -> dict:
    # use_cache=False: with a cache (the config default) transformers 5 skips the packed-row detection and
    # a packed row silently gets one causal mask across its samples.
    kwargs = {k: case[k].long() for k in ("input_ids", "labels", "position_ids")} | {"use_cache": False}
    if "attention_mask" in case:
        kwargs["attention_mask"] = case["attention_mask"].long()
    return kwargs


def run_case(peft_model, case: dict):
    """logits, loss and the gradient of every trainable tensor (by PEFT key) of the model's own forward."""
    peft_model.zero_grad(set_to_none=True)
    out = peft_model(**forward_kwargs(case))
    out.loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in trainable(peft_model).items()}
    peft_model.zero_grad(set_to_none=True)
    return out.logits.detach().float(), out.loss.detach().float().reshape(1), grads


def per_sample_packed(peft_model, case: dict):
    """Each sample of a packed row alone, logits concatenated, the model's loss function over the whole row."""
    cu = case["cu_seqlens"].tolist()
    ids = case["input_ids"].long()
    with torch.no_grad():
        logits = torch.cat([peft_model(input_ids=ids[:, a:b]).logits for a, b in zip(cu, cu[1:])], dim=1)
        loss = peft_model.base_model.model.loss_function(logits, case["labels"].long(), vocab_size=VOCAB)
    return logits, loss


# ------------------------------------------------------------------------------------------------ checks


def finite_difference_check(peft_model, case: dict, grads: dict, label: str) -> list:
    """Central differences in float64 for three gradient entries; returns the records."""
    model64 = copy.deepcopy(peft_model).double()
    params64 = trainable(model64)
    kwargs = forward_kwargs(case)
    labels = kwargs.pop("labels")

    def loss64() -> float:
        # the model's loss function upcasts to fp32 only, too coarse for a difference quotient: same maths in fp64
        logits = model64(**kwargs).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100).item()

    picks = [("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", (1, 5)),
             ("base_model.model.model.layers.1.mlp.fc1.lora_B.weight", (17, 2)),
             ("base_model.model.lm_head.bias", (37,))]
    h = 1e-5
    softmax = torch.nn.functional.softmax

    def softmax_keeping_fp64(x, dim=None, _stacklevel=3, dtype=None):
        # eager attention asks for an fp32 softmax: rounding noise far above h's effect; keep fp64 here
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)

    torch.nn.functional.softmax = softmax_keeping_fp64
    try:
        return finite_differences(params64, loss64, grads, picks, h, label)
    finally:
        torch.nn.functional.softmax = softmax


def finite_differences(params64, loss64, grads, picks, h, label) -> list:
    records = []
    with torch.no_grad():
        for key, index in picks:
            p = params64[key]
            original = p[index].item()
            p[index] = original + h
            up = loss64()
            p[index] = original - h
            down = loss64()
            p[index] = original
            numeric = (up - down) / (2 * h)
            analytic = grads[key][index].item()
            rel = abs(numeric - analytic) / max(abs(numeric), 1e-6)
            records.append({"case": label, "key": key, "index": list(index), "analytic_fp32": analytic,
                            "central_difference_fp64": numeric, "relative_error": rel})
            assert rel < 1e-3, records[-1]
    return records


def check_bnb_folder(fp32_folder_model, q4_dir: str) -> dict:
    """The pre-quantized checkpoint: packed weights == quantize_4bit(fp32 W); reload gives the same logits."""
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    saved = load_file(os.path.join(q4_dir, "model.safetensors"))
    quantized = sorted(k[: -len(".absmax")] for k in saved if k.endswith(".weight.absmax"))
    assert len(quantized) == 6 * LAYERS, quantized
    for wkey in quantized:
        w = fp32_folder_model.get_parameter(wkey).data
        packed, state = F.quantize_4bit(w, **NF4)
        assert torch.equal(packed, saved[wkey]) and torch.equal(state.absmax, saved[wkey + ".absmax"]), wkey
        assert torch.equal(state.state2.absmax, saved[wkey + ".nested_absmax"]), wkey
    return {"quantized_weights": quantized,
            "not_quantized": sorted(k for k in saved if not any(k.startswith(q) for q in quantized))}


# -------------------------------------------------------------------------------------------------- main


def bnb_adamw(params):
    import bitsandbytes as bnb

    return bnb.optim.AdamW(params, optim_bits=32, **OPTIM)


def torch_adamw(params):
    return torch.optim.AdamW(params, **OPTIM)


def train_curve(peft_model, batches: list, make_optimizer):
    params = list(trainable(peft_model).values())
    optimizer = make_optimizer(params)
    peft_model.train()
    losses = []
    for step in range(STEPS):
        window = batches[ACCUMULATION * step: ACCUMULATION * (step + 1)]
        num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        step_loss = 0.0
        for batch in window:
            loss = peft_model(**forward_kwargs(batch), num_items_in_batch=num_items).loss
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    peft_model.eval()
    return torch.tensor(losses, dtype=torch.float32), {k: p.detach().clone() for k, p in trainable(peft_model).items()}


def check_bnb_adamw_matches_torch() -> float:
    a = torch.nn.Parameter(torch.from_numpy(rc.normalish(256, stream(8300))))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = bnb_adamw([a]), torch_adamw([b])
    for i in range(5):
        g = torch.from_numpy(rc.normalish(256, stream(8301 + i)))
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    diff = (a - b).abs().max().item()
    assert diff < 1e-6, diff
    return diff


def resize_reference() -> tuple:
    model = load_folder(MODEL_DIR)
    old_embed = model.model.embed_tokens.weight.detach().clone()
    old_head_w, old_head_b = model.lm_head.weight.detach().clone(), model.lm_head.bias.detach().clone()
    torch.manual_seed(0)  # mean_resizing draws from torch's RNG
    model.resize_token_embeddings(RESIZE_TO, pad_to_multiple_of=RESIZE_MULTIPLE)
    embed = model.model.embed_tokens.weight.detach().clone()
    head_w, head_b = model.lm_head.weight.detach().clone(), model.lm_head.bias.detach().clone()
    n_new = ((RESIZE_TO + RESIZE_MULTIPLE - 1) // RESIZE_MULTIPLE) * RESIZE_MULTIPLE
    assert embed.shape == (n_new, 64) and head_w.shape == (n_new, 64) and head_b.shape == (n_new,)
    assert model.config.vocab_size == n_new
    assert torch.equal(embed[:VOCAB], old_embed) and torch.equal(head_w[:VOCAB], old_head_w)
    assert torch.equal(head_b[:VOCAB], old_head_b)
    dev = {
        "embed_tokens": (embed[VOCAB:] - old_embed.mean(0)).abs().max().item(),
        "lm_head.weight": (head_w[VOCAB:] - old_head_w.mean(0)).abs().max().item(),
        "lm_head.bias": (head_b[VOCAB:] - old_head_b.mean()).abs().max().item(),
    }
    # std of one drawn coordinate is sqrt(1e-9 * Sigma_ii) <= this bound (bias: 1e-9 * std(bias))
    noise_std = {
        "embed_tokens": math.sqrt(1e-9 * old_embed.var(0, unbiased=False).max().item()),
        "lm_head.weight": math.sqrt(1e-9 * old_head_w.var(0, unbiased=False).max().item()),
        "lm_head.bias": 1e-9 * old_head_b.std().item(),
    }
    tensors = {"resize.embed_tokens": embed, "resize.lm_head.weight": head_w, "resize.lm_head.bias": head_b}
    return tensors, dev, noise_std, n_new


def main():
    import logging
    import warnings

    import bitsandbytes
    import peft
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    # 1. the fp32 checkpoint, sharded
    for d in (MODEL_DIR, BNB_DIR):
        shutil.rmtree(d, ignore_errors=True)
    base = build_base_model()
    base.save_pretrained(MODEL_DIR, max_shard_size="300KB")
    shards = sorted(f for f in os.listdir(MODEL_DIR) if f.endswith(".safetensors"))
    assert len(shards) == 2 and os.path.exists(os.path.join(MODEL_DIR, "model.safetensors.index.json")), shards

    # 2. the QLoRA reference model: fp32 Phi with NF4-round-tripped linears + the adapter
    nf4_round_trip_linears(base)
    peft_model, init = attach_adapter(base, None)
    cases = {"padded": padded_case(), "packed": packed_case()}
    results = {name: run_case(peft_model, case) for name, case in cases.items()}

    logits_alone, loss_alone = per_sample_packed(peft_model, cases["packed"])
    packed_vs_alone = (logits_alone - results["packed"][0]).abs().max().item()
    assert packed_vs_alone < 2e-6 and abs(loss_alone.item() - results["packed"][1].item()) < 2e-6, packed_vs_alone

    fd = []
    for name, case in cases.items():
        fd += finite_difference_check(peft_model, case, results[name][2], name)

    # 3. re-loading the folder reproduces the padded logits bit for bit
    reloaded = load_folder(MODEL_DIR)
    nf4_round_trip_linears(reloaded)
    again, _ = attach_adapter(reloaded, init)
    reload_logits, reload_loss, _ = run_case(again, cases["padded"])
    assert torch.equal(reload_logits, results["padded"][0]) and torch.equal(reload_loss, results["padded"][1])

    # 4. the real QLoRA model (bitsandbytes Linear4bit, compute fp32) agrees bit for bit; save its checkpoint
    qmodel = load_folder(MODEL_DIR, quantization_config=bnb_config(), device_map="cpu")
    qmodel.save_pretrained(BNB_DIR)
    with torch.no_grad():
        q_base_logits = qmodel(**forward_kwargs(cases["padded"])).logits
    qpeft, _ = attach_adapter(qmodel, init)
    q_logits, q_loss, q_grads = run_case(qpeft, cases["padded"])
    ref_logits, ref_loss, ref_grads = results["padded"]
    assert torch.equal(q_logits, ref_logits) and torch.equal(q_loss, ref_loss)
    assert all(torch.equal(q_grads[k], ref_grads[k]) for k in ref_grads)
    bnb_layout = check_bnb_folder(load_folder(MODEL_DIR), BNB_DIR)
    with torch.no_grad():
        reloaded_q = load_folder(BNB_DIR, device_map="cpu")
        assert torch.equal(reloaded_q(**forward_kwargs(cases["padded"])).logits, q_base_logits)

    # 5. training curve
    batches = [curve_batch(i % CURVE_DISTINCT) for i in range(STEPS * ACCUMULATION)]
    adamw_diff = check_bnb_adamw_matches_torch()
    losses, final = train_curve(peft_model, batches, bnb_adamw)
    assert losses[-1] < losses[0] - 1.0, losses
    # the same run with torch.optim.AdamW: how far algebraically equal float orders drift in 20 steps
    torch_losses, torch_final = train_curve(again, batches, torch_adamw)
    curve_drift = {"losses_max_abs_diff": (torch_losses - losses).abs().max().item(),
                   "final_max_abs_diff": max((torch_final[k] - final[k]).abs().max().item() for k in final)}

    # 6. resize
    resize_tensors, resize_dev, resize_noise_std, resize_n = resize_reference()

    tensors = {f"lora_init.{k}": v for k, v in init.items()}
    for name, case in cases.items():
        logits, loss, grads = results[name]
        tensors.update({f"{name}.{k}": v for k, v in case.items()})
        tensors.update({f"{name}.logits": logits, f"{name}.loss": loss})
        tensors.update({f"{name}.grad.{k}": v for k, v in grads.items()})
    for i, batch in enumerate(batches):
        tensors.update({f"curve.batch{i}.{k}": v for k, v in batch.items()})
    tensors["curve.losses"] = losses
    tensors.update({f"curve.final.{k}": v for k, v in final.items()})
    tensors.update(resize_tensors)

    lora_meta = {k: LORA[k] for k in ("r", "lora_alpha", "target_modules", "modules_to_save", "lora_dropout",
                                      "bias", "task_type")}
    rc.save(REFERENCE, tensors, {
        "description": "tiny Phi + PEFT QLoRA references; see tests/reference/phi_model.py",
        "script": "tests/reference/phi_model.py",
        "model_dir": "tests/data/models/tiny_phi",
        "peft": peft.__version__,
        "lora_config": lora_meta,
        "lora_scaling": LORA["lora_alpha"] / LORA["r"],
        "quantization": {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "double_quant_blocksize": 256,
                         "compute_dtype": "float32", "quantized": "every nn.Linear except lm_head",
                         "reference_forward": "fp32 Phi with W := dequantize_4bit(quantize_4bit(W_fp32)); checked "
                                              "bit-identical to bitsandbytes Linear4bit (logits, loss, grads)"},
        "attn_implementation": "eager",
        "cases": {
            "padded": "right padding, attention_mask 0 on pads (pad id 199), labels -100 on prompt and pads, "
                      "position_ids 0..S-1; model(input_ids, attention_mask, position_ids, labels)",
            "packed": "one row, cu_seqlens boundaries, positions restart; model(input_ids, position_ids, labels) "
                      "with attention_mask None: transformers' packed-sequence (block-diagonal causal) mask; loss "
                      "over the whole row with the row-level shift (crosses sample boundaries)",
            "loss": "mean CE over shifted labels != -100 (ForCausalLMLoss)",
            "mask": "key j is visible to query i iff j <= i and attention_mask[j] == 1 (masking_utils causal and "
                    "padding mask functions; masked scores get finfo(float32).min added); so pad positions have "
                    "logits too (their query sees the non-pad keys before it)",
            "packed_vs_per_sample_max_abs_logit_diff": packed_vs_alone,
        },
        "finite_difference_checks": fd,
        "curve": {"steps": STEPS, "gradient_accumulation": ACCUMULATION, "micro_batch": "curve.batch<2k>, "
                  "curve.batch<2k+1> for step k; each a packed row of 32", "loss_per_micro_batch":
                  "sum CE / num_items_in_batch (shifted labels != -100 over both micro-batches)",
                  "curve.losses": "per step, sum of its micro-batch losses, before the update",
                  "optimizer": "bitsandbytes.optim.AdamW(optim_bits=32) on CPU", **OPTIM,
                  "bnb_vs_torch_adamw_max_abs_diff_5_steps": adamw_diff,
                  "same_curve_with_torch_adamw": curve_drift, "lr_schedule": "constant",
                  "max_grad_norm": MAX_GRAD_NORM, "clip": "torch.nn.utils.clip_grad_norm_ over trainable params",
                  "dropout": 0.0, "mode": "train() (dropout 0, so the same maths as eval)"},
        "resize": {"call": f"resize_token_embeddings({RESIZE_TO}, pad_to_multiple_of={RESIZE_MULTIPLE})",
                   "applied_to": "the fp32 base model of tests/data/models/tiny_phi (no adapter)",
                   "new_vocab": resize_n, "rows_copied": VOCAB,
                   "new_rows": "mean_resizing: matrices ~ N(row mean, 1e-9 * centered covariance / old_n), bias ~ "
                               "N(mean(bias), (1e-9 * std(bias))^2), torch.manual_seed(0) before the call",
                   "resize_max_abs_dev_from_mean": resize_dev, "noise_std_bound": resize_noise_std},
        "bnb4bit_checkpoint": {"dir": "tests/data/models/tiny_phi_bnb4bit", **bnb_layout,
                               "checks": "packed weights/absmax/nested_absmax == quantize_4bit(fp32 W); reload "
                                         "logits == on-the-fly quantized model's"},
        "bitsandbytes": bitsandbytes.__version__,
    }, max_bytes=3 << 19)

    for d in (MODEL_DIR, BNB_DIR):
        for f in os.listdir(d):
            os.chmod(os.path.join(d, f), 0o644)
    print("curve.losses", [round(v, 4) for v in losses.tolist()])
    print("finite differences", json.dumps([round(r["relative_error"], 7) for r in fd]))
    print("resize deviations", resize_dev)


if __name__ == "__main__":
    main()
