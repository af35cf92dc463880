"""A small InternLM2-like SentencePiece BPE tokenizer, and what the reference libraries make of it.

Re-create the fixtures with:

    .venv/bin/python tests/reference/sentencepiece_bpe.py

(needs ``protobuf`` in the venv for sentencepiece's model proto; a few seconds). It writes, under
tests/data/data/sentencepiece/:

  internlm2_like/tokenizer.model
      trained by the ``sentencepiece`` package on _hostile_corpus.TRAINING_TEXT plus generated text
      (``generated_text()``), then given InternLM2's chat tokens as USER_DEFINED pieces at the top of
      the vocabulary, as InternLM2's tokenizer.model has them (<|im_end|> = size-2, <|im_start|> =
      size-1). Two of those six pieces keep the old "[UNUSED_TOKEN_14x]" names, which the config
      renames (InternLM2's first tokenizer.model had every chat token under such a name: xtuner's
      internlm2_chat template used [UNUSED_TOKEN_146] before its PR #339, and llama.cpp's InternLM2
      converter still renames pieces from added_tokens_decoder).
  internlm2_like/tokenizer_config.json
      shaped as internlm/internlm2-chat-7b's (the same keys, model_max_length written as the
      1e30 integer transformers saves, pad = eos = </s>), with added_tokens_decoder for <unk>, <s>,
      </s>, the six chat tokens, and one token the model does not have (<|endoftext|>, not special).
  encodings.json
      for every HOSTILE entry: the text (as UTF-8 bytes, since some are not UTF-8) and
        - invalid entries: the byte offset where Python's strict UTF-8 decoder stops;
        - valid entries: (a) ``sp``: sentencepiece alone: ids, pieces, sp.decode(ids);
          (b) ``pretrained``: the InternLM2 slow tokenizer loaded from the directory (config read by
          transformers): encode(text, add_special_tokens=False) ids, transformers' own decode, and
          the "plain" decode the C++ reproduces (``plain_decode``: runs of model ids through
          sp.decode, added tokens by their content; skip_special first drops transformers'
          all_special_ids);
          (c) ``bare``: the same class built from tokenizer.model alone (no config): its ids;
        then EXTRA_TEXTS in the same form, and ``decode_cases``: id sequences no text encodes to
        (bytes that are not UTF-8, byte runs cut by an added token, renamed ids) with their plain
        decodes. ``config_variant``: the stand-in's tokenizer_config.json with special tokens the
        model and its added_tokens_decoder lack (a sep_token, a mask_token, more
        additional_special_tokens, one of them an added_tokens_decoder entry that is not special),
        and what the pretrained tokenizer makes of it: len(tokenizer), the new tokens' ids, the
        special ids, and the ids and plain decodes of texts that use them.
  runtime.json
      add_tokens / set_special_token at run time, on the ``pretrained`` tokenizer: the ids
      transformers gives the new tokens and the encodings of texts that use them.
  tests/data/data/tokenizer_config/*.json and tokenizer_config/expected.json
      tokenizer_config.json variants and what transformers reads from each (special token names,
      added_tokens_decoder with flags, add_bos/eos_token, tokenizer_class, model_max_length, and
      all_special_tokens where the file names the BOS, EOS, UNK and PAD, so that no class default
      is among them).

The InternLM2 slow tokenizer: InternLM2's remote code (``tokenization_internlm2.py``) cannot be
imported here, so ``InternLM2Tokenizer`` below is a minimal ``PreTrainedTokenizer`` subclass
modelled on it: the same vocab_size/get_vocab/_tokenize (``sp_model.encode(text, out_type=str)``)/
piece<->id conversion and the same convert_tokens_to_string. Everything else (the added-token
trie split before sp sees the text, the added-token-first id lookup, from_pretrained reading
tokenizer_config.json, add_tokens) is transformers' own ``PreTrainedTokenizer`` machinery.

Trainer settings. Verified for InternLM2 (tests in lenML/llama2-tokenizer.js against its
vocabulary, llama.cpp's InternLM2 support PR #5184 and its converter): BPE, byte fallback with
<0x00>..<0xFF> right after <unk>=0 <s>=1 </s>=2 (so <0xF0> = 243), no dummy prefix ("Hello" ->
"Hello", not "▁Hello"), whitespace-only pieces (" " alone before an emoji). Not verified (taken as
Llama's / the brief's): split_digits=true, normalization_rule_name=identity (no NFKC),
remove_extra_whitespaces=false (InternLM2 tokenizes code, so runs of spaces must survive; not seen
in a reference). InternLM2's real vocabulary was assembled (cl100k + Chinese), not trained, so its
merges are not reproducible by the trainer in any case.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(__file__))

from _hostile_corpus import HOSTILE, TRAINING_TEXT, fixture_entry  # noqa: E402
from _refcommon import DATA_DIR, random_u32, versions  # noqa: E402

import sentencepiece as spm  # noqa: E402
from sentencepiece import sentencepiece_model_pb2  # noqa: E402
from transformers import PreTrainedTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

OUT_DIR = os.path.join(DATA_DIR, "data", "sentencepiece")
MODEL_DIR = os.path.join(OUT_DIR, "internlm2_like")
CONFIG_DIR = os.path.join(DATA_DIR, "data", "tokenizer_config")

TRAINED_VOCAB_SIZE = 1500
# InternLM2's top six ids, in its order; None keeps the old "[UNUSED_TOKEN_14x]" piece name in the
# model (the config then renames the id).
CHAT_PIECES = [
    ("<|plugin|>", "[UNUSED_TOKEN_141]"),
    ("<|interpreter|>", "[UNUSED_TOKEN_142]"),
    ("<|action_end|>", None),
    ("<|action_start|>", None),
    ("<|im_end|>", None),
    ("<|im_start|>", None),
]
EXTRA_CONFIG_TOKEN = "<|endoftext|>"  # in the config only, at the first id after the model

# Texts for the places where SentencePiece alone and the InternLM2 tokenizer part ways (encoded
# after the HOSTILE entries, in the same form).
EXTRA_TEXTS = [
    "<s>user</s> and <unk>?",
    "[UNUSED_TOKEN_141] is renamed <|plugin|>; <|interpreter|>[UNUSED_TOKEN_142]",
    " <|im_end|> \n <|im_start|>  spaced",
    "bytes\U0001F680<|im_end|>\U0001F680 split",
    "a\u2581b \u2581\u2581 literal U+2581",
    "<|action_start|><|action_end|><|endoftext|><|endoftext|>",
]


def generated_text() -> list[str]:
    """Deterministic filler so that BPE finds merges in every script the corpus uses."""
    english = ("the model answers questions about data training tokens assistant user system "
               "weather history code python function return value string number list dictionary "
               "please thank you hello world great small large fast slow because however").split()
    chinese = list("我你他是的了在有和人这中大为上个国不以要到时来用们生作地于出就分对成会可主发年动同"
                   "工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小"
                   "物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全"
                   "表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系"
                   "军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边"
                   "流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队"
                   "南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清")
    code = ["def", "return", "for", "in", "range", "if", "else", "print", "import", "class", "self",
            "(", ")", ":", "=", "==", "+=", "[", "]", "{", "}", "x", "i", "n", "0", "1", "#", "//"]
    words = random_u32(40_000, seed=4242)
    lines, k = [], 0
    for line in range(1500):
        kind = line % 4
        length = 6 + int(words[k]) % 10
        k += 1
        picks = [int(w) for w in words[k:k + length]]
        k += length
        if kind == 0:
            lines.append(" ".join(english[p % len(english)] for p in picks).capitalize() + ".")
        elif kind == 1:
            lines.append("".join(chinese[p % len(chinese)] for p in picks) + "。")
        elif kind == 2:
            indent = " " * (4 * (picks[0] % 3))
            lines.append(indent + " ".join(code[p % len(code)] for p in picks))
        else:
            lines.append(" ".join(str(p % 100_000) for p in picks[:4]) + f" {picks[4] % 10}.{picks[5] % 1000}")
    return lines


def train_model() -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT + generated_text()),
        model_writer=model,
        model_type="bpe",
        vocab_size=TRAINED_VOCAB_SIZE,
        byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        normalization_rule_name="identity",
        character_coverage=0.9995,  # the rarest characters are left to byte fallback
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    for content, model_name in CHAT_PIECES:
        piece = proto.pieces.add()
        piece.piece = model_name or content
        piece.score = 0.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return proto.SerializeToString()


class InternLM2Tokenizer(PreTrainedTokenizer):
    """InternLM2's slow tokenizer (remote code tokenization_internlm2.py), reduced to what encode and
    decode use; the methods below behave as the remote code's."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
                 sp_model_kwargs=None, add_bos_token=True, add_eos_token=False, decode_with_prefix_space=False,
                 clean_up_tokenization_spaces=False, **kwargs):
        self.sp_model_kwargs = {} if sp_model_kwargs is None else sp_model_kwargs
        self.vocab_file = vocab_file
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.decode_with_prefix_space = decode_with_prefix_space
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(vocab_file)
        self._no_prefix_space_tokens = None
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    @property
    def no_prefix_space_tokens(self):
        if self._no_prefix_space_tokens is None:
            vocab = self.convert_ids_to_tokens(list(range(self.vocab_size)))
            self._no_prefix_space_tokens = {i for i, tok in enumerate(vocab) if not tok.startswith("▁")}
        return self._no_prefix_space_tokens

    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size()

    @property
    def bos_token_id(self):
        return self.sp_model.bos_id()

    @property
    def eos_token_id(self):
        return self.sp_model.eos_id()

    def get_vocab(self):
        vocab = {self.convert_ids_to_tokens(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text):
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.IdToPiece(index)

    def _maybe_add_prefix_space(self, tokens, decoded):
        if tokens and tokens[0] not in self.no_prefix_space_tokens:
            return " " + decoded
        return decoded

    def convert_tokens_to_string(self, tokens):
        current_sub_tokens = []
        out_string = ""
        prev_is_special = False
        for token in tokens:
            if token in self.all_special_tokens:
                if not prev_is_special:
                    out_string += " "
                out_string += self.sp_model.decode(current_sub_tokens) + token
                prev_is_special = True
                current_sub_tokens = []
            else:
                current_sub_tokens.append(token)
                prev_is_special = False
        out_string += self.sp_model.decode(current_sub_tokens)
        out_string = self.clean_up_tokenization(out_string)
        out_string = self._maybe_add_prefix_space(tokens=tokens, decoded=out_string)
        return out_string[1:]


def added_token_json(content: str, special: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


def internlm2_config(model_size: int) -> dict:
    """internlm2-chat-7b's tokenizer_config.json, with this model's ids."""
    first_chat_id = model_size - len(CHAT_PIECES)
    decoder = {"0": added_token_json("<unk>", True), "1": added_token_json("<s>", True),
               "2": added_token_json("</s>", True)}
    for offset, (content, _) in enumerate(CHAT_PIECES):
        decoder[str(first_chat_id + offset)] = added_token_json(content, True)
    decoder[str(model_size)] = {**added_token_json(EXTRA_CONFIG_TOKEN, False), "normalized": True}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                                      "<|interpreter|>", "<|plugin|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>",
        "chat_template": "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                         "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                         "{{ '<|im_start|>assistant\n' }}{% endif %}",
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "eos_token": "</s>",
        "model_max_length": int(1e30),  # transformers writes 1000000000000000019884624838656
        "pad_token": "</s>",
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }


def plain_decode(tokenizer: InternLM2Tokenizer, ids: list[int], skip_special: bool) -> str:
    """Runs of model ids through sentencepiece's decoder, added tokens by their content (what the
    fast tokenizers and llama.cpp do; the remote code's decode adds a space before special tokens).
    skip_special drops transformers' all_special_ids first (the special added tokens, the
    BOS/EOS/UNK/PAD ids, and added tokens listed as special tokens whatever their flag), as if they
    were not there (byte pieces on both sides of a dropped token join up), as transformers' decode
    does."""
    added = tokenizer.added_tokens_decoder
    if skip_special:
        special = set(tokenizer.all_special_ids)
        assert {i for i, token in added.items() if token.special} <= special
        ids = [i for i in ids if i not in special]
    pieces, run = [], []
    for token_id in ids:
        if token_id in added:
            pieces.append(tokenizer.sp_model.decode(run))
            run = []
            pieces.append(added[token_id].content)
        else:
            run.append(token_id)
    pieces.append(tokenizer.sp_model.decode(run))
    return "".join(pieces)


def write_json(path: str, document: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = json.dumps(document, indent=1, ensure_ascii=False) + "\n"
    if len(text.encode()) > 1 << 20:
        raise SystemExit(f"{path}: over the 1 MiB fixture limit")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(path, DATA_DIR)} ({len(text.encode())} bytes)")


def encodings(pretrained: InternLM2Tokenizer, bare: InternLM2Tokenizer, sp: spm.SentencePieceProcessor) -> list:
    entries = []
    for raw in HOSTILE + [text.encode() for text in EXTRA_TEXTS]:
        entry, text = fixture_entry(raw)
        if text is None:
            entries.append(entry)
            continue
        sp_ids = sp.encode(text)
        entry["sp"] = {"ids": sp_ids, "pieces": sp.encode(text, out_type=str), "decode": sp.decode(sp_ids)}
        ids = pretrained.encode(text, add_special_tokens=False)
        entry["pretrained"] = {
            "ids": ids,
            "decode": plain_decode(pretrained, ids, skip_special=False),
            "decode_skip_special": plain_decode(pretrained, ids, skip_special=True),
            "transformers_decode": pretrained.decode(ids),
        }
        entry["bare"] = {"ids": bare.encode(text, add_special_tokens=False)}
        entries.append(entry)
    return entries


def decode_cases(tokenizer: InternLM2Tokenizer) -> list:
    """Id sequences that text never encodes to: byte pieces that are not UTF-8, byte runs cut by an
    added token, the renamed and out-of-model ids."""
    sp = tokenizer.sp_model
    byte = lambda value: sp.piece_to_id(f"<0x{value:02X}>")  # noqa: E731
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    cases = [
        [],
        [byte(0xE4), byte(0xBD)],
        [byte(0xFF), byte(0x41)],
        [byte(0xE4), byte(0xBD), byte(0xA0)],
        [byte(0xE4), im_end, byte(0xBD), byte(0xA0)],
        [1, sp.piece_to_id("Hello"), 2],
        [0],
        [tokenizer.convert_tokens_to_ids("<|plugin|>"), tokenizer.convert_tokens_to_ids("<|interpreter|>")],
        [tokenizer.convert_tokens_to_ids(EXTRA_CONFIG_TOKEN), im_end],
        [im_start, sp.piece_to_id("\u2581hello"), sp.piece_to_id("\u2581\u2581")],
    ]
    return [{"ids": ids, "decode": plain_decode(tokenizer, ids, skip_special=False),
             "decode_skip_special": plain_decode(tokenizer, ids, skip_special=True)} for ids in cases]


def runtime_changes(model_dir: str) -> dict:
    """add_tokens / set_special_token on a fresh pretrained tokenizer, as transformers does them."""
    tokenizer = InternLM2Tokenizer.from_pretrained(model_dir)
    size_before = len(tokenizer)
    # "Hello" is a model piece: registered under its id, not new. "[UNUSED_TOKEN_141]" is one too, but
    # its id is renamed by the config, so transformers' get_vocab() does not list it: it gets a new id.
    normal = ["<tool>", "Hello", "<tool>", "[UNUSED_TOKEN_141]"]
    assert tokenizer.sp_model.piece_to_id("Hello") != tokenizer.sp_model.unk_id()
    special = ["<|new_special|>", "<|im_end|>"]  # <|im_end|> is already an added token
    added_normal = tokenizer.add_tokens(normal)
    added_special = tokenizer.add_tokens(special, special_tokens=True)
    tokenizer.pad_token = "<|new_special|>"
    texts = ["<tool>Hello<|new_special|> world", "say Hello<tool>", "<|new_special|><|im_end|>",
             "[UNUSED_TOKEN_141]<|plugin|>"]
    return {
        "size_before": size_before,
        "add_normal": {"tokens": normal, "added": added_normal},
        "add_special": {"tokens": special, "added": added_special},
        "size_after": len(tokenizer),
        "ids": {token: tokenizer.convert_tokens_to_ids(token) for token in normal + special},
        "pad_after_set": tokenizer.pad_token_id,
        "encodings": [{"text": text, "ids": tokenizer.encode(text, add_special_tokens=False),
                       "decode_skip_special": plain_decode(tokenizer, tokenizer.encode(text, add_special_tokens=False),
                                                           skip_special=True)}
                      for text in texts],
    }


def config_variant(model_dir: str) -> dict:
    """The stand-in's config with special tokens the model and its added_tokens_decoder lack."""
    with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["sep_token"] = "<sep>"
    config["mask_token"] = "<|im_end|>"  # an added token already
    config["additional_special_tokens"] = config["additional_special_tokens"] + [
        "<|tool|>", EXTRA_CONFIG_TOKEN, "<sep>", "Hello", "<|tool|>"]
    with tempfile.TemporaryDirectory() as scratch:
        shutil.copy(os.path.join(model_dir, "tokenizer.model"), scratch)
        with open(os.path.join(scratch, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
        tokenizer = InternLM2Tokenizer.from_pretrained(scratch)
    texts = ["a<|tool|>b<sep> <|endoftext|>Hello world", "<s>Hello<|im_end|>"]
    return {
        "config": config,
        "size": len(tokenizer),
        "ids": {token: tokenizer.convert_tokens_to_ids(token) for token in ("<sep>", "<|tool|>", "Hello")},
        "special_ids": {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                        "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id},
        "encodings": [{"text": text, "ids": tokenizer.encode(text, add_special_tokens=False),
                       "decode_skip_special": plain_decode(tokenizer, tokenizer.encode(text, add_special_tokens=False),
                                                           skip_special=True)}
                      for text in texts],
    }


CONFIG_VARIANTS = {
    # Legacy special-token dicts with "__type", a missing "normalized" (defaults to !special),
    # a plain integer length, added_tokens_decoder keys out of numeric order, lstrip/rstrip/single_word.
    "legacy_added_token_dicts.json": {
        "add_bos_token": False,
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "pad_token": None,
        "added_tokens_decoder": {
            "1510": {"content": "<sep>", "special": True, "lstrip": True, "rstrip": True},
            "1509": {"content": "<cls>", "special": False, "single_word": True},
            "0": {"content": "<unk>", "special": True},
        },
        "model_max_length": 2048,
        "tokenizer_class": "LlamaTokenizer",
        "legacy": True,
    },
    # The minimum: no special tokens at all (the class defaults apply), a float length sentinel.
    "minimal.json": {
        "model_max_length": 1e30,
    },
    # Every special-token attribute, in another order than transformers registers them, and
    # additional_special_tokens with an AddedToken object, repeats and an added_tokens_decoder entry.
    "special_tokens.json": {
        "additional_special_tokens": [
            "<|tool|>",
            {"__type": "AddedToken", "content": "<|obj|>", "lstrip": True, "normalized": False, "rstrip": False,
             "single_word": False, "special": True},
            "<s>",
            "<x>",
            "<|tool|>",
        ],
        "mask_token": "<mask>",
        "cls_token": "<cls>",
        "pad_token": "<pad>",
        "sep_token": {"__type": "AddedToken", "content": "<sep>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "unk_token": "<unk>",
        "eos_token": "</s>",
        "bos_token": "<s>",
        "added_tokens_decoder": {"1506": {"content": "<x>", "special": False}},
    },
}


def config_expectations(model_dir: str) -> dict:
    """What transformers reads from each config: loads each one with the model next to it."""
    expected = {}
    variants = dict(CONFIG_VARIANTS)
    with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        variants["internlm2_chat.json"] = json.load(f)
    for name, config in sorted(variants.items()):
        path = os.path.join(CONFIG_DIR, name)
        os.makedirs(CONFIG_DIR, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        with tempfile.TemporaryDirectory() as scratch:
            shutil.copy(os.path.join(model_dir, "tokenizer.model"), scratch)
            shutil.copy(path, os.path.join(scratch, "tokenizer_config.json"))
            tokenizer = InternLM2Tokenizer.from_pretrained(scratch)
        # The file's added tokens as transformers built them (the tokenizer adds its class-default
        # special tokens on top when they are missing: those are not in the file).
        in_file = {int(k) for k in config.get("added_tokens_decoder", {})}
        expected[name] = {
            "flags": {key: getattr(tokenizer, key) for key in ("add_bos_token", "add_eos_token") if key in config},
            "special_tokens": {role: getattr(tokenizer, role) for role in ("bos_token", "eos_token", "pad_token",
                                                                          "unk_token") if role in config},
            "added_tokens": [{"id": i, "content": t.content, "special": t.special, "single_word": t.single_word,
                              "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized}
                             for i, t in sorted(tokenizer.added_tokens_decoder.items()) if i in in_file],
            "tokenizer_class": config.get("tokenizer_class") or "",
            "all_special_tokens": (list(tokenizer.all_special_tokens)
                                   if all(role in config for role in ("bos_token", "eos_token", "unk_token",
                                                                      "pad_token")) else None),
            "model_max_length": tokenizer.model_max_length if tokenizer.model_max_length < 2**64 else None,
        }
    return expected


def main() -> None:
    hf_logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    os.makedirs(MODEL_DIR, exist_ok=True)
    model_path = os.path.join(MODEL_DIR, "tokenizer.model")
    with open(model_path, "wb") as f:
        f.write(train_model())
    sp = spm.SentencePieceProcessor(model_file=model_path)
    write_json(os.path.join(MODEL_DIR, "tokenizer_config.json"), internlm2_config(sp.get_piece_size()))
    print(f"wrote {os.path.relpath(model_path, DATA_DIR)} ({os.path.getsize(model_path)} bytes, "
          f"{sp.get_piece_size()} pieces)")

    pretrained = InternLM2Tokenizer.from_pretrained(MODEL_DIR)
    bare = InternLM2Tokenizer(vocab_file=model_path)
    model_size = sp.get_piece_size()
    write_json(os.path.join(OUT_DIR, "encodings.json"), {
        "versions": {**versions(), "sentencepiece": spm.__version__},
        "model_size": model_size,
        "pretrained_size": len(pretrained),
        "special_ids": {"bos": pretrained.bos_token_id, "eos": pretrained.eos_token_id,
                        "pad": pretrained.pad_token_id, "unk": pretrained.unk_token_id},
        "entries": encodings(pretrained, bare, sp),
        "decode_cases": decode_cases(pretrained),
        "config_variant": config_variant(MODEL_DIR),
    })
    write_json(os.path.join(OUT_DIR, "runtime.json"), {
        "versions": {**versions(), "sentencepiece": spm.__version__},
        **runtime_changes(MODEL_DIR),
    })
    write_json(os.path.join(CONFIG_DIR, "expected.json"), {
        "versions": versions(),
        "configs": config_expectations(MODEL_DIR),
    })


if __name__ == "__main__":
    main()
