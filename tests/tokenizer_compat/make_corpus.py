#!/usr/bin/env python3
"""Writes corpus.json: the strings tokenizer_compat_test encodes and decodes with both Hugging Face
tokenizers and ours. Deterministic (fixed seed, Python stdlib only), so the committed file can be
regenerated and reviewed:

    python3 tests/tokenizer_compat/make_corpus.py > tests/tokenizer_compat/corpus.json

Every string is valid Unicode (no lone surrogates). The corpus covers code in several languages,
CJK, emoji (ZWJ sequences, skin tones, flags, keycaps), whitespace runs (tabs, newlines, CR LF,
many spaces, Unicode spaces), numbers of many lengths, punctuation, English contractions in all
cases, mixed scripts, combining marks (NFC), text around special tokens of Llama 2/3 and Qwen,
and random code points from all planes.
"""
import json
import random
import sys
import unicodedata

rng = random.Random(20240603)
out = []


def add(s):
    out.append(s)


def pick(seq):
    return rng.choice(seq)


WORDS = ("the quick brown fox jumps over lazy dog tokenizer server model request stream "
         "inference batch kernel cache block token llama mistral qwen hello world data value "
         "function return error status string number example test parse encode decode "
         "international naïve café résumé façade coöperate jalapeño Straße").split()
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ve", "'M", "'LL",
                "'D", "’s", "’t", "'ſ"]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|reserved_special_token_5|>", "<s>", "</s>", "<unk>",
            "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>",
            "<|fim_prefix|>", "<|vision_start|>"]
NEAR_SPECIALS = ["<|begin_of_tex|>", "<|im_start", "<s", "s>", "</ s>", "< s>", "<|", "|>",
                 "<|endoftext", "<<s>>", "<|im_end|>>"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\t\t", "    ", "\u00a0",
          "\u3000", "\u2009", "\u2028", "\u200b", " \t \n", "\n   ", "\x0b", "\x0c", "\u0085"]
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["...", "—", "–", "…", "«", "»", "„", "“",
                                                     "”", "‘", "’", "¿", "¡", "·", "•", "§",
                                                     "。", "、", "！", "？", "：", "（", "）"]
EMOJI = ["😀", "😂", "🥲", "👍", "👍🏽", "👍🏿", "❤️", "❤", "🔥", "🚀", "🇺🇸", "🇯🇵", "🇩🇪",
         "👨‍👩‍👧‍👦", "👩‍💻", "🧑🏾‍🚀", "🏳️‍🌈", "🏴‍☠️", "1️⃣", "#️⃣", "✅", "⚠️", "🤖",
         "🐍", "🦀", "☕", "🫠", "🪿", "👁️‍🗨️", "🧔‍♂️", "💁‍♀️", "🏃🏻‍♂️‍➡️"]
