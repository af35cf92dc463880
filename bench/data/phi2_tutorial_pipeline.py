"""The Phi-2 QLoRA tutorial's data pipeline, the Python baseline of data_pipeline_bench.

Run by bench/data/data_pipeline_bench.cpp (a subprocess, in the same run as the C++
pipeline, on the same JSONL file and tokenizer folder); also usable by hand:

    .venv/bin/python bench/data/phi2_tutorial_pipeline.py TOKENIZER_DIR DATA.jsonl [--num-proc N]

What it does is what the tutorial (../shared/seeds/003_*.txt) does, re-typed here with the
same semantics: AutoTokenizer with the tutorial's run-time additions (<|im_start|> and
<PAD> added, <PAD> as pad, <|im_end|> as EOS); `datasets.load_dataset("json")`;
`dataset.map(tokenize, batched=False)` where tokenize applies the ChatML templates
message by message (even index = user, masked with -100), tokenizes each message
separately without special tokens and truncates to 1024; then the tutorial's `collate`
(pad to the longest with the pad id, labels -100, attention 0) over batches of
`--batch-size` samples, making torch tensors as the Trainer's DataLoader would.

Prints one JSON line: {"seconds", "samples", "tokens", "batches", "unsupervised_tokens"},
where seconds covers load_dataset through the last collated batch (imports and the
tokenizer load are excluded: they are a fixed cost, not throughput), tokens counts
the non-pad tokens of the collated batches, and unsupervised_tokens those of samples
with no supervised label (a user message that fills max_length), which qlora drops.
"""

import argparse
import json
import time
from functools import partial

import datasets
import torch
from transformers import AutoTokenizer

IGNORE_INDEX = -100
TEMPLATES = [
    "<|im_start|>assistant\n{msg}<|im_end|>",  # message by assistant
    "<|im_start|>user\n{msg}<|im_end|>",  # message by user
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenizer_dir")
    parser.add_argument("data")
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    tokenizer.add_tokens(["<|im_start|>", "<PAD>"])
    tokenizer.pad_token = "<PAD>"
    tokenizer.add_special_tokens(dict(eos_token="<|im_end|>"))

    def tokenize(sample, max_length):
        input_ids, attention_mask, labels = [], [], []
        for i, msg in enumerate(sample["messages"]):
            is_human = i % 2 == 0
            encoded = tokenizer(TEMPLATES[is_human].format(msg=msg), truncation=False, add_special_tokens=False)
            input_ids += encoded["input_ids"]
            attention_mask += encoded["attention_mask"]
            labels += [IGNORE_INDEX] * len(encoded["input_ids"]) if is_human else encoded["input_ids"]
        return {
            "input_ids": input_ids[:max_length],
            "attention_mask": attention_mask[:max_length],
            "labels": labels[:max_length],
        }

    def collate(elements):
        longest = max(len(e["input_ids"]) for e in elements)
        for e in elements:
            pad = longest - len(e["input_ids"])
            e["input_ids"].extend(pad * [tokenizer.pad_token_id])
            e["labels"].extend(pad * [IGNORE_INDEX])
            e["attention_mask"].extend(pad * [0])
        return {
            "input_ids": torch.tensor([e["input_ids"] for e in elements]),
            "labels": torch.tensor([e["labels"] for e in elements]),
            "attention_mask": torch.tensor([e["attention_mask"] for e in elements]),
        }

    datasets.disable_caching()  # a warm cache would time a disk read, not the pipeline
    datasets.disable_progress_bars()
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=args.data, split="train", keep_in_memory=True)
    tokenized = dataset.map(
        partial(tokenize, max_length=args.max_length),
        batched=False,
        num_proc=args.num_proc if args.num_proc > 1 else None,
        remove_columns=dataset.column_names,
        keep_in_memory=True,
    )
    tokens = batches = 0
    for begin in range(0, len(tokenized), args.batch_size):
        rows = tokenized[begin : begin + args.batch_size]
        elements = [
            {"input_ids": i, "labels": l, "attention_mask": m}
            for i, l, m in zip(rows["input_ids"], rows["labels"], rows["attention_mask"])
        ]
        batch = collate(elements)
        tokens += int(batch["attention_mask"].sum())
        batches += 1
    seconds = time.perf_counter() - start
    # Not timed: the tokens of samples with no supervised label. The tutorial trains on
    # them (they add nothing to the loss); qlora's encoder drops them, as XTuner does,
    # so the benchmark compares the other tokens.
    unsupervised = sum(len(ids) for ids, labels in zip(tokenized["input_ids"], tokenized["labels"])
                       if all(label == IGNORE_INDEX for label in labels))
    print(json.dumps({"seconds": seconds, "samples": len(tokenized), "tokens": tokens, "batches": batches,
                      "unsupervised_tokens": unsupervised}))


if __name__ == "__main__":
    main()
