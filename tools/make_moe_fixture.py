#!/usr/bin/python3
"""Generate the MoE layer fixtures tests/fixtures/moe_small_{a,b}.safetensors.

Run with Debian's torch:  /usr/bin/python3 tools/make_moe_fixture.py

An MoE FFN layer written independently of src/ops/moe.cpp with plain torch ops in float64
(torch.topk for the routing, a per-expert loop with index_select / index_add_ for dispatch and
combine, autograd for the gradients). Semantics as documented in src/ops/moe.h:
  logits = x router_w^T; scores = softmax or sigmoid; top-K (ties made impossible, see below);
  combine weights = top-K scores, divided by their sum when renormalize;
  expert e keeps its first Ce = ceil(cf N K / E) assignments in (token, slot) order (cf > 0);
  SwiGLU (w_in rows [gate; up], silu(gate) * up) or tanh-GELU; y = act w_out[e]^T;
  aux = aux_coef E sum_i f_i P_i, f_i = counts_i / (N K) (before the capacity, no gradient),
  P_i = mean_n scores[n, i]; z = z_coef mean_n logsumexp(logits[n])^2.
Loss L = sum(out * G) + aux + z.

Configs (N=10, C=16, E=4, K=2, F=12, aux_coef=0.01, z_coef=0.001):
  a: softmax, renormalize, SwiGLU, dropless
  b: sigmoid, no renormalize, GELU(tanh), capacity_factor 1.0 (Ce = 5), at least one drop

Ties: the inputs are drawn in float32 from a seeded generator; a seed is accepted only when, for
every token, the gap between the K-th and (K+1)-th largest score (float64) is at least MIN_GAP
(1e-3, far above fp32 rounding of the scores, ~1e-7) and, for config b, at least one assignment
is dropped. The seed search is deterministic, so reruns write the same files.

Each fixture holds (safetensors, written by hand as in tools/make_fixtures.py):
  x, router_w, w_in, w_out, G           F32  the inputs (exact fp32 values the float64 computation uses)
  ref.out                               F64  (N, C)
  ref.aux, ref.z                        F64  (1)
  ref.topk_idx                          I32  (N, K) chosen experts by decreasing score
  ref.dropped                           I32  (1) assignments dropped by the capacity
  grad.x, grad.router_w, grad.w_in, grad.w_out   F64  dL/d input
  __metadata__ {"config": JSON with N, C, E, K, F, activation, score, renormalize,
                capacity_factor, aux_coef, z_coef, seed, min_gap}
"""
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import write_safetensors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "fixtures")

N, C, E, K, F = 10, 16, 4, 2, 12
AUX_COEF, Z_COEF = 0.01, 0.001
MIN_GAP = 1e-3

CONFIGS = {
    "moe_small_a": dict(activation="swiglu", score="softmax", renormalize=True, capacity_factor=0.0, seed=100),
    "moe_small_b": dict(activation="gelu", score="sigmoid", renormalize=False, capacity_factor=1.0, seed=200),
}


def gelu_tanh(v):
    return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


def make_inputs(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    f_in = 2 * F if cfg["activation"] == "swiglu" else F

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * scale).to(torch.float32)

    return {
        "x": rnd(N, C),
        "router_w": rnd(E, C, scale=1.0 / math.sqrt(C)),
        "w_in": rnd(E, f_in, C, scale=1.0 / math.sqrt(C)),
        "w_out": rnd(E, C, F, scale=1.0 / math.sqrt(F)),
        "G": rnd(N, C),
    }