SCRIPTS = {
    "zh": "我们今天讨论分词器的实现以及如何与模型对齐中文文本处理需要特别注意标点符号和数字",
    "ja": "こんにちは世界、トークナイザーのテストです。カタカナとひらがなと漢字を混ぜます。",
    "ko": "안녕하세요 세계 토크나이저 테스트입니다 한국어 문장을 처리합니다",
    "ru": "Привет мир это проверка токенизатора на русском языке",
    "el": "Γειά σου κόσμε αυτή είναι μια δοκιμή",
    "ar": "مرحبا بالعالم هذا اختبار للمحلل اللغوي",
    "he": "שלום עולם זו בדיקה של המפרק",
    "hi": "नमस्ते दुनिया यह टोकनाइज़र का परीक्षण है",
    "th": "สวัสดีชาวโลกนี่คือการทดสอบตัวตัดคำ",
    "vi": "Xin chào thế giới đây là bài kiểm tra bộ tách từ tiếng Việt",
    "tr": "Merhaba dünya İstanbul ışık ğüşöç",
    "de": "Grüße aus München, Äpfel und Öfen, Straße",
    "fr": "Où est la bibliothèque ? C'est l'été, déjà !",
    "pl": "Zażółć gęślą jaźń",
    "am": "ሰላም ልዑል",
    "ta": "வணக்கம் உலகம்",
}
CODE = {
    "python": [
        "def {f}(x, y=None):\n    \"\"\"Return the {w}.\"\"\"\n    if y is None:\n        return x * {n}\n    return x + y\n",
        "class {F}:\n    def __init__(self):\n        self.{f} = [{n}, {n}, {n}]\n\n    def __repr__(self) -> str:\n        return f\"{F}({{self.{f}!r}})\"\n",
        "for i in range({n}):\n\tprint(i, end='\\t')\n",
        "import numpy as np\nx = np.zeros(({n}, {n}), dtype=np.float32)  # {w}\n",
        "    # TODO: {w} {w}\n    lambda k: k ** 2 if k % 2 == 0 else -k\n",
    ],
    "cpp": [
        "#include <vector>\n\nint {f}(const std::vector<int>& v) {{\n  int s = 0;\n  for (int x : v) s += x;\n  return s * {n};\n}}\n",
        "template <typename T>\nstruct {F} {{\n  T value_{{}};  // {w}\n}};\n",
        "if (a != b && c >= {n}) {{ ptr->{f}(); }} else {{ return -1; }}",
        "std::unique_ptr<{F}> p = std::make_unique<{F}>();\n",
    ],
    "js": [
        "const {f} = async (req, res) => {{\n  const data = await fetch(`/api/{w}/${{req.id}}`);\n  return res.json({{ ok: true, n: {n} }});\n}};\n",
        "export default function {F}() {{ return <div className=\"{w}\">{{props.{f}}}</div>; }}",
        "let x = [1, 2, 3].map((v) => v * {n}).filter(Boolean); // {w}",
    ],
    "rust": [
        "fn {f}(v: &[u32]) -> Result<u64, String> {{\n    let s: u64 = v.iter().map(|&x| x as u64).sum();\n    Ok(s + {n})\n}}\n",
        "impl {F} {{\n    pub fn new() -> Self {{ Self {{ {f}: Vec::new() }} }}\n}}\n",
        "match x {{ Some(v) if v > {n} => v, _ => 0 }}",
    ],
    "go": [
        "func {F}(ctx context.Context, n int) (int, error) {{\n\tif n < {n} {{\n\t\treturn 0, errors.New(\"{w}\")\n\t}}\n\treturn n, nil\n}}\n",
    ],
    "java": [
        "public static void main(String[] args) {{\n    System.out.println(\"{w}: \" + {n});\n}}\n",
    ],
    "sql": [
        "SELECT id, {f}, COUNT(*) AS n FROM {f}s WHERE created_at > '2024-01-{d}' GROUP BY 1, 2 HAVING n > {n};",
    ],
    "shell": [
        "#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.json; do\n  jq '.{f}' \"$f\" | head -n {n}\ndone\n",
        "$ cmake -S . -B build -G Ninja && ninja -C build -j{d}",
    ],
    "html": [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>{w}</title></head>\n<body><p class=\"{f}\">{w} &amp; {w}</p></body>\n</html>\n",
    ],
    "json": [
        "{{\"{f}\": {n}, \"list\": [1, 2.5, -3e10, null, true], \"nested\": {{\"{w}\": \"\\u00e9\"}}}}",
    ],
    "markdown": [
        "# {F}\n\n- item **{w}**\n- `code {f}()`\n\n```python\nprint({n})\n```\n\n> quote {w}\n| a | b |\n|---|---|\n| {n} | {d} |\n",
    ],
}


def ident():
    return pick(WORDS).replace("é", "e").replace("ß", "ss").lower() + pick(["", "_", "2", "_id"])


