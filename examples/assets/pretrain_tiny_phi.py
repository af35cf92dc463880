"""Re-create examples/assets/tiny-phi/: a tiny pre-trained Phi-2-shaped model, the default of `qlora-train`.

Why it exists: the README's first command fine-tunes a real pre-trained causal LM on the shipped self-identity
data set in minutes on a laptop CPU. Phi-2 itself is 5.6 GB; this model has the same architecture
(`PhiForCausalLM`: parallel block, partial rotary, gelu_new, lm_head with bias, untied embeddings), the same
tokenizer format (GPT-2 byte-level BPE, `CodeGenTokenizer`, `<|endoftext|>` as bos/eos/unk) and the same
checkpoint layout (float16 safetensors), scaled down to about 4 M parameters so it fits in the repository.

Text: the English fortune-cookie files of the Debian packages `fortunes` and `fortunes-min`
(BSD-style licence, see /usr/share/doc/fortunes/copyright), `ascii-art` and `translate-me` left out.
Each fortune is one document; documents are joined by `<|endoftext|>` as in GPT-2 pre-training.

One command (root, Debian/Ubuntu; about 35 minutes on one busy CPU core, much less on an idle one):

    apt-get install -y fortunes fortunes-min
    nice -n 19 /work/main/.venv/bin/python examples/assets/pretrain_tiny_phi.py

Options: --out DIR (default examples/assets/tiny-phi), --work DIR (checkpoints for resuming, default
/tmp/tiny-phi-work; an interrupted run picks up from its last checkpoint), --threads N (default 1: a second
thread only helps on idle cores).
Everything is seeded (tokenizer training is deterministic, the data order is a function of the step, the
weights start from torch.manual_seed), but float32 CPU matmuls may differ in the last bits between machines or
thread counts, so a re-run gives a model of the same quality, not necessarily byte-identical weights.
"""

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PhiConfig, PhiForCausalLM

FORTUNE_DIR = Path("/usr/share/games/fortunes")
SKIPPED_FILES = {"ascii-art", "translate-me"}  # pictures made of punctuation; not English
EOS = "<|endoftext|>"
SEED = 20240617

TOKENIZER_SIZE = 2000  # 1999 BPE entries (256 bytes + merges) then <|endoftext|> last, as GPT-2 puts it at 50256
# Like Phi-2 (50295 tokens, 51200 rows), the model has more rows than the tokenizer has tokens. Adding the
# tutorial's three tokens and resizing to a multiple of 64 therefore *shrinks* the matrices (2003 -> 2048),
# exactly the trap Phi-2 users meet (50297 -> 50304).
MODEL_VOCAB = 2112

# Sized for the budget (about 35 minutes of one CPU core shared with compilers, ~2.5 M tokens, ~3 passes over
# the corpus): in this compute-bound regime a 1.3 M-parameter model reaches a lower loss than a wider one (hidden
# 256 would see a third of the tokens), and it keeps the C++ fine-tune of the README quick. head_dim is 32.
HIDDEN, LAYERS, HEADS, INTERMEDIATE = 128, 4, 4, 512
SEQ_LEN, BATCH = 128, 16
STEPS, WARMUP, PEAK_LR, MIN_LR_RATIO, WEIGHT_DECAY = 1200, 50, 4e-3, 0.1, 0.1
EVAL_EVERY, CHECKPOINT_EVERY = 100, 50
HELD_OUT_FRACTION = 0.05
SAMPLE_PROMPTS = ["The cat", "A man walked into a bar", "Life is", "The computer", "Once upon a time"]


