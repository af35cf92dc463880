"""Reference fixtures for packing, collation and per-rank sharding (data/ layer).

Run: ``.venv-xtuner/bin/python tests/reference/xtuner_packing.py`` (about 15 s on 2 cores).

Writes, under tests/data/data/packing/ (JSON, each well under 1 MiB):

  xtuner_packer_toy.json
      XTuner's real ``Packer`` (``xtuner.dataset.utils``) called directly on the toy
      vectors of design/notes/xtuner_spec.md section 4.3: per case, the chunk size, the
      batches handed to successive calls, what each call returned (input_ids, labels,
      cumulative_len, position_ids per chunk) and the state left behind (``residual``
      ids/labels and ``residual_cumulative_len``, with the position_ids the Packer's
      get_position_ids gives it).
  xtuner_packer_stream.json
      160 samples with realistic lengths and labels (see ``make_samples``:
      prompt tokens labelled -100, answer tokens labelled with their id, lengths from a
      log-normal mix plus forced length-1 samples and samples longer than max_length),
      packed the way XTuner's ``pack_dataset`` packs: ``Dataset.map(Packer(...),
      batched=True, batch_size=B, num_proc=P)`` of the real ``datasets`` library (so
      the batch cuts, the per-process shards and the per-shard Packer copies are
      datasets' own), with and without ``use_varlen_attn``; one case goes through
      XTuner's ``pack_dataset`` itself (batch 1000, shuffle_before_pack=False).
      ``dropped_tokens`` = input tokens - output tokens: the tails XTuner loses.
  collate.json
      ``default_collate_fn`` of XTuner on a padded batch and on one varlen chunk; the
      Phi-2 tutorial's ``collate`` (reproduced below, the few lines of
      /work/shared/seeds/003: pad to the longest with pad_token_id, labels -100,
      attention_mask 0); transformers' ``DataCollatorForSeq2Seq`` with
      ``pad_to_multiple_of=8``; and the error transformers raises when asked to pad
      with a tokenizer that has no pad token.
  distributed_sampler.json
      torch's ``DistributedSampler`` (shuffle=False) applied to a given permutation:
      the indices each rank gets for several dataset sizes, world sizes and drop_last.
      (torch.randperm's stream is not reproduced by qlora, which draws its own
      permutations; the sharding step after it is what this fixture pins down.)
  epoch_permutations.json
      qlora's own epoch/pack-shuffle permutations for a few (n, seed, stream), from
      ``seeded_permutation`` below: an independent Python implementation of the
      documented algorithm (Philox4x32-10 as cuRAND lays it out, checked here against
      Random123's known answer; Lemire's unbiased bounded draw; Fisher-Yates from the
      top). No package defines this order, so the fixture pins the algorithm: a
      change to it would break resuming runs started with an earlier qlora.

XTuner shuffles before packing with ``dataset.shuffle()`` and no seed (a seed drawn
from numpy's global state), which no other program can reproduce; the packer
fixtures therefore use shuffle_before_pack=False and test the packer on a given order.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _refcommon as rc  # noqa: E402

OUT_DIR = os.path.join(rc.DATA_DIR, "data", "packing")
IGNORE_INDEX = -100

# The stream fixture: sizes chosen so that max_length is small against the sample
# mix (several samples per chunk, some samples longer than a chunk) while the JSON
# stays small.
STREAM_SAMPLES = 160
STREAM_MAX_LENGTH = 64
STREAM_SEED = 4242


def versions() -> dict:
    import datasets
    import transformers
    import xtuner

    v = rc.versions()
    v.update(xtuner=xtuner.__version__, datasets=datasets.__version__, transformers=transformers.__version__)
    return v


def write_json(name: str, payload: dict) -> None:
    path = os.path.join(OUT_DIR, name)
    os.makedirs(OUT_DIR, exist_ok=True)
    payload = {"script": "tests/reference/xtuner_packing.py", "versions": versions(), **payload}
    text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
    if len(text) > rc.MAX_FILE_BYTES:
        raise SystemExit(f"{path}: {len(text)} bytes exceeds the fixture limit")
    with open(path, "w") as f:
        f.write(text + "\n")
    print(f"wrote {os.path.relpath(path, rc.REPO_ROOT)} ({len(text)} bytes)")


def as_ints(value) -> list:
    """A (nested) list of Python ints from lists, numpy arrays or torch tensors."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: as_ints(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_ints(v) for v in value]
    return int(value)


