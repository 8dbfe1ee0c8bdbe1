#!/usr/bin/python3
"""Generate the model test fixtures tests/fixtures/model_{gpt2,llama}_tiny.safetensors.

Run with Debian's torch:  /usr/bin/python3 tools/make_fixtures.py

Each fixture holds (safetensors, written by hand below):
  param.<name>   F32   initial weights (the exact fp32 values the float64 computation starts from)
  batch.tokens   I32   (STEPS, B, T+1); inputs = [:, :, :T], targets = [:, :, 1:] (see make_tokens)
  ref.logits     F32   (B, T, V) logits of batch 0
  ref.loss       F64   (1) mean cross-entropy of batch 0
  grad.<name>    F32   d loss / d param on batch 0
  traj.loss      F64   (STEPS) loss of each training step, computed before its update
  traj.loss64    F64   (STEPS) the same values (alias kept for readers that ask for it by this name)
  traj.lr        F64   (STEPS) learning rate of each step
  __metadata__   {"config": <MODEL.md config JSON>, "train": <training settings JSON>}
All reference values are computed in float64 with tools/torch_reference.py.
"""
import json
import math
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as ref  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "fixtures")

B, T, STEPS = 2, 8, 10
TRAIN = {"B": B, "T": T, "steps": STEPS, "lr": 0.01, "min_lr": 0.001, "warmup": 3,
         "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "grad_clip": 1.0}

CONFIGS = {
    "model_gpt2_tiny": dict(
        vocab_size=61, pad_vocab_multiple=16, context_length=16, n_layer=2, n_head=4, n_kv_head=4,
        d_model=32, d_ff=128, norm="layernorm", norm_eps=1e-5, activation="gelu",
        positions="learned", rope_theta=10000.0, tied_embeddings=True, bias=True),
    "model_llama_tiny": dict(
        vocab_size=61, pad_vocab_multiple=16, context_length=16, n_layer=2, n_head=4, n_kv_head=2,
        d_model=32, d_ff=48, norm="rmsnorm", norm_eps=1e-5, activation="swiglu",
        positions="rope", rope_theta=10000.0, tied_embeddings=False, bias=False),
}
SEEDS = {"model_gpt2_tiny": 1234, "model_llama_tiny": 5678}

# ---------------------------------------------------------------------------------------------
# safetensors, by hand
# ---------------------------------------------------------------------------------------------
_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.int32: "I32"}
_SIZES = {"F32": 4, "F64": 8, "I32": 4}
_TORCH = {"F32": torch.float32, "F64": torch.float64, "I32": torch.int32}


def write_safetensors(path, tensors, metadata):
    """tensors: list of (name, tensor) in file order. Layout: u64 LE header size N, N bytes of
    JSON (space-padded to a multiple of 8), then the raw little-endian data back to back."""
    assert sys.byteorder == "little"
    header, blobs, offset = {}, [], 0
    for name, t in tensors:
        t = t.detach().contiguous().cpu()
        dt = _DTYPES[t.dtype]
        raw = t.numpy().tobytes()
        assert len(raw) == t.numel() * _SIZES[dt]
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = metadata
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for raw in blobs:
            f.write(raw)


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    body = data[8 + n:]
    out, end = {}, 0
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items())
    for b, e, k in spans:
        assert b == end, "offsets must be contiguous"
        end = e
        info = header[k]
        dt = _TORCH[info["dtype"]]
        assert (e - b) == math.prod(info["shape"]) * _SIZES[info["dtype"]]
        t = torch.frombuffer(bytearray(body[b:e]), dtype=dt) if e > b else torch.empty(0, dtype=dt)
        out[k] = t.reshape(info["shape"]).clone()
    assert end == len(body), "trailing bytes after the data"
    return out, meta


# ---------------------------------------------------------------------------------------------
# Self checks of the reference
# ---------------------------------------------------------------------------------------------

def check_naive(params64, cfg, inputs):
    """forward() (F ops) against the literal MODEL.md transcription."""
    with torch.no_grad():
        a = ref.forward(params64, cfg, inputs)
        b = ref.forward_naive(params64, cfg, inputs)
    err = (a - b).abs().max().item()
    assert err < 1e-12, "forward vs forward_naive: %g" % err
    return err


