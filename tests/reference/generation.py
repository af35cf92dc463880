"""Text generation references: transformers' ``generate`` (KV cache) and its sampling warpers, on tiny Phi.

Writes (run: ``nice -n 10 .venv/bin/python tests/reference/generation.py``; a few seconds on one core)
  tests/data/models/generation_reference.safetensors
      The model is the real QLoRA one: ``tests/data/models/tiny_phi_bnb4bit`` loaded by transformers on CPU
      (bitsandbytes Linear4bit, NF4 + double quant, compute fp32) with the PEFT adapter ``lora_init.*`` of
      ``tiny_phi_reference.safetensors`` attached (LoRA on every linear, modules_to_save lm_head and
      embed_tokens; see phi_model.py), in eval mode.

      greedy<i>.prompt I32 [P], greedy<i>.tokens I32 [N], greedy<i>.logits F32 [N, 200] for i = 0, 1, 2:
          ``generate(prompt, do_sample=False, use_cache=True, max_new_tokens=12, eos_token_id=199)``; tokens are
          the generated ids (the eos included when reached), logits the raw logits of each step
          (output_logits).  Case 2 adds ``repetition_penalty=1.3``, the one processor greedy search applies.
          Prompts are drawn from phi_model.tokens with the first tags whose every step has a top-2 logit gap
          (after the penalty) of at least MIN_GAP, so that the ~1e-5 float differences between two correct
          implementations cannot flip an argmax; the gaps are recorded in the metadata.  The script also checks
          that generate with use_cache=False gives the same tokens.
      sample<j>.prompt, sample<j>.tokens (as above) and, per step, sample<j>.logits F32 [N, 200] (raw) and
          sample<j>.probs F32 [N, 200] = softmax of transformers' processed scores (output_scores: after
          repetition penalty, temperature, top-k, top-p; 0 where a warper removed the token), for the sampling
          settings SAMPLING[j] (torch.manual_seed(SEED) before each; the draws themselves are torch's RNG and
          are not reproduced: the test feeds the recorded history and raw logits and compares distributions).
          The script checks that no step has a cumulative probability within TOP_P_MARGIN of top-p's threshold.
      warp<k>.logits F32 [V], warp<k>.history I32 [H], warp<k>.probs F32 [V]: hand-made logits with ties at the
          top-k boundary and exact zeros/negatives for the penalty, through
          ``LogitsProcessorList([RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
          TopPLogitsWarper])`` (generate's order, checked above) with WARPS[k]; probs = softmax of the result.

Why: tests/models/generation_test.cpp and sampling_test.cpp (qlora/models/generation.hpp, sampling.hpp) must
reproduce greedy decoding token for token and the warped sampling distribution of transformers.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _refcommon as rc  # noqa: E402
import phi_model  # noqa: E402

OUT = os.path.join(rc.DATA_DIR, "models", "generation_reference.safetensors")
MAX_NEW = 12
MIN_GAP = 0.02
TOP_P_MARGIN = 1e-4
SEED = 0
GREEDY_PENALTIES = [1.0, 1.0, 1.3]
SAMPLING = [
    dict(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2),
    dict(temperature=1.5, top_k=0, top_p=0.6, repetition_penalty=1.0),
    dict(temperature=1.0, top_k=7, top_p=1.0, repetition_penalty=0.8),
]
WARPS = [
    dict(temperature=1.0, top_k=3, top_p=1.0, repetition_penalty=1.0),  # ties at the 3rd value: all kept
    dict(temperature=0.5, top_k=0, top_p=0.8, repetition_penalty=1.0),
    dict(temperature=2.0, top_k=4, top_p=0.7, repetition_penalty=1.5),
    dict(temperature=1.0, top_k=0, top_p=0.05, repetition_penalty=1.0),  # top-p keeps at least one token
]


def reference_model():
    init_file = phi_model.REFERENCE
    from safetensors.torch import load_file

    init = {k[len("lora_init."):]: v for k, v in load_file(init_file).items() if k.startswith("lora_init.")}
    model = phi_model.load_folder(phi_model.BNB_DIR, device_map="cpu")
    peft_model, _ = phi_model.attach_adapter(model, init)
    return peft_model.eval()


def run_generate(model, prompt: list, **kwargs):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=MAX_NEW, eos_token_id=phi_model.EOS, pad_token_id=phi_model.EOS,
                             return_dict_in_generate=True, output_logits=True, output_scores=True, **kwargs)
    tokens = out.sequences[0, len(prompt):].tolist()
    logits = torch.cat(out.logits, 0).float()
    scores = torch.cat(out.scores, 0).float()
    return tokens, logits, scores


def top2_gap(scores: torch.Tensor) -> float:
    top = torch.topk(scores, 2, dim=-1).values
    return (top[:, 0] - top[:, 1]).min().item()


def greedy_cases(model):
    cases, gaps, tag = [], [], 9000
    for penalty in GREEDY_PENALTIES:
        while True:
            prompt = phi_model.tokens(5 + tag % 4, tag)
            tag += 1
            tokens, logits, scores = run_generate(model, prompt, do_sample=False, use_cache=True,
                                                  repetition_penalty=penalty)
            if top2_gap(scores) < MIN_GAP:
                continue
            uncached, _, _ = run_generate(model, prompt, do_sample=False, use_cache=False, repetition_penalty=penalty)
            assert uncached == tokens, (uncached, tokens)
            cases.append((prompt, tokens, logits))
            gaps.append(top2_gap(scores))
            break
    return cases, gaps


def top_p_margin(scores_before_top_p: torch.Tensor, top_p: float) -> float:
    """The smallest |cumulative - (1 - top_p)| over a step's ascending cumulative probabilities."""
    if top_p >= 1.0:
        return float("inf")
    sorted_logits, _ = torch.sort(scores_before_top_p, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    return (cumulative - (1 - top_p)).abs().min().item()


def processors(settings: dict):
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    chain = LogitsProcessorList()
    if settings["repetition_penalty"] != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"]))
    if settings["temperature"] != 1.0:
        chain.append(TemperatureLogitsWarper(settings["temperature"]))
    before_top_p = LogitsProcessorList(list(chain))
    if settings["top_k"] != 0:
        chain.append(TopKLogitsWarper(settings["top_k"]))
        before_top_p.append(TopKLogitsWarper(settings["top_k"]))
    if settings["top_p"] != 1.0:
        chain.append(TopPLogitsWarper(settings["top_p"]))
    return chain, before_top_p


def sample_cases(model):
    cases, margins, tag = [], [], 9500
    for settings in SAMPLING:
        while True:
            prompt = phi_model.tokens(6, tag)
            tag += 1
            torch.manual_seed(SEED)
            tokens, logits, scores = run_generate(model, prompt, do_sample=True, use_cache=True, **settings)
            chain, before_top_p = processors(settings)
            sequence = prompt + tokens
            margin = float("inf")
            for step in range(len(tokens)):
                history = torch.tensor([sequence[:len(prompt) + step]])
                mine = chain(history, logits[step:step + 1].clone())
                # generate's own processed scores are what our chain makes: the order is generate's
                assert torch.equal(mine, scores[step:step + 1]), step
                margin = min(margin, top_p_margin(before_top_p(history, logits[step:step + 1].clone()),
                                                  settings["top_p"]))
            if margin < TOP_P_MARGIN:
                continue
            cases.append((prompt, tokens, logits, scores.softmax(-1)))
            margins.append(margin if margin != float("inf") else None)  # None: top-p off
            break
    return cases, margins


def warp_cases():
    vocab = 40
    base = rc.normalish(vocab, phi_model.stream(9900), 2.0).astype(np.float32)
    base[[3, 8, 17]] = 2.5  # three-way tie for the lead
    base[[5, 11]] = 1.75    # a tie just below
    base[20] = 0.0          # the penalty leaves 0 alone
    base[21] = -1.0
    logits = torch.from_numpy(base)
    history = [21, 20, 5, 5, 3, 30]
    out = []
    for settings in WARPS:
        chain, _ = processors(settings)
        scores = chain(torch.tensor([history]), logits[None].clone())[0]
        out.append((logits.clone(), history, scores.softmax(-1)))
    return out


def main():
    torch.set_num_threads(1)
    import bitsandbytes
    import peft
    import transformers

    model = reference_model()
    greedy, gaps = greedy_cases(model)
    sampled, margins = sample_cases(model)
    warps = warp_cases()

    tensors = {}
    for i, (prompt, tokens, logits) in enumerate(greedy):
        tensors.update({f"greedy{i}.prompt": torch.tensor(prompt, dtype=torch.int32),
                        f"greedy{i}.tokens": torch.tensor(tokens, dtype=torch.int32), f"greedy{i}.logits": logits})
    for j, (prompt, tokens, logits, probs) in enumerate(sampled):
        tensors.update({f"sample{j}.prompt": torch.tensor(prompt, dtype=torch.int32),
                        f"sample{j}.tokens": torch.tensor(tokens, dtype=torch.int32),
                        f"sample{j}.logits": logits, f"sample{j}.probs": probs})
    for k, (logits, history, probs) in enumerate(warps):
        tensors.update({f"warp{k}.logits": logits, f"warp{k}.history": torch.tensor(history, dtype=torch.int32),
                        f"warp{k}.probs": probs})
    rc.save(OUT, {k: v.contiguous() for k, v in tensors.items()}, {
        "description": "transformers generate (greedy and sampling, use_cache=True) on tiny Phi QLoRA + adapter; "
                       "see tests/reference/generation.py",
        "script": "tests/reference/generation.py",
        "model_dir": "tests/data/models/tiny_phi_bnb4bit",
        "adapter": "lora_init.* of tests/data/models/tiny_phi_reference.safetensors",
        "eos_token_id": phi_model.EOS,
        "max_new_tokens": MAX_NEW,
        "greedy_repetition_penalties": GREEDY_PENALTIES,
        "greedy_min_top2_gaps": gaps,
        "sampling": SAMPLING,
        "sampling_min_top_p_margins": margins,
        "warps": WARPS,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    })
    print("greedy gaps", gaps, "top-p margins", margins)
    print(json.dumps({k: v.tolist() for k, v in tensors.items() if k.endswith(".tokens")}))


if __name__ == "__main__":
    main()
