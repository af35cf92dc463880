"""Fixtures for the JSONL readers (tests/data/jsonl_reader_test.cpp,
dataset_format_test.cpp, conversation_reader_test.cpp), from CPython's json
module and XTuner's real map functions.

    .venv-xtuner/bin/python tests/reference/dataset_formats.py

writes, under tests/data/data/formats/:

* ``malformed.jsonl`` + ``malformed.json``: a JSONL file of good, blank and bad
  lines (a BOM, CRLF line ends, no final newline), and per line what a reader
  must report: ``json.loads``'s reason and column for bad JSON, the column of
  the first undecodable byte (``bytes.decode`` error) for invalid UTF-8, the
  column of the value for a line that is JSON but not an object.  The lines are
  split as the C++ reader splits them (on ``\\n``, one ``\\r`` before it and
  the BOM of line 1 removed); the verdicts are CPython's.
* ``texts.jsonl`` + ``texts.json``: ``{"text": ...}`` records written by
  ``json.dumps`` in several spellings (ASCII escapes, raw UTF-8, surrogate
  pairs, ``\\/``) and the strings ``json.loads`` decodes from them.
* ``openai.jsonl`` + ``openai.json``: OpenAI-style records and, per record,
  XTuner's ``openai_map_fn`` turns; per assistant message, the
  ``output_with_loss`` XTuner gives that message alone.
* ``xtuner.jsonl``: the same conversations in XTuner's format, as
  ``openai_map_fn`` writes them (records it maps to no turn left out).
* ``alternating.jsonl`` + ``alternating.json``: records in the Phi-2 tutorial's
  ``{"messages": [str, ...]}`` layout and the roles its ``tokenize`` gives each
  message (``isHuman = i % 2 == 0``, reproduced from the tutorial).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _hostile_corpus import HOSTILE, TRAINING_TEXT  # noqa: E402
from _refcommon import DATA_DIR, REPO_ROOT, versions  # noqa: E402

OUT_DIR = os.path.join(DATA_DIR, "data", "formats")
COMMAND = ".venv-xtuner/bin/python tests/reference/dataset_formats.py"
JSON_WHITESPACE = " \t\n\r"


def xtuner_versions() -> dict:
    import xtuner

    v = versions()
    v["xtuner"] = xtuner.__version__
    return v


def write_bytes(name: str, data: bytes) -> None:
    path = os.path.join(OUT_DIR, name)
    with open(path, "wb") as f:
        f.write(data)
    print(f"wrote {os.path.relpath(path, REPO_ROOT)} ({len(data)} bytes)")


def write_json(name: str, payload: dict) -> None:
    payload = {"command": COMMAND, "versions": xtuner_versions(), **payload}
    # ASCII-only, so that the fixture itself holds no byte a reader could mis-decode.
    write_bytes(name, (json.dumps(payload, ensure_ascii=True, indent=1) + "\n").encode("ascii"))


# ---- malformed.jsonl -------------------------------------------------------

# Lines of the bad-input file, as bytes. A few are good records, so that the
# reader must go on past bad lines and still count the line numbers right.
MALFORMED_LINES: list[bytes] = [
    b'{"text": "first, after a BOM"}',
    b"",
    b"   \t ",
    b'{"a": 1,}',
    b"[1, 2]",
    b'"just a string"',
    b"42",
    b"null",
    b'{"a" 1}',
    b'{"a": tru}',
    b'{"a": "unterminated',
    b'{"a": "tab\there"}',
    b'{"a": "\\x"}',
    b'{"a": "\\u12G4"}',
    b'{"a": "\\ud800\\u12G4"}',
    b'{"a": "\\u1234',
    b'{"a": 1} x',
    b'{"a": 01}',
    b'{"a": 1.}',
    b'{"a": [1e+]}',
    b'{"a": -}',
    b'{1: 2}',
    b'{"a": 1 "b": 2}',
    b'{"a": [1 2]}',
    b"{'a': 1}",
    b'{"a":',
    b"{",
    b'{"a": [}',
    b'{"a": [1, 2',
    b'{"ok": "a good record between bad ones"}',
    "{\"中文\": 值}".encode(),
    "{\"emoji 😀\": \"x\" \"y\"}".encode(),
    b'{"a": "\xff"}',
    b'{"text": "truncated \xe4\xbd"}',
    "{\"text\": \"中文 then a lone continuation byte ".encode() + b'\x80"}',
    b'{"text": "overlong \xc0\xaf"}',
    b'{"text": "surrogate \xed\xa0\x80"}',
    b"  [1]  ",
    b'{"last": "line without a newline"}',
]
# Lines 3, 8 and 21 (1-based) end with "\r\n"; the file starts with a BOM and has no final newline.
CRLF_LINES = {3, 8, 21}


def expected_verdict(raw: bytes, number: int) -> dict:
    """What CPython says about one line (already split from the file)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        column = len(raw[: e.start].decode("utf-8")) + 1
        return {"line": number, "code": "InvalidUtf8", "column": column}
    if text.strip(JSON_WHITESPACE) == "":
        return {"line": number, "code": "blank"}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        assert e.lineno == 1
        # Our reasons are CPython's messages, a trailing " at" spelled " here".
        return {"line": number, "code": "MalformedJson", "column": e.colno, "reason": e.msg}
    if not isinstance(value, dict):
        column = len(text) - len(text.lstrip(JSON_WHITESPACE)) + 1
        return {"line": number, "code": "NotAnObject", "column": column}
    return {"line": number, "code": "ok"}


