#!/usr/bin/env python3
"""PyTorch baseline on the GPU: a Mixture-of-Experts GPT training step (same conventions as bench/torch_gpu_gpt2.py).

    python3 bench/torch_gpu_moe.py --mode compile-bf16 --batch-size 8 --seq-len 2048
    python3 bench/torch_gpu_moe.py --mode eager-bf16 --batch-size 8 --seq-len 2048 --dense-ff 6144   # dense comparison
    /usr/bin/python3 bench/torch_gpu_moe.py --self-check                                                 # CPU, float64

Model (defaults): 12 layers, d_model 768, 12 heads, vocab 32768, T 2048, learned position embeddings, pre-norm LayerNorm,
attention with qkv/proj biases (GPT-2), causal flash SDPA (F.scaled_dot_product_attention, is_causal), tied LM head.
Every MLP is an MoE layer: 8 experts, top-2 token-choice routing, d_expert 3072, tanh-GELU experts without biases
(expert e: gelu(x w_in[e]^T) w_out[e]^T), router Linear(d, E, bias=False) computed in float32, softmax scores,
renormalised top-k weights, Switch aux loss 0.01 * E * sum_i f_i P_i (f_i = share of the N*K assignments routed to
expert i, no gradient; P_i = mean score of expert i) added to the loss. Dropless. Dispatch the usual eager way:
stable sort of the flattened assignments by expert, gather of the token rows, a Python loop over the experts' contiguous
slices (sizes from torch.bincount(...).tolist(), data dependent), scatter back with index_add_ weighted by the top-k
weights. --dense-ff N replaces every MoE by a dense GELU MLP of hidden width N with biases (6144 = same active size).

Modes: eager-fp32, eager-tf32 (TF32 matmuls), eager-bf16 (autocast), compile-bf16 (torch.compile + autocast); fused AdamW
(lr 3e-4, wd 0.1 on matrices, betas 0.9/0.95), grad clip 1.0. torch.compile meets the data-dependent loop: a graph break
at .tolist() and recompiles as the expert slice sizes change (they become dynamic); the recompile limit is raised so it
does not fall back to eager. If compiling fails the script prints a JSON line with "error" and exits 0.
Prints ONE JSON line (the last line of stdout):
  {"impl": "pytorch-moe-<mode>-B<B>", "tok_s", "step_ms", "mfu", "peak_mem_gb", "torch", "params", "active_params", ...}
(impl "pytorch-dense<N>-<mode>-B<B>" with --dense-ff N; compile modes add "graphs", "graph_breaks", "warmup_s").
MFU uses 6 N_active + 12 L d T FLOPs per token against --peak-tflops (989: H100 SXM / H200 dense bf16), N_active =
parameters without the position embedding, with top_k/E of the expert weights (router, attention, norms and the tied
embedding counted in full). With --device cpu (smoke test) the time is wall clock and peak_mem_gb the process max RSS.
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


def causal_attention(q, k, v):
    if HAS_SDPA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # torch < 2.0 (CPU smoke test only): plain masked softmax attention
    T = q.shape[-2]
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return att @ v


class MoE(nn.Module):
    """Dropless top-k token-choice MoE FFN with tanh-GELU experts (no biases) and the Switch aux loss."""

    def __init__(self, d, n_exp, d_exp, top_k, aux_coef):
        super().__init__()
        self.router = nn.Linear(d, n_exp, bias=False)
        self.w_in = nn.Parameter(torch.empty(n_exp, d_exp, d))
        self.w_out = nn.Parameter(torch.empty(n_exp, d, d_exp))
        self.E, self.K, self.aux_coef = n_exp, top_k, aux_coef
        self.expert_loop = self._expert_loop  # torch.compiler.disable(...)d by --compile-loop-eager

    def _expert_loop(self, xs, flat_e):  # xs: token rows sorted by expert -> expert outputs (same order), counts
        counts = torch.bincount(flat_e, minlength=self.E)
        ys, start = [], 0
        for e, n in enumerate(counts.tolist()):  # data-dependent per-expert loop (an empty slice gives 0 rows)
            h = F.gelu(F.linear(xs[start:start + n], self.w_in[e]), approximate="tanh")
            ys.append(F.linear(h, self.w_out[e]))
            start += n
        return torch.cat(ys, dim=0), counts

    def forward(self, x):  # x (N, C) -> out (N, C), aux (scalar, fp32)
        N, E, K = x.shape[0], self.E, self.K
        rdt = torch.promote_types(x.dtype, torch.float32)  # fp32 router (float64 in the self-check)
        with torch.autocast(x.device.type, enabled=False):  # autocast would run F.linear in bf16
            logits = F.linear(x.to(rdt), self.router.weight.to(rdt))
        scores = logits.softmax(dim=-1)
        top_s, top_i = torch.topk(scores, K, dim=-1)  # (N, K), by decreasing score
        comb = top_s / top_s.sum(dim=-1, keepdim=True)
        flat_e = top_i.reshape(-1)  # assignment a = n K + k
        order = torch.sort(flat_e, stable=True)[1]  # assignments grouped by expert, (token, slot) order within
        tok = torch.div(order, K, rounding_mode="floor")
        xs = x.index_select(0, tok)  # (N K, C)
        y, counts = self.expert_loop(xs, flat_e)
        y = y * comb.reshape(-1).index_select(0, order).unsqueeze(1).to(y.dtype)
        out = torch.zeros(N, x.shape[1], dtype=y.dtype, device=x.device).index_add_(0, tok, y)
        self.last_counts = counts.detach()  # tools/moe_routing_compare.py reads the loads
        f = (counts.to(scores.dtype) / (N * K)).detach()
        P = scores.mean(dim=0)
        aux = self.aux_coef * E * (f * P).sum()
        return out, aux


class DenseMLP(nn.Module):
    def __init__(self, d, ff):
        super().__init__()
        self.fc = nn.Linear(d, ff)
        self.mproj = nn.Linear(ff, d)

    def forward(self, x):
        return self.mproj(F.gelu(self.fc(x), approximate="tanh")), None


class Block(nn.Module):
    def __init__(self, d, nh, a):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = DenseMLP(d, a.dense_ff) if a.dense_ff else MoE(d, a.experts, a.d_expert, a.top_k, a.aux_coef)
        self.nh = nh

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.nh, C // self.nh).transpose(1, 2) for t in (q, k, v))
        att = causal_attention(q, k, v)
        x = x + self.proj(att.transpose(1, 2).contiguous().view(B, T, C))
        m, aux = self.mlp(self.ln2(x).view(B * T, C))
        return x + m.view(B, T, C), aux


class MoEGPT(nn.Module):
    def __init__(self, a):
        super().__init__()
        V, T, L, d = a.vocab, a.seq_len, a.layers, a.d_model
        self.wte = nn.Embedding(V, d)
        self.wpe = nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, a.heads, a) for _ in range(L))
        self.lnf = nn.LayerNorm(d)
        for n, p in self.named_parameters():
            if p.dim() >= 2:  # GPT-2 init; residual output projections (attention, MLP / experts) scaled by 1/sqrt(2L)
                out_proj = n.endswith("proj.weight") or n.endswith("w_out")
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * L) if out_proj else 0.02)

    def losses(self, idx, targets, vocab=None):
        """(cross-entropy, summed aux or None); vocab: the logits' first columns only (a padded embedding)."""
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        aux_total = None
        for b in self.blocks:
            x, aux = b(x)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        logits = F.linear(self.lnf(x), self.wte.weight)
        if vocab is not None:
            logits = logits[..., :vocab]
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1)), aux_total

    def forward(self, idx, targets):
        loss, aux_total = self.losses(idx, targets)
        return loss if aux_total is None else loss + aux_total


