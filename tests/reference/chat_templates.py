"""Golden segments, ids and labels for the chat templates and SampleEncoder.

Re-create the fixture with:

    .venv-xtuner/bin/python tests/reference/chat_templates.py

It writes tests/data/data/templates/chat_templates.json, read by
tests/data/{turn_template,phi2_chatml,pretrain,sample_encoder}_test.cpp.

Where the truth comes from:

* XTuner templates (internlm2_chat, qwen_chat = ChatML, default, gemma,
  chatglm2, and one custom template with brace escapes): XTuner's real
  ``openai_map_fn`` -> ``template_map_fn`` -> ``encode_fn``, and its
  "no label >= 0" filter from ``process()`` (reproduced in one line).
* Pre-training documents: XTuner's real ``pretrain_map_fn`` -> ``encode_fn``;
  the "append EOS" variant sets ``need_eos_token`` back to True, which is what
  XTuner before v0.1.20 produced.
* Phi2ChatML: the Phi-2 tutorial's ``templates`` and ``tokenize`` (reproduced
  below, see ``tutorial_tokenize``: the tutorial is a notebook, not a package),
  on the strict conversations and, with role_order "tutorial"
  (Phi2ChatML::keep_trailing_question), on conversations that end with an
  unanswered question, which the tutorial's tokenize keeps, masked. Where a
  conversation is what the tutorial's data is (user/assistant alternating, no
  system message, every answer learned), the script also asserts that the
  role-tagged ``tutorial_tokenize`` gives exactly what the tutorial's own code,
  unchanged (``original_tutorial_tokenize``), gives on the bare strings.

The segments (the text pieces the encoder tokenizes separately) are the strings
those functions produce; their order and flags follow encode_fn, and the script
asserts that tokenizing them one by one gives exactly encode_fn's ids and labels.

Tokenizer: a deterministic toy (``ToyTokenizer``), which the C++ tests
re-implement in tests/data/toy_tokenizer.hpp: added tokens are split out first
(longest match at each position) and map to their ids; every other UTF-8 byte b
is id 10 + b; pad 0, BOS 1, EOS 2. Real tokenizers are checked elsewhere.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _refcommon import DATA_DIR, REPO_ROOT, versions  # noqa: E402

import xtuner  # noqa: E402
from mmengine.config import ConfigDict  # noqa: E402
from xtuner.dataset.map_fns import openai_map_fn, pretrain_map_fn, template_map_fn_factory  # noqa: E402
from xtuner.dataset.utils import encode_fn, get_bos_eos_token_ids  # noqa: E402
from xtuner.utils import IGNORE_INDEX, PROMPT_TEMPLATE  # noqa: E402

OUT = os.path.join(DATA_DIR, "data", "templates", "chat_templates.json")

PAD_ID, BOS_ID, EOS_ID, BYTE_OFFSET = 0, 1, 2, 10
ADDED_TOKENS = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]
FIRST_ADDED_ID = BYTE_OFFSET + 256


class ToyTokenizer:
    """What XTuner and the tutorial call on a Hugging Face tokenizer, on toy ids."""

    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    pad_token_id = PAD_ID

    def __init__(self):
        self.added = {token: FIRST_ADDED_ID + i for i, token in enumerate(ADDED_TOKENS)}

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False, "XTuner and the tutorial never add special tokens here"
        ids, i = [], 0
        while i < len(text):
            match = max((t for t in self.added if text.startswith(t, i)), key=len, default=None)
            if match is not None:
                ids.append(self.added[match])
                i += len(match)
            else:
                ids.extend(BYTE_OFFSET + b for b in text[i].encode("utf-8"))
                i += 1
        return ids

    def __call__(self, text, truncation=False, add_special_tokens=True):
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


class Qwen2TokenizerFast(ToyTokenizer):
    """The same toy under Qwen's class name: XTuner's get_bos_eos_token_ids
    then gives no BOS, which is what the ChatML (qwen_chat) path does."""


CUSTOM_TEMPLATE = dict(
    SYSTEM="[[{system}]] {{not a field}}\n",
    INSTRUCTION="Q{round}: {input} }}{{\nA: ",
    SUFFIX="</a>",
    SUFFIX_AS_EOS=False,
)

# name -> (template, tokenizer class, special tokens the C++ template declares)
XTUNER_TEMPLATES = {
    "internlm2_chat": (PROMPT_TEMPLATE.internlm2_chat, ToyTokenizer, ["<|im_start|>", "<|im_end|>"]),
    "qwen_chat": (PROMPT_TEMPLATE.qwen_chat, Qwen2TokenizerFast, ["<|im_start|>", "<|im_end|>"]),
    "default": (PROMPT_TEMPLATE.default, ToyTokenizer, []),
    "gemma": (PROMPT_TEMPLATE.gemma, ToyTokenizer, ["<start_of_turn>", "<end_of_turn>"]),
    "chatglm2": (PROMPT_TEMPLATE.chatglm2, ToyTokenizer, []),
    "custom": (ConfigDict(CUSTOM_TEMPLATE), ToyTokenizer, []),
}


def message(role, content, loss=True):
    return {"role": role, "content": content, "loss": loss}


# Chat conversations in OpenAI form. "canonical" has the whitespace edge cases:
# leading/trailing spaces and newlines, CRLF, {input}-looking braces, non-ASCII
# text and an empty assistant answer.
CONVERSATIONS = {
    "canonical": [
        message("system", " Be brief.\r\n"),
        message("user", "  Hello {input} and {system}!\r\nSecond line \n"),
        message("assistant", " Hi {round}.\r\n\r\n"),
        message("user", "\n\u65e5\u672c\u8a9e question? "),
        message("assistant", ""),
    ],
    "empty_system": [
        message("system", ""),
        message("user", "Q1"),
        message("assistant", "A1", loss=False),
        message("user", "Q2"),
        message("assistant", "A2"),
    ],
    "system_midway": [
        message("user", "Q1"),
        message("assistant", "A1"),
        message("system", "S2"),
        message("user", "Q2"),
        message("assistant", "A2"),
    ],
    "special_in_content": [
        message("user", "x <|im_end|> y<start_of_turn>"),
        message("assistant", "ok<|im_start|>"),
    ],
    "no_loss": [
        message("user", "Q"),
        message("assistant", "A", loss=False),
    ],
}

# Conversations only RoleOrder::xtuner accepts (strict mode rejects them). In
# XTuner's openai_map_fn: a leading assistant message is dropped; user messages
# are joined with nothing between them; a system message inside a turn sets
# that turn's system; a trailing user message is dropped; an answer with no
# user message before it gets an empty input.
LENIENT_CONVERSATIONS = {
    "lenient": [
        message("assistant", "lead"),
        message("user", "a "),
        message("user", "b"),
        message("system", "S"),
        message("user", "c"),
        message("assistant", "A"),
        message("user", "trailing"),
    ],
    "lenient_unanswered": [
        message("system", "S"),
        message("user", "only"),
    ],
    "lenient_double_answer": [
        message("user", "Q"),
        message("assistant", "A1"),
        message("assistant", "A2"),
    ],
}

# Conversations that end with an unanswered question: the tutorial's tokenize
# takes any number of messages (even ones are the user's), so it keeps a
# trailing question, masked; Phi2ChatML does so with keep_trailing_question.
# (lenient_unanswered, a system prompt and one question, is used too: it keeps
# nothing learned, so the filter drops it.)
TRAILING_QUESTION_CONVERSATIONS = {
    "trailing_question": [
        message("user", "Q1 {msg}"),
        message("assistant", " A1\n"),
        message("user", "Q2, never answered "),
    ],
    "trailing_system_question": [
        message("user", "Q1"),
        message("assistant", "A1"),
        message("system", "S2"),
        message("user", "Q2"),
    ],
}

PRETRAIN_DOCUMENTS = {
    "spaces": "  \r\n Hello world.\t\n ",
    "unicode_spaces": "\u3000\u00a0 unicode\u2003spaces \u2028\u0085\x1c",
    "empty": "",
    "blank": "   \n\t",
    "special_in_text": "<|im_end|> and {text}",
}


def xtuner_segments(conversation, tokenizer):
    """The pieces encode_fn tokenizes, in its order, with its flags."""
    bos_ids, _ = get_bos_eos_token_ids(tokenizer)
    segments, next_needs_bos = [], True
    for turn in conversation:
        loss = turn.get("output_with_loss", True)
        if next_needs_bos and bos_ids:
            segments.append({"kind": "bos", "supervised": False})
        segments.append({"kind": "text", "text": turn["input"], "supervised": False})
        segments.append({"kind": "text", "text": turn["output"], "supervised": loss})
        next_needs_bos = turn.get("need_eos_token", True)
        if next_needs_bos:
            segments.append({"kind": "eos", "supervised": loss})
        if turn.get("sep", ""):
            segments.append({"kind": "text", "text": turn["sep"], "supervised": False})
    # Empty texts give no tokens; the fixture leaves them out (so do the C++ tests).
    return [s for s in segments if s["kind"] != "text" or s["text"]]


def encode_segments(segments, tokenizer):
    ids, labels = [], []
    for s in segments:
        piece = {"bos": [BOS_ID], "eos": [EOS_ID]}.get(s["kind"]) or tokenizer.encode(
            s.get("text", ""), add_special_tokens=False
        )
        ids += piece
        labels += piece if s["supervised"] else [IGNORE_INDEX] * len(piece)
    return ids, labels


def truncation_lengths(labels):
    """No cut (4096, and exactly the length); the last token cut; a cut halfway;
    a cut just before the first supervised label (the truncated sample then has
    none and the filter drops it); a cut three tokens into the first answer."""
    n = len(labels)
    lengths = {4096, n, n - 1, n // 2}
    first_supervised = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if first_supervised is not None:
        lengths |= {first_supervised, first_supervised + 3}
    return sorted((length for length in lengths if 1 <= length <= 4096), reverse=True)


def encodings(encode):
    """encode(max_length) -> {"input_ids", "labels"}, at each truncation length,
    with XTuner's filter (process() keeps a sample with a label >= 0). The
    tutorial keeps every sample; SampleEncoder applies XTuner's filter to every
    template (an all-masked sample gives a NaN loss), so "kept" is the filter's
    verdict for the tutorial's samples too."""
    records = []
    for max_length in truncation_lengths(encode(4096)["labels"]):
        out = encode(max_length)
        kept = any(label >= 0 for label in out["labels"])
        records.append({"max_length": max_length, "input_ids": out["input_ids"], "labels": out["labels"], "kept": kept})
    return records


