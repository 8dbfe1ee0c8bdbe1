"""PyTorch reference of the lmforge model (docs/MODEL.md).

Plain tensors, no nn.Module: parameters are an ordered dict name -> tensor, in the MODEL.md order.
Used by tools/make_fixtures.py (in float64) and bench/torch_cpu_step.py (in float32).

    cfg    = dict with the MODEL.md config keys
    params = init_params(cfg, generator)          # or build_params(cfg, ...)
    logits = forward(params, cfg, tokens)          # (B, T, V), padded vocab rows excluded
    loss   = loss_fn(params, cfg, inputs, targets) # mean cross entropy over B*T
    opt    = make_optimizer(params, lr, ...)       # torch.optim.AdamW, decay on 2-D params only
    train_step(params, cfg, opt, inputs, targets, lr, grad_clip)

forward_naive() is a slow, literal transcription of the MODEL.md formulas (explicit loops over
heads, explicit LayerNorm/RMSNorm/GELU/RoPE arithmetic); it exists only to cross-check forward().

MoE trunks (docs/MODEL.md "MoE"): cfg may carry "moe", a dict with the lmforge config's moe keys
(experts, top_k, d_expert, every, first_dense, shared, shared_gate, score, renormalize, aux_coef,
z_coef; dropless only: capacity_factor and bias_rate 0). Its layers get the moe.* parameters instead
of mlp.* and trunk(..., moe_stats=[]) reports each MoE layer's aux + z loss (see moe_ffn).
"""
import json
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F

CONFIG_KEYS = [
    "vocab_size", "pad_vocab_multiple", "context_length", "n_layer", "n_head", "n_kv_head",
    "d_model", "d_ff", "norm", "norm_eps", "activation", "positions", "rope_theta",
    "tied_embeddings", "bias",
]

DEFAULT_CONFIG = {
    "vocab_size": 256, "pad_vocab_multiple": 64, "context_length": 128,
    "n_layer": 4, "n_head": 4, "n_kv_head": 4, "d_model": 128, "d_ff": 512,
    "norm": "layernorm", "norm_eps": 1e-5,
    "activation": "gelu", "positions": "learned", "rope_theta": 10000.0,
    "tied_embeddings": True, "bias": True,
}


def make_config(**overrides):
    cfg = dict(DEFAULT_CONFIG)
    for k, v in overrides.items():
        if k not in DEFAULT_CONFIG:
            raise KeyError("unknown config key: " + k)
        cfg[k] = v
    validate_config(cfg)
    return cfg


def validate_config(cfg):
    for k in CONFIG_KEYS:
        if k not in cfg:
            raise KeyError("config is missing key: " + k)
    assert cfg["norm"] in ("layernorm", "rmsnorm"), cfg["norm"]
    assert cfg["activation"] in ("gelu", "swiglu"), cfg["activation"]
    assert cfg["positions"] in ("learned", "rope"), cfg["positions"]
    assert cfg["d_model"] % cfg["n_head"] == 0, "n_head must divide d_model"
    assert cfg["n_head"] % cfg["n_kv_head"] == 0, "n_kv_head must divide n_head"
    if cfg["positions"] == "rope":
        assert head_size(cfg) % 2 == 0, "head size must be even with rope"


def config_json(cfg):
    """The config as JSON text, keys in the MODEL.md order."""
    out = OrderedDict()
    for k in CONFIG_KEYS:
        v = cfg[k]
        if k in ("norm_eps", "rope_theta"):
            v = float(v)
        out[k] = v
    return json.dumps(out)


def padded_vocab(cfg):
    m = cfg["pad_vocab_multiple"]
    return (cfg["vocab_size"] + m - 1) // m * m


def head_size(cfg):
    return cfg["d_model"] // cfg["n_head"]


def moe_cfg(cfg):
    """The config's "moe" dict with lmforge's defaults filled in ({} for a dense model)."""
    m = cfg.get("moe") or {}
    if m.get("experts", 0) == 0:
        return {}
    out = dict(top_k=2, d_expert=0, every=1, first_dense=0, shared=0, shared_gate=False, score="softmax",
               renormalize=True, capacity_factor=0.0, aux_coef=0.01, z_coef=0.0, bias_rate=0.0)
    out.update(m)
    assert out["capacity_factor"] == 0 and out["bias_rate"] == 0, "the reference MoE is dropless, without selection bias"
    if out["d_expert"] == 0:
        out["d_expert"] = cfg["d_ff"]
    return out