def check_gradcheck(params64, cfg, inputs, targets, gen, per_tensor=2):
    """torch.autograd.gradcheck (float64 central differences) on a few entries of every parameter."""
    names = list(params64.keys())
    base = {n: p.detach().clone() for n, p in params64.items()}
    picks = {}
    for n in names:
        numel = base[n].numel()
        rows = base[n].shape[0]
        if n in ("tok_emb.weight", "lm_head.weight"):
            # entries in the real vocab rows (a padded row has identically zero gradient)
            C = base[n].shape[1]
            tok = inputs.flatten()[0].item()
            idx = [tok * C + int(torch.randint(C, (1,), generator=gen)),
                   int(torch.randint(cfg["vocab_size"] * C, (1,), generator=gen))]
        else:
            idx = torch.randint(numel, (per_tensor,), generator=gen).tolist()
        del rows
        picks[n] = torch.tensor(sorted(set(idx)), dtype=torch.long)

    def f(*subs):
        ps = {}
        for n, s in zip(names, subs):
            flat = base[n].flatten().index_put((picks[n],), s)
            ps[n] = flat.view_as(base[n])
        return ref.loss_fn(ps, cfg, inputs, targets)

    subs = [base[n].flatten()[picks[n]].clone().requires_grad_(True) for n in names]
    ok = torch.autograd.gradcheck(f, subs, eps=1e-6, atol=1e-8, rtol=1e-5)
    assert ok
    return sum(len(picks[n]) for n in names)


def check_fd_against_grads(params64, cfg, inputs, targets, grads, gen, count=12):
    """Independent central-difference check of the stored (F32) gradients, largest entries first."""
    worst = 0.0
    names = list(params64.keys())
    with torch.no_grad():
        for i in range(count):
            n = names[i % len(names)]
            g = grads[n].float().double().flatten()  # the values as stored (F32)
            j = int(g.abs().argmax()) if i < len(names) else int(torch.randint(g.numel(), (1,), generator=gen))
            ps = {k: v.detach().clone() for k, v in params64.items()}
            h = 1e-6
            ps[n].view(-1)[j] += h
            lp = ref.loss_fn(ps, cfg, inputs, targets).item()
            ps[n].view(-1)[j] -= 2 * h
            lm = ref.loss_fn(ps, cfg, inputs, targets).item()
            fd = (lp - lm) / (2 * h)
            err = abs(fd - g[j].item()) / max(1e-4, abs(fd))
            worst = max(worst, err)
    assert worst < 1e-4, "finite differences vs stored gradients: rel err %g" % worst
    return worst


# ---------------------------------------------------------------------------------------------

def make_tokens(V, gen, follow=0.75):
    """(STEPS, B, T+1) int32. Learnable, so the trajectory's loss visibly falls: each next token is
    the bigram rule (t * 7 + 3) mod V with probability `follow`, otherwise uniform noise."""
    tok = torch.empty(STEPS, B, T + 1, dtype=torch.int64)
    tok[:, :, 0] = torch.randint(0, V, (STEPS, B), generator=gen)
    for j in range(1, T + 1):
        rule = (tok[:, :, j - 1] * 7 + 3) % V
        noise = torch.randint(0, V, (STEPS, B), generator=gen)
        keep = torch.rand(STEPS, B, generator=gen) < follow
        tok[:, :, j] = torch.where(keep, rule, noise)
    return tok.to(torch.int32)