def number():
    kind = rng.randrange(8)
    if kind == 0:
        return str(rng.randrange(10))
    if kind == 1:
        return str(rng.randrange(10 ** rng.randrange(1, 25)))
    if kind == 2:
        return f"{rng.uniform(-1e6, 1e6):.{rng.randrange(0, 8)}f}"
    if kind == 3:
        return f"{rng.randrange(1, 10 ** 9):,}"
    if kind == 4:
        return f"{rng.random():.3e}"
    if kind == 5:
        return "".join(pick("٠١٢٣٤٥٦٧٨٩") for _ in range(rng.randrange(1, 6)))
    if kind == 6:
        return "".join(pick("０１２３４５６７８９") for _ in range(rng.randrange(1, 6)))
    return "0x" + "".join(pick("0123456789abcdefABCDEF") for _ in range(rng.randrange(1, 17)))


# Code points from which random characters are drawn: assigned ones of every plane, weighted
# towards the blocks real text uses, plus some unassigned, private-use and noncharacters.
RANGES = [(0x20, 0x7E), (0xA0, 0x24F), (0x250, 0x2FF), (0x300, 0x36F), (0x370, 0x3FF),
          (0x400, 0x52F), (0x530, 0x8FF), (0x900, 0xDFF), (0xE00, 0xFFF), (0x1000, 0x1FFF),
          (0x2000, 0x2BFF), (0x2E80, 0x2FFF), (0x3000, 0x30FF), (0x3100, 0x4DBF),
          (0x4E00, 0x9FFF), (0xA000, 0xABFF), (0xAC00, 0xD7A3), (0xE000, 0xF8FF),
          (0xF900, 0xFFFD), (0x10000, 0x1FFFF), (0x1F300, 0x1FAFF), (0x20000, 0x2FA1F),
          (0x30000, 0x3134F), (0xE0000, 0xE01EF), (0xF0000, 0xF00FF), (0x10FF00, 0x10FFFF)]


def random_char(assigned_only):
    while True:
        lo, hi = pick(RANGES)
        cp = rng.randint(lo, hi)
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        if assigned_only and unicodedata.category(c) == "Cn":
            continue
        return c


def random_unicode(n, assigned_only=True):
    return "".join(random_char(assigned_only) for _ in range(n))


def sentence(words=None):
    n = words or rng.randrange(1, 14)
    parts = []
    for _ in range(n):
        w = pick(WORDS)
        r = rng.random()
        if r < 0.1:
            w = w.capitalize()
        elif r < 0.15:
            w = w.upper()
        elif r < 0.2:
            w += pick(CONTRACTIONS)
        parts.append(w)
    s = " ".join(parts)
    if rng.random() < 0.7:
        s += pick([".", "!", "?", "...", ":", ";", ""])
    return s


def code_snippet(lang):
    tmpl = pick(CODE[lang])
    return tmpl.format(f=ident(), F=pick(WORDS).capitalize() + pick(["", "Impl", "2"]),
                       w=pick(WORDS), n=number().replace(",", ""), d=rng.randrange(1, 29))