def read_fortunes():
    """Every fortune as one cleaned string, in a fixed order."""
    documents = []
    for path in sorted(FORTUNE_DIR.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or path.name in SKIPPED_FILES:
            continue
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            # Indentation and tabs in fortune files are layout, not content; keep line breaks (poems, quotes).
            lines = [" ".join(line.split()) for line in entry.strip("%\n").split("\n")]
            text = "\n".join(lines).strip()
            while "\n\n\n" in text:
                text = text.replace("\n\n\n", "\n\n")
            letters = sum(ch.isalpha() for ch in text)
            visible = sum(not ch.isspace() for ch in text)
            if len(text) >= 20 and visible and letters / visible > 0.7:  # drop ASCII drawings and tables
                documents.append(text)
    return documents


def train_tokenizer(texts):
    """GPT-2/CodeGen-style byte-level BPE, serialised like Phi-2's tokenizer.json."""
    tokenizer = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_SIZE - 1, min_frequency=2, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens([tokenizers.AddedToken(EOS, special=True, normalized=False)])
    assert tokenizer.get_vocab_size() == TOKENIZER_SIZE and tokenizer.token_to_id(EOS) == TOKENIZER_SIZE - 1
    return tokenizer


def save_tokenizer_json(tokenizer, path):
    """tokenizer.json spelled as Phi-2's (converted from GPT-2 files): merges as "left right" strings and ""
    for the unused subword affixes. tokenizers reads both spellings the same way."""
    data = json.loads(tokenizer.to_str())
    model = data["model"]
    model["continuing_subword_prefix"] = model["end_of_word_suffix"] = ""
    model["merges"] = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def tokenizer_config():
    eos_entry = {"content": EOS, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(TOKENIZER_SIZE - 1): eos_entry},
        "bos_token": EOS,
        "clean_up_tokenization_spaces": True,
        "eos_token": EOS,
        "model_max_length": 512,
        "return_token_type_ids": False,
        "tokenizer_class": "CodeGenTokenizer",
        "unk_token": EOS,
    }


def model_config(resid_pdrop):
    eos_id = TOKENIZER_SIZE - 1
    return PhiConfig(
        vocab_size=MODEL_VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, resid_pdrop=resid_pdrop, embd_pdrop=0.0,
        attention_dropout=0.0, hidden_act="gelu_new", max_position_embeddings=512, initializer_range=0.02,
        layer_norm_eps=1e-5, use_cache=True, tie_word_embeddings=False, rope_theta=10000.0,
        partial_rotary_factor=0.4, qk_layernorm=False, bos_token_id=eos_id, eos_token_id=eos_id)


