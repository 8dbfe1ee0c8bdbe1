#!/usr/bin/env python3
"""PyTorch baseline on the GPU: GPT-2 124M training step (nanoGPT-style, docs/MODEL.md shapes).

    python3 bench/torch_gpu_gpt2.py --mode compile-bf16 --batch-size 16 --seq-len 1024

Modes: eager-fp32, eager-tf32 (TF32 matmuls), eager-bf16 (autocast), compile-bf16 (torch.compile + autocast). The model uses
flash SDPA (F.scaled_dot_product_attention, is_causal), a tied LM head, vocab 50304, fused AdamW.
Prints ONE JSON line: {"impl": "pytorch-<mode>", "tok_s", "step_ms", "mfu", "peak_mem_gb"}.
MFU uses 6N + 12 L d T FLOPs per token against 989 TFLOP/s (H100 SXM / H200 dense bf16).
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="compile-bf16", choices=["eager-fp32", "eager-tf32", "eager-bf16", "compile-bf16"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    tf32 = a.mode == "eager-tf32"  # fp32 means fp32 (as lmforge's fp32 path); tf32 as --precision tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    model = GPT(T=a.seq_len).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    n_flops_params = n_params - model.wpe.weight.numel()
    decay = [p for p in model.parameters() if p.dim() == 2]
    nodecay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    fwd = torch.compile(model) if a.mode.startswith("compile") else model
    bf16 = a.mode.endswith("bf16")
    x = torch.randint(0, 50257, (a.batch_size, a.seq_len), device=dev)
    y = torch.randint(0, 50257, (a.batch_size, a.seq_len), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.warmup_steps):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    ms = times[len(times) // 2]
    tok_s = a.batch_size * a.seq_len / (ms / 1e3)
    flops_tok = 6 * n_flops_params + 12 * 12 * 768 * a.seq_len
    print(json.dumps({"impl": "pytorch-%s-B%d" % (a.mode, a.batch_size), "tok_s": round(tok_s, 1), "step_ms": round(ms, 2),
                      "mfu": round(tok_s * flops_tok / 989e12, 4),
                      "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
