"""PEFT's merge of a LoRA adapter into its base model (``merge_and_unload`` + ``save_pretrained``): the truth
for include/qlora/lora/merge_adapter.hpp and qlora-merge.

Writes (run: ``nice -n 10 .venv/bin/python tests/reference/merge_adapter.py``; ~15 s) under
tests/data/lora/merge/ (the base models are tests/data/models/tiny_phi, fp32, and tiny_phi_bnb4bit, made by
phi_model.py; README.md model cards peft writes are deleted: boilerplate):
  adapter/            ``get_peft_model(tiny_phi fp32, LoraConfig(r=4, lora_alpha=8, target_modules=[q_proj,
                      k_proj, v_proj, dense, fc1, fc2], modules_to_save=[lm_head, embed_tokens], bias="lora_only",
                      task_type=CAUSAL_LM)).save_pretrained``; every value overwritten from _refcommon.normalish:
                      lora_A of layer l, target m: stream(8000 + 100 l + 10 m), scale 1/sqrt(in); lora_B: the
                      stream of tag + 1, scale 0.1 (non-zero, so the merge changes every target); the
                      modules_to_save copies and the LoRA layers' biases: base + normalish(scale 0.01) (streams
                      8500.., so a merge that keeps the base's copy fails).
  base_bf16/          tiny_phi loaded with dtype=bfloat16 and saved (one model.safetensors).
  merged_f32/         PeftModel.from_pretrained(tiny_phi fp32, adapter/).merge_and_unload().save_pretrained(
                      max_shard_size="300KB"): 2 shards + index.
  merged_bf16/        the same on base_bf16/ (the tutorials' flow: the base reloaded in bf16; the adapter stays
                      fp32, peft's autocast_adapter_dtype).
  merged_bnb_bf16/    tiny_phi_bnb4bit loaded by transformers (NF4 + double quant), ``dequantize()`` (fp32
                      nn.Linear from bitsandbytes' dequantize_4bit; copied into a plain fp32 PhiForCausalLM,
                      since transformers cannot save the dequantized model), the adapter merged in fp32, then
                      ``.to(torch.bfloat16)`` and saved: what ``qlora-merge --dtype bfloat16`` must write for a
                      bnb-4bit base (quantization_config gone).
  adapter_resized/    tiny_phi fp32 after ``resize_token_embeddings(100, pad_to_multiple_of=64)`` (vocab 200 -> 128:
                      it shrinks, as Phi-2's does in the tutorial, 51200 -> 50304, and keeps the fixture small),
                      LoraConfig(r=4, lora_alpha=8, target_modules=[fc1], modules_to_save=[lm_head,
                      embed_tokens]); values as above (streams 9000..).  Because the vocabulary changed, peft's
                      save_embedding_layers="auto" also writes the wrapper-internal copies
                      (`lm_head.original_module.weight`, `...modules_to_save.weight`, spec section 2.4).
  merged_resized_bf16/ base_bf16 resized to 128 the same way, the adapter loaded and merged: vocab_size 128.
  adapter_remote/     an adapter in today's names whose q/k/v_proj share one lora_A per layer (bias="all",
                      r 4, alpha 16, targets q/k/v_proj, dense, fc1, fc2; streams 9500..): what converting
                      adapter_remote_code/ must give.
  adapter_remote_code/ the same adapter as the Dec-2023 remote-code Phi (phi-msft) names it, written by this
                      script from adapter_remote/ with the mapping of spec section 4.4 (transformers'
                      convert_phi_weights_to_hf.py names): Wqkv = rows [q; k; v] (lora_B and the bias), the shared
                      lora_A once, out_proj = dense, transformer.h.{i}.ln = input_layernorm, lm_head.ln =
                      final_layernorm, lm_head.linear = lm_head; adapter_config.json with peft 0.7.1's fields and
                      target_modules [Wqkv, out_proj, fc1, fc2].
  meta.json           package versions and the script's checks.

Checks (the script fails if one fails):
  bf16_merge_rounds_once  for every LoRA module of merged_bf16: peft's bf16 weight == (W.float() + delta).bfloat16()
                          with delta = (B @ A) * scaling in fp32: ``weight.data += delta`` on a bf16 tensor computes
                          in fp32 and rounds once, so a replica that does the same is bit-exact.
  merged_reloads          each merged folder reloads with AutoModelForCausalLM and its logits equal the unmerged
                          PeftModel's to 1e-5 (fp32) / the bf16 rounding (bf16 cases: 0.05).
  resize_vocab            merged_resized_bf16's config.json says vocab_size 128.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile

# peft writes target_modules from a Python set, whose order follows the string hash seed.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import numpy as np
import torch

import _refcommon as rc

MODELS_DIR = os.path.join(rc.DATA_DIR, "models")
BASE_DIR = os.path.join(MODELS_DIR, "tiny_phi")
BNB_DIR = os.path.join(MODELS_DIR, "tiny_phi_bnb4bit")
OUT_DIR = os.path.join(rc.DATA_DIR, "lora", "merge")
BASE_NAME = "tests/data/models/tiny_phi"  # base_model_name_or_path written into the adapters (repo-relative)

LAYERS = 2
TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
MAX_FIXTURE_BYTES = 2 << 20
INPUT_IDS = torch.tensor([[1, 17, 42, 99, 120, 127, 3, 64, 7]])  # < 128: valid in every model here
# The vocabulary shrinks, as Phi-2's does in the tutorial (51200 -> 50304): 100 rounded up to 128 < 200.
RESIZE = (100, 64)
RESIZED_VOCAB = 128


def stream(tag: int) -> int:
    """Seeds spread 2^32 draws apart (neighbouring splitmix64 seeds are one stream shifted by one draw)."""
    return tag << 32


def load(path: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def module_path(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{'mlp' if name.startswith('fc') else 'self_attn'}.{name}"


def fill(param, seed: int, scale: float, offset=None) -> None:
    values = torch.from_numpy(rc.normalish(param.numel(), seed, scale)).reshape(param.shape)
    param.copy_(values if offset is None else offset.float() + values)


def save_adapter(peft_model, path: str) -> None:
    peft_model.peft_config["default"].base_model_name_or_path = BASE_NAME
    shutil.rmtree(path, ignore_errors=True)
    peft_model.save_pretrained(path)
    os.remove(os.path.join(path, "README.md"))


def make_adapter(path: str, tag: int, targets, modules_to_save, resize: bool = False, bias: str = "none",
                 lora_alpha: int = 8, share_qkv_A: bool = False) -> None:
    from peft import LoraConfig, get_peft_model

    base = load(BASE_DIR)
    if resize:
        torch.manual_seed(0)
        base.resize_token_embeddings(*RESIZE)
    config = LoraConfig(r=4, lora_alpha=lora_alpha, target_modules=list(targets), modules_to_save=modules_to_save,
                        bias=bias, lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for layer in range(LAYERS):
            for m, name in enumerate(targets):
                lora = modules[module_path(layer, name)]
                seed = stream(tag + 100 * layer + 10 * m)
                a_seed = stream(tag + 100 * layer) if share_qkv_A and name.endswith("_proj") else seed
                fill(lora.lora_A["default"].weight, a_seed, 1.0 / math.sqrt(lora.in_features))
                fill(lora.lora_B["default"].weight, seed + 1, 0.1)
        k = 0
        for name in sorted(modules_to_save or []):
            wrapper = modules["lm_head" if name == "lm_head" else "model.embed_tokens"]
            copy = wrapper.modules_to_save["default"]
            for pname, p in sorted(copy.named_parameters()):
                fill(p, stream(tag + 500 + k), 0.01, offset=getattr(wrapper.original_module, pname))
                k += 1
        if bias != "none":  # the trainable biases are the base model's own parameters
            for pname, p in sorted(peft_model.named_parameters()):
                if pname.endswith(".bias") and p.requires_grad and "modules_to_save" not in pname:
                    fill(p, stream(tag + 500 + k), 0.01, offset=p.detach().clone())
                    k += 1
    save_adapter(peft_model, path)


def merge(base, adapter_dir: str, out_dir: str, to_dtype=None, **save_kwargs):
    """PeftModel.from_pretrained + merge_and_unload + save_pretrained; returns the unmerged logits and the model."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = peft_model(INPUT_IDS).logits.float()
    merged = peft_model.merge_and_unload()
    if to_dtype is not None:
        merged = merged.to(to_dtype)
    shutil.rmtree(out_dir, ignore_errors=True)
    merged.save_pretrained(out_dir, **save_kwargs)
    return logits, merged


