"""Reference fixture for the element-wise and per-row ops of nn/ (forward and backward).

Writes tests/data/nn/elementwise.safetensors (run:
``.venv/bin/python tests/reference/nn_elementwise.py``; ~20 s, mostly importing transformers).

What runs (torch CPU, float32, ``torch.set_num_threads(1)``; gradients from autograd):
  * layer_norm : torch.nn.LayerNorm(H, eps, bias=...)   (Phi-2's input/final layernorm)
  * rms_norm   : transformers.models.llama.modeling_llama.LlamaRMSNorm(H, eps)
                 (the same maths as InternLM2RMSNorm: fp32 mean(x^2), x*rsqrt(var+eps), * weight)
  * gelu_new   : transformers.activations.NewGELUActivation   (Phi-2's hidden_act)
  * silu       : torch.nn.functional.silu
  * swiglu     : F.silu(gate) * up                              (InternLM2's w2(silu(w1 x) * w3 x))
  * embedding  : torch.nn.functional.embedding(ids, table[, padding_idx])

Inputs are drawn with _refcommon.normalish (portable; values in [-2, 2) * scale) and stored
next to the results, so the C++ tests read everything from the file.  Case k uses seeds
100k+1, 100k+2, ... for its inputs in the order listed below.

Tensors, per case <c> (all F32 unless noted):
  norm cases (layer_norm_*, rms_norm_*):
    <c>.x [T,H] (normalish*2 + offset: a row mean far from 0 tests the centring), <c>.weight [H]
    (1 + normalish*0.2), <c>.bias [H] (layer_norm with bias only), <c>.dy [T,H];
    results <c>.y, <c>.dx, <c>.dweight, <c>.dbias (with bias), and the saved statistics
    <c>.mean / <c>.rstd [T] computed as torch's kernel returns them
    (torch.ops.aten.native_layer_norm; rms_norm: rsqrt(mean(x^2)+eps) as LlamaRMSNorm does).
  element-wise cases (gelu_new_*, silu_*): <c>.x, <c>.dy, results <c>.y, <c>.dx (any shape).
  swiglu_*: <c>.gate, <c>.up, <c>.dout [T,F]; results <c>.out, <c>.dgate, <c>.dup.
  embedding_*: <c>.table [V,H], <c>.ids I32 [T] (with repeats), <c>.dout [T,H];
    results <c>.out [T,H] and <c>.dtable [V,H] (the gradient of a zero-initialised table).

``__metadata__["cases"]``: JSON list of {name, op, shape fields, eps, bias, padding_idx}.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import _refcommon  # noqa: E402

OUT_PATH = os.path.join(_refcommon.DATA_DIR, "nn", "elementwise.safetensors")


class Draw:
    """Successive normalish streams for one case (seeds 100k+1, 100k+2, ...)."""

    def __init__(self, case_index: int):
        self.next_seed = 100 * case_index + 1

    def __call__(self, shape, scale=1.0, offset=0.0) -> torch.Tensor:
        n = int(np.prod(shape))
        values = _refcommon.normalish(n, self.next_seed, scale)
        self.next_seed += 1
        return torch.from_numpy(values.astype(np.float64) + offset).float().reshape(shape)


def layer_norm_case(name, k, T, H, eps, bias, offset):
    draw = Draw(k)
    x = draw((T, H), 2.0, offset)
    weight = draw((H,), 0.2, 1.0)
    b = draw((H,), 0.5) if bias else None
    dy = draw((T, H))
    module = torch.nn.LayerNorm(H, eps=eps, bias=bias)
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias:
            module.bias.copy_(b)
    xg = x.clone().requires_grad_(True)
    y = module(xg)
    y.backward(dy)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, [H], weight, b, eps)
    tensors = {"x": x, "weight": weight, "dy": dy, "y": y.detach(), "dx": xg.grad,
               "dweight": module.weight.grad, "mean": mean.reshape(T), "rstd": rstd.reshape(T)}
    if bias:
        tensors.update({"bias": b, "dbias": module.bias.grad})
    return tensors, {"name": name, "op": "layer_norm", "T": T, "H": H, "eps": eps, "bias": bias}


def rms_norm_case(name, k, T, H, eps, offset):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    draw = Draw(k)
    x = draw((T, H), 2.0, offset)
    weight = draw((H,), 0.2, 1.0)
    dy = draw((T, H))
    module = LlamaRMSNorm(H, eps=eps)
    with torch.no_grad():
        module.weight.copy_(weight)
    xg = x.clone().requires_grad_(True)
    y = module(xg)
    y.backward(dy)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + eps)  # the statistic LlamaRMSNorm computes
    tensors = {"x": x, "weight": weight, "dy": dy, "y": y.detach(), "dx": xg.grad,
               "dweight": module.weight.grad, "rstd": rstd}
    return tensors, {"name": name, "op": "rms_norm", "T": T, "H": H, "eps": eps}


def unary_case(name, k, op, module, shape, scale):
    draw = Draw(k)
    x = draw(shape, scale)
    dy = draw(shape)
    xg = x.clone().requires_grad_(True)
    y = module(xg)
    y.backward(dy)
    return {"x": x, "dy": dy, "y": y.detach(), "dx": xg.grad}, {"name": name, "op": op, "shape": list(shape)}


def swiglu_case(name, k, T, Fdim, scale):
    draw = Draw(k)
    gate = draw((T, Fdim), scale)
    up = draw((T, Fdim), scale)
    dout = draw((T, Fdim))
    gg = gate.clone().requires_grad_(True)
    ug = up.clone().requires_grad_(True)
    out = F.silu(gg) * ug
    out.backward(dout)
    return ({"gate": gate, "up": up, "dout": dout, "out": out.detach(), "dgate": gg.grad, "dup": ug.grad},
            {"name": name, "op": "swiglu", "T": T, "F": Fdim})


def embedding_case(name, k, V, H, ids, padding_idx=None):
    draw = Draw(k)
    table = draw((V, H))
    dout = draw((len(ids), H))
    ids_t = torch.tensor(ids, dtype=torch.int32)
    tg = table.clone().requires_grad_(True)
    out = F.embedding(ids_t, tg, padding_idx=padding_idx)
    out.backward(dout)
    meta = {"name": name, "op": "embedding", "V": V, "H": H, "T": len(ids), "padding_idx": padding_idx}
    return {"table": table, "ids": ids_t, "dout": dout, "out": out.detach(), "dtable": tg.grad}, meta


def main():
    torch.set_num_threads(1)
    from transformers.activations import NewGELUActivation

    gelu_new = NewGELUActivation()
    builders = [
        lambda k: layer_norm_case("layer_norm_bias", k, 7, 40, 1e-5, True, 0.0),
        lambda k: layer_norm_case("layer_norm_odd", k, 5, 13, 1e-5, True, 3.0),
        lambda k: layer_norm_case("layer_norm_one_token", k, 1, 264, 1e-5, True, -1.0),
        lambda k: layer_norm_case("layer_norm_no_bias", k, 6, 96, 1e-6, False, 0.5),
        lambda k: rms_norm_case("rms_norm", k, 7, 40, 1e-5, 0.0),
        lambda k: rms_norm_case("rms_norm_odd", k, 5, 13, 1e-6, 1.0),
        lambda k: rms_norm_case("rms_norm_one_token", k, 1, 264, 1e-5, 0.0),
        # scale 4: values in [-8, 8), past both tails of tanh and exp
        lambda k: unary_case("gelu_new", k, "gelu_new", gelu_new, (9, 150), 4.0),
        lambda k: unary_case("gelu_new_odd", k, "gelu_new", gelu_new, (3, 5, 7), 1.0),
        lambda k: unary_case("silu", k, "silu", F.silu, (9, 150), 4.0),
        lambda k: unary_case("silu_odd", k, "silu", F.silu, (1, 13), 1.0),
        lambda k: swiglu_case("swiglu", k, 6, 37, 3.0),
        lambda k: swiglu_case("swiglu_one_token", k, 1, 64, 1.0),
        lambda k: embedding_case("embedding", k, 11, 13, [3, 0, 10, 3, 7, 3, 0, 5, 10]),
        lambda k: embedding_case("embedding_one_token", k, 4, 24, [2]),
        lambda k: embedding_case("embedding_padding", k, 9, 8, [1, 4, 4, 0, 8, 4, 2], padding_idx=4),
    ]
    tensors, cases = {}, []
    for k, build in enumerate(builders, start=1):
        case_tensors, meta = build(k)
        meta["seed_base"] = 100 * k
        for key, value in case_tensors.items():
            tensors[f"{meta['name']}.{key}"] = value.detach().contiguous()
        cases.append(meta)
    _refcommon.save(OUT_PATH, tensors, {"cases": cases, "generator": "tests/reference/nn_elementwise.py"})


if __name__ == "__main__":
    main()
