#!/usr/bin/env python3
"""Is lmforge's MoE routing healthy, and does it follow PyTorch's? (issue 23, "MoE routing health")

Trains the same MoE model twice from the same initial weights on the same batches, with the same optimizer
and schedule: once with `lmforge train`, once with the PyTorch reference MoE of bench/torch_gpu_moe.py, and
compares the per-layer expert loads and aux losses step by step.

    python3 tools/moe_routing_compare.py --lmforge build/lmforge --preset moe-bench -B 8 -T 2048 --steps 300 \\
        --device cuda --lr 3e-3 --warmup 2          # the default lr and the warm-up gpu_check.sh's runs use
    /work/torchenv/bin/python tools/moe_routing_compare.py --lmforge build-cpu/lmforge --config small_moe.json \\
        -B 8 -T 256 --steps 150 --device cpu         # the CPU (fp32 on both sides)

How the two runs are made the same:
  * weights: `lmforge train --save-init` writes checkpoints/step_000000; PyTorch loads it (safetensors).
  * batches: lmforge's loader draws window b of batch k at offset philox(seed, 0xda7a, k B + b) mod windows
    (src/data/loader.cpp); this script computes the same offsets over the same tokens (the bundled corpus,
    byte-tokenized, its first 90 %, or --data shards in llm.c format).
  * AdamW (betas 0.9/0.95, eps 1e-8, weight decay on the 2-D parameters), the gradient clipped to norm 1,
    lmforge's schedule (linear warm-up, cosine to --min-lr, default lr/10), loss = cross-entropy + aux.
  * precision: on the CPU both fp32; on the GPU lmforge bf16 and PyTorch bf16 autocast (router in fp32).
The reference covers the GPT-2-style MoE family of bench/torch_gpu_moe.py (LayerNorm, GELU experts without
biases, learned positions, tied embeddings, softmax top-k renormalised, Switch aux loss, dropless, every
layer MoE); another config is refused naming the field.

Prints a table (steps 1, 2, 5, 10, 20, 50, 100, ... and the last): each side's loss, aux and the least and
most loaded expert's share over layers, and the largest per-expert share difference between the sides; then
per side whether routing is healthy: after warm-up (--health-from, default max(2 warmup, 20)) every layer's
every expert keeps a share above 1/(4E). Exit status 0 when the two sides agree on the first steps (loads
within --tol at step 1; the loss within 2e-3 relative, 1e-2 on the GPU) -- the check that the comparison compares like with
like -- whatever the health verdict, which the table reports. --json FILE writes every step of both sides.
"""
import argparse
import array
import bisect
import json
import math
import os
import struct
import subprocess
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ---- lmforge's counter RNG (src/core/rng.h, Philox4x32-10) ----
def philox_u64(seed, stream, index):
    M = 0xFFFFFFFF
    c0, c1, c2, c3 = index & M, (index >> 32) & M, stream & M, (stream >> 32) & M
    k0, k1 = seed & M, (seed >> 32) & M
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M, p1 & M, ((p0 >> 32) ^ c3 ^ k1) & M, p0 & M
        k0, k1 = (k0 + 0x9E3779B9) & M, (k1 + 0xBB67AE85) & M
    return (c1 << 32) | c0


class Batches:
    """lmforge's DataLoader (src/data/loader.cpp): batch k, row b = window philox(seed, 0xda7a, k B + b) mod W."""

    def __init__(self, sources, B, T, seed):
        self.sources, self.B, self.T, self.seed = sources, B, T, seed
        self.starts = [0]
        for s in sources:
            self.starts.append(self.starts[-1] + len(s) - T)

    def get(self, k):  # (inputs, targets): B lists of T token ids
        xs, ys = [], []
        for b in range(self.B):
            w = philox_u64(self.seed, 0xDA7A, k * self.B + b) % self.starts[-1]
            s = bisect.bisect_right(self.starts, w) - 1
            at, t = w - self.starts[s], self.sources[s]
            xs.append(list(t[at:at + self.T]))
            ys.append(list(t[at + 1:at + self.T + 1]))
        return xs, ys