def make_fixture(name, cfg_over):
    cfg = ref.make_config(**cfg_over)
    V = cfg["vocab_size"]
    gen = torch.Generator().manual_seed(SEEDS[name])
    params32 = ref.init_params(cfg, gen, dtype=torch.float32, nontrivial=True)
    tokens = make_tokens(V, gen)
    inputs, targets = tokens[:, :, :T], tokens[:, :, 1:]

    # --- batch 0: logits, loss, gradients in float64
    p64 = {n: p.double().requires_grad_(True) for n, p in params32.items()}
    logits = ref.forward(p64, cfg, inputs[0])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets[0].reshape(-1).long())
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in p64.items()}
    for n in ("tok_emb.weight", "lm_head.weight"):
        if n in grads:
            assert grads[n][V:].abs().max().item() == 0.0, "padded rows received gradient"

    # --- self checks
    checks = {}
    checks["forward_vs_naive_max_abs"] = check_naive({n: p.detach() for n, p in p64.items()}, cfg, inputs[0])
    checks["gradcheck_entries"] = check_gradcheck(p64, cfg, inputs[0], targets[0], gen)
    checks["fd_vs_grads_max_rel"] = check_fd_against_grads(
        {n: p.detach() for n, p in p64.items()}, cfg, inputs[0], targets[0], grads, gen)

    # --- 10-step training trajectory in float64
    tp = {n: p.double().detach().clone().requires_grad_(True) for n, p in params32.items()}
    opt = ref.make_optimizer(tp, TRAIN["lr"], betas=(TRAIN["beta1"], TRAIN["beta2"]), eps=TRAIN["eps"],
                             weight_decay=TRAIN["weight_decay"])
    traj_loss, traj_lr, traj_norm = [], [], []
    for s in range(STEPS):
        lr = ref.lr_at(s, STEPS, TRAIN["lr"], TRAIN["min_lr"], TRAIN["warmup"])
        l, gn = ref.train_step(tp, cfg, opt, inputs[s], targets[s], lr, TRAIN["grad_clip"])
        traj_loss.append(l.item())
        traj_lr.append(lr)
        traj_norm.append(gn.item())
    assert abs(traj_loss[0] - loss.item()) < 1e-12, "trajectory step 0 must match ref.loss"
    for n in ("tok_emb.weight", "lm_head.weight"):
        if n in tp:
            assert tp[n][V:].abs().max().item() == 0.0, "padded rows changed during training"

    # --- write (F64 tensors first so every tensor stays naturally aligned)
    f64 = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    tensors = [
        ("ref.loss", f64([loss.item()])),
        ("traj.loss", f64(traj_loss)),
        ("traj.loss64", f64(traj_loss)),
        ("traj.lr", f64(traj_lr)),
        ("batch.tokens", tokens),
        ("ref.logits", logits.detach().float()),
    ]
    tensors += [("param." + n, p) for n, p in params32.items()]
    tensors += [("grad." + n, g.float()) for n, g in grads.items()]
    meta = {"config": ref.config_json(cfg), "train": json.dumps(TRAIN)}
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, name + ".safetensors")
    write_safetensors(path, tensors, meta)

    # --- read back and verify bit-exactly
    back, bmeta = read_safetensors(path)
    assert bmeta == meta
    assert list(back.keys()) == [n for n, _ in tensors]
    for n, t in tensors:
        assert back[n].dtype == t.dtype and back[n].shape == t.shape, n
        assert torch.equal(back[n], t.detach()), n
    assert json.loads(bmeta["config"]) == {k: cfg[k] for k in ref.CONFIG_KEYS}
    assert list(json.loads(bmeta["config"]).keys()) == ref.CONFIG_KEYS
    checks["readback"] = "ok (%d tensors)" % len(tensors)

    size = os.path.getsize(path)
    assert size < 300 * 1024, "fixture too large: %d" % size
    n_params = sum(p.numel() for p in params32.values())
    print("%s: %s  (%d bytes, %d params in %d tensors)" % (name, os.path.relpath(path, ROOT), size,
                                                           n_params, len(params32)))
    print("  config: %s" % meta["config"])
    print("  ref.loss = %.12f  (ln V = %.6f)" % (loss.item(), math.log(V)))
    print("  traj.loss =", " ".join("%.6f" % x for x in traj_loss))
    print("  traj.lr   =", " ".join("%.6g" % x for x in traj_lr))
    print("  grad norm =", " ".join("%.4f" % x for x in traj_norm))
    print("  checks: forward vs naive max|d| %.2e; gradcheck on %d entries passed; "
          "FD vs stored grads max rel %.2e; read-back %s" % (
              checks["forward_vs_naive_max_abs"], checks["gradcheck_entries"],
              checks["fd_vs_grads_max_rel"], checks["readback"]))
    return path


def main():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print("torch", torch.__version__)
    for name, over in CONFIGS.items():
        make_fixture(name, over)


if __name__ == "__main__":
    main()
