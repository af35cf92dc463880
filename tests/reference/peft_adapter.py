"""PEFT LoRA adapter directories, both ways: what peft writes, and whether peft loads what qlora writes.

Writes (run: ``.venv/bin/python tests/reference/peft_adapter.py``; ~20 s.  It builds and runs the C++
fixture writer, so the CMake build folder must be configured: ``build/``, or ``$QLORA_BUILD_DIR``)
  tests/data/lora/peft_written/adapter_config.json, adapter_model.safetensors
      written by peft's ``PeftModel.save_pretrained`` (its README.md model card is deleted: boilerplate).
      The model is a tiny transformers ``PhiForCausalLM`` (PhiConfig hidden 64, 2 layers, 4 heads,
      intermediate 128, vocab 256; base weights from ``torch.manual_seed(0)``, not stored) wrapped by
      ``get_peft_model(LoraConfig(r=4, lora_alpha=8, target_modules=[q_proj, k_proj, v_proj, dense,
      fc1, fc2], modules_to_save=[lm_head], task_type=CAUSAL_LM))``, with every adapter value then
      overwritten from ``_refcommon.normalish`` (C++: tests/lora/tiny_phi_adapter.hpp):
        layer l, module m (index in the list above):
          lora_A  seed 1000 + 100 l + 10 m,      scale 1 / math.sqrt(in_features)   [4, in]
          lora_B  seed 1000 + 100 l + 10 m + 1,  scale 0.05                         [out, 4]
        lm_head (the modules_to_save copy): weight seed 2000, scale 0.05; bias seed 2001, scale 0.1.
      peft writes target_modules from a Python set, whose order follows the string hash seed: the
      script re-runs itself with PYTHONHASHSEED=0 so the file is the same on every run.
  tests/data/lora/qlora_written/adapter_config.json, adapter_model.safetensors
      the same adapter as qlora writes it: build/tests/lora_make_peft_fixture
      (tests/lora/make_peft_fixture.cpp, write_peft_adapter).
  tests/data/lora/qlora_written_verdict.json
      what peft made of qlora_written: package versions, pass/fail per check, the largest logit
      difference, and the tiny Phi's nn.Linear modules (path, in, out, bias) for the C++ fit checks.
  tests/data/lora/peft_config_variants.json
      {"variants": [{"name", "kwargs", "text"}]}: the adapter_config.json text peft's
      LoraConfig(**kwargs).save_pretrained writes for configs that exercise the other fields
      (rsLoRA, rank/alpha patterns, a regex target, bias "lora_only", Gaussian, PiSSA and EVA
      inits, a non-ASCII base model name).  adapter_config_test.cpp parses each and must write
      the same bytes back.

Why: the C++ reader must take what peft writes (tests/lora/peft_adapter_test.cpp reads peft_written),
and what qlora writes must load in ``PeftModel.from_pretrained`` as if peft had written it.  Checks:
  weights_bytes_identical      qlora's adapter_model.safetensors == peft's, byte for byte
  config_same_fields           the same JSON fields and values, except peft_version (ours says
                               "<peft version>+qlora.<version>") and the order of target_modules
  config_bytes_identical       qlora's adapter_config.json == json.dumps(peft's fields, indent=2,
                               sort_keys=True) with those two put as qlora has them (and that re-dump
                               gives peft's own file back byte for byte)
  peft_resaves_config          LoraConfig.from_pretrained(qlora_written).save_pretrained() gives
                               qlora's bytes back (target_modules order aside)
  no_load_warnings             PeftModel.from_pretrained(fresh base, qlora_written) warns nothing
                               (no unknown config keys, no missing adapter keys)
  same_state_dict_keys         load_peft_weights(qlora_written) has exactly the keys peft saves
  parameters_bit_identical     every adapter parameter of the loaded model == the Python-built one
  logits_identical             logits on fixed input ids are identical (and differ from the base's)
Exit status 1 when any check fails (the verdict is written first).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

# peft's target_modules order depends on the string hash seed: fix it before anything is hashed.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch

import _refcommon as rc

LORA_DIR = os.path.join(rc.DATA_DIR, "lora")
PEFT_DIR = os.path.join(LORA_DIR, "peft_written")
QLORA_DIR = os.path.join(LORA_DIR, "qlora_written")
VERDICT = os.path.join(LORA_DIR, "qlora_written_verdict.json")
VARIANTS = os.path.join(LORA_DIR, "peft_config_variants.json")
BUILD_DIR = os.environ.get("QLORA_BUILD_DIR", os.path.join(rc.REPO_ROOT, "build"))
WRITER_TARGET = "lora_make_peft_fixture"

TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
LAYERS = 2
INPUT_IDS = [[1, 17, 42, 99, 128, 200, 255, 3, 64, 7]]


def build_base():
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=128,
                    vocab_size=256)
    torch.manual_seed(0)  # the base weights: the same on every call, never stored
    return PhiForCausalLM(cfg).eval()


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), modules_to_save=["lm_head"],
                      task_type="CAUSAL_LM")


def module_path(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{'mlp' if name.startswith('fc') else 'self_attn'}.{name}"


def set_adapter_values(peft_model) -> None:
    """Overwrites every adapter tensor with the documented normalish values."""
    hf = peft_model.base_model.model
    modules = dict(hf.named_modules())

    def fill(param, seed, scale):
        values = rc.normalish(param.numel(), seed, scale)
        param.copy_(torch.from_numpy(values).reshape(param.shape))

    with torch.no_grad():
        for layer in range(LAYERS):
            for m, name in enumerate(TARGETS):
                lora = modules[module_path(layer, name)]
                seed = 1000 + 100 * layer + 10 * m
                fill(lora.lora_A["default"].weight, seed, 1.0 / math.sqrt(lora.in_features))
                fill(lora.lora_B["default"].weight, seed + 1, 0.05)
        head = hf.lm_head.modules_to_save["default"]
        fill(head.weight, 2000, 0.05)
        fill(head.bias, 2001, 0.1)


CONFIG_VARIANTS = {
    "defaults": {},
    "rslora_patterns": dict(r=16, lora_alpha=32, use_rslora=True, lora_dropout=0.05, bias="lora_only",
                            target_modules=["q_proj", "v_proj"],
                            rank_pattern={"q_proj": 8, "layers.0.self_attn.v_proj": 4},
                            alpha_pattern={"v_proj": 12.5}, task_type="CAUSAL_LM",
                            base_model_name_or_path="microsoft/phi-2", revision="main"),
    "gaussian_regex": dict(init_lora_weights="gaussian", target_modules=r".*\.(q_proj|fc1)$",
                           modules_to_save=["lm_head", "model.embed_tokens"], task_type="CAUSAL_LM"),
    "pissa": dict(init_lora_weights="pissa_niter_4", target_modules=["fc1", "fc2"], lora_dropout=0.1),
    "no_init": dict(init_lora_weights=False, target_modules=["dense"], inference_mode=True),
    "eva": dict(init_lora_weights="eva", eva_config={"rho": 2.0}, target_modules=["fc1"]),
    "non_ascii": dict(base_model_name_or_path="\u00fcser/mod\u00e8le-\u6a21\u578b-\U0001f600",
                      target_modules=["q_proj"]),
}


def write_config_variants(path: str) -> None:
    from peft import LoraConfig
    from peft.tuners.lora.config import EvaConfig

    variants = []
    for name, kwargs in CONFIG_VARIANTS.items():
        args = dict(kwargs)
        if "eva_config" in args:
            args["eva_config"] = EvaConfig(**args["eva_config"])
        with tempfile.TemporaryDirectory() as tmp:
            LoraConfig(**args).save_pretrained(tmp)
            text = read_text(os.path.join(tmp, "adapter_config.json"))
        variants.append({"name": name, "kwargs": kwargs, "text": text})
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"script": "tests/reference/peft_adapter.py", "variants": variants}, f, indent=2)
        f.write("\n")
    print(f"wrote {os.path.relpath(path, rc.REPO_ROOT)} ({len(variants)} configs)")


def build_writer() -> str:
    if not os.path.isfile(os.path.join(BUILD_DIR, "build.ninja")) and not os.path.isfile(
            os.path.join(BUILD_DIR, "Makefile")):
        raise SystemExit(f"{BUILD_DIR} is not a configured CMake build folder (set QLORA_BUILD_DIR)")
    subprocess.run(["cmake", "--build", BUILD_DIR, "--target", WRITER_TARGET], check=True)
    return os.path.join(BUILD_DIR, "tests", WRITER_TARGET)


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def redump(fields: dict) -> str:
    """peft's own spelling (PeftConfigMixin.save_pretrained)."""
    return json.dumps(fields, indent=2, sort_keys=True)