def is_moe_layer(cfg, layer):
    m = moe_cfg(cfg)
    return bool(m) and layer >= m["first_dense"] and (layer - m["first_dense"]) % m["every"] == 0


def param_specs(cfg):
    """[(name, shape, kind)] in the MODEL.md order. kind: emb | linear | proj | bias | norm."""
    C, F_, L = cfg["d_model"], cfg["d_ff"], cfg["n_layer"]
    NH, NKV, HS = cfg["n_head"], cfg["n_kv_head"], head_size(cfg)
    Vp = padded_vocab(cfg)
    norm_bias = cfg["norm"] == "layernorm" and cfg["bias"]
    fc = 2 * F_ if cfg["activation"] == "swiglu" else F_
    qkv = (NH + 2 * NKV) * HS
    specs = [("tok_emb.weight", (Vp, C), "emb")]
    if cfg["positions"] == "learned":
        specs.append(("pos_emb.weight", (cfg["context_length"], C), "emb"))

    def norm(prefix):
        specs.append((prefix + ".weight", (C,), "norm"))
        if norm_bias:
            specs.append((prefix + ".bias", (C,), "bias"))

    def linear(prefix, out_f, in_f, kind):
        specs.append((prefix + ".weight", (out_f, in_f), kind))
        if cfg["bias"]:
            specs.append((prefix + ".bias", (out_f,), "bias"))

    for i in range(L):
        p = "layers.%d." % i
        norm(p + "norm1")
        linear(p + "attn.qkv", qkv, C, "linear")
        linear(p + "attn.proj", C, NH * HS, "proj")
        norm(p + "norm2")
        if is_moe_layer(cfg, i):  # src/model/model.cpp trunk_param_specs
            m = moe_cfg(cfg)
            E, S, Fe = m["experts"], m["shared"], m["d_expert"]
            Fi = 2 * Fe if cfg["activation"] == "swiglu" else Fe
            specs.append((p + "moe.router.weight", (E, C), "linear"))
            specs.append((p + "moe.experts.w_in", (E, Fi, C), "linear"))
            specs.append((p + "moe.experts.w_out", (E, C, Fe), "proj"))
            if S > 0:
                specs.append((p + "moe.shared.w_in", (S, Fi, C), "linear"))
                specs.append((p + "moe.shared.w_out", (S, C, Fe), "proj"))
                if m["shared_gate"]:
                    specs.append((p + "moe.shared.gate", (S, C), "linear"))
            continue
        linear(p + "mlp.fc", fc, C, "linear")
        linear(p + "mlp.proj", C, F_, "proj")
    norm("norm_f")
    if not cfg["tied_embeddings"]:
        specs.append(("lm_head.weight", (Vp, C), "emb"))
    return specs


def init_params(cfg, generator=None, dtype=torch.float32, nontrivial=False):
    """GPT-2 initialisation from a torch.Generator (not the engine's Philox stream).

    nontrivial=True additionally draws biases ~ N(0, 0.02^2) and norm weights ~ 1 + N(0, 0.1^2)
    (instead of 0 and 1) so that test fixtures really exercise their gradients.
    Rows V..Vp-1 of tok_emb / lm_head are zero. Tensors are created in float32, then cast to dtype.
    """
    V, L = cfg["vocab_size"], cfg["n_layer"]
    params = OrderedDict()
    for name, shape, kind in param_specs(cfg):
        if kind in ("emb", "linear"):
            t = torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02
        elif kind == "proj":
            t = torch.randn(shape, generator=generator, dtype=torch.float32) * (0.02 / math.sqrt(2 * L))
        elif kind == "bias":
            t = (torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02 if nontrivial
                 else torch.zeros(shape, dtype=torch.float32))
        elif kind == "norm":
            t = (1.0 + torch.randn(shape, generator=generator, dtype=torch.float32) * 0.1 if nontrivial
                 else torch.ones(shape, dtype=torch.float32))
        else:
            raise AssertionError(kind)
        if name in ("tok_emb.weight", "lm_head.weight"):
            t[V:] = 0.0
        params[name] = t.to(dtype).contiguous()
    return params