def read_shard(path, vocab):
    with open(path, "rb") as f:
        head = array.array("i", f.read(256 * 4))
        if head[0] != 20240520 or head[1] not in (1, 2):
            sys.exit(f"--data: {path} is not an llm.c shard (magic {head[0]}, version {head[1]})")
        toks = array.array("H" if head[1] == 1 else "I", f.read())
    if len(toks) != head[2] or (len(toks) and max(toks) >= vocab):
        sys.exit(f"--data: {path}: {len(toks)} tokens for a header of {head[2]}, or a token >= vocab {vocab}")
    return toks


def bundled_train_tokens():
    text = open(os.path.join(ROOT, "data", "kjv.txt"), "rb").read()  # src/train/trainer.cpp bundled_tokens
    return text[: len(text) // 10 * 9]  # bytes: byte-tokenized


def read_safetensors(path):  # {name: (shape, little-endian f32 bytes)}, metadata
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        blob = f.read()
    meta = head.pop("__metadata__", {})
    out = {}
    for k, v in head.items():
        if v["dtype"] != "F32":
            sys.exit(f"{path}: tensor {k} is {v['dtype']}, expected F32")
        a, b = v["data_offsets"]
        out[k] = (tuple(v["shape"]), blob[a:b])
    return out, meta


def lr_at(s, a):  # src/train/trainer.cpp lr_at_step (s: 0-based step)
    min_lr = a.lr * 0.1 if a.min_lr is None else a.min_lr
    if s < a.warmup:
        return a.lr * (s + 1) / a.warmup
    p = min(1.0, (s - a.warmup) / max(1, a.steps - a.warmup))
    return min_lr + 0.5 * (a.lr - min_lr) * (1.0 + math.cos(math.pi * p))


def check_family(cfg):
    m = cfg.get("moe") or {}
    want = {"norm": "layernorm", "activation": "gelu", "positions": "learned", "tied_embeddings": True, "bias": True}
    for k, v in want.items():
        if cfg.get(k) != v:
            sys.exit(f"model config: {k}={cfg.get(k)!r}; the PyTorch reference implements {k}={v!r}")
    if cfg["n_kv_head"] != cfg["n_head"]:
        sys.exit("model config: n_kv_head != n_head; the PyTorch reference has no grouped-query attention")
    moe_want = {"every": 1, "first_dense": 0, "shared": 0, "score": "softmax", "renormalize": True,
                "capacity_factor": 0.0, "z_coef": 0.0, "bias_rate": 0.0}
    if not m.get("experts"):
        sys.exit("model config: no \"moe\" layers to compare")
    for k, v in moe_want.items():
        if m.get(k, v) != v:
            sys.exit(f"model config: moe.{k}={m.get(k)!r}; the PyTorch reference implements moe.{k}={v!r}")


def run_lmforge(a, work):
    model = ["--preset", a.preset] if a.preset else ["--config", a.config]
    cmd = [a.lmforge, "train", *model, "-B", str(a.B), "-T", str(a.T), "--steps", str(a.steps), "--lr", str(a.lr),
           "--warmup", str(a.warmup), "--seed", str(a.seed), "--log-every", "1", "--eval-every", "0",
           "--eval-batches", "1", "--device", a.device, "--save-init", "--overwrite", "--out-dir", work]
    if a.min_lr is not None:
        cmd += ["--min-lr", str(a.min_lr)]
    if a.data:
        cmd += ["--data", *a.data]
    if a.device == "cuda":
        cmd += ["--precision", "bf16"]
    print("lmforge:", " ".join(cmd), file=sys.stderr)
    with open(os.path.join(work + ".log"), "w") as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"lmforge train failed (exit {r.returncode}); its log: {work}.log")
    steps = {}
    for line in open(os.path.join(work, "metrics.jsonl")):
        j = json.loads(line)
        if "expert_loads" in j:
            steps[j["step"]] = {"loss": j["loss"], "pred": j["pred"], "aux": j["aux_layers"], "loads": j["expert_loads"]}
    return steps