def xtuner_case(template_name, conversation_name, mapped, tokenizer, role_order=None):
    segments = xtuner_segments(mapped["conversation"], tokenizer)
    full = encode_fn(mapped, tokenizer, max_length=4096)
    # The segments, tokenized one by one, must be exactly encode_fn's sample.
    expected = (full["input_ids"], full["labels"])
    assert encode_segments(segments, tokenizer) == expected, (template_name, conversation_name)
    case = {"template": template_name, "conversation": conversation_name}
    if role_order is not None:
        case["role_order"] = role_order
    case["segments"] = segments
    case["encodings"] = encodings(lambda max_length: encode_fn(mapped, tokenizer, max_length=max_length))
    return case


def chat_cases():
    cases = []
    for template_name, (template, tokenizer_class, _) in XTUNER_TEMPLATES.items():
        tokenizer = tokenizer_class()
        to_turns = template_map_fn_factory(template)
        conversations = dict(CONVERSATIONS)
        if template_name == "internlm2_chat":
            conversations.update(LENIENT_CONVERSATIONS)
        for conversation_name, messages in conversations.items():
            mapped = openai_map_fn({"messages": [dict(m) for m in messages]})
            mapped.update(to_turns(mapped))
            role_order = "xtuner" if conversation_name in LENIENT_CONVERSATIONS else "strict"
            cases.append(xtuner_case(template_name, conversation_name, mapped, tokenizer, role_order))
    return cases