# --- Fixed edge cases -------------------------------------------------------------------------
for s in ["", " ", "  ", "   ", "\t", "\n", "\r\n", "\n\n\n", " \n ", "a", "A", "1", "12", "123",
          "1234", "12345", "123456789012345678901234567890", "Hello", " Hello", "Hello ",
          "  Hello  world  ", "Hello\tworld", "Hello\nworld", "Hello\r\nworld",
          "hello world", "Hello World!", "I'm", "I'M", "you're", "YOU'RE", "we've", "they'll",
          "he'd", "it's", "IT'S", "don't", "DON'T", "ſ's", "'s", "'", "''", "'''", "' s",
          "don’t", "l'été", "rock'n'roll", "x'y'z", "a\u00a0b", "a\u3000b", "a\u2028b",
          "\u200b", "\ufeffBOM", "e\u0301", "\u00e9", "e\u0301\u0301", "\u1100\u1161\u11a8",
          "a\u0323\u0307", "a\u0307\u0323", "\u212b", "\u2126", "\uff21\uff22", "ﬁ", "①",
          "😀", "👨‍👩‍👧‍👦", "🇺🇸🇯🇵", "\x00", "\x00\x01\x02", "\x7f", "\u0080\u0081",
          "\U0010ffff", "\U000e0041", "\uffff", "\ufffd", "�", "<0x41>", "<0xE4>", "▁", "▁▁",
          "▁Hello", "Ġ", "Ċ", "ĠĠ", "<unk>", "<s>", "</s>", "<s> </s>", "<s><s>", " <s> ",
          "a<s>b", "a </s> b", "<|begin_of_text|>", "<|begin_of_text|>Hello",
          "<|begin_of_text|><|begin_of_text|>", "<|im_start|>user\nhi<|im_end|>\n",
          "<|endoftext|>", " <|endoftext|> ", "<think>\n\n</think>\n\n", "<|eot_id|>",
          "<|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>",
          "<<|im_start|>>", "<|im_start", "<|im_start|", "|im_start|>",
          # Newer than Unicode 9 (HF's NFC tables) or 14 (PCRE2 10.42, Python 3.11): CJK Ext. H,
          # Kawi, Nag Mundari letters and digits; combining marks HF's NFC does not know; Unicode 14
          # letters and digits (Vithkuqi, Tangsa), which both regex engines know.
          "a\U00031350b", " \U00031350\U00031351", "x\U00011F04\U00011F05", " \U0001E4D0",
          " 1\U0001E4F02", "the\U00011F04", "x \U00011F04y", "'s\U00031350", "\U0001E4F0" * 5,
          "x\u0310\u08D2", "x\u08D2\u0310", "x\u0310\u0323", "\U00011935\U00011930",
          "a\u1ABF\u0301", "a\u0301\u1ABF", " \U0001E4F01234", "1\U0001E4F0234567",
          "x\U0001E030y", "\U0001DF25abc", "a\U00010EFD", "1\U00016AC023", " \U0001FBF012",
          "x\u2FFCy", "\U00010570\U00010571 ab", "12\U00016AC9345"]:
    add(s)
for n in range(1, 40):
    add(" " * n)
    add("x" + " " * n + "y")
for n in range(1, 12):
    add("\t" * n + "x")
    add("\n" * n)
    add("a" + "\n" * n + "b")
    add(" " * n + "\n" + " " * n + "z")
for n in range(1, 31):
    add("9" * n)
    add("x" + "7" * n)
    add(str(rng.randrange(10 ** n)))

# --- Generated categories ---------------------------------------------------------------------
for _ in range(500):
    add(sentence())
for _ in range(150):
    add(" ".join(sentence() for _ in range(rng.randrange(2, 6))))
for _ in range(300):
    add(code_snippet(pick(sorted(CODE))))
for _ in range(40):
    add("\n\n".join(code_snippet(pick(sorted(CODE))) for _ in range(rng.randrange(2, 6))))
for lang, text in sorted(SCRIPTS.items()):
    add(text)
    for _ in range(12):
        words = text.split(" ") if " " in text else [text[i:i + 3] for i in range(0, len(text), 3)]
        start = rng.randrange(len(words))
        piece = " ".join(words[start:start + rng.randrange(1, 5)])
        add(piece)
        add(sentence(3) + " " + piece + pick(PUNCT) + " " + number())
for _ in range(150):
    add("".join(pick(list(SCRIPTS["zh"] + SCRIPTS["ja"])) for _ in range(rng.randrange(1, 30))))
for _ in range(60):
    add("".join(chr(rng.randint(0xAC00, 0xD7A3)) for _ in range(rng.randrange(1, 12))))
for _ in range(200):
    parts = []
    for _ in range(rng.randrange(1, 8)):
        r = rng.random()
        parts.append(pick(EMOJI) if r < 0.5 else pick(WORDS) if r < 0.8 else pick(SPACES))
    add("".join(parts))
for _ in range(200):
    add("".join(pick(SPACES) + pick(WORDS + PUNCT + [number()]) for _ in range(rng.randrange(1, 10))))
