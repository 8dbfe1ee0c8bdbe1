#!/usr/bin/env python3
"""Generate tests/fixtures/timeseries_{tiny,moe}.safetensors: the time-series family
(docs/TIMESERIES.md) in PyTorch, float64, written independently of src/model/timeseries_ends.cpp,
src/ops/mse.cpp and src/ops/moe.cpp.

Run with any Python that has torch:  python3 tools/make_timeseries_fixture.py

The model: input end x0 = silu(x W_e[:C]) * (x W_e[C:]) (ts_embed.weight rows [gate; up]), the trunk
of tools/torch_reference.py (RMSNorm, RoPE, SwiGLU, no biases), the heads y = h W_h^T
(ts_heads.weight, column block j = horizon j); pred = mean over rows of (mean over heads of (mean
over the head's non-missing targets of huber_delta(y - t))).
  timeseries_tiny: the dense trunk; loss = pred.
  timeseries_moe:  every FFN an MoE in tiny-ts's shape (4 experts, top-2, softmax scores renormalised,
    dropless, 1 shared expert with its sigmoid gate, aux_coef 0.02; torch_reference.moe_ffn);
    loss = pred + aux, aux = the sum over the MoE layers of aux_coef E sum_i f_i P_i, as lmforge's
    trainer logs it (loss= pred= aux=) and as its backward differentiates it. Routing ties: a seed is
    kept only when in every layer every row's K-th and (K+1)-th largest scores differ by at least
    MIN_GAP (float64; lmforge's fp32 trunk moves them by ~1e-6) and every expert gets a row; the search
    is deterministic, so reruns write the same file.

Each fixture holds:
  param.<name>  F32  weights (the exact fp32 values the float64 computation starts from)
  inputs        F32  (B, T, 1)
  targets       F32  (B, T, Hmax), NaN where missing
  ref.values    F64  (B, T, D) head outputs
  ref.loss      F64  (1) pred + aux
  ref.pred      F64  (1) the Huber term (MoE fixture only)
  ref.aux       F64  (1) the MoE aux term (MoE fixture only)
  grad.<name>   F64  d loss / d param
  __metadata__  {"config": lmforge config JSON} (+ "seed", "min_gap" for the MoE fixture)
"""
import json
import os
import struct
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as ref  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "fixtures")

B, T = 2, 12
CFG = dict(vocab_size=1, pad_vocab_multiple=1, context_length=16, n_layer=2, n_head=2, n_kv_head=1,
           d_model=16, d_ff=24, norm="rmsnorm", norm_eps=1e-6, activation="swiglu", positions="rope",
           rope_theta=10000.0, tied_embeddings=False, bias=False)
# tiny-ts's MoE (src/model/config.cpp) at fixture size
MOE = dict(experts=4, top_k=2, d_expert=8, every=1, first_dense=0, shared=1, shared_gate=True, score="softmax",
           renormalize=True, capacity_factor=0.0, aux_coef=0.02, z_coef=0.0, bias_rate=0.0)
HORIZONS = [1, 3, 4]
DELTA = 1.0
MIN_GAP = 1e-3
MOE_SEED = 100  # the first seed tried


def lmforge_config(cfg):
    c = dict(cfg)
    c["family"] = "timeseries"
    c["horizons"] = HORIZONS
    c["huber_delta"] = DELTA
    return c


def specs(cfg):
    out = [("ts_embed.weight", (2 * cfg["d_model"], 1))]
    for name, shape, _ in ref.param_specs(cfg):
        if name in ("tok_emb.weight", "lm_head.weight"):
            continue
        out.append((name, shape))
    out.append(("ts_heads.weight", (sum(HORIZONS), cfg["d_model"])))
    return out


def huber(r, d):
    a = r.abs()
    return torch.where(a <= d, 0.5 * r * r, d * (a - 0.5 * d))


