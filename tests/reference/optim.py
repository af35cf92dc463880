"""Reference fixtures for the optim/ layer: AdamW (bitsandbytes paged_adamw_32bit maths),
torch's clip_grad_norm_, and transformers' LR schedules.

Writes (run: ``.venv/bin/python tests/reference/optim.py``; a few seconds)
  tests/data/optim/adamw.safetensors          AdamW trajectories
  tests/data/optim/clip_grad_norm.safetensors torch.nn.utils.clip_grad_norm_
  tests/data/optim/lr_schedule.safetensors    transformers.get_scheduler, get_warmup_steps

AdamW (adamw.safetensors).  Four parameters (``no_decay`` in the metadata is the one in
the weight-decay-free group, as the Trainer's bias / LayerNorm group), updated STEPS times
with the gradients ``grad.<name>`` [STEPS, ...] and learning rates ``lr`` [STEPS] (F64;
one is 0, as the first step of a warmup).  ``zero_grad`` gets a zero gradient at every
step, ``bias`` at step 3 only; some gradient elements are ~1e-9 so that eps matters.
Initial values ``init.<name>``.  Per case <c>, after all steps: ``<c>.param.<name>``,
``<c>.exp_avg.<name>``, ``<c>.exp_avg_sq.<name>`` (F32).  ``__metadata__["cases"]``: JSON
object case -> {beta1, beta2, eps, weight_decay, decay_order, source}.  Cases:
  bnb_default  bitsandbytes.optim.AdamW(optim_bits=32, is_paged=False) on CPU, wd 0
  bnb_betas    the same with betas (0.8, 0.95), eps 1e-6
  bnb_wd       the same with weight_decay 0.1.  NOTE: bitsandbytes 0.50.2's CPU backend
               (backends/cpu/ops.py) multiplies p by (1 - lr*wd) BEFORE the Adam step;
               its CUDA kernel (csrc/kernels.cu kOptimizer32bit2State, what
               paged_adamw_32bit runs on a GPU) does it AFTER.  So this case is
               decay_order "before_step".
  torch_wd     torch.optim.AdamW(foreach=False), wd 0.1: decay before the step and the
               Adam step arranged as lr/c1 * m / (sqrt(v)/sqrt(c2) + eps) (algebraically
               the bnb formula; rounding differs).
  kernel_wd    wd 0.1, decay AFTER the step: no CUDA here, so this is a float32 torch loop
               that spells out kOptimizer32bit2State<ADAM> line by line (emulate_kernel
               below: float32 betas, powf/sqrtf corrections, no fused multiply-add).

clip_grad_norm.safetensors: three gradients ``grad.g0`` [3,7], ``grad.g1`` [40000],
``grad.g2`` [5]; per case <c>: ``<c>.total`` (F32 scalar, what clip_grad_norm_ returns) and
``<c>.clipped.<name>`` (the gradients after the call; foreach=True, the default).  Cases
(metadata ``cases``: case -> max_norm, scale): ``active`` (norm ~50, max_norm 1),
``inactive`` (max_norm 1000: torch multiplies by the clamped coefficient 1.0),
``tiny`` (gradients scaled by 1e-6, max_norm 1: inactive).

lr_schedule.safetensors: per config i, ``lr.<i>`` F64 [STEPS_LR] = the learning rate after
``k`` scheduler steps (LambdaLR's last_epoch = k), k = 0..STEPS_LR-1, from
transformers.get_scheduler(kind, optimizer(lr=peak), num_warmup_steps, num_training_steps,
scheduler_specific_kwargs).  Metadata ``configs``: JSON list of {kind, peak_lr,
warmup_steps, total_steps, num_cycles}.  ``warmup.ratio`` F64, ``warmup.total`` I64,
``warmup.steps`` I64: TrainingArguments(warmup_steps=ratio).get_warmup_steps(total).
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import torch

from _refcommon import DATA_DIR, normalish, save, uniform01

torch.set_num_threads(1)

OUT_DIR = os.path.join(DATA_DIR, "optim")

# ---------------------------------------------------------------- AdamW

SHAPES = {"lora_A": (4, 6), "lora_B": (5, 4), "bias": (5,), "zero_grad": (3,)}
NO_DECAY = ["bias"]
STEPS = 7
LRS = [1e-3, 2e-3, 0.0, 5e-4, 1e-3, 3e-2, 2e-4]

CASES = {
    "bnb_default": dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decay_order="after_step"),
    "bnb_betas": dict(beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.0, decay_order="after_step"),
    "bnb_wd": dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay_order="before_step"),
    "torch_wd": dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay_order="before_step"),
    "kernel_wd": dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay_order="after_step"),
}


def adamw_inputs():
    init, grads = {}, {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        n = int(np.prod(shape))
        init[name] = torch.from_numpy(normalish(n, 10 + i, 0.5)).reshape(shape)
        g = []
        for step in range(STEPS):
            # magnitudes vary over steps and elements (1e-3 .. 1e1); every 5th element ~1e-9
            scale = 10.0 ** (int(uniform01(1, 20 + i, step)[0] * 4) - 3)
            values = normalish(n, 100 * (i + 1) + step, scale)
            values[::5] *= np.float32(1e-8)
            if name == "zero_grad" or (name == "bias" and step == 3):
                values[:] = 0
            g.append(torch.from_numpy(values).reshape(shape))
        grads[name] = torch.stack(g)
    return init, grads


def param_groups(params, weight_decay):
    decay = [p for n, p in params.items() if n not in NO_DECAY]
    no_decay = [p for n, p in params.items() if n in NO_DECAY]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run_optimizer(make, init, grads):
    params = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    opt = make(param_groups(params, CASE["weight_decay"]))
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = LRS[step]
        for n, p in params.items():
            p.grad = grads[n][step].clone()
        opt.step()
    return params, opt


def emulate_kernel(init, grads):
    """kOptimizer32bit2State<float, ADAM> (bitsandbytes csrc/kernels.cu), float32 throughout:
        correction1 = 1 - powf(beta1, step); correction2 = sqrtf(1 - powf(beta2, step))
        step_size = -lr*correction2/correction1
        s1 = s1*beta1 + (1-beta1)*g;  s2 = s2*beta2 + (1-beta2)*(g*g)
        p = p + step_size*(s1/(sqrtf(s2) + eps*correction2))
        if wd > 0: p = p*(1 - lr*wd)
    Each line is one float32 rounding per operation (nvcc would fuse some into FMAs; the
    C++ under test does not either, so the comparison tolerance covers that)."""
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    b1, b2, eps = f(CASE["beta1"]), f(CASE["beta2"]), f(CASE["eps"])
    params = {n: t.clone() for n, t in init.items()}
    m = {n: torch.zeros_like(t) for n, t in init.items()}
    v = {n: torch.zeros_like(t) for n, t in init.items()}
    for step in range(STEPS):
        t = step + 1
        lr = f(LRS[step])
        c1 = f(1.0) - torch.pow(b1, t)
        c2 = torch.sqrt(f(1.0) - torch.pow(b2, t))
        step_size = -lr * c2 / c1
        for n in params:
            wd = f(0.0 if n in NO_DECAY else CASE["weight_decay"])
            g = grads[n][step]
            m[n] = m[n] * b1 + (f(1.0) - b1) * g
            v[n] = v[n] * b2 + (f(1.0) - b2) * (g * g)
            params[n] = params[n] + step_size * (m[n] / (torch.sqrt(v[n]) + eps * c2))
            if wd > 0:
                params[n] = params[n] * (f(1.0) - lr * wd)
    return params, m, v


def write_adamw():
    global CASE
    import bitsandbytes as bnb

    init, grads = adamw_inputs()
    tensors = {"lr": torch.tensor(LRS, dtype=torch.float64)}
    tensors.update({f"init.{n}": t for n, t in init.items()})
    tensors.update({f"grad.{n}": t for n, t in grads.items()})
    cases = {}
    for case, options in CASES.items():
        CASE = options
        betas = (options["beta1"], options["beta2"])
        if case.startswith("bnb"):
            source = "bitsandbytes.optim.AdamW(optim_bits=32, is_paged=False), CPU backend"
            params, opt = run_optimizer(
                lambda groups: bnb.optim.AdamW(groups, lr=1e-3, betas=betas, eps=options["eps"],
                                               optim_bits=32, is_paged=False), init, grads)
            m = {n: opt.state[p]["state1"] for n, p in params.items()}
            v = {n: opt.state[p]["state2"] for n, p in params.items()}
            assert all(opt.state[p]["step"] == STEPS for p in params.values())
        elif case == "torch_wd":
            source = "torch.optim.AdamW(foreach=False)"
            params, opt = run_optimizer(
                lambda groups: torch.optim.AdamW(groups, lr=1e-3, betas=betas, eps=options["eps"], foreach=False),
                init, grads)
            m = {n: opt.state[p]["exp_avg"] for n, p in params.items()}
            v = {n: opt.state[p]["exp_avg_sq"] for n, p in params.items()}
        else:
            source = "float32 torch emulation of bitsandbytes kOptimizer32bit2State<ADAM> (emulate_kernel)"
            params, m, v = emulate_kernel(init, grads)
        for n in SHAPES:
            tensors[f"{case}.param.{n}"] = params[n].detach().clone()
            tensors[f"{case}.exp_avg.{n}"] = m[n].detach().clone()
            tensors[f"{case}.exp_avg_sq.{n}"] = v[n].detach().clone()
        cases[case] = dict(options, source=source)
    save(os.path.join(OUT_DIR, "adamw.safetensors"), tensors,
         {"cases": cases, "no_decay": NO_DECAY, "steps": STEPS})


# ---------------------------------------------------------------- clipping

CLIP_SHAPES = {"g0": (3, 7), "g1": (40000,), "g2": (5,)}
CLIP_CASES = {"active": dict(max_norm=1.0, scale=1.0), "inactive": dict(max_norm=1000.0, scale=1.0),
              "tiny": dict(max_norm=1.0, scale=1e-6)}


def write_clip():
    base = {}
    for i, (name, shape) in enumerate(CLIP_SHAPES.items()):
        n = int(np.prod(shape))
        base[name] = torch.from_numpy(normalish(n, 300 + i, 1.0 if name != "g1" else 0.4)).reshape(shape)
    tensors = {f"grad.{n}": t for n, t in base.items()}
    for case, c in CLIP_CASES.items():
        params = [torch.nn.Parameter(torch.zeros(s)) for s in CLIP_SHAPES.values()]
        for p, g in zip(params, base.values()):
            p.grad = (g * c["scale"]).clone()  # float32 * python float: one rounding
        total = torch.nn.utils.clip_grad_norm_(params, c["max_norm"])
        tensors[f"{case}.total"] = total.detach().clone()
        for p, n in zip(params, CLIP_SHAPES):
            tensors[f"{case}.clipped.{n}"] = p.grad.clone()
        print(f"clip {case}: total {total.item()}")
    save(os.path.join(OUT_DIR, "clip_grad_norm.safetensors"), tensors, {"cases": CLIP_CASES})


# ---------------------------------------------------------------- schedules

STEPS_LR = 26
SCHEDULES = [
    dict(kind="constant", peak_lr=2e-4, warmup_steps=5, total_steps=20, num_cycles=0.5),  # warmup ignored
    dict(kind="constant_with_warmup", peak_lr=2e-4, warmup_steps=5, total_steps=20, num_cycles=0.5),
    dict(kind="linear", peak_lr=2e-4, warmup_steps=5, total_steps=20, num_cycles=0.5),
    dict(kind="linear", peak_lr=1e-3, warmup_steps=0, total_steps=7, num_cycles=0.5),
    dict(kind="linear", peak_lr=3e-4, warmup_steps=3, total_steps=3, num_cycles=0.5),
    dict(kind="cosine", peak_lr=2e-4, warmup_steps=5, total_steps=20, num_cycles=0.5),
    dict(kind="cosine", peak_lr=1e-3, warmup_steps=3, total_steps=11, num_cycles=1.3),
]
WARMUP_RATIOS = [0.0, 0.03, 0.1, 0.5, 0.999]
WARMUP_TOTALS = [1, 10, 33, 1000, 4321]


def write_schedules():
    from transformers import TrainingArguments, get_scheduler

    tensors = {}
    for i, s in enumerate(SCHEDULES):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=s["peak_lr"])
        kwargs = {"num_cycles": s["num_cycles"]} if s["kind"] == "cosine" else None
        sched = get_scheduler(s["kind"], opt, num_warmup_steps=s["warmup_steps"],
                              num_training_steps=s["total_steps"], scheduler_specific_kwargs=kwargs)
        lrs = []
        for _ in range(STEPS_LR):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        tensors[f"lr.{i}"] = torch.tensor(lrs, dtype=torch.float64)
    ratios, totals, steps = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in WARMUP_RATIOS:
            args = TrainingArguments(output_dir=tmp, warmup_steps=r, report_to=[])
            for t in WARMUP_TOTALS:
                ratios.append(r)
                totals.append(t)
                steps.append(args.get_warmup_steps(t))
    tensors["warmup.ratio"] = torch.tensor(ratios, dtype=torch.float64)
    tensors["warmup.total"] = torch.tensor(totals, dtype=torch.int64)
    tensors["warmup.steps"] = torch.tensor(steps, dtype=torch.int64)
    save(os.path.join(OUT_DIR, "lr_schedule.safetensors"), tensors, {"configs": SCHEDULES})


if __name__ == "__main__":
    write_adamw()
    write_clip()
    write_schedules()