def run_torch(a, cfg, weights, batches):
    import torch
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import torch_gpu_moe as ref

    m = cfg["moe"]
    args = argparse.Namespace(vocab=cfg["vocab_size"], seq_len=cfg["context_length"], layers=cfg["n_layer"],
                              d_model=cfg["d_model"], heads=cfg["n_head"], experts=m["experts"],
                              d_expert=m["d_expert"], top_k=m["top_k"], aux_coef=m.get("aux_coef", 0.01), dense_ff=0)
    V = cfg["vocab_size"]
    Vp = weights["tok_emb.weight"][0][0]
    args.vocab = Vp
    torch.manual_seed(0)
    dev = a.device
    model = ref.MoEGPT(args)
    names = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight", "lnf.weight": "norm_f.weight",
             "lnf.bias": "norm_f.bias"}
    for i in range(cfg["n_layer"]):
        p, q = f"blocks.{i}.", f"layers.{i}."
        names.update({p + "ln1.weight": q + "norm1.weight", p + "ln1.bias": q + "norm1.bias",
                      p + "ln2.weight": q + "norm2.weight", p + "ln2.bias": q + "norm2.bias",
                      p + "qkv.weight": q + "attn.qkv.weight", p + "qkv.bias": q + "attn.qkv.bias",
                      p + "proj.weight": q + "attn.proj.weight", p + "proj.bias": q + "attn.proj.bias",
                      p + "mlp.router.weight": q + "moe.router.weight", p + "mlp.w_in": q + "moe.experts.w_in",
                      p + "mlp.w_out": q + "moe.experts.w_out"})
    state = model.state_dict()
    missing = [k for k in state if k not in names] + [v for v in names.values() if v not in weights]
    if missing:
        sys.exit(f"weights: no match for {missing[:4]} (lmforge's checkpoint names changed?)")
    with torch.no_grad():
        for k, v in state.items():
            shape, data = weights[names[k]]
            if shape != tuple(v.shape):
                sys.exit(f"weights: {names[k]} is {shape}, the reference's {k} is {tuple(v.shape)}")
            v.copy_(torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape))
    model.to(dev)
    moes = [b.mlp for b in model.blocks]
    stash = {}

    def hook(mod, inp, out):
        stash.setdefault("aux", []).append(float(out[1].detach()))
        stash.setdefault("loads", []).append((mod.last_counts.double() / (inp[0].shape[0] * mod.K)).cpu().tolist())

    for mo in moes:
        mo.register_forward_hook(hook)
    opt = ref.make_optimizer(model, argparse.Namespace(device=dev, lr=a.lr))
    bf16 = dev == "cuda"
    out = {}
    for s in range(a.steps):
        x, y = batches.get(s)
        x, y = torch.tensor(x, dtype=torch.long, device=dev), torch.tensor(y, dtype=torch.long, device=dev)
        stash.clear()
        for g in opt.param_groups:
            g["lr"] = lr_at(s, a)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            pred, aux_total = model.losses(x, y, vocab=V)
        loss = pred + aux_total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out[s + 1] = {"loss": float(loss.detach()), "pred": float(pred.detach()), "aux": stash["aux"], "loads": stash["loads"]}
        if (s + 1) % 50 == 0:
            print(f"  pytorch step {s + 1}/{a.steps} loss {float(loss):.4f}", file=sys.stderr)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lmforge", required=True, help="the lmforge binary")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset")
    g.add_argument("--config", help="model config JSON")
    ap.add_argument("--data", nargs="*", help="llm.c shards (default: the bundled corpus)")
    ap.add_argument("-B", type=int, default=8)
    ap.add_argument("-T", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--work", default="/tmp/lmf_moe_compare", help="lmforge's out-dir (and its .log)")
    ap.add_argument("--tol", type=float, default=0.02, help="step-1 per-expert share difference allowed")
    ap.add_argument("--health-from", type=int, help="first step of the health verdict (default max(2 warmup, 20))")
    ap.add_argument("--json", help="write every step of both runs here")
    a = ap.parse_args()
    if a.steps < 1 or a.B < 1 or a.T < 1 or a.lr <= 0:
        sys.exit("--steps, -B, -T must be >= 1 and --lr > 0")

    lmf = run_lmforge(a, a.work)
    init = os.path.join(a.work, "checkpoints", "step_000000")
    weights, meta = read_safetensors(os.path.join(init, "model.safetensors"))
    cfg = json.loads(meta["lmforge_config"]) if "lmforge_config" in meta else json.load(open(os.path.join(init, "config.json")))
    check_family(cfg)
    if a.T > cfg["context_length"]:
        sys.exit(f"-T {a.T} exceeds the model's context_length {cfg['context_length']}")
    sources = [read_shard(p, cfg["vocab_size"]) for p in a.data] if a.data else [bundled_train_tokens()]
    ref = run_torch(a, cfg, weights, Batches(sources, a.B, a.T, a.seed))

    E = cfg["moe"]["experts"]
    floor = 1.0 / (4 * E)
    health_from = a.health_from or max(2 * a.warmup, 20)
    marks = sorted({s for s in [1, 2, 5, 10, 20] + list(range(50, a.steps + 1, 50)) + [a.steps] if s <= a.steps})
    print(f"MoE routing, lmforge vs PyTorch from the same weights and batches ({a.preset or a.config}, B={a.B} "
          f"T={a.T}, lr {a.lr:g} warm-up {a.warmup}, {a.device}; E={E}, top-{cfg['moe']['top_k']}, {cfg['n_layer']} layers)\n")
    print("| step | loss lmforge | loss PyTorch | aux lmforge | aux PyTorch | load min/max lmforge | load min/max PyTorch "
          "| max share diff |")
    print("|---|---|---|---|---|---|---|---|")
    for s in marks:
        L, R = lmf.get(s), ref.get(s)
        if not L or not R:
            continue
        lmin, lmax = min(map(min, L["loads"])), max(map(max, L["loads"]))
        rmin, rmax = min(map(min, R["loads"])), max(map(max, R["loads"]))
        diff = max(abs(p - q) for lr_, rr in zip(L["loads"], R["loads"]) for p, q in zip(lr_, rr))
        print(f"| {s} | {L['loss']:.4f} | {R['loss']:.4f} | {sum(L['aux']):.4f} | {sum(R['aux']):.4f} | "
              f"{lmin:.3f} / {lmax:.3f} | {rmin:.3f} / {rmax:.3f} | {diff:.3f} |")

    def health(run):
        bad = [(s, i, min(l)) for s, r in sorted(run.items()) if s >= health_from for i, l in enumerate(r["loads"])
               if min(l) <= floor]
        if not any(k >= health_from for k in run):
            return f"n/a: the run ends before step {health_from}"
        if not bad:
            return f"healthy: every expert's share > 1/(4E) = {floor:.4f} in every layer from step {health_from}"
        steps = sorted({b[0] for b in bad})
        s, i, v = bad[0]
        return (f"NOT healthy: {len(steps)} of {sum(1 for k in run if k >= health_from)} steps from {health_from} have "
                f"an expert at or below 1/(4E) = {floor:.4f} (first: step {s}, layer {i}, share {v:.3f}; last step "
                f"{steps[-1]})")

    print(f"\nlmforge: {health(lmf)}\nPyTorch: {health(ref)}")
    L1, R1 = lmf.get(1), ref.get(1)
    d1 = max(abs(p - q) for lr_, rr in zip(L1["loads"], R1["loads"]) for p, q in zip(lr_, rr))
    rel = abs(L1["loss"] - R1["loss"]) / abs(R1["loss"])
    rel_tol = 2e-3 if a.device == "cpu" else 1e-2  # fp32 both sides; bf16 kernels that round differently
    same = d1 <= a.tol and rel <= rel_tol
    print(f"step 1: max share difference {d1:.4f} (tol {a.tol}), loss relative difference {rel:.2e}: "
          f"{'the two runs start alike' if same else 'THE RUNS DIFFER FROM THE FIRST STEP (not like with like)'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"lmforge": lmf, "pytorch": ref}, f)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
