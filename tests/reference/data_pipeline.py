"""End-to-end truth for BatchStream: two real pipelines, JSONL file to batches.

Re-create the fixtures with (after byte_level_bpe.py and sentencepiece_bpe.py, whose
tokenizers it uses):

    .venv-xtuner/bin/python tests/reference/data_pipeline.py

It writes, under tests/data/data/pipeline/:

  riddles.jsonl, riddles_batches.json
      The Phi-2 tutorial's pipeline (../shared/seeds/003_*.txt) on a riddles-format file
      ({"number", "messages": [user, assistant, ...]}): transformers' AutoTokenizer on the
      Phi-2-like stand-in (tests/data/data/bpe/phi2_like) with the tutorial's run-time
      additions, the tutorial's `tokenize` (ChatML per message, users masked, each message
      tokenized alone, truncated to MAX_LENGTH) and `collate` (pad to the longest with the pad
      id, labels -100, attention 0) over batches of BATCH_SIZE. `tokenize` and `collate` are
      re-typed from the tutorial with the same semantics (its code is not importable).
  riddles_trailing.jsonl, riddles_trailing_batches.json
      The same pipeline on riddles that end with an unanswered question, which the tutorial's
      `tokenize` keeps, masked (Phi2ChatML::keep_trailing_question). One record is a lone
      question: the tutorial keeps it as a sample with nothing to learn; SampleEncoder drops
      such samples (XTuner's filter), so the script drops it too before collating and records
      how many it dropped ("dropped_no_supervised").
  conversations.jsonl, xtuner_packed.json
      XTuner's pipeline (xtuner 0.2.0, its real functions) on an OpenAI-format file:
      openai_map_fn, template_map_fn(internlm2_chat), encode_fn(max_length=PACK_LENGTH) with
      the InternLM2-like stand-in tokenizer (tests/data/data/sentencepiece/internlm2_like, via
      the InternLM2Tokenizer class of sentencepiece_bpe.py), XTuner's "a label >= 0" filter,
      then Packer(PACK_LENGTH, use_varlen_attn=True) over one map batch (no shuffle: XTuner's
      shuffle has no seed to reproduce) -- the rows, their labels, position_ids and
      cumulative_len. The tail XTuner drops is recorded too.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _refcommon import DATA_DIR, versions  # noqa: E402
from sentencepiece_bpe import InternLM2Tokenizer  # noqa: E402

import datasets  # noqa: E402
import tokenizers  # noqa: E402
import xtuner  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from xtuner.dataset.map_fns import openai_map_fn, template_map_fn_factory  # noqa: E402
from xtuner.dataset.utils import Packer, encode_fn  # noqa: E402
from xtuner.utils import PROMPT_TEMPLATE  # noqa: E402

OUT = os.path.join(DATA_DIR, "data", "pipeline")
MAX_LENGTH = 96  # the tutorial truncates at 1024; small here so that truncation happens
BATCH_SIZE = 3
PACK_LENGTH = 64
IGNORE_INDEX = -100

RIDDLES = [
    ["What has keys but can't open locks?", "A piano: it has keys, yet opens nothing."],
    ["Born in despair, fed with mud, soon I'll bloom into beauty for the good.",
     "This riddle describes a flower.\n\n1. \"Born in despair\" is a hard start.\n2. \"Fed with mud\" is dirt.",
     "What kind of flower?", "A sunflower  (or a lotus, which grows in mud)."],
    ["什么东西越洗越脏？", "水。 Water gets dirtier the more you wash with it."],
    ["  leading and trailing spaces  ", "\tTabs,\r\nCRLF and emoji 😀 survive.\n"],
    ["Count: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30",
     "A long answer that the truncation will cut: " + "one two three four five six seven eight nine ten " * 6],
    ["<|im_start|> inside a question <|im_end|>", "Added tokens in text are split out."],
    ["def f(x):\n    return x ** 2", "It squares x; f(3) == 9."],
]

RIDDLES_TRAILING = [
    ["What has a neck but no head?", "A bottle.", "And what has a head but no neck?"],
    ["A lone riddle that nobody answered?"],
    ["What runs but never walks?", "A river.", "What has hands but cannot clap?", "A clock."],
    ["Short question", "Short answer", "Follow-up", "Second answer", "  Trailing follow-up?\n"],
    ["What gets wetter the more it dries?", "A towel."],
]

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Who are you?"},
                  {"role": "assistant", "content": "I am a small model trained with qlora."}]},
    {"messages": [{"role": "user", "content": "你好"},
                  {"role": "assistant", "content": "你好！我是一个助手。", "loss": False},
                  {"role": "user", "content": "What is 2 + 2?"},
                  {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "Write a loop."},
                  {"role": "assistant", "content": "for i in range(3):\n    print(i)\n"}]},
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "Name three colours."},
                  {"role": "assistant", "content": "Red, green and blue."},
                  {"role": "user", "content": "And two more?"},
                  {"role": "assistant", "content": "Yellow and purple."}]},
    {"messages": [{"role": "user", "content": "Only masked answers here."},
                  {"role": "assistant", "content": "This answer has no loss.", "loss": False}]},
    {"messages": [{"role": "user", "content": "Emoji? 😀🚀"},
                  {"role": "assistant", "content": "Yes: 👍  and   spaces."}]},
]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_json(path, document):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(document, f, ensure_ascii=False, indent=1)
        f.write("\n")


def tutorial_pipeline(data_path, drop_unsupervised=False):
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(DATA_DIR, "data", "bpe", "phi2_like"))
    tokenizer.add_tokens(["<|im_start|>", "<PAD>"])
    tokenizer.pad_token = "<PAD>"
    tokenizer.add_special_tokens(dict(eos_token="<|im_end|>"))
    templates = ["<|im_start|>assistant\n{msg}<|im_end|>", "<|im_start|>user\n{msg}<|im_end|>"]

    def tokenize(sample, max_length):  # the tutorial's tokenize
        input_ids, attention_mask, labels = [], [], []
        for i, msg in enumerate(sample["messages"]):
            is_human = i % 2 == 0
            encoded = tokenizer(templates[is_human].format(msg=msg), truncation=False, add_special_tokens=False)
            input_ids += encoded["input_ids"]
            attention_mask += encoded["attention_mask"]
            labels += [IGNORE_INDEX] * len(encoded["input_ids"]) if is_human else encoded["input_ids"]
        return {"input_ids": input_ids[:max_length], "attention_mask": attention_mask[:max_length],
                "labels": labels[:max_length]}

    def collate(elements):  # the tutorial's collate (lists, not tensors)
        longest = max(len(e["input_ids"]) for e in elements)
        for e in elements:
            pad = longest - len(e["input_ids"])
            e["input_ids"] = e["input_ids"] + pad * [tokenizer.pad_token_id]
            e["labels"] = e["labels"] + pad * [IGNORE_INDEX]
            e["attention_mask"] = e["attention_mask"] + pad * [0]
        return {k: [e[k] for e in elements] for k in ("input_ids", "labels", "attention_mask")}

    dataset = datasets.load_dataset("json", data_files=data_path, split="train")
    tokenized = [tokenize(sample, MAX_LENGTH) for sample in dataset]
    kept = [t for t in tokenized if not drop_unsupervised or any(label >= 0 for label in t["labels"])]
    batches = [collate(kept[i:i + BATCH_SIZE]) for i in range(0, len(kept), BATCH_SIZE)]
    result = {"max_length": MAX_LENGTH, "batch_size": BATCH_SIZE, "pad_id": tokenizer.pad_token_id,
              "eos_id": tokenizer.eos_token_id, "batches": batches}
    if drop_unsupervised:
        result["dropped_no_supervised"] = len(tokenized) - len(kept)
    return result


def xtuner_pipeline(data_path):
    tokenizer = InternLM2Tokenizer.from_pretrained(os.path.join(DATA_DIR, "data", "sentencepiece", "internlm2_like"))
    template_map_fn = template_map_fn_factory(template=PROMPT_TEMPLATE.internlm2_chat)
    samples = []
    with open(data_path, encoding="utf-8") as f:
        for line in f:
            mapped = template_map_fn(openai_map_fn(json.loads(line)))
            if not mapped["conversation"]:
                continue
            encoded = encode_fn(mapped, tokenizer, max_length=PACK_LENGTH, input_ids_with_output=True)
            if any(label >= 0 for label in encoded["labels"]):  # process()'s filter
                samples.append(encoded)
    packer = Packer(chunk_size=PACK_LENGTH, use_varlen_attn=True)
    packed = packer({"input_ids": [s["input_ids"] for s in samples], "labels": [s["labels"] for s in samples]})
    rows = [{"input_ids": ids, "labels": labels, "position_ids": positions, "cumulative_len": cumulative}
            for ids, labels, positions, cumulative in zip(packed["input_ids"], packed["labels"],
                                                        packed["position_ids"], packed["cumulative_len"])]
    dropped = len(packer.residual["input_ids"]) if sum(len(s["input_ids"]) for s in samples) >= PACK_LENGTH else 0
    return {"max_length": PACK_LENGTH, "samples": samples, "rows": rows, "dropped_tokens": dropped}


def main():
    os.makedirs(OUT, exist_ok=True)
    riddles_path = os.path.join(OUT, "riddles.jsonl")
    write_jsonl(riddles_path, [{"number": n, "messages": m} for n, m in enumerate(RIDDLES)])
    trailing_path = os.path.join(OUT, "riddles_trailing.jsonl")
    write_jsonl(trailing_path, [{"number": n, "messages": m} for n, m in enumerate(RIDDLES_TRAILING)])
    conversations_path = os.path.join(OUT, "conversations.jsonl")
    write_jsonl(conversations_path, CONVERSATIONS)
    meta = {**versions(), "tokenizers": tokenizers.__version__, "datasets": datasets.__version__,
            "xtuner": xtuner.__version__, "script": "tests/reference/data_pipeline.py"}
    write_json(os.path.join(OUT, "riddles_batches.json"), {"meta": meta, **tutorial_pipeline(riddles_path)})
    write_json(os.path.join(OUT, "riddles_trailing_batches.json"),
               {"meta": meta, **tutorial_pipeline(trailing_path, drop_unsupervised=True)})
    write_json(os.path.join(OUT, "xtuner_packed.json"), {"meta": meta, **xtuner_pipeline(conversations_path)})


if __name__ == "__main__":
    main()