# ---------------------------------------------------------------------------
# Packer on the spec's toy vectors
# ---------------------------------------------------------------------------


def toy_batch(lengths, first_id):
    """Samples of the given lengths with consecutive ids from first_id; labels = ids,
    except that every third token is -100 so that labels are not a copy of the ids."""
    batch = {"input_ids": [], "labels": []}
    next_id = first_id
    for n in lengths:
        ids = list(range(next_id, next_id + n))
        next_id += n
        batch["input_ids"].append(ids)
        batch["labels"].append([IGNORE_INDEX if t % 3 == 0 else t for t in ids])
    return batch


def toy_fixture():
    from xtuner.dataset.utils import Packer

    cases = [
        # (name, chunk size, [(sample lengths, first id) per call])
        ("spec_two_calls", 8, [([3, 5, 6, 2, 4], 0), ([7, 1], 100)]),
        ("spec_short_chunk", 8, [([2, 3], 0)]),
        ("spec_long_sample", 4, [([10, 1], 0)]),
        ("exact_multiple", 4, [([2, 2, 4], 0), ([3], 50)]),
        ("boundary_at_chunk_end", 5, [([5, 5, 1], 0), ([4], 20), ([9], 40)]),
        ("short_then_long", 6, [([1], 0), ([2, 1], 10), ([13], 20), ([1, 1], 40)]),
    ]
    out = []
    for name, chunk, calls in cases:
        packer = Packer(chunk, use_varlen_attn=True)
        recorded = []
        for lengths, first_id in calls:
            batch = toy_batch(lengths, first_id)
            result = packer(batch)
            recorded.append(
                {
                    "batch": batch,
                    "chunks": [
                        {
                            "input_ids": as_ints(result["input_ids"][k]),
                            "labels": as_ints(result["labels"][k]),
                            "cumulative_len": as_ints(result["cumulative_len"][k]),
                            "position_ids": as_ints(result["position_ids"][k]),
                        }
                        for k in range(len(result["input_ids"]))
                    ],
                    "residual": {
                        "input_ids": as_ints(packer.residual["input_ids"]),
                        "labels": as_ints(packer.residual["labels"]),
                        "cumulative_len": as_ints(packer.residual_cumulative_len),
                        # What the short-chunk branch would emit for it.
                        "position_ids": as_ints(packer.get_position_ids([packer.residual_cumulative_len])[0]),
                    },
                }
            )
        out.append({"name": name, "max_length": chunk, "calls": recorded})
    write_json("xtuner_packer_toy.json", {"cases": out})


# ---------------------------------------------------------------------------
# Packer through datasets.map, on a realistic stream
# ---------------------------------------------------------------------------