def check_reload(out_dir: str, logits, tolerance: float, dtype) -> float:
    reloaded = load(out_dir, dtype=dtype)
    with torch.no_grad():
        diff = (reloaded(INPUT_IDS).logits.float() - logits).abs().max().item()
    if not diff <= tolerance:
        raise SystemExit(f"{out_dir}: reloaded logits differ from the unmerged PeftModel's by {diff}")
    return diff


def check_bf16_rounds_once(adapter_dir: str, base_dir: str, merged_dir: str) -> int:
    """peft's bf16 merge == (W.float() + (B @ A) * scaling).bfloat16(), for every LoRA module."""
    from safetensors.torch import load_file

    adapter = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    scaling = config["lora_alpha"] / config["r"]
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    merged = load_file(os.path.join(merged_dir, "model.safetensors"))
    checked = 0
    prefix = "base_model.model."
    for key, a in adapter.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(prefix):-len(".lora_A.weight")]
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        expected = (base[module + ".weight"].float() + (b @ a) * scaling).bfloat16()
        if not torch.equal(expected.view(torch.int16), merged[module + ".weight"].view(torch.int16)):
            raise SystemExit(f"{module}: peft's bf16 merge is not W + delta rounded once")
        checked += 1
    return checked


def write_remote_code_adapter(new_dir: str, old_dir: str) -> None:
    """adapter_remote/ renamed to the remote-code Phi names (spec 4.4), as an adapter of that era would be."""
    from safetensors.torch import load_file, save_file

    new = load_file(os.path.join(new_dir, "adapter_model.safetensors"))
    prefix = "base_model.model."
    old = {}
    for layer in range(LAYERS):
        new_attn, old_layer = f"{prefix}model.layers.{layer}.self_attn.", f"{prefix}transformer.h.{layer}."
        qkv = [new_attn + p for p in ("q_proj", "k_proj", "v_proj")]
        a = new.pop(qkv[0] + ".lora_A.weight")
        for name in qkv[1:]:
            if not torch.equal(new.pop(name + ".lora_A.weight"), a):
                raise SystemExit("adapter_remote: q/k/v_proj must share lora_A")
        old[old_layer + "mixer.Wqkv.lora_A.weight"] = a
        old[old_layer + "mixer.Wqkv.lora_B.weight"] = torch.cat([new.pop(n + ".lora_B.weight") for n in qkv])
        old[old_layer + "mixer.Wqkv.base_layer.bias"] = torch.cat([new.pop(n + ".base_layer.bias") for n in qkv])
        renames = {f"{new_attn}dense.": f"{old_layer}mixer.out_proj.",
                   f"{prefix}model.layers.{layer}.mlp.": f"{old_layer}mlp.",
                   f"{prefix}model.layers.{layer}.input_layernorm.": f"{old_layer}ln."}
        for key in [k for k in new if any(k.startswith(n) for n in renames)]:
            new_prefix = next(n for n in renames if key.startswith(n))
            old[renames[new_prefix] + key[len(new_prefix):]] = new.pop(key)
    old[prefix + "lm_head.ln.bias"] = new.pop(prefix + "model.final_layernorm.bias")
    old[prefix + "lm_head.linear.bias"] = new.pop(prefix + "lm_head.bias")
    if new:
        raise SystemExit(f"adapter_remote: keys without a remote-code name: {sorted(new)}")
    shutil.rmtree(old_dir, ignore_errors=True)
    os.makedirs(old_dir)
    save_file(dict(sorted(old.items())), os.path.join(old_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(new_dir, "adapter_config.json")) as f:
        config = json.load(f)
    # peft 0.7.1's field set (spec section 2.5), as the Dec-2023 tutorials' adapters have it.
    fields_071 = ["alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out",
                  "inference_mode", "init_lora_weights", "layers_pattern", "layers_to_transform", "loftq_config",
                  "lora_alpha", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type",
                  "r", "rank_pattern", "revision", "target_modules", "task_type"]
    old_config = {k: config[k] for k in fields_071}
    old_config["base_model_name_or_path"] = "microsoft/phi-2"
    old_config["target_modules"] = ["Wqkv", "fc1", "fc2", "out_proj"]
    with open(os.path.join(old_dir, "adapter_config.json"), "w") as f:
        f.write(json.dumps(old_config, indent=2, sort_keys=True))


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def main() -> None:
    torch.set_num_threads(1)
    os.chdir(rc.REPO_ROOT)  # base_model_name_or_path is repo-relative; peft reads the base config through it
    os.makedirs(OUT_DIR, exist_ok=True)
    out = lambda name: os.path.join(OUT_DIR, name)  # noqa: E731
    checks = {}

    make_adapter(out("adapter"), 8000, TARGETS, ["lm_head", "embed_tokens"], bias="lora_only")
    make_adapter(out("adapter_resized"), 9000, ["fc1"], ["lm_head", "embed_tokens"], resize=True)
    make_adapter(out("adapter_remote"), 9500, TARGETS, None, bias="all", lora_alpha=16, share_qkv_A=True)
    write_remote_code_adapter(out("adapter_remote"), out("adapter_remote_code"))

    shutil.rmtree(out("base_bf16"), ignore_errors=True)
    load(BASE_DIR, dtype=torch.bfloat16).save_pretrained(out("base_bf16"))

    logits, _ = merge(load(BASE_DIR), out("adapter"), out("merged_f32"), max_shard_size="300KB")
    checks["merged_f32_reload_max_abs_diff"] = check_reload(out("merged_f32"), logits, 1e-5, torch.float32)

    logits, _ = merge(load(out("base_bf16"), torch.bfloat16), out("adapter"), out("merged_bf16"))
    checks["merged_bf16_reload_max_abs_diff"] = check_reload(out("merged_bf16"), logits, 0.05, torch.bfloat16)
    checks["bf16_merge_rounds_once_modules"] = check_bf16_rounds_once(out("adapter"), out("base_bf16"),
                                                                      out("merged_bf16"))

    # transformers cannot save the dequantized model itself (its load-time weight conversion has no
    # reverse): its weights go into a plain fp32 model.
    dequantized = load(BASE_DIR)
    dequantized.load_state_dict(load(BNB_DIR).dequantize().state_dict())
    logits, _ = merge(dequantized, out("adapter"), out("merged_bnb_bf16"), to_dtype=torch.bfloat16)
    checks["merged_bnb_bf16_reload_max_abs_diff"] = check_reload(out("merged_bnb_bf16"), logits, 0.05,
                                                                 torch.bfloat16)

    resized_base = load(out("base_bf16"), torch.bfloat16)
    torch.manual_seed(0)
    resized_base.resize_token_embeddings(*RESIZE)
    logits, _ = merge(resized_base, out("adapter_resized"), out("merged_resized_bf16"))
    checks["merged_resized_bf16_reload_max_abs_diff"] = check_reload(out("merged_resized_bf16"), logits, 0.05,
                                                                     torch.bfloat16)
    with open(os.path.join(out("merged_resized_bf16"), "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    if vocab != RESIZED_VOCAB:
        raise SystemExit(f"merged_resized_bf16: vocab_size {vocab}, expected {RESIZED_VOCAB}")
    checks["resized_vocab_size"] = vocab

    import peft

    meta = dict(rc.versions(), peft=peft.__version__, checks=checks)
    with open(out("meta.json"), "w") as f:
        f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    total = folder_bytes(OUT_DIR)
    print(f"wrote {os.path.relpath(OUT_DIR, rc.REPO_ROOT)} ({total} bytes): {json.dumps(checks)}")
    if total > MAX_FIXTURE_BYTES:
        raise SystemExit(f"{OUT_DIR}: {total} bytes exceeds the {MAX_FIXTURE_BYTES}-byte budget")


if __name__ == "__main__":
    main()