def pretrain_cases():
    cases = []
    variants = (
        ("pretrain", False, ToyTokenizer()),
        ("pretrain_eos", True, ToyTokenizer()),
        ("pretrain_nobos", False, Qwen2TokenizerFast()),  # Qwen: no BOS
    )
    for template_name, need_eos, tokenizer in variants:
        for document_name, text in PRETRAIN_DOCUMENTS.items():
            mapped = pretrain_map_fn({"text": text})
            if need_eos:  # XTuner before v0.1.20 (#553): pre-training samples end with EOS
                mapped["conversation"][0]["need_eos_token"] = True
            cases.append(xtuner_case(template_name, document_name, mapped, tokenizer))
    return cases


# ---- The Phi-2 tutorial (shared/seeds/003: "Applying ChatML and tokenizing") --
# Its `templates` list and `tokenize` function, reproduced line for line except
# for three marked changes that let it take role-tagged messages (the tutorial's
# dataset is a list of strings alternating user/assistant):
#   (1) the template is picked by the message's role, not by i % 2;
#   (2) a system line in the ChatML shape, masked like the user's (the tutorial
#       has no system messages);
#   (3) an assistant message with loss false is masked (the tutorial has no
#       per-message loss switch).
IGNORE_INDEX_TUTORIAL = -100
templates = {
    "assistant": "<|im_start|>assistant\n{msg}<|im_end|>",  # message by assistant
    "user": "<|im_start|>user\n{msg}<|im_end|>",  # message by user
    "system": "<|im_start|>system\n{msg}<|im_end|>",  # change (2)
}