def encode_corpus(tokenizer, documents):
    eos_id = tokenizer.token_to_id(EOS)
    ids = []
    for encoding in tokenizer.encode_batch(documents):
        ids.extend(encoding.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def batch_at(stream, step, generator_seed):
    """Random windows; the batch depends only on (seed, step), so a resumed run sees the same data."""
    generator = torch.Generator().manual_seed(generator_seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (BATCH,), generator=generator)
    return torch.stack([stream[s:s + SEQ_LEN + 1] for s in starts.tolist()])


def learning_rate(step):
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, STEPS - WARMUP)
    return PEAK_LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def mean_loss(model, stream, windows=48):
    """Mean next-token loss over fixed, non-overlapping windows (the same ones every time)."""
    model.eval()
    count = min(windows, (len(stream) - 1) // (SEQ_LEN + 1))
    total = 0.0
    for start in range(0, count, BATCH):
        rows = [stream[i * (SEQ_LEN + 1):(i + 1) * (SEQ_LEN + 1)] for i in range(start, min(count, start + BATCH))]
        chunk = torch.stack(rows)
        total += model(input_ids=chunk, labels=chunk).loss.item() * len(rows)
    model.train()
    return total / count


@torch.no_grad()
def greedy_samples(model, tokenizer, new_tokens=40):
    model.eval()
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=tokenizer.token_to_id(EOS), pad_token_id=tokenizer.token_to_id(EOS))
        samples.append((prompt, tokenizer.decode(out[0, ids.shape[1]:].tolist())))
    model.train()
    return samples


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "tiny-phi"))
    parser.add_argument("--work", default="/tmp/tiny-phi-work")
    # One thread by default: on a machine shared with other jobs, a second OpenMP thread that is descheduled
    # makes the first spin at every barrier (measured here: 1 thread 1.6 s/step, 2 threads 15 s/step).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probe", type=int, default=0, help="time this many steps and stop (sizing only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(SEED)
    torch.manual_seed(SEED)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    documents = read_fortunes()
    random.Random(SEED).shuffle(documents)
    held_out_count = int(len(documents) * HELD_OUT_FRACTION)
    held_out_docs, train_docs = documents[:held_out_count], documents[held_out_count:]
    tokenizer = train_tokenizer(train_docs)
    save_tokenizer_json(tokenizer, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    train_stream = encode_corpus(tokenizer, train_docs)
    held_out_stream = encode_corpus(tokenizer, held_out_docs)
    corpus_chars = sum(map(len, documents))
    print(f"corpus: {len(documents)} fortunes, {corpus_chars} chars; train {len(train_stream)} tokens, "
          f"held-out {len(held_out_stream)} tokens", flush=True)

    # Pre-training runs without dropout: with ~2 passes over a small corpus the model is under-fitted, and
    # dropout would only slow it down. The saved config carries Phi-2's resid_pdrop = 0.1 for fine-tuning.
    model = PhiForCausalLM(model_config(resid_pdrop=0.0))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "layernorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "layernorm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=PEAK_LR, betas=(0.9, 0.95))
    print(f"parameters: {sum(p.numel() for p in model.parameters())}", flush=True)

    checkpoint_path = work / "checkpoint.pt"
    step, elapsed, log = 0, 0.0, []
    if checkpoint_path.exists() and not args.probe:
        state = torch.load(checkpoint_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, log = state["step"], state["elapsed"], state["log"]
        print(f"resumed at step {step}", flush=True)

    model.train()
    started = time.time() - elapsed
    last_steps = args.probe if args.probe else STEPS
    while step < last_steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        batch = batch_at(train_stream, step, SEED)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 10 == 0 or args.probe:
            print(f"step {step}/{STEPS} loss {loss.item():.3f} lr {learning_rate(step - 1):.2e} "
                  f"{time.time() - started:.0f}s", flush=True)
        if step % EVAL_EVERY == 0 or step == STEPS:
            held_out = mean_loss(model, held_out_stream)
            log.append({"step": step, "train_loss": round(loss.item(), 4), "held_out_loss": round(held_out, 4),
                        "seconds": round(time.time() - started)})
            print(f"== step {step}: held-out loss {held_out:.3f}", flush=True)
        if step % CHECKPOINT_EVERY == 0 and not args.probe:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "elapsed": time.time() - started, "log": log}, checkpoint_path)
    if args.probe:
        print(f"{(time.time() - started) / args.probe:.2f} s/step", flush=True)
        return
    wall = time.time() - started

    train_loss = mean_loss(model, train_stream)
    held_out_loss = mean_loss(model, held_out_stream)
    samples = greedy_samples(model, tokenizer)
    for prompt, text in samples:
        print(repr(prompt), "->", repr(text), flush=True)

    model.config.resid_pdrop = 0.1  # Phi-2's value (convert_phi_weights_to_hf.py), used when fine-tuning
    model.generation_config = GenerationConfig(bos_token_id=TOKENIZER_SIZE - 1, eos_token_id=TOKENIZER_SIZE - 1)
    model.half().save_pretrained(out, safe_serialization=True)
    write_report(out, documents, train_stream, held_out_stream, log, train_loss, held_out_loss, wall, samples,
                 sum(p.numel() for p in model.parameters()), args.threads)


