"""A small Phi-2-like byte-level BPE tokenizer.json, and what tokenizers and transformers make of it.

Re-create the fixtures with:

    .venv-xtuner/bin/python tests/reference/byte_level_bpe.py

(a few seconds; tests/reference/data_pipeline.py reads phi2_like/, so re-run it after any change
that alters the trained tokenizer). It writes, under tests/data/data/bpe/:

  phi2_like/tokenizer.json
      a byte-level BPE (vocabulary 1500) trained by the ``tokenizers`` package on
      _hostile_corpus.TRAINING_TEXT, sentencepiece_bpe.generated_text() and EXTRA_TEXTS (below) 20
      times, set up as Phi-2's tokenizer.json is: ByteLevel pre-tokenizer (add_prefix_space false, trim_offsets true,
      use_regex true), ByteLevel post-processor and decoder, no normalizer, <|endoftext|> a special
      added token that is also in the model vocabulary, and CodeGen's whitespace runs as added tokens
      right after the vocabulary (31 down to 2 spaces, then 9 down to 2 tabs; normalized true, special
      false, as Phi-2's ids 50257..50294). The model's continuing_subword_prefix and
      end_of_word_suffix are "" (not null), as transformers' GPT2Converter writes them and so Phi-2's
      file has them. Merges in the pairs form [["a", "b"], ...] that tokenizers >= 0.20 writes.
  phi2_like/tokenizer_config.json
      Phi-2's keys (CodeGenTokenizer; bos = eos = unk = <|endoftext|>; added_tokens_decoder with the
      same tokens and flags as tokenizer.json; clean_up_tokenization_spaces true).
  tokenizer_legacy_merges.json
      the same tokenizer.json with the merges in the legacy "a b" string form (older files, Phi-2's
      among them; byte-level tokens never contain a space, so the two forms say the same).
  ascii_unk.json
      a byte-level BPE with unk_token "<unk>" trained on the ASCII texts of TRAINING_TEXT without the
      full byte alphabet, so that every byte >= 0x80 has no token and becomes <unk>.
  encodings.json
      for every HOSTILE entry, then the EXTRA_TEXTS and PROBE_TEXTS below: its bytes; for entries that
      are not UTF-8, the offset where Python's strict decoder stops; for the others
        (a) ``tokenizers``: tokenizers.Tokenizer.from_file(phi2_like/tokenizer.json):
            encode(text, add_special_tokens=False).ids and decode(ids) with skip_special_tokens
            false and true;
        (b) ``transformers``: AutoTokenizer.from_pretrained(phi2_like) (CodeGenTokenizerFast) after the
            Phi-2 tutorial's run-time additions (add_tokens(["<|im_start|>", "<PAD>"]),
            pad_token = "<PAD>", add_special_tokens(dict(eos_token="<|im_end|>"))):
            encode(text, add_special_tokens=False), the decode of its tokenizers backend (skip false and
            true), and transformers' own decode() for the record (it also applies
            clean_up_tokenization_spaces, an English-punctuation heuristic: "a != b" -> "a!= b").
        (c) ``variants``: the ids tokenizers gives with other pre_tokenizers in the same file (each
            variant's pre_tokenizer JSON is stored with it): a Llama-3-style Sequence of a Split regex
            and ByteLevel(use_regex false), ByteLevel with add_prefix_space true, and a Split on a
            literal string (". ") before ByteLevel; ``ignore_merges``: the ids with the model's
            ignore_merges set to true (as Llama-3's file has it) and the merge that makes "Ġthe"
            removed (named in ``ignore_merges_edit``): every token of a trained vocabulary is what
            merging its own spelling gives, so without that edit the setting changes no id;
        (d) ``unk``: the ids of ascii_unk.json, with fuse_unk false and true;
        (e) ``slow_ids``: the ids of the slow tokenizer (below) after the same run-time additions.
      ``runtime``: the ids transformers gives the run-time tokens, their flags, what add_tokens /
      add_special_tokens returned, len(tokenizer) before and after, and the special ids; ``readd``:
      what add_tokens then returns for tokens that are an added token already with the same flags,
      a model token, and "", and the flags of the model token after it.
      ``long_text``: a longer generated text (long pre-tokens included) and its ids from (a).
      ``lossy_decode``: byte sequences that are not UTF-8 (cut characters, surrogates, overlong forms),
      as the ids of their one-byte tokens, and what tokenizers' decode makes of them
      (from_utf8_lossy: one U+FFFD per maximal invalid subsequence).
      ``config_variant``: tokenizer_config.json with tokens that tokenizer.json lacks (an
      added_tokens_decoder entry "<extra>", a pad_token "<|pad|>", a mask_token "<mask>" and
      additional_special_tokens: strings, an AddedToken object with its own flags, "<extra>" again,
      which makes it special, and tokens already there), and what AutoTokenizer makes of it: the ids
      and flags of the new tokens, len(tokenizer), the special ids and the ids of a text using them.
      ``slow_tokenizer``: the tutorial loads with use_fast=False. That path exists in this
      transformers (CodeGenTokenizer, Python BPE over vocab.json + merges.txt, which this script
      writes to a temporary folder); its ids are (e) above. Its decode does differ:
      spaces_between_special_tokens puts spaces around added tokens, and skip_special_tokens drops
      every token in all_special_ids (so also "<PAD>", which is not flagged special); qlora decodes as
      the tokenizers backend does.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

from _hostile_corpus import HOSTILE, TRAINING_TEXT, fixture_entry  # noqa: E402
from _refcommon import DATA_DIR, versions  # noqa: E402
from sentencepiece_bpe import generated_text  # noqa: E402

import tokenizers  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode  # noqa: E402

OUT_DIR = os.path.join(DATA_DIR, "data", "bpe")
MODEL_DIR = os.path.join(OUT_DIR, "phi2_like")
VOCAB_SIZE = 1500

# Llama-3's pre-tokenizer regex (meta-llama/Meta-Llama-3-8B tokenizer.json).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
VARIANTS = {
    "llama3_split": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    },
    "prefix_space": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    # A literal pattern (regex characters in it are plain text) before the GPT-2 regex.
    "literal_split": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"String": ". "}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    },
}


# More texts where PCRE2 (qlora) and Oniguruma (tokenizers) could disagree: U+180E (White_Space for
# PCRE2 10.42's \\s, not for Oniguruma) next to spaces and punctuation, separators that Python's
# isspace() takes but Unicode's White_Space does not (U+001C..U+001F, U+200B), and letters and numbers
# of the rarer categories (Lt, Lm, Nl, No, Nd outside ASCII).
EXTRA_TEXTS = [
    "a \u180e b x\u180e, y \u180e\u180e  z\u180e \u180e\n",
    "\u2028\u2029 \u3000x\r\n\r\n  x   \n  y \u00a0\u00a0word",
    "\u200b zero width\u200b \x1c\x1d\x1e\x1f seps \x1c x",
    "\u01c5 titlecase \u02b0modifier \u216b roman \u00b2\u00b3 \u0663\u0664 it\u2019s",
]

# Texts that are encoded but not trained on (so that adding one changes no token of the model): ". "
# for the literal_split variant, " the" for ignore_merges, the run-time and config tokens.
PROBE_TEXTS = [
    "Hello. World. ",
    "a. b.. c . d.\n. e",
    "the other. There, the end. the",
    "<|im_start|>user. the<|im_end|><PAD>",
]

# The merge removed for the ignore_merges variant (see the docstring).
IGNORE_MERGES_REMOVED = "\u0120the"


def whitespace_runs() -> list[AddedToken]:
    """CodeGen's added tokens: 31..2 spaces, then 9..2 tabs (normalized, not special)."""
    runs = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
    return [AddedToken(run, normalized=True, special=False) for run in runs]