def make_samples(n: int, seed: int, max_length: int):
    """n samples like tokenized SFT data, relative to max_length.

    Length: log-normal with median max_length/4 and sigma 0.9 (normalish is an
    Irwin-Hall(4) normal with std ~0.577, hence the 1/0.577 scale), at least 1.
    Every 23rd sample has length 1 and every 41st is 1.5-2.7x max_length long, so that
    single-token segments and samples spanning several chunks are always present.
    Prompt: the first ~40 % of the tokens (at least 1 when the sample has 2 or more),
    labelled -100; the answer is labelled with its ids. Ids in [3, 1000).
    """
    z = rc.normalish(n, seed, 1.0 / 0.577).astype(np.float64)
    u = rc.uniform01(n, seed + 1)
    ids_bits = rc.splitmix64(np.arange(n * 3 * max_length, dtype=np.uint64), seed + 2)
    samples = []
    cursor = 0
    for i in range(n):
        length = max(1, int(round(math.exp(math.log(max_length / 4) + 0.9 * z[i]))))
        if i % 23 == 5:
            length = 1
        if i % 41 == 7:
            length = int(max_length * (1.5 + 1.2 * u[i]))
        ids = [int(3 + b % 997) for b in ids_bits[cursor : cursor + length]]
        cursor += length
        prompt = 0 if length == 1 else max(1, int(0.4 * length))
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def pack_with_map(samples, max_length, use_varlen_attn, batch_size, num_proc, via_pack_dataset=False):
    import datasets
    from xtuner.dataset.huggingface import pack_dataset
    from xtuner.dataset.utils import Packer

    datasets.disable_caching()
    dataset = datasets.Dataset.from_dict(
        {"input_ids": [s["input_ids"] for s in samples], "labels": [s["labels"] for s in samples]}
    )
    if via_pack_dataset:
        # XTuner's own call: map(Packer, batched=True) with datasets' default batch size (1000).
        packed = pack_dataset(dataset, max_length, use_varlen_attn, shuffle_before_pack=False, map_num_proc=num_proc)
    else:
        packed = dataset.map(
            Packer(max_length, use_varlen_attn=use_varlen_attn), batched=True, batch_size=batch_size, num_proc=num_proc
        )
    chunks = []
    for row in packed:
        chunk = {"input_ids": as_ints(row["input_ids"]), "labels": as_ints(row["labels"])}
        if use_varlen_attn:
            chunk["cumulative_len"] = as_ints(row["cumulative_len"])
            chunk["position_ids"] = as_ints(row["position_ids"])
        chunks.append(chunk)
    return chunks


def stream_fixture():
    samples = make_samples(STREAM_SAMPLES, STREAM_SEED, STREAM_MAX_LENGTH)
    total = sum(len(s["input_ids"]) for s in samples)
    cases = [
        # (name, use_varlen_attn, map batch_size, map num_proc, through pack_dataset)
        ("varlen_batch64", True, 64, 1, False),
        ("plain_batch64", False, 64, 1, False),
        ("varlen_pack_dataset_defaults", True, 1000, 1, True),
        ("varlen_batch10_proc7", True, 10, 7, False),  # 160 = 6 shards of 23 + 1 of 22
        ("varlen_batch3_proc2", True, 3, 2, False),
        ("varlen_batch53", True, 53, 1, False),  # the last call takes the short-chunk branch
    ]
    out = []
    for name, varlen, batch_size, num_proc, via_pack_dataset in cases:
        chunks = pack_with_map(samples, STREAM_MAX_LENGTH, varlen, batch_size, num_proc, via_pack_dataset)
        emitted = sum(len(c["input_ids"]) for c in chunks)
        short = sum(1 for c in chunks if len(c["input_ids"]) < STREAM_MAX_LENGTH)
        print(f"  {name}: {len(chunks)} chunks, {short} short, {total - emitted} tokens dropped")
        out.append(
            {
                "name": name,
                "use_varlen_attn": varlen,
                "map_batch_size": batch_size,
                "map_num_proc": num_proc,
                "chunks": chunks,
                "dropped_tokens": total - emitted,
            }
        )
    # The fixture is only useful if both end-of-data behaviours and mid-stream short
    # chunks occur somewhere.
    assert any(c["dropped_tokens"] > 0 for c in out)
    assert any(len(c["chunks"][-1]["input_ids"]) < STREAM_MAX_LENGTH for c in out)
    write_json(
        "xtuner_packer_stream.json",
        {"max_length": STREAM_MAX_LENGTH, "samples": samples, "total_tokens": total, "cases": out},
    )


# ---------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------

PHI2_PAD_ID = 50296  # the tutorial's "<PAD>", added after "<|im_start|>" (50295) to Phi-2's 50295 tokens


