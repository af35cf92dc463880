"""How Hugging Face tokenizers splits added tokens out of text, for tests/data/added_vocabulary_test.cpp.

Re-create the fixtures with:

    .venv/bin/python tests/reference/added_vocabulary.py

It writes tests/data/data/added_vocabulary/splits.json: for each case, the added tokens (content, id,
flags) and, for each text, the pieces tokenizers' AddedVocabulary cuts it into: {"text": ...} for a run
of plain text, {"id": ...} for an added token. And many_tokens.json, in the same form (without
indentation): one case with about a thousand tokens, most sharing long prefixes as Llama-3's
<|reserved_special_token_N|> do, for the matcher's search among many candidates.

How the pieces are observed: the tokenizer has a WordLevel model whose only entry is [UNK], no
normalizer and no pre-tokenizer, so every plain piece that AddedVocabulary leaves reaches the model
whole and comes back as one [UNK] token whose offsets span it; added tokens come back with their ids.
(lstrip/rstrip make an added token's offsets cover the white space it swallowed; the fixture keeps only
its id, since that white space reaches the model as nothing.)

Cases: the flags (lstrip, rstrip, single_word, with the Unicode meaning of \\w and \\s that tokenizers'
Rust regex gives them), leftmost-longest matching among overlapping tokens, the two passes
(normalized=false tokens first on the raw text, then normalized=true tokens in each remaining piece,
where single_word and lstrip see only that piece), and tokens that overlap the white space an
lstrip/rstrip match swallowed (tokenizers resumes the search at the end of the token itself, so a
token may start inside that white space, and plain text after a token that ends inside it repeats
the rest of it).
"""

from __future__ import annotations

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _refcommon import DATA_DIR, versions  # noqa: E402

import tokenizers  # noqa: E402
from tokenizers import AddedToken, Tokenizer, models  # noqa: E402

OUT = os.path.join(DATA_DIR, "data", "added_vocabulary", "splits.json")
MANY_OUT = os.path.join(DATA_DIR, "data", "added_vocabulary", "many_tokens.json")


def token(content: str, *, special=False, normalized=None, lstrip=False, rstrip=False, single_word=False):
    return AddedToken(content, special=special, normalized=(not special) if normalized is None else normalized,
                      lstrip=lstrip, rstrip=rstrip, single_word=single_word)


CASES = {
    # tokenizers' own unit tests (added_vocabulary.rs) and more around them.
    "flags": (
        [
            token("[CLS]", special=True),
            token("[SEP]", special=True),
            token("<mask>", special=True, lstrip=True, rstrip=True, single_word=True),
            token("my", normalized=False, lstrip=True, rstrip=True),
            token("name", normalized=False),
            token("ony", normalized=False, single_word=True),
            token("<sp>", special=True, lstrip=True),
            token("<rs>", special=True, rstrip=True),
        ],
        [
            "[CLS] My name is Anthony [SEP]",
            "Hi <mask> there\t<mask>\t<mask>\u2000",
            "<mask>, <mask>- \u25cc\u0330<mask>",
            "<mask> My name <mask> A<mask> <mask>ony <mask>",
            "my my  my\u3000my",
            "mymy xmy myx",
            "ony ony,ony_ ony1 ony",
            "ony\u00e9 \u00f3ony ony\u0301 ony\u200d ony\u216b ony\u00b2 ony\u0663 ony\u00b7 ony",
            "a \u0085<sp>\u0085 b\u180e<sp> c\u00a0<sp>\u2028<rs>\u2029\u202f d<rs>\u180e e",
            "  <sp><sp>  <rs>  <rs><sp>",
            "",
            "no added token here at all",
        ],
    ),
    # Aho-Corasick LeftmostLongest: the leftmost start wins, then the longest.
    "overlap": (
        [token(t, normalized=False) for t in ("ab", "abc", "bcd", "cd", "d", "\u00e9t\u00e9", "\u00e9")],
        ["abcd", "abcde", "xabcdabd", "dddd", "bcdd", "\u00e9t\u00e9\u00e9t", "abab"],
    ),
    # The two passes, with CodeGen/Phi-2-like whitespace runs (normalized) and chat tokens.
    "passes": (
        [token(" " * n) for n in range(4, 1, -1)]
        + [
            token("\t\t"),
            token("<|im_start|>"),
            token("<PAD>"),
            token("<|im_end|>", special=True),
            token("<|endoftext|>", special=True),
            token("XX", normalized=False),
            token("ab", single_word=True),
            token("cd", lstrip=True),
            token("end|>", normalized=False),
        ],
        [
            "<|im_start|>user\nHi     there<|im_end|>\n",
            "<|im_start|><|im_end|><PAD><PAD>",
            "x   <|im_end|>  y\t\t\tz",
            "<PAD<|im_end|>>",
            "<|im_end|>",
            "XXab XX ab xab",
            "XX  cd  XXcd x cd",
            "a      b",
            "glued<|im_start|>special<|im_end|>tokens",
        ],
    ),
    # Matches that overlap the white space an rstrip (or lstrip) match swallowed.
    "strip_overlap": (
        [
            token("<a>", normalized=False, rstrip=True),
            token(" <b>", normalized=False),
            token("  ", normalized=False),
            token("<c>", normalized=False, lstrip=True),
            token("<d>", normalized=False, lstrip=True, rstrip=True),
            token(" <n>"),
            token("\t<e>", normalized=False, rstrip=True),
        ],
        [
            "<a> <b>x",
            "<a>   x",
            "<a>    <b>y",
            "<a> \t<c>z",
            "<a>\u3000 <b> <c>",
            "x <d>  <d>   <d>y",
            "<d> <b><d>",
            "<a> <n> <a>  <n>",
            "<a>\t\t<e>  <b>w",
            " <b> <b>  <c>",
        ],
    ),
}