def build_params(cfg, seed=0, dtype=torch.float32, nontrivial=False, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    params = init_params(cfg, g, dtype=dtype, nontrivial=nontrivial)
    for p in params.values():
        p.requires_grad_(requires_grad)
    return params


def num_params(cfg, include_pos=True):
    n = 0
    for name, shape, _ in param_specs(cfg):
        if name == "pos_emb.weight" and not include_pos:
            continue
        n += math.prod(shape)
    return n


# ---------------------------------------------------------------------------------------------
# Forward (efficient formulation with torch.nn.functional)
# ---------------------------------------------------------------------------------------------

def _norm(x, params, prefix, cfg):
    w = params[prefix + ".weight"]
    if cfg["norm"] == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), w, params.get(prefix + ".bias"), cfg["norm_eps"])
    # RMSNorm: x * rsqrt(mean(x^2) + eps) * weight
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["norm_eps"]) * w


def rope_tables(cfg, T, dtype, device=None):
    """cos/sin of shape (T, HS): angle[t, i] = t * theta^(-2i/HS), repeated for both halves."""
    HS = head_size(cfg)
    i = torch.arange(HS // 2, dtype=torch.float64, device=device)
    freq = cfg["rope_theta"] ** (-2.0 * i / HS)
    ang = torch.arange(T, dtype=torch.float64, device=device)[:, None] * freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x, cos, sin):
    """x: (..., T, HS). x'[i] = x[i] cos - x[i+HS/2] sin; x'[i+HS/2] = x[i+HS/2] cos + x[i] sin."""
    return x * cos + _rotate_half(x) * sin


def _attention(q, k, v, causal_mask):
    """q: (B, NH, T, HS), k/v: (B, NH, T, HS) (already expanded for GQA)."""
    HS = q.shape[-1]
    att = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(HS))
    att = att.masked_fill(causal_mask, float("-inf"))
    att = torch.softmax(att, dim=-1)
    return torch.matmul(att, v)


def forward_hidden(params, cfg, tokens):
    """tokens (B, T) int -> final normed hidden state h (B, T, C)."""
    B, T = tokens.shape
    assert T <= cfg["context_length"], "sequence longer than context_length"
    tokens = tokens.long()
    x = F.embedding(tokens, params["tok_emb.weight"])
    if cfg["positions"] == "learned":
        x = x + params["pos_emb.weight"][:T]
    return trunk(params, cfg, x)


def _ffn_act(u, cfg, width):
    """SwiGLU over rows [gate; up] of u (..., 2 width), or tanh-GELU."""
    if cfg["activation"] == "gelu":
        return F.gelu(u, approximate="tanh")
    return F.silu(u[..., :width]) * u[..., width:]


def moe_ffn(params, cfg, p, h):
    """An MoE layer's FFN (src/ops/moe.h, dropless), written with plain torch ops, not from moe.cpp.

    h: (B, T, C) -> out (B, T, C), stats {"aux": aux + z loss (differentiable scalar), "gap": the
    smallest margin over the rows between the K-th and (K+1)-th largest score (fixtures stay away
    from routing ties), "counts": (E) assignments per expert}.
      logits = h router^T (N, E); scores = softmax or sigmoid; top-K experts per row;
      combine weights = their scores (/ their sum when renormalize);
      out[n] = sum_k w[n, k] expert_{e(n,k)}(h[n]), expert_e(v) = act(v w_in[e]^T) w_out[e]^T;
      shared expert s: out[n] += g_s[n] act(h[n] ws_in[s]^T) ws_out[s]^T, g_s[n] = sigmoid(h[n] . gate[s])
        when shared_gate, else 1;
      aux = aux_coef E sum_i f_i P_i, f_i = (assignments to i) / (N K) without gradient, P_i = mean_n
        scores[n, i]; z = z_coef mean_n logsumexp(logits[n])^2.
    """
    m = moe_cfg(cfg)
    B, T, C = h.shape
    E, K, Fe = m["experts"], m["top_k"], m["d_expert"]
    x = h.reshape(B * T, C)
    N = x.shape[0]
    logits = x @ params[p + "moe.router.weight"].t()                        # (N, E)
    scores = torch.softmax(logits, dim=-1) if m["score"] == "softmax" else torch.sigmoid(logits)
    top_s, top_i = torch.topk(scores, K, dim=-1)                             # (N, K), decreasing
    comb = top_s / top_s.sum(-1, keepdim=True) if m["renormalize"] else top_s
    srt = torch.sort(scores.detach(), dim=-1, descending=True)[0]
    gap = float((srt[:, K - 1] - srt[:, K]).min()) if K < E else float("inf")
    w_in, w_out = params[p + "moe.experts.w_in"], params[p + "moe.experts.w_out"]
    out = torch.zeros_like(x)
    for e in range(E):
        tok, slot = torch.nonzero(top_i == e, as_tuple=True)                 # the rows routed to e
        if tok.numel() == 0:
            continue
        y = _ffn_act(x[tok] @ w_in[e].t(), cfg, Fe) @ w_out[e].t()          # (rows, C)
        out = out.index_add(0, tok, comb[tok, slot].unsqueeze(1) * y)
    for s_ in range(m["shared"]):
        y = _ffn_act(x @ params[p + "moe.shared.w_in"][s_].t(), cfg, Fe) @ params[p + "moe.shared.w_out"][s_].t()
        if m["shared_gate"]:
            y = torch.sigmoid(x @ params[p + "moe.shared.gate"][s_]).unsqueeze(1) * y
        out = out + y
    counts = torch.bincount(top_i.reshape(-1), minlength=E)
    f = (counts.to(x.dtype) / (N * K)).detach()
    aux = m["aux_coef"] * E * (f * scores.mean(0)).sum()
    aux = aux + m["z_coef"] * (torch.logsumexp(logits, dim=-1) ** 2).mean()
    return out.reshape(B, T, C), {"aux": aux, "gap": gap, "counts": counts}


