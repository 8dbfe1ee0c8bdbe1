#!/usr/bin/env python3
"""PyTorch baseline on the GPU: a dense transformer's training step, at the shapes of lmforge's presets.

    python3 bench/torch_gpu_gpt2.py --mode compile-bf16 --batch-size 16 --seq-len 1024                 # GPT-2 124M
    python3 bench/torch_gpu_gpt2.py --shape llama-1b --mode compile-bf16 --batch-size 4 --seq-len 2048
    python3 bench/torch_gpu_gpt2.py --shape gpt2-350m --device cpu --batch-size 1 --seq-len 32 --steps 1   # smoke test

Shapes (--shape, as lmforge's presets of the same name, docs/MODEL.md):
  gpt2-124m  12 layers, d 768, 12 heads, MLP 3072      GPT-2: LayerNorm, learned positions, GELU (tanh), biases,
  gpt2-350m  24 layers, d 1024, 16 heads, MLP 4096     tied LM head, vocab 50304 (50257 padded)
  llama-1b   16 layers, d 2048, 16 heads, 4 KV heads,  Llama: RMSNorm, RoPE (rotate-half, theta 1e4), SwiGLU,
             SwiGLU 5632, vocab 32000                  no biases, untied LM head, grouped-query attention
Modes: eager-fp32, eager-tf32 (TF32 matmuls), eager-bf16 (autocast), compile-bf16 (torch.compile + autocast). Flash SDPA
(F.scaled_dot_product_attention, is_causal; GQA through enable_gqa), fused AdamW (fp32 master weights), clip 1.0.
Prints ONE JSON line: {"impl": "pytorch-<shape>-<mode>-B<B>", "tok_s", "step_ms", "mfu", "peak_mem_gb", "torch", "params"}.
MFU uses 6N + 12 L d T FLOPs per token (N: parameters without the position embedding) against 989 TFLOP/s (H100 SXM /
H200 dense bf16). --device cpu (smoke test): wall-clock time, peak_mem_gb is the process max RSS.
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, nh):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.mproj = nn.Linear(4 * d, d)
        self.nh = nh

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.nh, C // self.nh).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mproj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, V=50304, T=1024, L=12, d=768, nh=12):
        super().__init__()
        self.wte = nn.Embedding(V, d)
        self.wpe = nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, nh) for _ in range(L))
        self.lnf = nn.LayerNorm(d)
        for n, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * L) if n.endswith("proj.weight") else 0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = F.linear(self.lnf(x), self.wte.weight)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def rope(x, cos, sin):  # x (B, H, T, hs); rotate-half convention (docs/MODEL.md)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaBlock(nn.Module):
    def __init__(self, d, nh, nkv, ff):
        super().__init__()
        self.hs, self.nh, self.nkv = d // nh, nh, nkv
        self.n1 = nn.RMSNorm(d, eps=1e-5)
        self.qkv = nn.Linear(d, (nh + 2 * nkv) * self.hs, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.n2 = nn.RMSNorm(d, eps=1e-5)
        self.gate_up = nn.Linear(d, 2 * ff, bias=False)
        self.mproj = nn.Linear(ff, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(self.n1(x)).split([self.nh * self.hs, self.nkv * self.hs, self.nkv * self.hs], dim=2)
        q = rope(q.view(B, T, self.nh, self.hs).transpose(1, 2), cos, sin)
        k = rope(k.view(B, T, self.nkv, self.hs).transpose(1, 2), cos, sin)
        v = v.view(B, T, self.nkv, self.hs).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nkv != self.nh)
        x = x + self.proj(a.transpose(1, 2).contiguous().view(B, T, C))
        g, u = self.gate_up(self.n2(x)).chunk(2, dim=-1)
        return x + self.mproj(F.silu(g) * u)


class Llama(nn.Module):
    def __init__(self, V=32000, T=2048, L=16, d=2048, nh=16, nkv=4, ff=5632):
        super().__init__()
        self.wte = nn.Embedding(V, d)
        self.blocks = nn.ModuleList(LlamaBlock(d, nh, nkv, ff) for _ in range(L))
        self.nf = nn.RMSNorm(d, eps=1e-5)
        self.lm_head = nn.Linear(d, V, bias=False)
        hs = d // nh
        inv = 1.0 / (10000.0 ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
        ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)  # (T, hs / 2): pair (i, i + hs / 2) turns by ang[:, i]
        self.register_buffer("sin", ang.sin(), persistent=False)
        for n, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * L) if n.endswith("proj.weight") else 0.02)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        for b in self.blocks:
            x = b(x, cos, sin)
        logits = self.lm_head(self.nf(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


SHAPES = {  # lmforge's presets (src/model/config.cpp)
    "gpt2-124m": ("gpt2", dict(V=50304, L=12, d=768, nh=12)),
    "gpt2-350m": ("gpt2", dict(V=50304, L=24, d=1024, nh=16)),
    "llama-1b": ("llama", dict(V=32000, L=16, d=2048, nh=16, nkv=4, ff=5632)),
}


def peak_mem_gb(dev):
    if dev == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    import resource  # CPU smoke test: process max RSS (KiB on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gpt2-124m", choices=sorted(SHAPES))
    ap.add_argument("--mode", default="compile-bf16", choices=["eager-fp32", "eager-tf32", "eager-bf16", "compile-bf16"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = a.device
    tf32 = a.mode == "eager-tf32"  # fp32 means fp32 (as lmforge's fp32 path); tf32 as --precision tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    arch, kw = SHAPES[a.shape]
    model = (GPT(T=a.seq_len, **kw) if arch == "gpt2" else Llama(T=a.seq_len, **kw)).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    n_flops_params = n_params - (model.wpe.weight.numel() if arch == "gpt2" else 0)
    decay = [p for p in model.parameters() if p.dim() == 2]
    nodecay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if dev == "cuda" else {}))
    fwd = torch.compile(model) if a.mode.startswith("compile") else model
    bf16 = a.mode.endswith("bf16")
    V_real = 50257 if arch == "gpt2" else kw["V"]
    x = torch.randint(0, V_real, (a.batch_size, a.seq_len), device=dev)
    y = torch.randint(0, V_real, (a.batch_size, a.seq_len), device=dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    for _ in range(a.warmup_steps):
        step()
    sync()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        if dev == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    ms = times[len(times) // 2]
    tok_s = a.batch_size * a.seq_len / (ms / 1e3)
    flops_tok = 6 * n_flops_params + 12 * kw["L"] * kw["d"] * a.seq_len
    impl = "pytorch-%s%s-B%d" % ("" if a.shape == "gpt2-124m" else a.shape + "-", a.mode, a.batch_size)
    print(json.dumps({"impl": impl, "tok_s": round(tok_s, 1), "step_ms": round(ms, 2),
                      "mfu": round(tok_s * flops_tok / 989e12, 4), "peak_mem_gb": round(peak_mem_gb(dev), 2),
                      "torch": torch.__version__, "params": n_params}))


if __name__ == "__main__":
    main()