def train() -> dict:
    """The trained tokenizer as a tokenizer.json document (pairs merges)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    # EXTRA_TEXTS repeated, so that merges span the places where a regex engine could cut differently.
    tokenizer.train_from_iterator(TRAINING_TEXT + generated_text() + EXTRA_TEXTS * 20, trainer)
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    tokenizer.add_tokens(whitespace_runs())
    document = json.loads(tokenizer.to_str())
    document["model"]["continuing_subword_prefix"] = ""
    document["model"]["end_of_word_suffix"] = ""
    assert isinstance(document["model"]["merges"][0], list)
    return document


def phi2_config(document: dict) -> dict:
    decoder = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in document["added_tokens"]}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|endoftext|>",
        "model_max_length": 2048,
        "return_token_type_ids": False,
        "tokenizer_class": "CodeGenTokenizer",
        "unk_token": "<|endoftext|>",
    }


def write_json(path: str, document, indent: int | None = 1) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = json.dumps(document, indent=indent, ensure_ascii=False) + "\n"
    if len(text.encode()) > 1 << 20:
        raise SystemExit(f"{path}: over the 1 MiB fixture limit")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(path, DATA_DIR)} ({len(text.encode())} bytes)")


def tutorial_additions(tokenizer) -> dict:
    """The Phi-2 tutorial's run-time changes; returns what they gave."""
    size_before = len(tokenizer)
    added = tokenizer.add_tokens(["<|im_start|>", "<PAD>"])
    tokenizer.pad_token = "<PAD>"
    added_special = tokenizer.add_special_tokens(dict(eos_token="<|im_end|>"))
    new_tokens = {}
    for content in ("<|im_start|>", "<PAD>", "<|im_end|>"):
        token_id = tokenizer.convert_tokens_to_ids(content)
        flags = tokenizer.added_tokens_decoder[token_id]
        new_tokens[content] = {"id": token_id, "special": flags.special, "normalized": flags.normalized,
                               "lstrip": flags.lstrip, "rstrip": flags.rstrip, "single_word": flags.single_word}
    return {
        "size_before": size_before,
        "add_tokens_returned": added,
        "add_special_tokens_returned": added_special,
        "size_after": len(tokenizer),
        "tokens": new_tokens,
        "special_ids": {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                        "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id},
    }


def ascii_unk_model() -> dict:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"], show_progress=False)
    tokenizer.train_from_iterator([t for t in TRAINING_TEXT if t.isascii()], trainer)
    return json.loads(tokenizer.to_str())


def with_model_settings(document: dict, **settings) -> Tokenizer:
    changed = copy.deepcopy(document)
    changed["model"].update(settings)
    return Tokenizer.from_str(json.dumps(changed))


def ignore_merges_variant(document: dict) -> tuple[Tokenizer, list]:
    """ignore_merges with the merge that makes IGNORE_MERGES_REMOVED removed; returns it and that merge."""
    changed = copy.deepcopy(document)
    merges = changed["model"]["merges"]
    removed = [m for m in merges if m[0] + m[1] == IGNORE_MERGES_REMOVED]
    assert len(removed) == 1, removed
    merges.remove(removed[0])
    changed["model"]["ignore_merges"] = True
    return Tokenizer.from_str(json.dumps(changed)), removed[0]


def variant_tokenizers(document: dict) -> dict:
    variants = {}
    for name, pre_tokenizer in VARIANTS.items():
        changed = copy.deepcopy(document)
        changed["pre_tokenizer"] = pre_tokenizer
        variants[name] = Tokenizer.from_str(json.dumps(changed))
    return variants


def slow_tokenizer(document: dict):
    """The tutorial's use_fast=False tokenizer: CodeGenTokenizer reads vocab.json and merges.txt."""
    folder = tempfile.mkdtemp(prefix="bpe_slow_")
    Tokenizer.from_str(json.dumps(document)).model.save(folder)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(phi2_config(document), f)
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=False)
    assert type(tokenizer).__name__ == "CodeGenTokenizer", type(tokenizer)
    tutorial_additions(tokenizer)
    return tokenizer