def trunk(params, cfg, x, moe_stats=None):
    """The trunk: x (B, T, C), the input end's output -> final normed hidden state (B, T, C).

    moe_stats: a list, or None; each MoE layer appends its moe_ffn stats ("aux": its aux + z loss, to
    be added to the loss; "gap": its smallest top-K score margin; "counts": its expert loads).
    """
    B, T, _ = x.shape
    C, NH, NKV, HS = cfg["d_model"], cfg["n_head"], cfg["n_kv_head"], head_size(cfg)
    dtype, dev = x.dtype, x.device
    if cfg["positions"] == "rope":
        cos, sin = rope_tables(cfg, T, dtype, dev)
    causal_mask = torch.ones(T, T, dtype=torch.bool, device=dev).triu(1)
    group = NH // NKV
    for i in range(cfg["n_layer"]):
        p = "layers.%d." % i
        h = _norm(x, params, p + "norm1", cfg)
        qkv = F.linear(h, params[p + "attn.qkv.weight"], params.get(p + "attn.qkv.bias"))
        q, k, v = qkv.split([NH * HS, NKV * HS, NKV * HS], dim=-1)       # [q heads | k heads | v heads]
        q = q.view(B, T, NH, HS).transpose(1, 2)
        k = k.view(B, T, NKV, HS).transpose(1, 2)
        v = v.view(B, T, NKV, HS).transpose(1, 2)
        if cfg["positions"] == "rope":
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if group > 1:  # q head h uses kv head h // group
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        a = _attention(q, k, v, causal_mask)
        a = a.transpose(1, 2).reshape(B, T, NH * HS)
        x = x + F.linear(a, params[p + "attn.proj.weight"], params.get(p + "attn.proj.bias"))
        h = _norm(x, params, p + "norm2", cfg)
        if is_moe_layer(cfg, i):
            out, stats = moe_ffn(params, cfg, p, h)
            if moe_stats is not None:
                moe_stats.append(stats)
            x = x + out
            continue
        u = F.linear(h, params[p + "mlp.fc.weight"], params.get(p + "mlp.fc.bias"))
        if cfg["activation"] == "gelu":
            g = F.gelu(u, approximate="tanh")
        else:
            Fd = cfg["d_ff"]
            g = F.silu(u[..., :Fd]) * u[..., Fd:]                           # rows [gate; up]
        x = x + F.linear(g, params[p + "mlp.proj.weight"], params.get(p + "mlp.proj.bias"))
    return _norm(x, params, "norm_f", cfg)


def head_weight(params, cfg):
    W = params["tok_emb.weight"] if cfg["tied_embeddings"] else params["lm_head.weight"]
    return W[: cfg["vocab_size"]]                                            # padded rows excluded


def forward(params, cfg, tokens):
    """tokens (B, T) -> logits (B, T, V)."""
    h = forward_hidden(params, cfg, tokens)
    return F.linear(h, head_weight(params, cfg))