def moe_layer(x, router_w, w_in, w_out, cfg):
    """Returns out (N, C), aux, z, topk_idx (N, K), dropped; all float64, differentiable."""
    logits = x @ router_w.t()  # (N, E)
    if cfg["score"] == "softmax":
        scores = torch.softmax(logits, dim=1)
    else:
        scores = torch.sigmoid(logits)
    top_s, top_i = torch.topk(scores, K, dim=1, largest=True, sorted=True)  # (N, K)
    comb = top_s / top_s.sum(dim=1, keepdim=True) if cfg["renormalize"] else top_s

    if cfg["capacity_factor"] > 0:
        cap = min(math.ceil(cfg["capacity_factor"] * N * K / E), N * K)
    else:
        cap = N * K
    out = torch.zeros(N, C, dtype=x.dtype)
    dropped = 0
    flat_e = top_i.reshape(-1)  # assignment a = n K + k
    for e in range(E):
        assign = torch.nonzero(flat_e == e, as_tuple=False).reshape(-1)  # increasing (token, slot)
        dropped += max(0, assign.numel() - cap)
        assign = assign[:cap]
        if assign.numel() == 0:
            continue
        tok = torch.div(assign, K, rounding_mode="floor")
        slot = assign % K
        xr = x.index_select(0, tok)  # (rows, C)
        pre = xr @ w_in[e].t()  # (rows, F_in)
        if cfg["activation"] == "swiglu":
            gate, up = pre[:, :F], pre[:, F:]
            act = torch.nn.functional.silu(gate) * up
        else:
            act = gelu_tanh(pre)
        y = act @ w_out[e].t()  # (rows, C)
        wgt = comb[tok, slot].unsqueeze(1)
        out = out.index_add(0, tok, wgt * y)

    counts = torch.bincount(flat_e, minlength=E).to(x.dtype)
    f = (counts / (N * K)).detach()
    P = scores.mean(dim=0)
    aux = AUX_COEF * E * (f * P).sum()
    lse = torch.logsumexp(logits, dim=1)
    z = Z_COEF * (lse ** 2).mean()
    return out, aux, z, top_i, dropped, scores


def min_topk_gap(scores):
    s, _ = torch.sort(scores, dim=1, descending=True)
    return float((s[:, K - 1] - s[:, K]).min())


def make_fixture(name, cfg):
    seed = cfg["seed"]
    while True:
        inp = make_inputs(cfg, seed)
        d = {k: v.to(torch.float64) for k, v in inp.items()}
        with torch.no_grad():
            _, _, _, _, dropped, scores = moe_layer(d["x"], d["router_w"], d["w_in"], d["w_out"], cfg)
        gap = min_topk_gap(scores)
        if gap >= MIN_GAP and (cfg["capacity_factor"] == 0 or dropped > 0):
            break
        seed += 1

    params = {k: d[k].clone().requires_grad_(True) for k in ("x", "router_w", "w_in", "w_out")}
    out, aux, z, top_i, dropped, _ = moe_layer(params["x"], params["router_w"], params["w_in"], params["w_out"], cfg)
    loss = (out * d["G"]).sum() + aux + z
    loss.backward()

    meta_cfg = dict(N=N, C=C, E=E, K=K, F=F, activation=cfg["activation"], score=cfg["score"],
                    renormalize=cfg["renormalize"], capacity_factor=cfg["capacity_factor"],
                    aux_coef=AUX_COEF, z_coef=Z_COEF, seed=seed, min_gap=gap)
    tensors = [(k, inp[k]) for k in ("x", "router_w", "w_in", "w_out", "G")]
    tensors += [
        ("ref.out", out.detach()),
        ("ref.aux", aux.detach().reshape(1)),
        ("ref.z", z.detach().reshape(1)),
        ("ref.topk_idx", top_i.to(torch.int32)),
        ("ref.dropped", torch.tensor([dropped], dtype=torch.int32)),
    ]
    tensors += [("grad." + k, params[k].grad.detach()) for k in ("x", "router_w", "w_in", "w_out")]
    path = os.path.join(OUT_DIR, name + ".safetensors")
    write_safetensors(path, tensors, {"config": json.dumps(meta_cfg, sort_keys=True)})
    print(f"{path}: seed {seed}, min top-K gap {gap:.3e}, dropped {dropped}, aux {float(aux):.6e}, "
          f"z {float(z):.6e}, {os.path.getsize(path)} bytes")


def main():
    torch.set_grad_enabled(True)
    os.makedirs(OUT_DIR, exist_ok=True)
    for name, cfg in CONFIGS.items():
        make_fixture(name, cfg)


if __name__ == "__main__":
    main()