def model_loss(params, cfg, x, t):
    """-> head outputs y (B, T, D), pred (the Huber term), MoE stats (torch_reference.trunk)."""
    C = cfg["d_model"]
    u = torch.matmul(x, params["ts_embed.weight"].t())             # (B, T, 2C)
    x0 = F.silu(u[..., :C]) * u[..., C:]
    stats = []
    h = ref.trunk(params, cfg, x0, moe_stats=stats)
    y = torch.matmul(h, params["ts_heads.weight"].t())             # (B, T, D)
    rows = torch.zeros(B, T, dtype=torch.float64)
    col = 0
    for hj in HORIZONS:
        tj = t[..., :hj]
        mask = ~torch.isnan(tj)
        r = y[..., col:col + hj] - torch.where(mask, tj, torch.zeros_like(tj))
        s = (huber(r, DELTA) * mask).sum(-1)
        n = mask.sum(-1)
        rows = rows + torch.where(n > 0, s / n.clamp(min=1), torch.zeros_like(s)) / len(HORIZONS)
        col += hj
    return y, rows.mean(), stats


def draw(cfg, seed):
    """Weights, inputs and targets from one generator (the dense fixture's draws as they always were)."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in specs(cfg):
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm_f.weight":
            w = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name == "ts_embed.weight":
            w = 0.6 * torch.randn(shape, generator=g)
        elif name.endswith("moe.router.weight"):  # a wide spread of scores: routing far from ties
            w = 0.6 * torch.randn(shape, generator=g)
        else:
            w = 0.2 * torch.randn(shape, generator=g)
        params[name] = w.float().double().requires_grad_(True)
    x = torch.randn(B, T, 1, generator=g).float().double()
    # some |r| beyond delta; scaled before the fp32 rounding, so the stored targets are the ones used
    t = (torch.randn(B, T, max(HORIZONS), generator=g) * 1.5).float().double()
    t[0, 3, 1] = float("nan")
    t[1, 5, :] = float("nan")
    return params, x, t


def write_fixture(name, cfg, seed, meta=None):
    params, x, t = draw(cfg, seed)
    y, pred, stats = model_loss(params, cfg, x, t)
    aux = sum(st["aux"] for st in stats) if stats else torch.zeros((), dtype=torch.float64)
    loss = pred + aux
    loss.backward()
    tensors = [("inputs", "F32", x.float()), ("targets", "F32", t.float()), ("ref.values", "F64", y.detach()),
               ("ref.loss", "F64", loss.detach().reshape(1))]
    if stats:
        tensors += [("ref.pred", "F64", pred.detach().reshape(1)), ("ref.aux", "F64", aux.detach().reshape(1))]
    for pname, _ in specs(cfg):
        tensors.append(("param." + pname, "F32", params[pname].detach().float()))
        tensors.append(("grad." + pname, "F64", params[pname].grad.detach()))
    metadata = {"config": json.dumps(lmforge_config(cfg))}
    metadata.update({k: str(v) for k, v in (meta or {}).items()})
    header, blobs, off = {"__metadata__": metadata}, [], 0
    for tname, dt, v in tensors:
        b = v.contiguous().numpy().tobytes()
        header[tname] = {"dtype": dt, "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    path = os.path.join(OUT_DIR, name + ".safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    extra = "" if not stats else " (pred %.9f + aux %.9f), min top-K gap %.3e, loads %s" % (
        pred.item(), aux.item(), min(st["gap"] for st in stats), [st["counts"].tolist() for st in stats])
    print("wrote %s: loss %.9f%s, %d bytes" % (path, loss.item(), extra, os.path.getsize(path)))


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    write_fixture("timeseries_tiny", CFG, 7)
    cfg = dict(CFG, moe=MOE)
    seed = MOE_SEED
    while True:
        params, x, t = draw(cfg, seed)
        with torch.no_grad():
            _, _, stats = model_loss(params, cfg, x, t)
        gap = min(s["gap"] for s in stats)
        if gap >= MIN_GAP and all(bool((s["counts"] > 0).all()) for s in stats):
            break
        seed += 1
    write_fixture("timeseries_moe", cfg, seed, {"seed": seed, "min_gap": gap})


if __name__ == "__main__":
    main()