def as_qlora_has_it(fields: dict, qlora_fields: dict) -> dict:
    """`fields` with peft_version and the target_modules order taken from qlora's file."""
    out = dict(fields)
    out["peft_version"] = qlora_fields["peft_version"]
    if sorted(out["target_modules"]) == sorted(qlora_fields["target_modules"]):
        out["target_modules"] = qlora_fields["target_modules"]
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def linear_modules(model) -> list:
    return [{"path": name, "in": mod.in_features, "out": mod.out_features, "bias": mod.bias is not None}
            for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]


def main():
    import peft
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    # 1. peft writes.
    base = build_base()
    modules = linear_modules(base)
    with torch.no_grad():
        base_logits = base(torch.tensor(INPUT_IDS)).logits.clone()
    python_model = get_peft_model(base, lora_config()).eval()
    set_adapter_values(python_model)
    shutil.rmtree(PEFT_DIR, ignore_errors=True)
    python_model.save_pretrained(PEFT_DIR)
    os.remove(os.path.join(PEFT_DIR, "README.md"))
    for name in os.listdir(PEFT_DIR):
        os.chmod(os.path.join(PEFT_DIR, name), 0o644)  # safetensors creates its files 0600
    print(f"wrote {os.path.relpath(PEFT_DIR, rc.REPO_ROOT)}: {sorted(os.listdir(PEFT_DIR))}")

    write_config_variants(VARIANTS)

    # 2. qlora writes.
    writer = build_writer()
    shutil.rmtree(QLORA_DIR, ignore_errors=True)
    subprocess.run([writer, QLORA_DIR], check=True)
    print(f"wrote {os.path.relpath(QLORA_DIR, rc.REPO_ROOT)}: {sorted(os.listdir(QLORA_DIR))}")

    checks = {}

    def record(name: str, passed: bool, **details):
        checks[name] = {"pass": bool(passed), **details}
        print(f"  {'PASS' if passed else 'FAIL'} {name} {details if details else ''}")

    # 3. Files.
    weights = "adapter_model.safetensors"
    with open(os.path.join(PEFT_DIR, weights), "rb") as f:
        peft_weights = f.read()
    with open(os.path.join(QLORA_DIR, weights), "rb") as f:
        qlora_weights = f.read()
    record("weights_bytes_identical", peft_weights == qlora_weights, bytes=len(qlora_weights))

    peft_text = read_text(os.path.join(PEFT_DIR, "adapter_config.json"))
    qlora_text = read_text(os.path.join(QLORA_DIR, "adapter_config.json"))
    peft_fields, qlora_fields = json.loads(peft_text), json.loads(qlora_text)
    differing = sorted(k for k in set(peft_fields) | set(qlora_fields)
                       if k not in ("peft_version", "target_modules") and peft_fields.get(k, "<absent>") !=
                       qlora_fields.get(k, "<absent>"))
    same_targets = sorted(peft_fields["target_modules"]) == sorted(qlora_fields["target_modules"])
    record("config_same_fields", not differing and same_targets, differing=differing,
           peft_version={"peft": peft_fields["peft_version"], "qlora": qlora_fields["peft_version"]},
           target_modules={"peft": peft_fields["target_modules"], "qlora": qlora_fields["target_modules"]})
    record("config_bytes_identical",
           redump(peft_fields) == peft_text and redump(as_qlora_has_it(peft_fields, qlora_fields)) == qlora_text)

    with tempfile.TemporaryDirectory() as tmp:
        LoraConfig.from_pretrained(QLORA_DIR).save_pretrained(tmp)
        resaved = json.loads(read_text(os.path.join(tmp, "adapter_config.json")))
    record("peft_resaves_config", redump(as_qlora_has_it(resaved, qlora_fields)) == qlora_text)

    # 4. peft loads what qlora wrote.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(build_base(), QLORA_DIR).eval()
    # transformers' deprecation notices about its own API (is_gradient_checkpointing) say nothing
    # about the adapter; anything else (peft's "Unexpected keyword arguments", "Found missing
    # adapter keys", ...) fails the check.
    def about_transformers_itself(w) -> bool:
        return issubclass(w.category, FutureWarning) and f"{os.sep}transformers{os.sep}" in w.filename

    load_warnings = [str(w.message) for w in caught if not about_transformers_itself(w)]
    record("no_load_warnings", not load_warnings, warnings=load_warnings,
           ignored=sorted({str(w.message) for w in caught if about_transformers_itself(w)}))

    expected_keys = set(get_peft_model_state_dict(python_model).keys())
    file_keys = set(load_peft_weights(QLORA_DIR).keys())
    record("same_state_dict_keys", file_keys == expected_keys, missing=sorted(expected_keys - file_keys),
           unexpected=sorted(file_keys - expected_keys))

    python_params = {n: p for n, p in python_model.named_parameters() if "lora_" in n or "modules_to_save" in n}
    loaded_params = dict(loaded.named_parameters())
    mismatched = sorted(n for n, p in python_params.items()
                        if n not in loaded_params or not torch.equal(bits(p), bits(loaded_params[n])))
    record("parameters_bit_identical", not mismatched, compared=len(python_params), mismatched=mismatched)

    ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        python_logits = python_model(ids).logits
        loaded_logits = loaded(ids).logits
    max_diff = float((python_logits - loaded_logits).abs().max())
    adapter_effect = float((python_logits - base_logits).abs().max())
    record("logits_identical", torch.equal(bits(python_logits), bits(loaded_logits)) and adapter_effect > 0,
           max_abs_diff=max_diff, max_abs_diff_from_base=adapter_effect)

    versions = rc.versions()
    versions["peft"] = peft.__version__
    verdict = {
        "script": "tests/reference/peft_adapter.py",
        "versions": versions,
        "peft_version_written_by_peft": peft_fields["peft_version"],
        "input_ids": INPUT_IDS,
        "max_logit_abs_diff": max_diff,
        "checks": checks,
        "all_pass": all(c["pass"] for c in checks.values()),
        "modules": modules,
    }
    with open(VERDICT, "w", encoding="utf-8") as f:
        json.dump(verdict, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"wrote {os.path.relpath(VERDICT, rc.REPO_ROOT)}: all_pass = {verdict['all_pass']}")
    if not verdict["all_pass"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
