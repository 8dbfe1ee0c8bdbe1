#!/usr/bin/env python3
"""PyTorch baseline on the GPU: a time-series MoE forecaster's training step (docs/TIMESERIES.md, the field
report's shape = lmforge's preset timemoe-field). Same conventions as bench/torch_gpu_moe.py.

    python3 bench/torch_gpu_timeseries.py --mode eager-bf16                   # B 4, T 4096
    python3 bench/torch_gpu_timeseries.py --mode compile-bf16 --compile-loop-eager
    python3 bench/torch_gpu_timeseries.py --device cpu --tiny --mode eager-fp32   # CPU smoke test
    python3 bench/torch_gpu_timeseries.py --self-check                        # CPU, float64, against the fixture

Model (defaults = timemoe-field, src/model/config.cpp): point embedding x0 = silu(x W[:d]) * (x W[d:])
(ts_embed: Linear(1, 2d, bias=False), rows [gate; up]); 12 pre-norm blocks, d 384, 12 heads (as many KV heads),
RMSNorm (eps 1e-6, weight only), RoPE (theta 1e4, rotate-half), causal flash SDPA (F.scaled_dot_product_attention,
is_causal), no biases, the residual stream in float32 (autocast runs the matmuls in bf16); every FFN an MoE: router Linear(d, 8, bias=False) in float32, softmax scores, top-2,
renormalised weights, dropless, SwiGLU experts of width d_expert 192 (w_in (E, 2F, d) rows [gate; up], w_out (E, d, F)),
one shared SwiGLU expert of the same width d_expert (src/model/model.cpp: lmforge's shared experts have d_expert, not
d_ff; d_ff 1536 is unused because every layer is MoE) scaled by sigmoid(x . gate) (gate in float32), Switch aux loss
0.02 * E * sum_i f_i P_i per layer (f_i = share of the N*K assignments routed to expert i, no gradient; P_i = mean
score of expert i); final RMSNorm; heads Linear(d, 1+8+32+64, bias=False), column block j = horizon j; loss = mean over
points of (mean over the 4 heads of (mean over the head's non-NaN targets of Huber_2(y - t))) + the aux terms.
Parameter names are lmforge's (ts_embed.weight, layers.<l>.attn.qkv.weight, layers.<l>.moe.experts.w_in, ...).
Dispatch as in bench/torch_gpu_moe.py: stable sort of the flattened assignments by expert, gather, a Python loop over
the experts' contiguous slices (sizes from torch.bincount(...).tolist()), index_add_ back weighted by the top-k weights.

Modes: eager-fp32, eager-tf32, eager-bf16 (autocast), compile-bf16 (torch.compile + autocast); fused AdamW (lr 3e-4,
wd 0.1 on matrices and expert stacks, betas 0.9/0.95), grad clip 1.0; inputs (B, T, 1) and targets (B, T, 64) random
normal. torch.compile and the data-dependent loop: as bench/torch_gpu_moe.py (--compile-loop-eager keeps the loop eager;
if compiling fails the script prints a JSON line with "error" and exits 0).
Prints ONE JSON line (the last line of stdout):
  {"impl": "pytorch-ts-<mode>-B<B>", "points_s", "step_ms", "mfu", "peak_mem_gb", "torch", "params", "active_params",
   "tok_s" (= points_s, for tools/gpu_check.sh's tables), "loss", ...}   (compile modes add "graphs", "graph_breaks",
   "warmup_s"). points_s = B*T / median step time (CUDA events on the GPU, wall clock on the CPU).
MFU uses 6 N_active + 12 L d T FLOPs per point against --peak-tflops (989: H100 SXM / H200 dense bf16), N_active = all
parameters with top_k/E of the routed expert weights.
--self-check builds this module in float64 with tests/fixtures/timeseries_moe.safetensors's config and weights
(tools/make_timeseries_fixture.py, the float64 reference lmforge's test_timeseries_model checks against) and compares
head outputs, loss (pred + aux) and every gradient: the benchmarked model is the one lmforge computes.
"""
import argparse
import json
import math
import os
import struct
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_gpu_moe import (add_run_args, causal_attention, compile_variant, compiled, make_optimizer,  # noqa: E402
                           make_step, print_record, set_precision, time_steps)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rms_norm(x, w, eps):
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def swiglu(u):  # u (..., 2F) rows [gate; up] -> (..., F)
    g, up = u.chunk(2, dim=-1)
    return F.silu(g) * up


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Experts(nn.Module):
    def __init__(self, n, d, f):
        super().__init__()
        self.w_in = nn.Parameter(torch.empty(n, 2 * f, d))  # rows [gate; up]
        self.w_out = nn.Parameter(torch.empty(n, d, f))