def original_tutorial_tokenize(input, max_length, tokenizer):
    """The tutorial's tokenize, unchanged but for the tokenizer argument (the
    tutorial's is a global): messages are bare strings, even ones the user's."""
    templates = [
        "<|im_start|>assistant\n{msg}<|im_end|>",  # message by assistant
        "<|im_start|>user\n{msg}<|im_end|>",  # message by user
    ]
    input_ids, attention_mask, labels = [], [], []
    for i, msg in enumerate(input["messages"]):
        isHuman = i % 2 == 0
        msg_chatml = templates[isHuman].format(msg=msg)
        msg_tokenized = tokenizer(msg_chatml, truncation=False, add_special_tokens=False)
        input_ids += msg_tokenized["input_ids"]
        attention_mask += msg_tokenized["attention_mask"]
        labels += [IGNORE_INDEX_TUTORIAL] * len(msg_tokenized["input_ids"]) if isHuman else msg_tokenized["input_ids"]
    return {
        "input_ids": input_ids[:max_length],
        "attention_mask": attention_mask[:max_length],
        "labels": labels[:max_length],
    }


def is_tutorial_data(messages):
    """Whether `messages` could be a record of the tutorial's dataset: user and
    assistant alternating from the user, every answer learned."""
    return all(m["role"] == ("user" if i % 2 == 0 else "assistant") and m["loss"] for i, m in enumerate(messages))


def tutorial_tokenize(input, max_length, tokenizer):
    input_ids, attention_mask, labels = [], [], []
    for i, msg in enumerate(input["messages"]):
        isHuman = msg["role"] != "assistant" or not msg["loss"]  # changes (1) and (3)
        msg_chatml = templates[msg["role"]].format(msg=msg["content"])
        msg_tokenized = tokenizer(msg_chatml, truncation=False, add_special_tokens=False)
        input_ids += msg_tokenized["input_ids"]
        attention_mask += msg_tokenized["attention_mask"]
        labels += [IGNORE_INDEX_TUTORIAL] * len(msg_tokenized["input_ids"]) if isHuman else msg_tokenized["input_ids"]
    return {
        "input_ids": input_ids[:max_length],
        "attention_mask": attention_mask[:max_length],
        "labels": labels[:max_length],
    }