def phi2_tutorial_collate(elements, pad_token_id):
    """The Phi-2 tutorial's ``collate`` (seeds/003, "定义collator"), reproduced: pad each
    sample to the batch's longest with pad_token_id, labels with IGNORE_INDEX,
    attention_mask with 0."""
    import torch

    tokens_maxlen = max(len(e["input_ids"]) for e in elements)
    for sample in elements:
        pad_len = tokens_maxlen - len(sample["input_ids"])
        sample["input_ids"].extend(pad_len * [pad_token_id])
        sample["labels"].extend(pad_len * [IGNORE_INDEX])
        sample["attention_mask"].extend(pad_len * [0])
    return {
        "input_ids": torch.tensor([e["input_ids"] for e in elements]),
        "labels": torch.tensor([e["labels"] for e in elements]),
        "attention_mask": torch.tensor([e["attention_mask"] for e in elements]),
    }


def collate_fixture():
    import copy

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast
    from xtuner.dataset.collate_fns import default_collate_fn
    from xtuner.dataset.utils import Packer

    samples = [
        {"input_ids": [1, 15, 16, 17, 18], "labels": [-100, -100, 16, 17, 18]},
        {"input_ids": [1, 25], "labels": [-100, 25]},
        {"input_ids": [1, 35, 36, 37, 38, 39, 0], "labels": [-100, -100, -100, 37, 38, 39, 0]},
    ]
    cases = []

    xtuner_padded = default_collate_fn(copy.deepcopy(samples), return_hf_format=True)
    cases.append(
        {
            "name": "xtuner_padded",
            "pad_id": 0,  # DEFAULT_PAD_TOKEN_INDEX, what XTuner's configs use
            "samples": samples,
            "input_ids": as_ints(xtuner_padded["input_ids"]),
            "labels": as_ints(xtuner_padded["labels"]),
            "attention_mask": as_ints(xtuner_padded["attention_mask"].int()),
            "position_ids": as_ints(xtuner_padded["position_ids"]),
        }
    )

    packer = Packer(8, use_varlen_attn=True)
    chunk_rows = packer(toy_batch([3, 2, 6], 40))
    chunk = {k: chunk_rows[k][0] for k in ("input_ids", "labels", "cumulative_len", "position_ids")}
    varlen = default_collate_fn([copy.deepcopy(chunk)], return_hf_format=True, use_varlen_attn=True)
    cases.append(
        {
            "name": "xtuner_varlen",
            "chunk": as_ints(chunk),
            "input_ids": as_ints(varlen["input_ids"]),
            "labels": as_ints(varlen["labels"]),
            "position_ids": as_ints(varlen["position_ids"]),
            "cumulative_len": as_ints(varlen["cumulative_len"][0]),
            "max_seqlen": as_ints(varlen["max_seqlen"]),
            "attention_mask": None if varlen.get("attention_mask") is None else "present",
        }
    )

    phi_elements = [dict(copy.deepcopy(s), attention_mask=[1] * len(s["input_ids"])) for s in samples]
    phi = phi2_tutorial_collate(phi_elements, PHI2_PAD_ID)
    cases.append(
        {
            "name": "phi2_tutorial",
            "pad_id": PHI2_PAD_ID,
            "samples": samples,
            "input_ids": as_ints(phi["input_ids"]),
            "labels": as_ints(phi["labels"]),
            "attention_mask": as_ints(phi["attention_mask"]),
        }
    )

    def word_level_tokenizer(with_pad: bool):
        vocab = {f"t{i}": i for i in range(64)}
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t3")))
        if with_pad:
            tok.pad_token = "t7"  # id 7
        return tok

    seq2seq = DataCollatorForSeq2Seq(word_level_tokenizer(True), pad_to_multiple_of=8, return_tensors="pt")
    padded8 = seq2seq(copy.deepcopy(samples))
    cases.append(
        {
            "name": "transformers_seq2seq_multiple_of_8",
            "pad_id": 7,
            "pad_to_multiple_of": 8,
            "samples": samples,
            "input_ids": as_ints(padded8["input_ids"]),
            "labels": as_ints(padded8["labels"]),
            "attention_mask": as_ints(padded8["attention_mask"]),
        }
    )

    try:
        DataCollatorForSeq2Seq(word_level_tokenizer(False), return_tensors="pt")(copy.deepcopy(samples))
        raise SystemExit("transformers padded without a pad token")
    except ValueError as e:
        missing_pad_message = str(e)

    write_json("collate.json", {"cases": cases, "missing_pad_message": missing_pad_message})


