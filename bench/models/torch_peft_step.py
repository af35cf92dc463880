"""One QLoRA optimizer step in transformers + PEFT + bitsandbytes on CPU: the
same-run baseline of training_step_bench (bench/models/training_step_bench.cpp).

Run by the bench (a subprocess, on the model folder and token batch it wrote);
also usable by hand:

    .venv/bin/python bench/models/torch_peft_step.py MODEL_DIR BATCH.safetensors \
        --compute-dtype bf16 --r 16 --alpha 32 --modules-to-save lm_head embed_tokens --threads 2

The model is loaded as the QLoRA recipe loads it: PhiForCausalLM with
BitsAndBytesConfig(load_in_4bit, nf4, double quant, bnb_4bit_compute_dtype =
--compute-dtype) on CPU (bitsandbytes 0.50 quantizes on the CPU), then
prepare_model_for_kbit_training(use_gradient_checkpointing=False) and
get_peft_model with LoRA on q,k,v,dense,fc1,fc2 (dropout 0). One step is what
the HF Trainer does per optimizer step: zero_grad, forward with labels,
backward, clip_grad_norm_(1.0), bitsandbytes.optim.AdamW(optim_bits=32) (the
CPU backend of "paged_adamw_32bit"; torch.optim.AdamW if bitsandbytes' cannot
step on this machine — the JSON says which).

The batch file holds input_ids, labels and position_ids [rows, row_length]:
position_ids restart at each packed sample, and with no attention mask
transformers (masking_utils.find_packed_sequence_indices) attends within each
sample only, as qlora's cu_seqlens do. Attention is transformers' default
(sdpa), its fastest CPU path.

Prints one JSON line: {"tokens_per_s", "seconds_per_step", "tokens", "steps",
"optimizer", "threads", "loss", "peak_rss_mib"}; the time covers the timed steps
only (after --warmup steps), not imports or loading.
"""

import argparse
import json
import resource
import time

import torch
from safetensors.torch import load_file


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("batch")
    parser.add_argument("--compute-dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--modules-to-save", nargs="*", default=[])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, PhiForCausalLM

    compute_dtype = torch.bfloat16 if args.compute_dtype == "bf16" else torch.float32
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute_dtype)
    model = PhiForCausalLM.from_pretrained(args.model_dir, quantization_config=quantization, dtype=torch.float32,
                                           device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
                      modules_to_save=args.modules_to_save or None)
    model = get_peft_model(model, lora)
    model.train()

    parameters = [p for p in model.parameters() if p.requires_grad]
    try:
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW(parameters, lr=1e-4, optim_bits=32, weight_decay=0.0)
        optimizer_name = "bitsandbytes.optim.AdamW(optim_bits=32)"
    except Exception as error:  # noqa: BLE001 - any failure means: fall back, and say so
        optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.0)
        optimizer_name = f"torch.optim.AdamW (bitsandbytes failed: {error})"

    batch = load_file(args.batch)
    inputs = {key: batch[key].long() for key in ("input_ids", "labels", "position_ids")}
    tokens = inputs["input_ids"].numel()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        return loss.item()

    loss = 0.0
    for _ in range(args.warmup):
        try:
            loss = step()
        except Exception as error:  # noqa: BLE001 - bitsandbytes' CPU optimizer may not step: fall back once
            if "bitsandbytes" not in optimizer_name or isinstance(error, KeyboardInterrupt):
                raise
            optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.0)
            optimizer_name = f"torch.optim.AdamW (bitsandbytes' step failed: {error})"
            loss = step()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    seconds = (time.perf_counter() - start) / args.steps
    print(json.dumps({"tokens_per_s": tokens / seconds, "seconds_per_step": seconds, "tokens": tokens,
                      "steps": args.steps, "optimizer": optimizer_name, "threads": torch.get_num_threads(),
                      "loss": loss, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