def count_params(model, a):
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if n.endswith("w_in") or n.endswith("w_out"))
    active = total - model.wpe.weight.numel() - expert + expert * a.top_k // a.experts
    return total, active


def self_check():
    """float64 CPU: the sorted/looped MoE layer against a naive per-token loop over the chosen experts."""
    torch.manual_seed(0)
    C, E, K, Fd, N = 16, 4, 2, 24, 37
    moe = MoE(C, E, Fd, K, 0.01).double()
    for p in moe.parameters():
        nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    G = torch.randn(N, C, dtype=torch.float64)
    out, aux = moe(x)
    ((out * G).sum() + aux).backward()
    g_fast = [x.grad.clone()] + [p.grad.clone() for p in (moe.router.weight, moe.w_in, moe.w_out)]
    x.grad = None
    for p in moe.parameters():
        p.grad = None

    # naive reference
    scores = torch.softmax(x @ moe.router.weight.t(), dim=1)
    rows, counts = [], torch.zeros(E, dtype=torch.float64)
    for n in range(N):
        s = scores[n]
        chosen = sorted(range(E), key=lambda e: -float(s[e]))[:K]
        den = sum(s[e] for e in chosen)
        acc = torch.zeros(C, dtype=torch.float64)
        for e in chosen:
            h = F.gelu(moe.w_in[e] @ x[n], approximate="tanh")
            acc = acc + (s[e] / den) * (moe.w_out[e] @ h)
            counts[e] += 1
        rows.append(acc)
    ref = torch.stack(rows)
    ref_aux = 0.01 * E * ((counts / (N * K)) * scores.mean(dim=0)).sum()
    ((ref * G).sum() + ref_aux).backward()
    g_ref = [x.grad] + [p.grad for p in (moe.router.weight, moe.w_in, moe.w_out)]
    err_out = (out - ref).abs().max().item()
    err_aux = abs(aux.item() - ref_aux.item())
    err_grad = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-30) for a, b in zip(g_fast, g_ref))
    ok = err_out < 1e-12 and err_aux < 1e-12 and err_grad < 1e-10
    print("self-check (float64, N=%d C=%d E=%d K=%d F=%d): max|out-ref|=%.3e |aux-ref|=%.3e max rel grad err=%.3e %s"
          % (N, C, E, K, Fd, err_out, err_aux, err_grad, "OK" if ok else "FAIL"))
    return ok


