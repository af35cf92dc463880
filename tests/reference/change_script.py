"""Fixtures for examples/change_script (its CTest/meson test,
examples/change_script/check_change_script.cmake): what the XTuner tutorial's
change_script.py writes for a small JSONL file.

    .venv/bin/python tests/reference/change_script.py

The tutorial (InternLM's XTuner self-identity fine-tuning walkthrough) has the
user save a script that replaces one text with another in every string value of
every record, recursively, and writes each record back with
``json.dumps(..., ensure_ascii=False)``; its defaults are ``--old_text 尖米
--new_text 闻星``.  ``process_line`` below is that script's function, unchanged
but for formatting.  Writes, under tests/data/data/change_script/:

* ``input.jsonl``: records in XTuner's format with what a rewrite must keep
  (key order, non-ASCII text, escapes, nested values, numbers, a CRLF line);
* ``expected_default.jsonl``: the tutorial's output with its default texts;
* ``expected_custom.jsonl``: its output for ``meta.json``'s ``custom_old`` /
  ``custom_new`` (overlapping matches, a replacement that needs escaping);
* ``meta.json``: those texts, the command and the versions.

Numbers are written in the form Python prints them (1e-05, 2.5): the C++
program copies numbers as written, where Python re-prints floats (1e5 becomes
100000.0).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _refcommon import DATA_DIR, REPO_ROOT, versions  # noqa: E402

OUT_DIR = os.path.join(DATA_DIR, "data", "change_script")
DEFAULT_OLD, DEFAULT_NEW = "尖米", "闻星"  # the tutorial's argparse defaults
CUSTOM_OLD, CUSTOM_NEW = "aa", '"b\\'


def process_line(line, old_text, new_text):
    # From the tutorial's change_script.py.
    data = json.loads(line)

    def replace_text(obj):
        if isinstance(obj, dict):
            return {k: replace_text(v) for k, v in obj.items()}
        elif isinstance(obj, list):
            return [replace_text(item) for item in obj]
        elif isinstance(obj, str):
            return obj.replace(old_text, new_text)
        else:
            return obj

    processed_data = replace_text(data)
    return json.dumps(processed_data, ensure_ascii=False)


INPUT_LINES = [
    '{"conversation": [{"system": "你是尖米，一个AI助手", "input": "你是谁？", '
    '"output": "我是尖米，由尖米团队开发。尖米尖米"}]}',
    # compact spelling, escapes json.dumps re-spells, a key holding the old text (keys are kept)
    '{"conversation":[{"input":"Who is \\u5c16\\u7c73?","output":"\\u5c16\\u7c73 is me.\\n\\t\\"quoted\\" \\/ '
    '\\ud83d\\ude00 \\u0001 \\u2028"}],"尖米":"a key is not replaced","n":[1,2.5,-3,1e-05,true,false,null,{},[]]}',
    # nested objects and arrays, overlapping matches for the custom texts
    '{"meta": {"tags": ["aaaaa", "尖米", {"deep": ["aaa 尖米米"]}], "empty": ""}, "text": "baaab"}',
    # a CRLF line end (the tutorial strips each line)
    '{"text": "Windows line 尖米 aa"}\r',
    '{"z": 1, "a": 2, "m": "key order is kept, not sorted"}',
]


def tutorial_main(input_file, output_file, old_text, new_text):
    # The tutorial's main(), without its tqdm progress bar.
    with open(input_file, "r", encoding="utf-8") as infile, open(output_file, "w", encoding="utf-8") as outfile:
        for line in infile:
            processed_line = process_line(line.strip(), old_text, new_text)
            outfile.write(processed_line + "\n")


def main() -> None:
    os.makedirs(OUT_DIR, exist_ok=True)
    input_path = os.path.join(OUT_DIR, "input.jsonl")
    with open(input_path, "wb") as f:
        f.write("".join(line + "\n" for line in INPUT_LINES).encode("utf-8"))  # the CRLF line keeps its "\r"
    written = [input_path]
    for name, (old, new) in {"expected_default.jsonl": (DEFAULT_OLD, DEFAULT_NEW),
                             "expected_custom.jsonl": (CUSTOM_OLD, CUSTOM_NEW)}.items():
        written.append(os.path.join(OUT_DIR, name))
        tutorial_main(input_path, written[-1], old, new)
    meta = {
        "command": ".venv/bin/python tests/reference/change_script.py",
        "versions": versions(),
        "default_old": DEFAULT_OLD,
        "default_new": DEFAULT_NEW,
        "custom_old": CUSTOM_OLD,
        "custom_new": CUSTOM_NEW,
    }
    written.append(os.path.join(OUT_DIR, "meta.json"))
    with open(written[-1], "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
    for path in written:
        print(f"wrote {os.path.relpath(path, REPO_ROOT)} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