class SharedExperts(Experts):
    def __init__(self, n, d, f):
        super().__init__(n, d, f)
        self.gate = nn.Parameter(torch.empty(n, d))


class MoE(nn.Module):
    """Dropless top-k MoE FFN with SwiGLU experts, gated shared experts and the Switch aux loss (src/ops/moe.h)."""

    def __init__(self, d, a):
        super().__init__()
        self.router = nn.Linear(d, a.experts, bias=False)
        self.experts = Experts(a.experts, d, a.d_expert)
        self.shared = SharedExperts(a.shared, d, a.d_expert) if a.shared else None
        self.E, self.K, self.aux_coef = a.experts, a.top_k, a.aux_coef
        self.expert_loop = self._expert_loop  # torch.compiler.disable(...)d by --compile-loop-eager

    def _expert_loop(self, xs, flat_e):  # xs: token rows sorted by expert -> expert outputs (same order), counts
        counts = torch.bincount(flat_e, minlength=self.E)
        ys, start = [], 0
        for e, n in enumerate(counts.tolist()):  # data-dependent per-expert loop (an empty slice gives 0 rows)
            h = swiglu(F.linear(xs[start:start + n], self.experts.w_in[e]))
            ys.append(F.linear(h, self.experts.w_out[e]))
            start += n
        return torch.cat(ys, dim=0), counts

    def forward(self, x):  # x (N, d) -> out (N, d), aux (scalar, fp32)
        N, E, K = x.shape[0], self.E, self.K
        rdt = torch.promote_types(x.dtype, torch.float32)  # fp32 router and gate (float64 in the self-check)
        with torch.autocast(x.device.type, enabled=False):  # autocast would run F.linear in bf16
            logits = F.linear(x.to(rdt), self.router.weight.to(rdt))
            gates = torch.sigmoid(F.linear(x.to(rdt), self.shared.gate.to(rdt))) if self.shared is not None else None
        scores = logits.softmax(dim=-1)
        top_s, top_i = torch.topk(scores, K, dim=-1)  # (N, K), by decreasing score
        comb = top_s / top_s.sum(dim=-1, keepdim=True)
        flat_e = top_i.reshape(-1)  # assignment a = n K + k
        order = torch.sort(flat_e, stable=True)[1]  # assignments grouped by expert, (token, slot) order within
        tok = torch.div(order, K, rounding_mode="floor")
        y, counts = self.expert_loop(x.index_select(0, tok), flat_e)
        y = y * comb.reshape(-1).index_select(0, order).unsqueeze(1).to(y.dtype)
        out = torch.zeros(N, x.shape[1], dtype=y.dtype, device=x.device).index_add_(0, tok, y)
        if self.shared is not None:
            for s in range(self.shared.w_in.shape[0]):
                ys = F.linear(swiglu(F.linear(x, self.shared.w_in[s])), self.shared.w_out[s])
                out = out + gates[:, s:s + 1].to(ys.dtype) * ys
        f = (counts.to(scores.dtype) / (N * K)).detach()
        aux = self.aux_coef * E * (f * scores.mean(dim=0)).sum()
        return out, aux