def write_report(out, documents, train_stream, held_out_stream, log, train_loss, held_out_loss, wall, samples,
                 parameters, threads):
    curve = "\n".join(f"| {e['step']} | {e['train_loss']:.3f} | {e['held_out_loss']:.3f} | {e['seconds']} |"
                      for e in log)
    sample_lines = "\n".join(f"- `{p!r}` → `{t!r}`" for p, t in samples)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    text = f"""# tiny-phi: how it was pre-trained

Made by `examples/assets/pretrain_tiny_phi.py` (its docstring has the one command). Do not edit by hand.

## Corpus
- Debian packages `fortunes` and `fortunes-min` (BSD-style licence, /usr/share/doc/fortunes/copyright),
  every file in /usr/share/games/fortunes except `ascii-art` and `translate-me`; `%` separators removed,
  whitespace inside lines collapsed, entries that are mostly punctuation (ASCII drawings) dropped.
- {len(documents)} fortunes, {sum(map(len, documents))} characters; shuffled with seed {SEED};
  {HELD_OUT_FRACTION:.0%} of the fortunes held out. Train stream {len(train_stream)} tokens, held-out stream
  {len(held_out_stream)} tokens; documents joined by `<|endoftext|>`.

## Tokenizer
Byte-level BPE trained with `tokenizers` on the training fortunes: ByteLevel pre-tokenizer (GPT-2 split regex,
add_prefix_space false), ByteLevel decoder and post-processor, {TOKENIZER_SIZE - 1} BPE entries (256 bytes +
merges) and `<|endoftext|>` = id {TOKENIZER_SIZE - 1} (bos = eos = unk), like GPT-2/Phi-2's id 50256.
`tokenizer_config.json` mirrors Phi-2's (`CodeGenTokenizer`, add_prefix_space false).

## Model
`PhiForCausalLM`, hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads (head_dim {HIDDEN // HEADS}),
intermediate {INTERMEDIATE}, partial_rotary_factor 0.4 (rotary dims int({HIDDEN // HEADS}·0.4) =
{int(HIDDEN // HEADS * 0.4)}), gelu_new, parallel block, lm_head with bias, untied embeddings,
max_position_embeddings 512, vocab {MODEL_VOCAB} rows for {TOKENIZER_SIZE} tokens (as Phi-2 has 51200 rows for 50295
tokens: adding `<|im_start|>`, `<|im_end|>`, `<PAD>` and resizing to a multiple of 64 shrinks it to 2048).
{parameters} parameters, saved in float16 (as Phi-2 ships). Folder size {size} bytes.
Config `resid_pdrop` is 0.1 (Phi-2's value, used when fine-tuning); pre-training itself ran with dropout 0.

## Training
AdamW (betas 0.9/0.95, weight decay {WEIGHT_DECAY} on matrices, none on biases/LayerNorms), peak LR {PEAK_LR},
{WARMUP} warm-up steps then cosine to {MIN_LR_RATIO:g}× peak, {STEPS} steps of {BATCH} × {SEQ_LEN} tokens
({STEPS * BATCH * SEQ_LEN} tokens, ≈{STEPS * BATCH * SEQ_LEN / len(train_stream):.1f} passes), grad-norm clip 1.0,
float32, {threads} CPU thread(s) under `nice -n 19`, seed {SEED}. Wall time {wall / 60:.1f} min on
{platform.processor() or platform.machine()} (shared with other work).

| step | train loss (batch) | held-out loss | seconds |
|---|---|---|---|
{curve}

Final mean loss over fixed windows: train {train_loss:.3f}, held-out {held_out_loss:.3f} (nats/token).

## Greedy samples (40 new tokens, float32 weights before the float16 cast)
{sample_lines}

## Versions
torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__},
Python {platform.python_version()}.

## Reproducibility
Seeded throughout; the batch at each step is a function of (seed, step), so resuming from a checkpoint
sees the same data. Float32 CPU kernels may differ in the last bits across machines and thread counts, so a
re-run should match in quality, not necessarily byte for byte (byte identity was not checked).
"""
    (out / "PRETRAINING.md").write_text(text)


if __name__ == "__main__":
    main()