def many_tokens_case() -> tuple[list, list]:
    """About a thousand tokens with shared prefixes and mixed flags, and texts built from them."""
    contents = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    contents += [f"<|reserved_special_token_{i}|>" for i in range(990)]
    # Prefixes of the long ones, so that the longest match must be chosen among many.
    contents += ["<|reserved_special_token_1", "<|reserved_special_token_", "<|r", "<|", "<", "|>", "_", "\u00e9t\u00e9"]
    tokens = []
    for index, content in enumerate(contents):
        normalized = index % 7 == 3  # some in the second pass
        tokens.append(token(content, special=not normalized, normalized=normalized, lstrip=index % 11 == 5,
                            rstrip=index % 13 == 6))
    rng = random.Random(20240607)
    fragments = contents + ["x", " ", "  ", "\n", "<|reserved_special_token_", "_token_9", "|", "<|res", "\u00e9"]
    texts = ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
             "<|reserved_special_token_1|><|reserved_special_token_10|><|reserved_special_token_100|>",
             "<|reserved_special_token_1<|reserved_special_token_999|><|reserved_special_token_989|>",
             "<<|<|r<|re <|reserved_special_token_|>_|>"]
    for _ in range(24):
        texts.append("".join(rng.choice(fragments) for _ in range(rng.randint(3, 12))))
    return tokens, texts


def split_case(name: str, added: list, texts: list) -> dict:
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.add_tokens(added)
    decoder = tokenizer.get_added_tokens_decoder()
    tokens = [{"id": i, "content": t.content, "special": t.special, "normalized": t.normalized,
               "lstrip": t.lstrip, "rstrip": t.rstrip, "single_word": t.single_word}
              for i, t in sorted(decoder.items())]
    return {"name": name, "tokens": tokens,
            "texts": [{"text": text, "pieces": pieces(tokenizer, text, 0)} for text in texts]}


def pieces(tokenizer: Tokenizer, text: str, unk_id: int) -> list:
    encoding = tokenizer.encode(text, add_special_tokens=False)
    result = []
    for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
        result.append({"text": text[start:end]} if token_id == unk_id else {"id": token_id})
    return result


def main() -> None:
    file_versions = {**versions(), "tokenizers": tokenizers.__version__}
    cases = [split_case(name, added, texts) for name, (added, texts) in CASES.items()]
    many = split_case("many_tokens", *many_tokens_case())
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    for path, fixture, indent in ((OUT, {"versions": file_versions, "cases": cases}, 1),
                                  (MANY_OUT, {"versions": file_versions, "cases": [many]}, None)):
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(fixture, indent=indent, ensure_ascii=False) + "\n")
        print(f"wrote {os.path.relpath(path, DATA_DIR)} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
