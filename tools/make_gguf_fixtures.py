#!/usr/bin/env python3
"""Fixtures of the GGUF importer (src/convert/gguf.h; tests/test_convert_gguf.cpp), in tests/fixtures/gguf/.

Needs numpy, torch, tokenizers, transformers and the `gguf` package (not CI: CI only reads the
committed fixtures). Three steps:

  python tools/make_gguf_fixtures.py synthetic
      Tiny llama models written with the `gguf` package, one tensor type per tensor across F32, F16,
      BF16, Q8_0, Q4_0 and Q4_1, Q and K permuted as llama.cpp's converter stores them, with a
      byte-level BPE tokenizer trained by `tokenizers`:
        tiny_llama.gguf        untied head, GQA, smollm pre-tokenizer, chat template
        tiny_llama_tied.gguf   tied embeddings, one KV head, alignment 64, llama-bpe with BOS added
        tokenizer_gpt2.gguf, tokenizer_qwen2.gguf   tokenizer metadata only (no tensors)
      and for each:
        <name>.safetensors     param.<lmforge name> F32: the dequantized weights under lmforge's names
                               and layouts (gguf.quants.dequantize, cross-checked against the numpy
                               block decoding below); tokens I32 (B, T); ref.logits F32 (B, T, V) from
                               tools/torch_reference.py in float64 (cross-checked against transformers'
                               own GGUF loader in fp32); metadata "config" (docs/MODEL.md JSON)
        <name>.tokenizer.json  the tokenizer as `tokenizers` writes it (the importer must produce the
                               same JSON)

  python tools/make_gguf_fixtures.py smollm2 [--gguf PATH]
      SmolLM2-135M-Instruct Q4_1 (scripts/fetch_smollm2.sh) through transformers (which reads GGUF
      itself: it dequantizes to fp32 and un-permutes Q/K), float32, eager attention, on three
      prompts (ids from transformers' tokenizer of the GGUF):
        smollm2_ref.safetensors  p<i>.tokens I32 (T), p<i>.last_logits F32 (V), p<i>.top_ids I32 (T, 20),
                                 p<i>.top_logits F32 (T, 20), p<i>.greedy I32 (32): greedy continuation
                                 by full forwards

  python tools/make_gguf_fixtures.py check-tokenizer --tokenizer-json FILE [--gguf PATH]
      FILE: the tokenizer.json lmforge made from the GGUF (GgufSmolLM2.Tokenizer in
      tests/test_convert_gguf.cpp writes it and prints where). Encodes a few hundred varied lines with
      it (`tokenizers`) and with transformers' tokenizer of the GGUF; writes smollm2_tokenizer.json
      (the FNV-1a 64 hash of FILE, which the test then checks, and the comparison's counts).
"""
import argparse
import json
import os
import random
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as ref  # noqa: E402
from make_fixtures import write_safetensors  # noqa: E402

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf")
SMOLLM2 = os.path.join(ROOT, "third_party", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------

def corpus_lines():
    with open(os.path.join(ROOT, "data", "kjv.txt"), encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f][:3000]
    return lines + varied_lines(200, seed=1)


def varied_lines(n, seed):
    """Mixed text: English, code, digits, runs of whitespace, CJK, emoji, accents, special tokens."""
    rng = random.Random(seed)
    with open(os.path.join(ROOT, "data", "kjv.txt"), encoding="utf-8") as f:
        verses = [line.strip() for line in f if line.strip()][5000:5400]
    pieces = [
        "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
        "for (int i = 0; i < 10; ++i) { sum += a[i] * 3.14159; }",
        "The year 1969: 3 astronauts, 384400 km, 8 days.", "Call +1-555-0123 or 0049 30 123456.",
        "   leading spaces", "trailing spaces   ", "tabs\tand\t\ttabs", "two  spaces  1  2   3",
        "東京は日本の首都です。", "北京欢迎你", "한국어 문장입니다", "Привет, мир!", "Ελληνικά γράμματα",
        "emoji 😀🎉👍🏽 and 🇫🇷 flags", "naïve café résumé façade", "mañana über straße",
        "<|im_start|>user\nHello!<|im_end|>", "x=1;y=22;z=333;w=4444;", "3.14e-10 + 2.71828",
        "it's we're they've I'm you'll he'd", "IT'S WE'RE THEY'VE", "line one\nline two\r\nline three",
        "{\"key\": [1, 2, 3], \"other\": null}", "SELECT * FROM users WHERE id = 42;", "a\u00a0b\u2003c",
        "   ", "\n\n\n", "0", "007", "1234567890", "$100.00 (50% off!)", "#include <vector>",
        "e\u0301 vs \u00e9", "Ａｂｃ full-width", "ﬁ ligature", "https://example.com/path?q=1&r=2",
    ]
    out = []
    for i in range(n):
        k = rng.randrange(4)
        if k == 0:
            out.append(rng.choice(verses))
        elif k == 1:
            out.append(rng.choice(pieces))
        elif k == 2:
            out.append(" ".join(rng.choice(pieces + verses) for _ in range(rng.randrange(2, 4))))
        else:
            s = rng.choice(verses)
            j = rng.randrange(len(s) + 1)
            out.append(s[:j] + rng.choice(["  ", "\t", " 12 ", "99", "\n ", "  3", "😀", "中文"]) + s[j:])
    return out


# ---------------------------------------------------------------------------------------------
# tokenizers (trained by `tokenizers`; GGUF metadata from them)
# ---------------------------------------------------------------------------------------------

def byte_level(add_prefix_space, trim_offsets, use_regex):
    return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=trim_offsets, use_regex=use_regex)