# ---------------------------------------------------------------------------
# DistributedSampler
# ---------------------------------------------------------------------------


def sampler_fixture():
    from torch.utils.data import DistributedSampler

    cases = []
    for n in (1, 3, 7, 10, 12, 29):
        # A permutation that is not torch's: argsort of splitmix words.
        permutation = [int(i) for i in np.argsort(rc.splitmix64(np.arange(n, dtype=np.uint64), 77 + n), kind="stable")]
        for world in (1, 2, 3, 4, 8):
            for drop_last in (False, True):
                ranks = []
                for rank in range(world):
                    sampler = DistributedSampler(
                        list(range(n)), num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last
                    )
                    ranks.append([permutation[i] for i in sampler])
                    num_samples = len(sampler)
                cases.append(
                    {
                        "permutation": permutation,
                        "world_size": world,
                        "drop_last": drop_last,
                        "num_samples": num_samples,
                        "total_size": sampler.total_size,
                        "ranks": ranks,
                    }
                )
    write_json("distributed_sampler.json", {"cases": cases})


# ---------------------------------------------------------------------------
# qlora's seeded permutation (independent re-implementation of the spec)
# ---------------------------------------------------------------------------

MASK32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    c, k = list(counter), list(key)
    for r in range(10):
        if r > 0:
            k = [(k[0] + 0x9E3779B9) & MASK32, (k[1] + 0xBB67AE85) & MASK32]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & MASK32, (p0 >> 32) ^ c[3] ^ k[1], p0 & MASK32]
    return c


def philox_words(seed, stream):
    """Words of blocks offset = 0, 1, ...: counter {offset lo, hi, stream lo, hi}, key {seed lo, hi}."""
    offset = 0
    while True:
        block = philox4x32_10(
            [offset & MASK32, offset >> 32, stream & MASK32, stream >> 32], [seed & MASK32, seed >> 32]
        )
        offset += 1
        yield from block


def seeded_permutation(n, seed, stream):
    words = philox_words(seed, stream)

    def below(bound):  # Lemire: multiply, reject the lowest (2^32 mod bound) products
        product = next(words) * bound
        if product & MASK32 < bound:
            threshold = (2**32 - bound) % bound
            while product & MASK32 < threshold:
                product = next(words) * bound
        return product >> 32

    order = list(range(n))
    for i in range(n, 1, -1):
        j = below(i)
        order[i - 1], order[j] = order[j], order[i - 1]
    return order


def permutation_fixture():
    # Random123 kat_vectors, philox4x32 10, counter 0 and key 0.
    assert philox4x32_10([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    cases = []
    for n, seed, stream in [
        (1, 0, 0),
        (2, 0, 0),
        (10, 0, 0),
        (10, 0, 1),
        (10, 1, 0),
        (97, 0x0123456789ABCDEF, 5),
        (300, 42, 2**64 - 1),  # the pack-shuffle stream
        (1000, 2**64 - 1, 3),
    ]:
        cases.append({"n": n, "seed": seed, "stream": stream, "permutation": seeded_permutation(n, seed, stream)})
    write_json("epoch_permutations.json", {"cases": cases})


def main():
    permutation_fixture()
    toy_fixture()
    stream_fixture()
    collate_fixture()
    sampler_fixture()


if __name__ == "__main__":
    main()