class Attention(nn.Module):
    def __init__(self, d, nh, nkv):
        super().__init__()
        self.nh, self.nkv, self.hs = nh, nkv, d // nh
        self.qkv = nn.Linear(d, (nh + 2 * nkv) * self.hs, bias=False)  # [q heads | k heads | v heads]
        self.proj = nn.Linear(nh * self.hs, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.nh * self.hs, self.nkv * self.hs, self.nkv * self.hs], dim=-1)
        q = q.view(B, T, self.nh, self.hs).transpose(1, 2)
        k = k.view(B, T, self.nkv, self.hs).transpose(1, 2)
        v = v.view(B, T, self.nkv, self.hs).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.nkv != self.nh:  # GQA: q head h reads kv head h // (nh / nkv)
            k = k.repeat_interleave(self.nh // self.nkv, dim=1)
            v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        a = causal_attention(q, k, v.to(q.dtype))
        return self.proj(a.transpose(1, 2).reshape(B, T, self.nh * self.hs))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def rope_tables(T, hs, theta, device):  # (T, hs): angle[t, i] = t theta^(-2i/hs), both halves
    i = torch.arange(hs // 2, dtype=torch.float64, device=device)
    ang = torch.arange(T, dtype=torch.float64, device=device)[:, None] * (theta ** (-2.0 * i / hs))[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.norm1 = RMSNorm(a.d_model, a.norm_eps)
        self.attn = Attention(a.d_model, a.heads, a.kv_heads)
        self.norm2 = RMSNorm(a.d_model, a.norm_eps)
        self.moe = MoE(a.d_model, a)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        B, T, C = x.shape
        m, aux = self.moe(self.norm2(x).reshape(B * T, C))
        return x + m.view(B, T, C).to(x.dtype), aux


class TimeSeriesMoE(nn.Module):
    def __init__(self, a):
        super().__init__()
        d, L = a.d_model, a.layers
        self.d, self.horizons, self.delta = d, a.horizons, a.huber_delta
        self.ts_embed = nn.Linear(1, 2 * d, bias=False)
        self.layers = nn.ModuleList(Block(a) for _ in range(L))
        self.norm_f = RMSNorm(d, a.norm_eps)
        self.ts_heads = nn.Linear(d, sum(a.horizons), bias=False)
        cos, sin = rope_tables(a.seq_len, d // a.heads, a.rope_theta, None)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for n, p in self.named_parameters():  # lmforge's init (src/model/params.cpp init_gpt2)
            if n.endswith("norm1.weight") or n.endswith("norm2.weight") or n == "norm_f.weight":
                continue
            out_proj = n.endswith("attn.proj.weight") or n.endswith("w_out")
            std = 1 / math.sqrt(3) if n == "ts_embed.weight" else 0.02 / math.sqrt(2 * L) if out_proj else 0.02
            nn.init.normal_(p, 0.0, std)

    def values(self, x):  # x (B, T, 1) -> head outputs (B, T, D), aux
        T = x.shape[1]
        u = self.ts_embed(x)
        h = swiglu(u)
        h = h.to(torch.promote_types(h.dtype, torch.float32))  # an fp32 residual stream, as the other benches'
        aux = None
        for blk in self.layers:
            h, a = blk(h, self.rope_cos[:T], self.rope_sin[:T])
            aux = a if aux is None else aux + a
        return self.ts_heads(self.norm_f(h)), aux

    def forward(self, x, t):  # x (B, T, 1), t (B, T, Hmax) with NaN where missing -> loss, pred, aux
        y, aux = self.values(x)
        y = y.float() if y.dtype in (torch.bfloat16, torch.float16) else y
        pred, col = 0, 0
        for hj in self.horizons:  # mean over the head's targets that exist, then over the heads
            tj = t[..., :hj]
            mask = ~torch.isnan(tj)
            r = y[..., col:col + hj] - torch.where(mask, tj, torch.zeros_like(tj))
            s = (F.huber_loss(r, torch.zeros_like(r), reduction="none", delta=self.delta) * mask).sum(-1)
            n = mask.sum(-1)
            pred = pred + torch.where(n > 0, s / n.clamp(min=1), torch.zeros_like(s)) / len(self.horizons)
            col += hj
        pred = pred.mean()
        return pred + aux, pred, aux


def count_params(model, a):
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".moe.experts." in n)
    return total, total - routed + routed * a.top_k // a.experts


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    dts = {"F32": torch.float32, "F64": torch.float64}
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        b, e = v["data_offsets"]
        out[k] = torch.frombuffer(bytearray(data[b:e]), dtype=dts[v["dtype"]]).reshape(v["shape"])
    return header["__metadata__"], out


def self_check():
    """float64 CPU: this module with the MoE fixture's config and weights against its reference numbers."""
    meta, ts = read_safetensors(os.path.join(ROOT, "tests", "fixtures", "timeseries_moe.safetensors"))
    c = json.loads(meta["config"])
    m = c["moe"]
    assert m["score"] == "softmax" and m["renormalize"] and m["capacity_factor"] == 0 and c["activation"] == "swiglu"
    a = argparse.Namespace(d_model=c["d_model"], layers=c["n_layer"], heads=c["n_head"], kv_heads=c["n_kv_head"],
                           experts=m["experts"], top_k=m["top_k"], d_expert=m["d_expert"], shared=m["shared"],
                           aux_coef=m["aux_coef"], horizons=c["horizons"], huber_delta=c["huber_delta"],
                           norm_eps=c["norm_eps"], rope_theta=c["rope_theta"], seq_len=ts["inputs"].shape[1])
    model = TimeSeriesMoE(a).double()
    params = dict(model.named_parameters())
    missing = sorted(set(params) ^ {k[len("param."):] for k in ts if k.startswith("param.")})
    assert not missing, "names differ from the fixture's: %s" % missing
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ts["param." + n].double())
    loss, pred, aux = model(ts["inputs"].double(), ts["targets"].double())
    loss.backward()
    y, _ = model.values(ts["inputs"].double())
    err_y = ((y - ts["ref.values"]).abs().max() / ts["ref.values"].abs().max()).item()
    err_loss = abs(loss.item() - ts["ref.loss"].item()) / abs(ts["ref.loss"].item())
    err_aux = abs(aux.item() - ts["ref.aux"].item()) / abs(ts["ref.aux"].item())
    err_grad = max(((p.grad - ts["grad." + n]).abs().max() / ts["grad." + n].abs().max().clamp(min=1e-30)).item()
                   for n, p in params.items())
    ok = max(err_y, err_loss, err_aux, err_grad) < 1e-10
    print("self-check (float64, tests/fixtures/timeseries_moe.safetensors, %d tensors): rel err values %.2e loss %.2e "
          "aux %.2e worst grad %.2e %s" % (len(params), err_y, err_loss, err_aux, err_grad, "OK" if ok else "FAIL"))
    return ok


def main():
    ap = argparse.ArgumentParser()
    add_run_args(ap, batch_size=4, seq_len=4096)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=0, help="0: as many as --heads")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-expert", type=int, default=192)
    ap.add_argument("--shared", type=int, default=1, help="gated shared experts per layer")
    ap.add_argument("--aux-coef", type=float, default=0.02)
    ap.add_argument("--horizons", default="1,8,32,64")
    ap.add_argument("--huber-delta", type=float, default=2.0)
    ap.add_argument("--norm-eps", type=float, default=1e-6)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--tiny", action="store_true",
                    help="smoke-test shape: B 2, T 64, 2 layers, d 32, 2 heads, 4 experts, d_expert 16, 3 steps, 1 warm-up")
    ap.add_argument("--self-check", action="store_true", help="float64 CPU check against the lmforge fixture, then exit")
    a = ap.parse_args()
    if a.self_check:
        sys.exit(0 if self_check() else 1)
    if a.tiny:
        a.batch_size, a.seq_len, a.layers, a.d_model, a.heads = 2, 64, 2, 32, 2
        a.experts, a.d_expert, a.steps, a.warmup_steps = 4, 16, 3, 1
    a.horizons = [int(h) for h in a.horizons.split(",")]
    a.kv_heads = a.kv_heads or a.heads
    assert a.d_model % a.heads == 0 and a.heads % a.kv_heads == 0 and 1 <= a.top_k <= a.experts
    assert a.horizons == sorted(set(a.horizons)) and a.horizons[0] >= 1

    torch.manual_seed(a.seed)
    dev = a.device
    set_precision(a)
    model = TimeSeriesMoE(a).to(dev)
    n_params, n_active = count_params(model, a)
    opt = make_optimizer(model, a)
    variant = compile_variant(a)
    impl = "pytorch-ts-%s%s-B%d" % (a.mode, variant, a.batch_size)
    print("%s: params total %d (%.1fM), active %d (%.1fM) (L=%d d=%d E=%d top-%d d_expert=%d shared=%d, T=%d, "
          "horizons %s)" % (impl, n_params, n_params / 1e6, n_active, n_active / 1e6, a.layers, a.d_model, a.experts,
                            a.top_k, a.d_expert, a.shared, a.seq_len, a.horizons), file=sys.stderr)
    base = {"impl": impl, "torch": torch.__version__, "params": n_params, "active_params": n_active}

    fwd = compiled(model, a, MoE, base)
    if fwd is None:
        return
    x = torch.randn(a.batch_size, a.seq_len, 1, device=dev)
    t = torch.randn(a.batch_size, a.seq_len, a.horizons[-1], device=dev)
    timed = time_steps(make_step(model, fwd, opt, a, (x, t)), a, base)
    if timed is None:
        return
    ms, extra = timed
    pts_s = a.batch_size * a.seq_len / (ms / 1e3)
    flops_pt = 6 * n_active + 12 * a.layers * a.d_model * a.seq_len
    print_record(dict(base, points_s=round(pts_s, 1), step_ms=round(ms, 2),
                      mfu=round(pts_s * flops_pt / (a.peak_tflops * 1e12), 4), tok_s=round(pts_s, 1), **extra),
                 "points_s")

if __name__ == "__main__":
    main()