LOSSY_BYTES = [b"\xe4\xbda", b"\xff", b"x\xf0\x9f\x98", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe0\x80z",
               b"\xf4\x90\x80\x80", b"\xe4\xbd\xa0\xe5", b"\x80\x80\x80"]


def lossy_decode(reference: Tokenizer) -> list:
    byte_char = bytes_to_unicode()
    cases = []
    for raw in LOSSY_BYTES:
        ids = [reference.token_to_id(byte_char[b]) for b in raw]
        cases.append({"bytes": list(raw), "ids": ids, "decode": reference.decode(ids)})
    return cases


def config_variant(document: dict) -> dict:
    """tokenizer_config.json naming tokens tokenizer.json lacks, and what transformers makes of them."""
    config = phi2_config(document)
    next_id = max(int(i) for i in config["added_tokens_decoder"]) + 1
    config["added_tokens_decoder"][str(next_id)] = {"content": "<extra>", "single_word": False, "lstrip": False,
                                                   "rstrip": False, "normalized": True, "special": False}
    config["pad_token"] = "<|pad|>"
    config["mask_token"] = "<mask>"
    config["additional_special_tokens"] = [
        "<|tool|>",
        {"__type": "AddedToken", "content": "<|obj|>", "lstrip": True, "rstrip": False, "single_word": False,
         "normalized": True},
        "<extra>",
        "<|endoftext|>",
        "<|tool|>",
        "<mask>",
    ]
    folder = tempfile.mkdtemp(prefix="bpe_config_")
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(document, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens = {}
    for content in ("<extra>", "<|pad|>", "<mask>", "<|tool|>", "<|obj|>"):
        token_id = tokenizer.convert_tokens_to_ids(content)
        flags = tokenizer.added_tokens_decoder[token_id]
        tokens[content] = {"id": token_id, "special": flags.special, "normalized": flags.normalized,
                           "lstrip": flags.lstrip, "rstrip": flags.rstrip, "single_word": flags.single_word}
    text = "a<extra>b <|pad|>c<|endoftext|><|tool|>x <|obj|>y<mask>"
    return {"config": config, "size": len(tokenizer), "tokens": tokens,
            "special_ids": {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                            "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id},
            "text": text, "ids": tokenizer.encode(text, add_special_tokens=False)}


def long_text() -> str:
    lines = generated_text()[:400]
    lines += ["x" * 200, "1234567890" * 20, "=" * 150, "aGVsbG8gd29ybGQ" * 12, "\t" * 12 + "tabs", " " * 70 + "spaces"]
    return "\n".join(lines)


def main() -> None:
    document = train()
    write_json(os.path.join(MODEL_DIR, "tokenizer.json"), document, indent=None)
    legacy = copy.deepcopy(document)
    legacy["model"]["merges"] = [f"{a} {b}" for a, b in document["model"]["merges"]]
    write_json(os.path.join(OUT_DIR, "tokenizer_legacy_merges.json"), legacy, indent=None)
    write_json(os.path.join(MODEL_DIR, "tokenizer_config.json"), phi2_config(document), indent=2)

    reference = Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    legacy_reference = Tokenizer.from_file(os.path.join(OUT_DIR, "tokenizer_legacy_merges.json"))
    pretrained = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert type(pretrained).__name__ == "CodeGenTokenizerFast", type(pretrained)
    runtime = tutorial_additions(pretrained)
    variants = variant_tokenizers(document)
    ignore_merges, removed_merge = ignore_merges_variant(document)
    unk_document = ascii_unk_model()
    write_json(os.path.join(OUT_DIR, "ascii_unk.json"), unk_document, indent=None)
    unk_models = {f"fuse_unk_{str(fuse).lower()}": with_model_settings(unk_document, fuse_unk=fuse)
                  for fuse in (False, True)}
    slow = slow_tokenizer(document)

    entries, other_slow_decode = [], []
    for index, raw in enumerate(HOSTILE + [text.encode() for text in EXTRA_TEXTS + PROBE_TEXTS]):
        entry, text = fixture_entry(raw)
        if text is None:
            entries.append(entry)
            continue
        ids = reference.encode(text, add_special_tokens=False).ids
        assert legacy_reference.encode(text, add_special_tokens=False).ids == ids
        entry["tokenizers"] = {"ids": ids, "decode": reference.decode(ids, skip_special_tokens=False),
                               "decode_skip_special": reference.decode(ids, skip_special_tokens=True)}
        ids = pretrained.encode(text, add_special_tokens=False)
        backend = pretrained.backend_tokenizer
        entry["transformers"] = {
            "ids": ids,
            "decode": backend.decode(ids, skip_special_tokens=False),
            "decode_skip_special": backend.decode(ids, skip_special_tokens=True),
            "transformers_decode": pretrained.decode(ids),
        }
        entry["variants"] = {name: v.encode(text, add_special_tokens=False).ids for name, v in variants.items()}
        entry["ignore_merges"] = ignore_merges.encode(text, add_special_tokens=False).ids
        entry["unk"] = {name: m.encode(text, add_special_tokens=False).ids for name, m in unk_models.items()}
        entry["slow_ids"] = slow.encode(text, add_special_tokens=False)
        if slow.decode(ids) != pretrained.decode(ids):
            other_slow_decode.append(index)
        entries.append(entry)

    text = long_text()
    readd_tokens = ["<|im_start|>", "st", ""]
    readd = {"tokens": readd_tokens, "returned": pretrained.add_tokens(readd_tokens), "size_after": len(pretrained)}
    st = pretrained.convert_tokens_to_ids("st")
    readd["st"] = {"id": st, "special": pretrained.added_tokens_decoder[st].special,
                   "normalized": pretrained.added_tokens_decoder[st].normalized}
    runtime["readd"] = readd
    fixture = {
        "versions": {**versions(), "tokenizers": tokenizers.__version__},
        "model_size": reference.get_vocab_size(with_added_tokens=False),
        "size_with_added_tokens": reference.get_vocab_size(with_added_tokens=True),
        "runtime": runtime,
        "variants": VARIANTS,
        "ignore_merges_edit": {"removed_merge": removed_merge},
        "slow_tokenizer": {"class": type(slow).__name__, "entries_with_other_decode": other_slow_decode},
        "entries": entries,
        "long_text": {"text": text, "ids": reference.encode(text, add_special_tokens=False).ids},
        "lossy_decode": lossy_decode(reference),
        "config_variant": config_variant(document),
    }
    write_json(os.path.join(OUT_DIR, "encodings.json"), fixture)


if __name__ == "__main__":
    main()
