"""Reference fixtures for the output head and the causal-LM loss (nn/lm_head.hpp, nn/cross_entropy.hpp).

Re-create with:  .venv/bin/python tests/reference/nn_loss.py

Writes tests/data/nn/loss_<case>.safetensors, one file per case:

  batch_rows    4 rows x 9 tokens, H 96, V 1037, bias; a prompt-masked row, an
                all-masked row, an unmasked row, a right-padded row;
                num_items_in_batch = count + 5 (a gradient-accumulation window)
  packed        1 packed row of 40 tokens (3 samples), H 64, V 700, no bias
                (InternLM2-like); the shift crosses sample boundaries; mean loss
  short         1 row of 5 tokens (fewer than a chunk), H 48, V 300, bias
  large_logits  2 rows x 6 tokens, H 32, V 520, bias + 150 (every logit near
                150: exp overflows fp32 without max subtraction)

Inputs (not stored; C++ regenerates them with _refcommon.normalish, k = case seed):
  hidden = normalish(T*H, 100k+1, 1.0)          float32 [T, H]
  weight = normalish(V*H, 100k+2, w_scale)      float32 [V, H]
  bias   = normalish(V,   100k+3, 0.5) + offset float32 [V] (offset added in float32)

Stored tensors:
  labels        I32 [B, L]   unshifted labels, -100 = not supervised
  targets       I32 [B*L]    the labels as transformers' ForCausalLMLoss shifts them
                             (pad with -100, drop the first); checked here to give
                             exactly ForCausalLMLoss's loss
  logits_true   F32 [T, V]   float64 h.W^T + b, rounded once
  loss_sum_true F64 [1]      float64 sum of CE over targets != -100
  dhidden_true, dweight_true, dbias_true  F32: float64 autograd of grad_scale * loss_sum,
                grad_scale = 1/num_items_in_batch (or 1/count for the mean), rounded once
Metadata "case": T, H, V, rows, row_length, seed, w_scale, bias, bias_offset, count,
num_items, grad_scale (float32 value torch's backward multiplies by), probes (hex bits of
elements 0, 1, -1 of hidden, weight, bias), and "torch": for logits/dhidden/dweight/dbias
the max_abs_err and rms_err of torch's float32 run (F.linear + ForCausalLMLoss + autograd)
against the float64 truth, and its loss_sum's abs error; "torch.floor" and
"torch.loss_sum_floor_abs_err": the same errors of the float64 gradients and loss of the truth's
logits rounded once to float32 (what the logits' own rounding forces on any float32
implementation; it dominates where the logits are large).
"""

from __future__ import annotations

import math
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

import _refcommon as rc

OUT_DIR = os.path.join(rc.DATA_DIR, "nn")
IGNORE = -100


def labels_for(case) -> np.ndarray:
    """Unshifted labels [rows, row_length]: token ids, prompts / padding set to -100."""
    rows, length, vocab = case["rows"], case["row_length"], case["V"]
    ids = (rc.random_u32(rows * length, 100 * case["seed"] + 4) % vocab).astype(np.int32).reshape(rows, length)
    labels = ids.copy()
    for row, masked in enumerate(case["masked"]):
        for start, stop in masked:
            labels[row, start:stop] = IGNORE
    return labels


CASES = [
    dict(name="batch_rows", seed=1, rows=4, row_length=9, H=96, V=1037, w_scale=0.3, bias=True, bias_offset=0.0,
         masked=[[(0, 3)], [(0, 9)], [], [(0, 1), (7, 9)]], extra_items=5),
    # Samples at [0, 13), [13, 29), [29, 40); the first two have 4-token prompts, the last none,
    # so position 28 (last token of sample 2) gets sample 3's first token as target.
    dict(name="packed", seed=2, rows=1, row_length=40, H=64, V=700, w_scale=0.4, bias=False, bias_offset=0.0,
         masked=[[(0, 4), (13, 17)]], extra_items=None),
    dict(name="short", seed=3, rows=1, row_length=5, H=48, V=300, w_scale=0.5, bias=True, bias_offset=0.0,
         masked=[[(0, 1)]], extra_items=0),
    dict(name="large_logits", seed=4, rows=2, row_length=6, H=32, V=520, w_scale=2.0, bias=True, bias_offset=150.0,
         masked=[[(0, 2)], [(5, 6)]], extra_items=0),
]


def hex_bits(values: np.ndarray) -> list:
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    return [struct.pack(">f", float(flat[i])).hex() for i in (0, 1, -1)]


def errors(got: torch.Tensor, truth: torch.Tensor) -> dict:
    d = (got.double() - truth.double()).abs()
    return {"max_abs_err": float(d.max()), "rms_err": float(d.pow(2).mean().sqrt())}


