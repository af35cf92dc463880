"""Tiny Llama checkpoint in bf16 and in transformers' bitsandbytes-4bit (NF4 + double quant) form.

Writes (run: ``.venv/bin/python tests/reference/bnb_4bit_model.py``)
  tests/data/quant/tiny_bf16/config.json, model.safetensors
      LlamaForCausalLM, hidden 64, intermediate 128, 2 layers, 4 heads (2 KV heads,
      so k/v_proj are [32, 64]), vocab 128, tied embeddings, bf16, saved with
      save_pretrained (generation_config.json is deleted; it is not needed).
      Weights come from splitmix64 (see _refcommon.py), not torch's RNG.
  tests/data/quant/tiny_bnb4bit/config.json, model.safetensors
      the same checkpoint loaded by transformers with
      BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16) and
      device_map="cpu" (transformers 5.x quantizes on CPU directly; no GPU, no
      manual Params4bit needed), then save_pretrained.
  tests/data/quant/tiny_bnb4bit_dequant.safetensors
      for every quantized Linear weight key (e.g. "model.layers.0.mlp.down_proj.weight"):
      bitsandbytes' dequantize_4bit(weight, quant_state) as BF16 [out, in].
  tests/data/quant/tiny_bnb4bit_keys.json
      exact key list of tiny_bnb4bit/model.safetensors in file order with dtypes and
      shapes, the safetensors __metadata__, and the exact bytes (text and hex) of
      one ``weight.quant_state.bitsandbytes__nf4`` JSON blob.

Why: the C++ loader must read a real transformers-written bnb-4bit checkpoint and
dequantize it bit-exactly; the writer must be able to produce the same keys.

Checked by this script: each saved packed weight / 8-bit absmax / nested stats is
byte-identical to ``bitsandbytes.functional.quantize_4bit(bf16 weight, blocksize=64,
compress_statistics=True, quant_type="nf4")``; the saved nested_offset equals the
torch absmax.mean(); the dequantized weights equal the flat-block semantics.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch

import _refcommon as rc

QDIR = os.path.join(rc.DATA_DIR, "quant")
BF16_DIR = os.path.join(QDIR, "tiny_bf16")
Q4_DIR = os.path.join(QDIR, "tiny_bnb4bit")
DEQ = os.path.join(QDIR, "tiny_bnb4bit_dequant.safetensors")
KEYS = os.path.join(QDIR, "tiny_bnb4bit_keys.json")


def build_bf16_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=True,
                      rms_norm_eps=1e-6)
    torch.manual_seed(0)  # only affects init, which is overwritten below
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            n = p.numel()
            if name.endswith("norm.weight"):
                v = 1.0 + rc.normalish(n, 300 + i, 0.05)
            else:
                v = rc.normalish(n, 300 + i, 0.035)  # std ~0.02
            p.copy_(torch.from_numpy(v.astype(np.float32)).reshape(p.shape).to(torch.bfloat16))
    return model


def main():
    import logging

    import bitsandbytes.functional as F
    import transformers
    from bitsandbytes.backends.default import ops as dops
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)

    for d in (BF16_DIR, Q4_DIR):
        shutil.rmtree(d, ignore_errors=True)
    model = build_bf16_model()
    model.save_pretrained(BF16_DIR)
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)
    qmodel = AutoModelForCausalLM.from_pretrained(BF16_DIR, quantization_config=qcfg, device_map="cpu")
    qmodel.save_pretrained(Q4_DIR)
    for d in (BF16_DIR, Q4_DIR):
        gc = os.path.join(d, "generation_config.json")
        if os.path.exists(gc):
            os.remove(gc)

    ref = load_file(os.path.join(BF16_DIR, "model.safetensors"))
    q = load_file(os.path.join(Q4_DIR, "model.safetensors"))
    flat_fn = getattr(dops._dequantize_4bit_compute, "__wrapped__", dops._dequantize_4bit_compute)

    deq = {}
    qweights = sorted(k[: -len(".quant_state.bitsandbytes__nf4")] for k in q if k.endswith(".quant_state.bitsandbytes__nf4"))
    for wkey in qweights:
        mod = qmodel.get_submodule(wkey[: -len(".weight")])
        w = mod.weight
        st = w.quant_state
        out = F.dequantize_4bit(w.data, st)
        assert out.dtype == torch.bfloat16 and list(out.shape) == list(ref[wkey].shape)
        # cross-checks
        p, st2 = F.quantize_4bit(ref[wkey], blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(p, q[wkey]) and torch.equal(st2.absmax, q[wkey + ".absmax"])
        assert torch.equal(st2.state2.absmax, q[wkey + ".nested_absmax"])
        assert torch.equal(st2.state2.code, q[wkey + ".nested_quant_map"])
        js = json.loads(bytes(q[wkey + ".quant_state.bitsandbytes__nf4"].tolist()).decode())
        assert np.float32(js["nested_offset"]) == st2.offset.numpy()
        absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
        flat = flat_fn(w.data.reshape(-1), absmax, st.code, 64, list(st.shape), torch.bfloat16)
        assert torch.equal(flat.view(torch.int16), out.view(torch.int16))
        deq[wkey] = out.contiguous()

    rc.save(DEQ, deq, {
        "description": "bitsandbytes dequantize_4bit (CPU) of every quantized Linear weight in "
                       "tests/data/quant/tiny_bnb4bit/model.safetensors; BF16 [out, in]. See tests/reference/bnb_4bit_model.py",
        "source_checkpoint": "tests/data/quant/tiny_bnb4bit/model.safetensors",
    })

    # key list in file order
    import struct

    path = os.path.join(Q4_DIR, "model.safetensors")
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    meta = header.pop("__metadata__", None)
    order = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    sample_key = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    blob = bytes(q[sample_key].tolist())
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(header)
    info = {
        "description": "Exact contents of tests/data/quant/tiny_bnb4bit/model.safetensors as written by transformers "
                       "save_pretrained after on-the-fly bnb 4-bit quantization on CPU (tests/reference/bnb_4bit_model.py)",
        "versions": rc.versions(),
        "safetensors_metadata": meta,
        "keys_in_file_order": [{"key": k, "dtype": v["dtype"], "shape": v["shape"], "data_offsets": v["data_offsets"]}
                               for k, v in order],
        "quantized_weights": qweights,
        "not_quantized": sorted(k for k in header if not any(k.startswith(w) for w in qweights)),
        "quant_state_sample": {"key": sample_key, "text": blob.decode("utf-8"), "hex": blob.hex(), "length": len(blob)},
        "config_quantization_config": json.load(open(os.path.join(Q4_DIR, "config.json")))["quantization_config"],
    }
    with open(KEYS, "w") as fh:
        json.dump(info, fh, indent=1)
        fh.write("\n")
    for p in (os.path.join(BF16_DIR, "model.safetensors"), path, KEYS):
        os.chmod(p, 0o644)
        print(f"wrote {os.path.relpath(p, rc.REPO_ROOT)} ({os.path.getsize(p)} bytes)")
    print(blob.decode())


if __name__ == "__main__":
    main()