def phi2_cases():
    cases = []
    tokenizer = ToyTokenizer()
    trailing = {name: LENIENT_CONVERSATIONS[name] for name in ["lenient_unanswered"]}
    trailing.update(TRAILING_QUESTION_CONVERSATIONS)
    for role_order, conversations in (("strict", CONVERSATIONS), ("tutorial", trailing)):
        for conversation_name, messages in conversations.items():
            segments = [
                {
                    "kind": "text",
                    "text": templates[m["role"]].format(msg=m["content"]),
                    "supervised": m["role"] == "assistant" and m["loss"],
                }
                for m in messages
            ]
            full = tutorial_tokenize({"messages": messages}, 4096, tokenizer)
            assert encode_segments(segments, tokenizer) == (full["input_ids"], full["labels"]), conversation_name

            def encode(n, messages=messages):
                out = tutorial_tokenize({"messages": messages}, n, tokenizer)
                if is_tutorial_data(messages):  # the changes (1)-(3) change nothing here
                    bare = {"messages": [m["content"] for m in messages]}
                    assert out == original_tutorial_tokenize(bare, n, tokenizer), conversation_name
                return out

            cases.append(
                {
                    "template": "phi2_chatml",
                    "conversation": conversation_name,
                    "role_order": role_order,
                    "segments": segments,
                    "encodings": encodings(encode),
                }
            )
    return cases


def python_strip_cases():
    """str.strip() around each character Python calls whitespace, and around
    characters it does not (zero-width space, U+180E, BOM, U+0085's neighbour
    U+0084), for detail::python_strip."""
    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    not_spaces = ["\u200b", "\u180e", "\ufeff", "\u0084", "\u00a1", "\u2027", "\u3001", "x"]
    cases = [[f"{c}{c}x y{c}", f"{c}{c}x y{c}".strip()] for c in spaces + not_spaces]
    cases.append(["".join(spaces), "".join(spaces).strip()])
    cases.append([" \u3000 \u65e5\u3000\u672c \u2029", " \u3000 \u65e5\u3000\u672c \u2029".strip()])
    return cases


def template_strings():
    out = {}
    for name, (template, tokenizer_class, special_tokens) in XTUNER_TEMPLATES.items():
        out[name] = {
            "SYSTEM": template.get("SYSTEM", ""),
            "INSTRUCTION": template.INSTRUCTION,
            "SUFFIX": template.get("SUFFIX", ""),
            "SUFFIX_AS_EOS": template.get("SUFFIX_AS_EOS", False),
            "SEP": template.get("SEP", ""),
            "bos": bool(get_bos_eos_token_ids(tokenizer_class())[0]),
            "special_tokens": special_tokens,
        }
    return out


def main():
    all_conversations = {**CONVERSATIONS, **LENIENT_CONVERSATIONS, **TRAILING_QUESTION_CONVERSATIONS}
    fixture = {
        "generator": "tests/reference/chat_templates.py",
        "versions": {**versions(), "xtuner": xtuner.__version__},
        "toy_tokenizer": {
            "pad_id": PAD_ID,
            "bos_id": BOS_ID,
            "eos_id": EOS_ID,
            "byte_offset": BYTE_OFFSET,
            "added_tokens": ADDED_TOKENS,
            "first_added_id": FIRST_ADDED_ID,
        },
        "xtuner_templates": template_strings(),
        "conversations": all_conversations,
        "documents": PRETRAIN_DOCUMENTS,
        "python_strip": python_strip_cases(),
        "cases": chat_cases() + phi2_cases() + pretrain_cases(),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        # One case per line keeps the file small and its diffs readable.
        f.write("{\n")
        items = list(fixture.items())
        for k, (key, value) in enumerate(items):
            f.write(f" {json.dumps(key)}: ")
            if key == "cases":
                f.write("[\n")
                f.write(",\n".join("  " + json.dumps(case, ensure_ascii=False) for case in value))
                f.write("\n ]")
            else:
                f.write(json.dumps(value, ensure_ascii=False))
            f.write(",\n" if k + 1 < len(items) else "\n")
        f.write("}\n")
    json.load(open(OUT, encoding="utf-8"))  # the file must parse
    size = os.path.getsize(OUT)
    assert size < 1 << 20, size
    print(f"wrote {os.path.relpath(OUT, REPO_ROOT)} ({size} bytes, {len(fixture['cases'])} cases)")


if __name__ == "__main__":
    main()