def run(case) -> None:
    k, T, H, V = case["seed"], case["rows"] * case["row_length"], case["H"], case["V"]
    hidden = torch.from_numpy(rc.normalish(T * H, 100 * k + 1, 1.0)).reshape(T, H)
    weight = torch.from_numpy(rc.normalish(V * H, 100 * k + 2, case["w_scale"])).reshape(V, H)
    bias = None
    if case["bias"]:
        bias = torch.from_numpy(rc.normalish(V, 100 * k + 3, 0.5) + np.float32(case["bias_offset"]))
    labels_np = labels_for(case)
    labels = torch.from_numpy(labels_np).long()

    # transformers' shift, spelled out so the C++ test can compare targets; proven equal below.
    targets = F.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1)
    count = int((targets != IGNORE).sum())
    num_items = None if case["extra_items"] is None else count + case["extra_items"]

    # torch float32, the way a transformers causal LM computes it.
    h32 = hidden.clone().requires_grad_(True)
    w32 = weight.clone().requires_grad_(True)
    b32 = bias.clone().requires_grad_(True) if bias is not None else None
    logits32 = F.linear(h32, w32, b32)
    n_tensor = None if num_items is None else torch.tensor(num_items)
    loss32 = ForCausalLMLoss(logits32.view(case["rows"], case["row_length"], V), labels, V,
                             num_items_in_batch=n_tensor)
    loss32.backward()
    sum32 = F.cross_entropy(logits32.detach(), targets, ignore_index=IGNORE, reduction="sum")
    divisor = count if num_items is None else num_items
    same = F.cross_entropy(logits32.detach(), targets, ignore_index=IGNORE,
                           reduction="mean" if num_items is None else "sum")
    if num_items is not None:
        same = same / n_tensor
    assert torch.equal(same, loss32.detach()), "the spelled-out shift differs from ForCausalLMLoss"

    # float64 truth of the same maths on the same (float32-exact) inputs.
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    b64 = bias.double().requires_grad_(True) if bias is not None else None
    logits64 = F.linear(h64, w64, b64)
    sum64 = F.cross_entropy(logits64, targets, ignore_index=IGNORE, reduction="sum")
    (sum64 / divisor).backward()

    # The floor: the float64 gradient of the exact logits rounded once to float32 (what the best
    # float32-logit implementation returns; where the logits are large, e.g. near 150, this
    # rounding dominates every float32 implementation's gradient error).
    z_rounded = logits64.detach().float().double().requires_grad_(True)
    sum_rounded = F.cross_entropy(z_rounded, targets, ignore_index=IGNORE, reduction="sum")
    (sum_rounded / divisor).backward()
    floor = {"dhidden": z_rounded.grad @ weight.double(), "dweight": z_rounded.grad.T @ hidden.double(),
             "dbias": z_rounded.grad.sum(0)}

    grad_scale = float(np.float32(1.0 / divisor))
    tensors = {
        "labels": torch.from_numpy(labels_np),
        "targets": targets.to(torch.int32),
        "logits_true": logits64.detach().float(),
        "loss_sum_true": sum64.detach().reshape(1),
        "dhidden_true": h64.grad.float(),
        "dweight_true": w64.grad.float(),
    }
    stats = {
        "logits": errors(logits32.detach(), logits64.detach()),
        "dhidden": errors(h32.grad, h64.grad),
        "dweight": errors(w32.grad, w64.grad),
        "floor": {name: errors(floor[name], grad) for name, grad in
                  (("dhidden", h64.grad), ("dweight", w64.grad)) + ((("dbias", b64.grad),) if bias is not None else ())},
        "loss_sum_floor_abs_err": abs(float(sum_rounded.detach()) - float(sum64.detach())),
        "loss_sum_abs_err": abs(float(sum32) - float(sum64.detach())),
    }
    probes = {"hidden": hex_bits(hidden.numpy()), "weight": hex_bits(weight.numpy())}
    if bias is not None:
        tensors["dbias_true"] = b64.grad.float()
        stats["dbias"] = errors(b32.grad, b64.grad)
        probes["bias"] = hex_bits(bias.numpy())
    meta = {k2: case[k2] for k2 in ("seed", "rows", "row_length", "H", "V", "w_scale", "bias", "bias_offset")}
    meta.update(T=T, count=count, num_items=num_items, grad_scale=grad_scale, probes=probes, torch=stats,
                torch_loss=float(loss32.detach()))
    assert math.isfinite(float(sum64.detach()))
    rc.save(os.path.join(OUT_DIR, f"loss_{case['name']}.safetensors"), tensors, {"case": meta})


def main() -> None:
    torch.set_num_threads(1)
    for case in CASES:
        run(case)


if __name__ == "__main__":
    main()