def make_malformed() -> None:
    data = b"\xef\xbb\xbf"
    for number, raw in enumerate(MALFORMED_LINES, start=1):
        last = number == len(MALFORMED_LINES)
        data += raw + (b"" if last else b"\r\n" if number in CRLF_LINES else b"\n")
    # Split again as the reader does, so that the verdicts follow from the bytes written.
    lines = data.split(b"\n")
    lines[0] = lines[0].removeprefix(b"\xef\xbb\xbf")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    assert lines == MALFORMED_LINES
    verdicts = [expected_verdict(raw, number) for number, raw in enumerate(lines, start=1)]
    write_bytes("malformed.jsonl", data)
    write_json("malformed.json", {"lines": verdicts})


# ---- texts.jsonl -----------------------------------------------------------

def make_texts() -> None:
    texts = [t.decode("utf-8") for t in HOSTILE if _is_utf8(t)] + TRAINING_TEXT
    texts += ["slash / and escaped slash", "", "\u0000 nul and \u001f unit separator", "\U0001d518 astral"]
    spellings = [
        lambda r: json.dumps(r, ensure_ascii=False),
        lambda r: json.dumps(r, ensure_ascii=True),  # \uXXXX, surrogate pairs above U+FFFF
        lambda r: json.dumps(r, ensure_ascii=False, indent=None, separators=(",", ":")),
        lambda r: " " + json.dumps(r, ensure_ascii=True, separators=(" , ", " : ")) + " \t",
    ]
    lines, expected = [], []
    for i, text in enumerate(texts):
        line = spellings[i % len(spellings)]({"id": i, "text": text})
        if text.startswith("slash"):
            line = line.replace("/", "\\/")  # json.dumps never writes \/ ; json.loads reads it
        assert json.loads(line)["text"] == text
        lines.append(line)
        expected.append(text)
    write_bytes("texts.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))
    write_json("texts.json", {"texts": expected})


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ---- openai.jsonl and xtuner.jsonl -----------------------------------------

def m(role: str, content: str, **extra) -> dict:
    return {"role": role, "content": content, **extra}


OPENAI_RECORDS = [
    {"messages": [m("user", "Who are you?"), m("assistant", "I am a bot.")]},
    {"messages": [m("system", "You are terse."), m("user", "Hi"), m("assistant", "Hello!", loss=False),
                  m("user", "Q2"), m("assistant", "A2")]},
    # loss spellings XTuner 0.2.0 reads (str(loss).lower() == "true")
    {"messages": [m("user", "a"), m("assistant", "b", loss=True), m("user", "c"), m("assistant", "d", loss="true"),
                  m("user", "e"), m("assistant", "f", loss="False"), m("user", "g"), m("assistant", "h", loss="TRUE"),
                  m("user", "i"), m("assistant", "j", loss="fAlSe")]},
    # what XTuner re-arranges: a leading assistant message (dropped), two user
    # messages in a row (joined), a system message in the middle, a trailing question (dropped)
    {"messages": [m("assistant", "greeting nobody asked for"), m("user", "part one, "), m("user", "part two"),
                  m("assistant", "answer"), m("system", "late system"), m("user", "next"), m("assistant", "ok"),
                  m("user", "unanswered")]},
    # loss on a user message: XTuner ignores it; other keys are ignored too
    {"id": 7, "messages": [m("user", "x", loss=False, name="bob"), m("assistant", "y", weight=0)]},
    {"messages": [m("system", ""), m("user", ""), m("assistant", "")]},
    {"messages": [m("user", "中文？ 😀 \u2028 \"quoted\" \\ back\\slash\n\ttab"), m("assistant", "好的。\r\n")]},
]


def make_openai() -> None:
    from xtuner.dataset.map_fns.dataset_map_fns.openai_map_fn import openai_map_fn

    expected, xtuner_lines = [], []
    for number, record in enumerate(OPENAI_RECORDS, start=1):
        messages = []
        for message in record["messages"]:
            entry = {"role": message["role"], "content": message["content"]}
            if message["role"] == "assistant":
                # XTuner's verdict on this message alone (behind an empty user
                # message, since openai_map_fn drops a leading assistant message).
                alone = openai_map_fn({"messages": [m("user", ""), message]})
                entry["xtuner_output_with_loss"] = alone["conversation"][0]["output_with_loss"]
            messages.append(entry)
        turns = openai_map_fn(json.loads(json.dumps(record)))["conversation"]
        expected.append({"line": number, "messages": messages, "xtuner_turns": turns})
        if turns:
            xtuner_lines.append({"line": len(xtuner_lines) + 1, "source_line": number,
                                 "json": json.dumps({"conversation": turns}, ensure_ascii=False)})
    write_bytes("openai.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in OPENAI_RECORDS).encode())
    write_bytes("xtuner.jsonl", "".join(x["json"] + "\n" for x in xtuner_lines).encode())
    write_json("openai.json", {
        "records": expected,
        # xtuner.jsonl line -> openai.jsonl line (whose xtuner_turns it holds)
        "xtuner_source_lines": [x["source_line"] for x in xtuner_lines],
    })


# ---- alternating.jsonl -----------------------------------------------------

ALTERNATING_RECORDS = [
    {"number": 286, "messages": ["Born in despair, fed with mud, soon I'll bloom into beauty for the good.",
                                 "This riddle describes a flower.\n\n1. \"Born in despair\"...",
                                 "What kind of flower starts in hardship?",
                                 "A sunflower."]},
    {"number": 1, "messages": ["只有一个问题"]},
    {"messages": ["q", "a", "q2"], "extra": {"nested": [1, 2]}},
]


def tutorial_roles(messages: list[str]) -> list[str]:
    # The Phi-2 tutorial's tokenize(): `isHuman = i%2==0`, templates[isHuman]
    # (templates[1] is the user template, templates[0] the assistant one).
    templates = ["assistant", "user"]
    return [templates[i % 2 == 0] for i, _ in enumerate(messages)]


def make_alternating() -> None:
    expected = [{"line": n, "roles": tutorial_roles(r["messages"]), "contents": r["messages"]}
                for n, r in enumerate(ALTERNATING_RECORDS, start=1)]
    write_bytes("alternating.jsonl",
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ALTERNATING_RECORDS).encode())
    write_json("alternating.json", {"records": expected})


def main() -> None:
    os.makedirs(OUT_DIR, exist_ok=True)
    make_malformed()
    make_texts()
    make_openai()
    make_alternating()


if __name__ == "__main__":
    main()
