"""The hostile corpus both tokenizer reference scripts encode (not a generator).

``HOSTILE`` is a list of ``bytes`` (not str) so that invalid UTF-8 can be in it.
Each entry targets a place where a re-implementation tends to drift from the
reference libraries: pre-tokenizer regex classes (letters, numbers, the rest,
whitespace runs and the ``\\s+(?!\\S)`` lookahead), Unicode whitespace that is
not ASCII, byte fallback, multi-byte characters split by merges, special tokens
glued to text, and bytes that are not UTF-8 at all.

``TRAINING_TEXT`` is the small mixed-language text the stand-in tokenizers are
trained on (English, Chinese, code, numbers), so that their vocabularies have
real merges in all of these scripts.
"""

HOSTILE = [
    b"",
    b"Hello, world!",
    b"hello world  hello   world    ",
    b"   leading spaces and trailing   ",
    b"tabs\tand\nnew\r\nlines\n\n\n",
    b"I'm you're we've they'll she'd it's I'M YOU'RE",
    b"don't can't won't 'quoted' ''double''",
    b"12345 3.14159 1,000,000 0x7f 1e-9 2024-11-23",
    b"\xe4\xbd\xa0\xe5\xa5\xbd\xef\xbc\x8c\xe4\xb8\x96\xe7\x95\x8c\xef\xbc\x81",  # 你好，世界！
    "我是一个由上海人工智能实验室开发的语言模型。".encode(),
    "Emoji: 😀🚀👩‍👩‍👧‍👦 and flags 🇨🇳🇺🇸".encode(),
    "Mixed 中文 and English, 数字123 and symbols ©®™".encode(),
    b"def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    b"if (a != b && c <= d) { x += 1; } // comment",
    b"\x00\x01\x02 control \x7f chars \x1b[31m",
    "non-breaking\u00a0space, narrow\u202fnbsp, ideographic\u3000space".encode(),
    "next line\u0085char, mongolian\u180evowel, line sep\u2028para\u2029".encode(),
    "combining e\u0301 vs \u00e9, Zalgo Z\u0351\u0358a\u035bl\u0346g\u0357o".encode(),
    b"<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\nI am a bot.<|im_end|>",
    b"glued<|im_start|>special<|im_end|>tokens<|im_end|><|im_end|>",
    b"half <|im_start and <|im_end| and <|im_sta rt|> are plain text",
    b"<PAD><PAD> padding <|endoftext|> end of text",
    b"a" * 300,
    b" " * 40 + b"x" + b"\t" * 5 + b"y" + b"\n" * 4,
    b"invalid utf8: \xff\xfe end",
    b"truncated sequence \xe4\xbd",
    b"lone continuation \x80\x81 bytes",
    b"overlong \xc0\xaf and surrogate \xed\xa0\x80",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝟙𝟚𝟛 and ½ ¼ Ⅻ".encode(),
    "Ünïcödé àccénts: naïve café résumé Straße".encode(),
]

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "I am an assistant developed by the community. I answer questions about the weather, "
    "history, mathematics and programming.",
    "你好！我是一个人工智能助手，由上海人工智能实验室开发。我可以回答问题、写代码和翻译文本。",
    "今天天气很好，我们去公园散步吧。学习语言模型需要大量的数据和计算资源。",
    "def tokenize(text):\n    return [ord(c) for c in text]\n\nfor i in range(10):\n    print(i * i)\n",
    "What makes a noise like a bell and flies, but cannot be seen? The answer lies in the bright blue sky.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 42. Dates like 2024-07-22 appear often.",
    "It's what you're doing that we've seen; they'll say I'd do it. Don't worry, it's fine.",
    "    indented code\n\tand tabs\n\nand blank lines\n",
    "Emoji are common in chat: 😀 🚀 👍 ❤️ and so is punctuation!?;:",
]


def fixture_entry(raw: bytes):
    """The fixture entry of one corpus text, and the text when it is UTF-8.

    Entries record the bytes (JSON strings cannot hold invalid UTF-8); an invalid
    one records where Python's strict decoder stops, and the text is None.
    """
    entry = {"bytes": list(raw)}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        entry["invalid_utf8_offset"] = e.start
        return entry, None
    entry["text"] = text
    return entry, text