def make_tokenizer(pre, add_bos, vocab_size=300):
    """A byte-level BPE tokenizer with the pre-tokenizer of llama.cpp's pre type `pre`, trained on
    the corpus; its JSON is what the importer must write for the GGUF made from it."""
    tok = Tokenizer(models.BPE(ignore_merges=(pre == "llama-bpe")))
    if pre == "gpt-2":
        tok.pre_tokenizer = byte_level(False, True, True)
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     byte_level(False, True, True)])
    elif pre == "llama-bpe":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False), byte_level(False, True, False)])
    elif pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False), byte_level(False, False, False)])
    else:
        raise ValueError(pre)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_lines(), trainer)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        b = SPECIALS[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b} $A", pair=f"{b} $A {b}:1 $B:1", special_tokens=[(b, tok.token_to_id(b))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return tok


def add_tokenizer_metadata(w, tok, pre, add_bos):
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in j["added_tokens"] if a["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)


# ---------------------------------------------------------------------------------------------
# dequantization, independently of gguf.quants (ggml-common.h block layouts)
# ---------------------------------------------------------------------------------------------

def numpy_dequant(raw, qtype, n):
    raw = np.asarray(raw).reshape(-1).view(np.uint8)
    if qtype == Q.F32:
        return raw.view(np.float32)[:n].copy()
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32)
    if qtype == Q.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    bs = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[qtype]
    blocks = raw.reshape(-1, bs)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    if qtype == Q.Q8_0:
        return (blocks[:, 2:].copy().view(np.int8).astype(np.float32) * d).reshape(-1)
    qs = blocks[:, 4:] if qtype == Q.Q4_1 else blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # elements 0..15 low, 16..31 high
    if qtype == Q.Q4_0:
        return ((q - 8) * d).reshape(-1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return (q * d + m).reshape(-1)


def store(w, name, x, qtype):
    """Writes x ((rows, cols) or (n,)) fp32 as qtype; returns the dequantized values the file holds."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == Q.F32:
        w.add_tensor(name, x)
        raw = x
    elif qtype == Q.F16:
        raw = x.astype(np.float16)
        w.add_tensor(name, raw)
    else:
        raw = gguf.quants.quantize(x, qtype)
        w.add_tensor(name, raw, raw_dtype=qtype)
    deq = gguf.quants.dequantize(raw, qtype).reshape(x.shape).astype(np.float32)
    mine = numpy_dequant(raw, qtype, x.size).reshape(x.shape)
    assert np.array_equal(deq.view(np.uint32), mine.view(np.uint32)), f"dequantization of {name} ({qtype.name})"
    return deq


def permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    """transformers' reverse_permute_weights (modeling_gguf_pytorch_utils.py)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# synthetic models
# ---------------------------------------------------------------------------------------------

SYNTHETIC = {
    "tiny_llama": dict(
        cfg=dict(vocab_size=300, pad_vocab_multiple=64, context_length=64, n_layer=2, n_head=4, n_kv_head=2,
                 d_model=32, d_ff=64, norm="rmsnorm", norm_eps=1e-5, activation="swiglu", positions="rope",
                 rope_theta=10000.0, tied_embeddings=False, bias=False),
        pre="smollm", add_bos=False, alignment=None, seed=11,
        types={"token_embd": Q.Q8_0, "output": Q.Q4_0, "output_norm": Q.F32,
               0: dict(attn_norm=Q.F32, attn_q=Q.Q4_0, attn_k=Q.Q4_1, attn_v=Q.F16, attn_output=Q.BF16,
                       ffn_norm=Q.F32, ffn_gate=Q.Q8_0, ffn_up=Q.Q4_1, ffn_down=Q.Q4_0),
               1: dict(attn_norm=Q.F16, attn_q=Q.Q4_1, attn_k=Q.Q4_0, attn_v=Q.Q8_0, attn_output=Q.F16,
                       ffn_norm=Q.BF16, ffn_gate=Q.BF16, ffn_up=Q.F32, ffn_down=Q.Q4_1)}),
    "tiny_llama_tied": dict(
        cfg=dict(vocab_size=300, pad_vocab_multiple=64, context_length=64, n_layer=1, n_head=4, n_kv_head=1,
                 d_model=32, d_ff=32, norm="rmsnorm", norm_eps=1e-6, activation="swiglu", positions="rope",
                 rope_theta=500000.0, tied_embeddings=True, bias=False),
        pre="llama-bpe", add_bos=True, alignment=64, seed=12,
        types={"token_embd": Q.Q4_1, "output_norm": Q.BF16,
               0: dict(attn_norm=Q.F32, attn_q=Q.Q8_0, attn_k=Q.BF16, attn_v=Q.Q4_0, attn_output=Q.Q4_1,
                       ffn_norm=Q.F16, ffn_gate=Q.F16, ffn_up=Q.Q4_0, ffn_down=Q.Q8_0)}),
}
B, T = 2, 12


def write_synthetic(name, spec):
    cfg, types = spec["cfg"], spec["types"]
    C, F, L, V = cfg["d_model"], cfg["d_ff"], cfg["n_layer"], cfg["vocab_size"]
    NH, NKV = cfg["n_head"], cfg["n_kv_head"]
    HS = C // NH
    cfg["norm_eps"] = float(np.float32(cfg["norm_eps"]))  # what the file's f32 holds
    tok = make_tokenizer(spec["pre"], spec["add_bos"], V)
    rng = np.random.default_rng(spec["seed"])

    def randn(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    path = os.path.join(OUT, name + ".gguf")
    w = gguf.GGUFWriter(path, "llama")
    if spec["alignment"]:
        w.add_custom_alignment(spec["alignment"])
    w.add_name(name)
    w.add_block_count(L)
    w.add_context_length(cfg["context_length"])
    w.add_embedding_length(C)
    w.add_feed_forward_length(F)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_layer_norm_rms_eps(cfg["norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(HS)
    w.add_vocab_size(V)
    add_tokenizer_metadata(w, tok, spec["pre"], spec["add_bos"])

    Vp = ref.padded_vocab(cfg)
    params = {}
    emb = store(w, "token_embd.weight", randn(V, C), types["token_embd"])
    params["tok_emb.weight"] = np.concatenate([emb, np.zeros((Vp - V, C), np.float32)])
    for i in range(L):
        t, b, p = types[i], f"blk.{i}.", f"layers.{i}."
        params[p + "norm1.weight"] = store(w, b + "attn_norm.weight", 1 + randn(C, scale=0.1), t["attn_norm"])
        # Hugging Face layout (rotate-half RoPE); the file holds Q and K permuted, as llama.cpp writes them
        q_hf, k_hf = randn(NH * HS, C, scale=C ** -0.5), randn(NKV * HS, C, scale=C ** -0.5)
        q = unpermute(store(w, b + "attn_q.weight", permute(q_hf, NH), t["attn_q"]), NH)
        k = unpermute(store(w, b + "attn_k.weight", permute(k_hf, NKV), t["attn_k"]), NKV)
        v = store(w, b + "attn_v.weight", randn(NKV * HS, C, scale=C ** -0.5), t["attn_v"])
        params[p + "attn.qkv.weight"] = np.concatenate([q, k, v])
        params[p + "attn.proj.weight"] = store(w, b + "attn_output.weight", randn(C, NH * HS, scale=C ** -0.5),
                                               t["attn_output"])
        params[p + "norm2.weight"] = store(w, b + "ffn_norm.weight", 1 + randn(C, scale=0.1), t["ffn_norm"])
        gate = store(w, b + "ffn_gate.weight", randn(F, C, scale=C ** -0.5), t["ffn_gate"])
        up = store(w, b + "ffn_up.weight", randn(F, C, scale=C ** -0.5), t["ffn_up"])
        params[p + "mlp.fc.weight"] = np.concatenate([gate, up])
        params[p + "mlp.proj.weight"] = store(w, b + "ffn_down.weight", randn(C, F, scale=F ** -0.5), t["ffn_down"])
    params["norm_f.weight"] = store(w, "output_norm.weight", 1 + randn(C, scale=0.1), types["output_norm"])
    if not cfg["tied_embeddings"]:
        head = store(w, "output.weight", randn(V, C, scale=C ** -0.5), types["output"])
        params["lm_head.weight"] = np.concatenate([head, np.zeros((Vp - V, C), np.float32)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # the reference: lmforge's model (docs/MODEL.md) in float64 on the dequantized weights
    names = [s[0] for s in ref.param_specs(cfg)]
    assert names == list(params), (names, list(params))
    p64 = {k: torch.from_numpy(v).double() for k, v in params.items()}
    gen = torch.Generator().manual_seed(spec["seed"])
    tokens = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int32)
    with torch.no_grad():
        logits = ref.forward(p64, cfg, tokens)
    check_with_transformers(path, tokens, logits)

    tensors = [("param." + k, torch.from_numpy(v)) for k, v in params.items()]
    tensors += [("tokens", tokens), ("ref.logits", logits.float())]
    write_safetensors(os.path.join(OUT, name + ".safetensors"), tensors, {"config": ref.config_json(cfg)})
    with open(os.path.join(OUT, name + ".tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok.to_str())
    print(f"wrote {name}.gguf ({os.path.getsize(path)} bytes), {name}.safetensors, {name}.tokenizer.json")


def check_with_transformers(path, tokens, logits64):
    """transformers' own GGUF loader (dequantize, reverse_permute_weights) gives the same logits."""
    from transformers import AutoModelForCausalLM
    d, f = os.path.split(path)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        got = m(tokens.long()).logits.double()
    err = ((got - logits64).abs().max() / logits64.abs().max()).item()
    print(f"  {f}: transformers' fp32 logits vs the float64 reference: max err {err:.2e} of max|logit|")
    assert err < 1e-5, err


def write_tokenizer_only(pre):
    tok = make_tokenizer(pre, False)
    name = "tokenizer_" + pre.replace("-", "")
    path = os.path.join(OUT, name + ".gguf")
    w = gguf.GGUFWriter(path, "llama")
    add_tokenizer_metadata(w, tok, pre, False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(os.path.join(OUT, name + ".tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok.to_str())
    print(f"wrote {name}.gguf ({os.path.getsize(path)} bytes), {name}.tokenizer.json")


def synthetic():
    os.makedirs(OUT, exist_ok=True)
    for name, spec in SYNTHETIC.items():
        write_synthetic(name, spec)
    for pre in ("gpt-2", "qwen2"):
        write_tokenizer_only(pre)


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct Q4_1 through transformers
# ---------------------------------------------------------------------------------------------

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWhat is the tallest mountain in the world?<|im_end|>\n<|im_start|>assistant\n",
]
TOPK, NEW = 20, 32


def load_hf(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return tok, model


def smollm2(gguf_path):
    tok, model = load_hf(gguf_path)
    tensors = []
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()  # (T, V)
        top = torch.topk(logits, TOPK, dim=-1)
        # greedy continuation by full forwards (no KV cache, no stopping at EOS)
        seq, margins = list(ids), []
        with torch.no_grad():
            for _ in range(NEW):
                last = model(torch.tensor([seq])).logits[0, -1].float()
                two = torch.topk(last, 2)
                margins.append((two.values[0] - two.values[1]).item() / last.abs().max().item())
                seq.append(int(torch.argmax(last)))
        gen = seq[len(ids):]
        print(f"prompt {i}: {len(ids)} tokens; greedy: {tok.decode(gen)!r}")
        print(f"  smallest top-1/top-2 gap along the greedy path: {min(margins):.2e} of max|logit|")
        tensors += [(f"p{i}.tokens", torch.tensor(ids, dtype=torch.int32)),
                    (f"p{i}.last_logits", logits[-1].contiguous()),
                    (f"p{i}.top_ids", top.indices.to(torch.int32).contiguous()),
                    (f"p{i}.top_logits", top.values.contiguous()),
                    (f"p{i}.greedy", torch.tensor(gen, dtype=torch.int32))]
    meta = {"source": "transformers " + __import__("transformers").__version__ + " from " + os.path.basename(gguf_path),
            "prompts": json.dumps(PROMPTS)}
    path = os.path.join(OUT, "smollm2_ref.safetensors")
    write_safetensors(path, tensors, meta)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def fnv1a64(data):
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def check_tokenizer(gguf_path, tokenizer_json):
    """lmforge's tokenizer.json (through `tokenizers`) against transformers' conversion of the GGUF.

    transformers builds the GGUF's tokenizer with GPT-2's ByteLevel split whatever tokenizer.ggml.pre
    says; SmolLM2's own tokenizer (and llama.cpp's 'smollm' pre type) first splits digits one by one.
    The two differ only where that split matters (whitespace before a digit), so the lines are also
    compared with lmforge's JSON given GPT-2's split: that must agree everywhere."""
    from transformers import AutoTokenizer
    d, f = os.path.split(os.path.abspath(gguf_path))
    hf = AutoTokenizer.from_pretrained(d, gguf_file=f)
    with open(tokenizer_json, "rb") as fh:
        raw = fh.read()
    mine = Tokenizer.from_str(raw.decode("utf-8"))
    j = json.loads(raw)
    j["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    mine_gpt2_split = Tokenizer.from_str(json.dumps(j))
    lines = varied_lines(400, seed=7)
    same = same_split = 0
    diffs = []
    for line in lines:
        want = hf(line, add_special_tokens=True).input_ids
        got = mine.encode(line).ids
        same += got == want
        same_split += mine_gpt2_split.encode(line).ids == want
        if got != want:
            diffs.append(line)
    roundtrip = sum(mine.decode(mine.encode(x).ids, skip_special_tokens=False) == x for x in lines)
    print(f"{len(lines)} lines: lmforge's tokenizer.json == transformers' GGUF tokenizer on {same}; "
          f"with GPT-2's split instead of SmolLM2's digit split: {same_split}; decode(encode(x)) == x on {roundtrip}")
    for line in diffs[:5]:
        print(f"  differs (digit split): {line!r}")
    assert same_split == len(lines), "vocabulary, merges or special tokens differ"
    assert roundtrip == len(lines)
    out = {"fnv1a64": "%016x" % fnv1a64(raw), "lines": len(lines), "identical_to_transformers": same,
           "identical_with_gpt2_split": same_split, "roundtrip": roundtrip}
    path = os.path.join(OUT, "smollm2_tokenizer.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
        fh.write("\n")
    print(f"wrote {path}: {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["synthetic", "smollm2", "check-tokenizer"])
    ap.add_argument("--gguf", default=SMOLLM2)
    ap.add_argument("--tokenizer-json")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.what == "synthetic":
        synthetic()
    elif a.what == "smollm2":
        smollm2(a.gguf)
    else:
        if not a.tokenizer_json:
            ap.error("check-tokenizer needs --tokenizer-json")
        check_tokenizer(a.gguf, a.tokenizer_json)


if __name__ == "__main__":
    main()