def peak_mem_gb(dev):
    if dev == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    import resource  # CPU smoke test: process max RSS (KiB on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def add_run_args(ap, batch_size, seq_len):
    """The flags every PyTorch training-step benchmark here takes (torch_gpu_timeseries.py imports them)."""
    ap.add_argument("--mode", default="compile-bf16", choices=["eager-fp32", "eager-tf32", "eager-bf16", "compile-bf16"])
    ap.add_argument("--batch-size", "--B", dest="batch_size", type=int, default=batch_size)
    ap.add_argument("--seq-len", "--T", dest="seq_len", type=int, default=seq_len)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="MFU denominator (989: H100 SXM / H200 bf16)")
    ap.add_argument("--recompile-limit", type=int, default=256, help="torch._dynamo recompile limit (compile mode)")
    ap.add_argument("--compile-scalars", action="store_true",
                    help="compile mode: torch._dynamo.config.capture_scalar_outputs (no graph break at .tolist())")
    ap.add_argument("--compile-loop-eager", action="store_true",
                    help="compile mode: torch.compiler.disable on the per-expert loop (static shapes elsewhere)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--seed", type=int, default=0)


def set_precision(a):
    """fp32 means fp32; tf32 as lmforge's --precision tf32."""
    tf32 = a.mode == "eager-tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def make_optimizer(model, a):
    """AdamW as lmforge's: weight decay on the 2-D parameters only, fused on the GPU."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    nodecay = [p for p in model.parameters() if p.dim() < 2]
    opt_kw = {"fused": True} if a.device == "cuda" else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}],
                             lr=a.lr, betas=(0.9, 0.95), eps=1e-8, **opt_kw)


def compile_variant(a):
    return "".join(sfx for on, sfx in ((a.compile_loop_eager, "-loopeager"), (a.compile_scalars, "-scalars"))
                   if on and a.mode.startswith("compile"))


def compiled(model, a, moe_cls, base):
    """The model to call: itself, or torch.compile of it with the recompile limits raised (data-dependent
    MoE shapes recompile) and the --compile-* variants; None (after printing the error record) when
    torch.compile is unavailable."""
    if not a.mode.startswith("compile"):
        return model
    try:
        import torch._dynamo as dynamo
        cfg = dynamo.config
        for key in ("recompile_limit", "cache_size_limit"):  # renamed in 2.6; set whichever exists
            if hasattr(cfg, key):
                setattr(cfg, key, max(getattr(cfg, key), a.recompile_limit))
                break
        for key in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(cfg, key):
                setattr(cfg, key, max(getattr(cfg, key), 4 * a.recompile_limit))
                break
        if a.compile_scalars:
            cfg.capture_scalar_outputs = True
        if a.compile_loop_eager:
            for mod in model.modules():
                if isinstance(mod, moe_cls):
                    mod.expert_loop = torch.compiler.disable(mod._expert_loop)
        return torch.compile(model)
    except Exception as e:  # e.g. torch without torch.compile
        print(json.dumps(dict(base, error="torch.compile failed: %s" % first_line(e))))
        return None


def time_steps(step, a, base):
    """Runs --warmup-steps, then times --steps training steps (CUDA events on the GPU). Returns (median
    step ms, last loss, extra record fields) or None after printing the error record of a compile that
    failed during warm-up."""
    dev, compiling = a.device, a.mode.startswith("compile")

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    try:
        for i in range(a.warmup_steps):
            tw = time.perf_counter()
            loss = step()
            sync()
            print("warmup step %d: %.2f s" % (i, time.perf_counter() - tw), file=sys.stderr)
    except Exception as e:
        if not compiling:
            raise
        print("torch.compile failed during warmup:", first_line(e), file=sys.stderr)
        print(json.dumps(dict(base, error="torch.compile failed: %s" % first_line(e))))
        return None
    warmup_s = time.perf_counter() - t0
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        if dev == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            loss = step()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            tc = time.perf_counter()
            loss = step()
            times.append((time.perf_counter() - tc) * 1e3)
    times.sort()
    extra = {"peak_mem_gb": round(peak_mem_gb(dev), 2), "loss": round(float(loss.detach()), 4)}
    if compiling:
        extra["warmup_s"] = round(warmup_s, 1)
        try:
            from torch._dynamo.utils import counters
            extra["graphs"] = int(counters["stats"]["unique_graphs"])
            extra["graph_breaks"] = int(sum(counters["graph_break"].values()))
        except Exception:
            pass
    return times[len(times) // 2], extra


def make_step(model, fwd, opt, a, inputs):
    """One training step: the loss (the model's first output) in bf16 autocast for *-bf16 modes, backward,
    clipping at 1.0, AdamW, gradients dropped."""
    bf16 = a.mode.endswith("bf16")

    def step():
        with torch.autocast(a.device, dtype=torch.bfloat16, enabled=bf16):
            out = fwd(*inputs)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def print_record(res, rate_key):
    """One JSON line, the fixed keys first, in torch_gpu_gpt2.py's order."""
    keys = ["impl", rate_key, "step_ms", "mfu", "peak_mem_gb", "torch", "params", "active_params"]
    print(json.dumps({k: res[k] for k in keys + [k for k in res if k not in keys]}))


def main():
    ap = argparse.ArgumentParser()
    add_run_args(ap, batch_size=8, seq_len=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-expert", type=int, default=3072)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--dense-ff", type=int, default=0, help="replace every MoE by a dense GELU MLP of this width (0: MoE)")
    ap.add_argument("--self-check", action="store_true", help="float64 CPU check of the MoE layer, then exit")
    a = ap.parse_args()
    if a.self_check:
        sys.exit(0 if self_check() else 1)
    assert a.d_model % a.heads == 0 and 1 <= a.top_k <= a.experts

    torch.manual_seed(a.seed)
    dev = a.device
    set_precision(a)
    model = MoEGPT(a).to(dev)
    n_params, n_active = count_params(model, a)
    opt = make_optimizer(model, a)
    tag = ("dense%d" % a.dense_ff) if a.dense_ff else "moe"
    variant = compile_variant(a)
    impl = "pytorch-%s-%s%s-B%d" % (tag, a.mode, variant, a.batch_size)
    print("%s: params total %d (%.1fM), active %d (%.1fM) (%s)" % (impl, n_params, n_params / 1e6, n_active, n_active / 1e6,
          "dense ff %d" % a.dense_ff if a.dense_ff else "E=%d top-%d d_expert=%d" % (a.experts, a.top_k, a.d_expert)),
          file=sys.stderr)
    base = {"impl": impl, "torch": torch.__version__, "params": n_params, "active_params": n_active}

    fwd = compiled(model, a, MoE, base)
    if fwd is None:
        return
    x = torch.randint(0, a.vocab, (a.batch_size, a.seq_len), device=dev)
    y = torch.randint(0, a.vocab, (a.batch_size, a.seq_len), device=dev)
    timed = time_steps(make_step(model, fwd, opt, a, (x, y)), a, base)
    if timed is None:
        return
    ms, extra = timed
    tok_s = a.batch_size * a.seq_len / (ms / 1e3)
    flops_tok = 6 * n_active + 12 * a.layers * a.d_model * a.seq_len
    print_record(dict(base, tok_s=round(tok_s, 1), step_ms=round(ms, 2),
                      mfu=round(tok_s * flops_tok / (a.peak_tflops * 1e12), 4), **extra), "tok_s")


def first_line(e):
    s = str(e).strip()
    return "%s: %s" % (type(e).__name__, s.splitlines()[0] if s else "")


if __name__ == "__main__":
    main()
