#!/usr/bin/env python3
"""Generate tests/fixtures/timeseries_tiny.safetensors: the time-series family (docs/TIMESERIES.md)
in PyTorch, float64, written independently of src/model/timeseries_ends.cpp and src/ops/mse.cpp.

Run with any Python that has torch:  python3 tools/make_timeseries_fixture.py

The model: input end x0 = silu(x W_e[:C]) * (x W_e[C:]) (ts_embed.weight rows [gate; up]), the dense
trunk of tools/torch_reference.py (RMSNorm, RoPE, SwiGLU, no biases), the heads y = h W_h^T
(ts_heads.weight, column block j = horizon j); loss = mean over rows of (mean over heads of (mean
over the head's non-missing targets of huber_delta(y - t))).

The fixture holds:
  param.<name>  F32  weights (the exact fp32 values the float64 computation starts from)
  inputs        F32  (B, T, 1)
  targets       F32  (B, T, Hmax), NaN where missing
  ref.values    F64  (B, T, D) head outputs
  ref.loss      F64  (1)
  grad.<name>   F64  d loss / d param
  __metadata__  {"config": lmforge config JSON}
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
OUT = os.path.join(ROOT, "tests", "fixtures", "timeseries_tiny.safetensors")

B, T = 2, 12
CFG = dict(vocab_size=1, pad_vocab_multiple=1, context_length=16, n_layer=2, n_head=2, n_kv_head=1,
           d_model=16, d_ff=24, norm="rmsnorm", norm_eps=1e-6, activation="swiglu", positions="rope",
           rope_theta=10000.0, tied_embeddings=False, bias=False)
HORIZONS = [1, 3, 4]
DELTA = 1.0


def lmforge_config():
    c = dict(CFG)
    c["family"] = "timeseries"
    c["horizons"] = HORIZONS
    c["huber_delta"] = DELTA
    return c


def specs():
    out = [("ts_embed.weight", (2 * CFG["d_model"], 1))]
    for name, shape, _ in ref.param_specs(CFG):
        if name in ("tok_emb.weight", "lm_head.weight"):
            continue
        out.append((name, shape))
    out.append(("ts_heads.weight", (sum(HORIZONS), CFG["d_model"])))
    return out


def huber(r, d):
    a = r.abs()
    return torch.where(a <= d, 0.5 * r * r, d * (a - 0.5 * d))


def model_loss(params, x, t):
    C = CFG["d_model"]
    u = torch.matmul(x, params["ts_embed.weight"].t())             # (B, T, 2C)
    x0 = F.silu(u[..., :C]) * u[..., C:]
    h = ref.trunk(params, CFG, x0)
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
    return y, rows.mean()


def main():
    g = torch.Generator().manual_seed(7)
    params = {}
    for name, shape in specs():
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm_f.weight":
            w = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name == "ts_embed.weight":
            w = 0.6 * torch.randn(shape, generator=g)
        else:
            w = 0.2 * torch.randn(shape, generator=g)
        params[name] = w.float().double().requires_grad_(True)
    x = torch.randn(B, T, 1, generator=g).float().double()
    t = torch.randn(B, T, max(HORIZONS), generator=g).float().double() * 1.5  # some |r| beyond delta
    t[0, 3, 1] = float("nan")
    t[1, 5, :] = float("nan")
    y, loss = model_loss(params, x, t)
    loss.backward()
    tensors = [("inputs", "F32", x.float()), ("targets", "F32", t.float()), ("ref.values", "F64", y.detach()),
               ("ref.loss", "F64", loss.detach().reshape(1))]
    for name, _ in specs():
        tensors.append(("param." + name, "F32", params[name].detach().float()))
        tensors.append(("grad." + name, "F64", params[name].grad.detach()))
    header, blobs, off = {"__metadata__": {"config": json.dumps(lmforge_config())}}, [], 0
    for name, dt, v in tensors:
        b = v.contiguous().numpy().tobytes()
        header[name] = {"dtype": dt, "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(OUT, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    print("wrote", OUT, "loss", loss.item())


if __name__ == "__main__":
    main()