def loss_fn(params, cfg, inputs, targets):
    """Mean cross entropy over B*T."""
    logits = forward(params, cfg, inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long())


# ---------------------------------------------------------------------------------------------
# Literal transcription of MODEL.md, for cross-checking forward() only (slow)
# ---------------------------------------------------------------------------------------------

def forward_naive(params, cfg, tokens):
    B, T = tokens.shape
    C, NH, NKV, HS = cfg["d_model"], cfg["n_head"], cfg["n_kv_head"], head_size(cfg)
    eps = cfg["norm_eps"]
    tokens = tokens.long()

    def norm(x, prefix):
        w = params[prefix + ".weight"]
        if cfg["norm"] == "layernorm":
            mu = x.mean(-1, keepdim=True)
            var = ((x - mu) ** 2).mean(-1, keepdim=True)
            y = (x - mu) / torch.sqrt(var + eps) * w
            b = params.get(prefix + ".bias")
            return y + b if b is not None else y
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def lin(x, prefix):
        y = x @ params[prefix + ".weight"].t()
        b = params.get(prefix + ".bias")
        return y + b if b is not None else y

    def rope(x):  # x: (T, HS)
        y = x.clone()
        for t in range(T):
            for i in range(HS // 2):
                ang = t * cfg["rope_theta"] ** (-2.0 * i / HS)
                c, s = math.cos(ang), math.sin(ang)
                y[t, i] = x[t, i] * c - x[t, i + HS // 2] * s
                y[t, i + HS // 2] = x[t, i + HS // 2] * c + x[t, i] * s
        return y

    x = params["tok_emb.weight"][tokens]
    if cfg["positions"] == "learned":
        x = x + params["pos_emb.weight"][torch.arange(T)]
    for li in range(cfg["n_layer"]):
        p = "layers.%d." % li
        h = norm(x, p + "norm1")
        qkv = lin(h, p + "attn.qkv")
        outs = []
        for b in range(B):
            heads = []
            for hh in range(NH):
                kv = hh // (NH // NKV)
                q = qkv[b, :, hh * HS:(hh + 1) * HS]
                k = qkv[b, :, NH * HS + kv * HS: NH * HS + (kv + 1) * HS]
                v = qkv[b, :, (NH + NKV) * HS + kv * HS: (NH + NKV) * HS + (kv + 1) * HS]
                if cfg["positions"] == "rope":
                    q, k = rope(q), rope(k)
                rows = []
                for t in range(T):
                    s = (k[: t + 1] @ q[t]) / math.sqrt(HS)
                    w = torch.exp(s - s.max())
                    w = w / w.sum()
                    rows.append(w @ v[: t + 1])
                heads.append(torch.stack(rows))
            outs.append(torch.cat(heads, dim=-1))
        a = torch.stack(outs)
        x = x + lin(a, p + "attn.proj")
        h = norm(x, p + "norm2")
        u = lin(h, p + "mlp.fc")
        if cfg["activation"] == "gelu":
            g = 0.5 * u * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u ** 3)))
        else:
            Fd = cfg["d_ff"]
            gate, up = u[..., :Fd], u[..., Fd:]
            g = gate / (1.0 + torch.exp(-gate)) * up
        x = x + lin(g, p + "mlp.proj")
    h = norm(x, "norm_f")
    W = params["tok_emb.weight"] if cfg["tied_embeddings"] else params["lm_head.weight"]
    return h @ W[: cfg["vocab_size"]].t()


# ---------------------------------------------------------------------------------------------
# Optimiser, schedule, training step
# ---------------------------------------------------------------------------------------------

def lr_at(step, total_steps, lr, min_lr, warmup):
    """MODEL.md schedule, step 0-based: linear warmup then cosine from lr to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total_steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * p))


def make_optimizer(params, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kw):
    """torch.optim.AdamW; weight decay only on 2-D parameters (embeddings, linear weights)."""
    decay = [p for p in params.values() if p.dim() == 2]
    no_decay = [p for p in params.values() if p.dim() != 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


def train_step(params, cfg, opt, inputs, targets, lr, grad_clip=1.0):
    """One step: loss (before the update), backward, global-norm clip, AdamW. Returns (loss, norm)."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(params, cfg, inputs, targets)
    loss.backward()
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), grad_clip)
    else:
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params.values() if p.grad is not None))
    set_lr(opt, lr)
    opt.step()
    return loss.detach(), norm.detach()
