#!/usr/bin/env python3
"""Writes the tokenizer fixtures of tests/test_tokenizer_bpe.cpp (tests/fixtures/tokenizer/), with
Hugging Face `tokenizers` as the reference:

  lines.txt           2,000+ lines of mixed text (English, code, CJK, emoji, digits, runs of
                      whitespace, combining marks, and invalid UTF-8), one per line, raw bytes
  <name>.json         tokenizers trained here with `tokenizers` in the GPT-2, Llama-3 and Qwen2 styles
  <name>.ids          per line of lines.txt: the ids `tokenizers` gives for that line (read as Python's
                      bytes.decode("utf-8", "replace")), space-separated, add_special_tokens=False
  smollm2.ids         the same for SmolLM2-135M's tokenizer (from its GGUF file, which CI fetches;
                      the tokenizer itself is not committed: lmforge reads it from the GGUF)

Run with a Python that has tokenizers (and transformers + gguf for the SmolLM2 part):
  /path/to/venv/bin/python tools/make_tokenizer_fixtures.py [--smollm2 PATH.gguf]
"""
import argparse
import os
import random
import sys

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer")

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def make_lines(rng):
    """Deterministic mixed text: a list of bytes objects without b'\\n'."""
    kjv = open(os.path.join(ROOT, "data", "kjv.txt"), encoding="utf-8").read().splitlines()
    kjv = [l for l in kjv if l.strip()]
    code = []
    for d in ("src/data", "src/ops", "tools"):
        for f in sorted(os.listdir(os.path.join(ROOT, d))):
            if f.endswith((".cpp", ".h", ".py")):
                code += open(os.path.join(ROOT, d, f), encoding="utf-8").read().splitlines()
    code = [l for l in code if l.strip()]
    cjk = ["天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。", "東京都は日本の首都です。人口は約千四百万人。",
           "한국어 문장도 섞어 봅니다: 안녕하세요, 세계!", "中文和English混合，数字123和符号！", "カタカナとひらがなと漢字。"]
    emoji = ["👍", "🎉🎉", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🙂 ok", "🤖🦀🐍", "✨ sparkle ✨"]
    other = ["naïve café résumé", "Ελληνικά κείμενα", "Русский текст, ёлки!", "עברית", "العربية نص",
             "e\u0301 (e + combining acute)", "A\u030a vs \u00c5", "Ǆ ǅ ǆ ﬁ ﬂ", "ℌ𝔢𝔩𝔩𝔬 𝕎𝕠𝕣𝕝𝕕", "\u00a0nbsp\u2003em space",
             "tab\there", "mixed\t \t whitespace", "zero\u200bwidth", "I'm sure they'll've done it, 'S 'T 'RE",
             "don't WON'T y'all", "$1,234,567.89 and 3.14159 and 1e-10", "0x1F 0b1010 42nd 2024-12-06",
             "call(a, b)->c[0] += d;", "   leading spaces", "trailing spaces   ", "\u3000ideographic space"]
    invalid = [b"\xff\xfe bad start", b"trunc \xe2\x82", b"lone \x80 continuation", b"\xc0\xaf overlong",
               b"\xed\xa0\x80 surrogate", b"\xf4\x90\x80\x80 too big", b"ok \xe2\x82\xac then \xe2 cut",
               b"\xf0\x9f\x98 cut emoji", b"\xc3", b"mix \xc3\xa9\xc3 end"]
    lines = []
    for i in range(2200):
        kind = i % 10
        if kind < 4:
            s = rng.choice(kjv)
        elif kind < 6:
            s = rng.choice(code)
        elif kind == 6:
            s = rng.choice(cjk) + " " + rng.choice(emoji)
        elif kind == 7:
            s = rng.choice(other)
        elif kind == 8:  # digits and whitespace runs
            s = (" " * rng.randint(0, 5)).join(str(rng.randint(0, 10 ** rng.randint(1, 12))) for _ in range(rng.randint(1, 5)))
            s += " " * rng.randint(0, 4) + "\t" * rng.randint(0, 2) + rng.choice(["x", "", "  y  ", "\r"])
        else:
            s = None
        b = rng.choice(invalid) + rng.choice(kjv)[:30].encode() if s is None else s.encode("utf-8")
        if kind in (0, 4) and rng.random() < 0.3:  # glue several together
            b += b"   " + rng.choice(kjv).encode("utf-8")
        lines.append(b.replace(b"\n", b" "))
    return lines


def train_tokenizer(style, corpus, vocab_size=1500):
    if style == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        specials = ["<|endoftext|>"]
    elif style == "llama3":
        tok = Tokenizer(models.BPE(ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    elif style == "qwen2":
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    else:
        raise ValueError(style)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    if style == "llama3":
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write_ids(path, tok, texts):
    with open(path, "w") as f:
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            f.write(" ".join(map(str, enc.ids)) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", help="SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch_smollm2.sh)")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    rng = random.Random(20261206)
    lines = make_lines(rng)
    with open(os.path.join(OUT, "lines.txt"), "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    texts = [l.decode("utf-8", "replace") for l in lines]
    # training text: the bundled corpus' first 300 KB plus the mixed lines' kinds (not the lines)
    kjv = open(os.path.join(ROOT, "data", "kjv.txt"), encoding="utf-8").read()[:300000]
    extra = "天地玄黄宇宙洪荒日月盈昃 東京都は日本の首都 한국어 naïve café Ελληνικά Русский 👍🎉 def f(x): return x + 1\n"
    corpus = kjv.splitlines() + [extra] * 50
    for style in ("gpt2", "llama3", "qwen2"):
        tok = train_tokenizer(style, corpus)
        tok.save(os.path.join(OUT, f"{style}.json"))
        write_ids(os.path.join(OUT, f"{style}.ids"), tok, texts)
        bos = tok.encode("hi", add_special_tokens=True).ids[:1] if style == "llama3" else []
        print(f"{style}: vocab {tok.get_vocab_size()}, {sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))} ids"
              f" over {len(texts)} lines; BOS {bos}")
    if args.smollm2:
        from transformers import AutoTokenizer
        d, f = os.path.split(os.path.abspath(args.smollm2))
        hf = AutoTokenizer.from_pretrained(d, gguf_file=f)
        tok = hf.backend_tokenizer
        # transformers' GGUF reader leaves out the "smollm" pre-tokenizer's digit split; SmolLM2's own
        # tokenizer.json splits every digit first, then ByteLevel with GPT-2's pattern. That is the reference.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        write_ids(os.path.join(OUT, "smollm2.ids"), tok, texts)
        tok.save("/tmp/smollm2_tokenizer.json")
        print(f"smollm2: vocab {tok.get_vocab_size()}, pre_tokenizer {tok.pre_tokenizer}; tokenizer.json in /tmp/smollm2_tokenizer.json")
    print(f"wrote {OUT}: {len(lines)} lines")


if __name__ == "__main__":
    sys.exit(main())