for _ in range(200):
    add(" ".join(number() for _ in range(rng.randrange(1, 6))) + pick(["", " ", "%", "$", "€", "\n"]))
for _ in range(150):
    add("".join(pick(PUNCT) for _ in range(rng.randrange(1, 12))) + pick(["", " ", "x", "\n"]))
for _ in range(150):
    w = pick(WORDS)
    add(pick([w, w.upper(), w.capitalize()]) + pick(CONTRACTIONS) + pick(["", " ", " it", "s", "!"]))
for _ in range(200):
    scripts = sorted(SCRIPTS)
    add(" ".join(pick(SCRIPTS[pick(scripts)].split(" ") or ["x"]) + pick(["", pick(PUNCT)])
                 for _ in range(rng.randrange(2, 8))))
for _ in range(250):
    a = pick(SPECIALS + NEAR_SPECIALS)
    b = pick(SPECIALS)
    add(pick(["", " ", "\n", sentence(2), "x"]) + a + pick(["", " ", "  ", "\n", sentence(3)]) + b +
        pick(["", " ", sentence(2), "\n"]))
for _ in range(120):
    # Decomposed letters and stacked combining marks (NFC changes them).
    base = pick("aeiouAEIOUnNcCsSzZ")
    marks = "".join(chr(rng.choice([0x300, 0x301, 0x302, 0x303, 0x308, 0x30A, 0x30C, 0x323,
                                    0x327, 0x328, 0x331]))
                    for _ in range(rng.randrange(1, 4)))
    add(pick(WORDS) + " " + base + marks + pick(WORDS) + pick(["", " ", "."]))
for _ in range(40):
    add(unicodedata.normalize("NFD", sentence() + " " + SCRIPTS[pick(["vi", "ko", "de", "fr"])]))
for _ in range(300):
    add(random_unicode(rng.randrange(1, 25)))
for _ in range(80):
    add(random_unicode(rng.randrange(1, 10), assigned_only=False))
for _ in range(80):
    add(sentence(3) + " " + random_unicode(rng.randrange(1, 6)) + " " + sentence(2))
for _ in range(40):
    add("\t".join(str(rng.randrange(-10**6, 10**6)) for _ in range(rng.randrange(2, 10))) + "\n")
for _ in range(30):
    user = pick(WORDS)
    add(f"https://example.com/{user}/{ident()}?q={number()}&lang=en#frag-{rng.randrange(99)}")
    add(f"{user}.{ident()}@mail.example.org")
    add(f"/usr/local/lib/{ident()}/{ident()}.so.{rng.randrange(9)}")
    add(f"C:\\Users\\{user}\\Documents\\{ident()}.txt")
for _ in range(25):
    # Long mixed documents (encoding speed, long words for the Llama 2 pipeline).
    parts = []
    for _ in range(rng.randrange(20, 60)):
        r = rng.random()
        if r < 0.4:
            parts.append(sentence())
        elif r < 0.55:
            parts.append(code_snippet(pick(sorted(CODE))))
        elif r < 0.7:
            parts.append(SCRIPTS[pick(sorted(SCRIPTS))])
        elif r < 0.8:
            parts.append(pick(EMOJI) * rng.randrange(1, 4))
        elif r < 0.9:
            parts.append(number())
        else:
            parts.append(pick(SPACES))
    add(pick(["\n", " ", "\n\n", ""]).join(parts))
add("a" * 3000)
add(" " * 500 + "x")
add("ab" * 1000)
add("9" * 2000)
add("😀" * 300)
add("\n" * 300)

# Drop duplicates, keeping the first occurrence.
seen = set()
unique = []
for s in out:
    if s not in seen:
        seen.add(s)
        unique.append(s)

sys.stdout.write("[\n")
for i, s in enumerate(unique):
    sys.stdout.write(json.dumps(s, ensure_ascii=False))
    sys.stdout.write(",\n" if i + 1 < len(unique) else "\n")
sys.stdout.write("]\n")
print(f"make_corpus: {len(unique)} strings", file=sys.stderr)
