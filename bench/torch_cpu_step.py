#!/usr/bin/python3
"""PyTorch CPU baseline: time one fp32 training step (forward + backward + clip + AdamW).

The model is tools/torch_reference.py (docs/MODEL.md) in float32, written with fused
torch.nn.functional ops (F.layer_norm, F.gelu(approximate="tanh"), batched matmul attention with a
causal mask, F.cross_entropy) and a multi-tensor (foreach) AdamW.

    /usr/bin/python3 bench/torch_cpu_step.py --preset tiny --batch-size 8 --seq-len 128 \
        --steps 5 --warmup-steps 2 --threads 2
    /usr/bin/python3 bench/torch_cpu_step.py --config path/to/config.json ...

Prints ONE JSON line on stdout: {"impl":"pytorch","tok_s":...,"step_ms":...,"torch":...,"threads":N}
(step_ms: the median of the timed steps, as lmforge_bench reports)
(with --verbose, details go to stderr).

Threads: Debian's torch does its GEMMs in OpenBLAS (pthreads), whose thread count is NOT set by
torch.set_num_threads but by OPENBLAS_NUM_THREADS, read when torch is imported; the element-wise ops
run on OpenMP threads, which busy-wait by default and then fight the OpenBLAS threads for the cores.
With --blas-threads auto (the default, when --threads > 1) the benchmark runs itself twice in child
processes, once with OpenBLAS single-threaded (GEMMs parallelised by torch's own OpenMP loops, best
for small models) and once with OpenBLAS on --threads threads and OMP_WAIT_POLICY=PASSIVE (best for
large GEMMs), and reports the faster: torch gets its best setting for the given thread count.
If OPENBLAS_NUM_THREADS is already set in the environment, it is used as given.
"""
import argparse
import json
import os
import subprocess
import sys
import time

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")

# Mirrors of the configs shipped with lmforge.
PRESETS = {
    "tiny": dict(
        vocab_size=256, pad_vocab_multiple=64, context_length=128, n_layer=4, n_head=4, n_kv_head=4,
        d_model=128, d_ff=512, norm="layernorm", norm_eps=1e-5, activation="gelu",
        positions="learned", rope_theta=10000.0, tied_embeddings=True, bias=True),
    "gpt2-124m": dict(
        vocab_size=50257, pad_vocab_multiple=128, context_length=1024, n_layer=12, n_head=12,
        n_kv_head=12, d_model=768, d_ff=3072, norm="layernorm", norm_eps=1e-5, activation="gelu",
        positions="learned", rope_theta=10000.0, tied_embeddings=True, bias=True),
}


def load_config(args, ref):
    if args.config:
        if os.path.exists(args.config):
            with open(args.config) as f:
                return ref.make_config(**json.load(f))
        if args.config in PRESETS:
            return ref.make_config(**PRESETS[args.config])
        sys.exit("--config: no such file or preset: %s" % args.config)
    if args.preset not in PRESETS:
        sys.exit("--preset: unknown preset %s (have: %s)" % (args.preset, ", ".join(PRESETS)))
    return ref.make_config(**PRESETS[args.preset])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="config JSON file (or a preset name)")
    ap.add_argument("--preset", default="tiny", help="preset name: " + ", ".join(PRESETS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=None, help="default: context_length")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blas-threads", default="auto",
                    help="OpenBLAS threads: a number, or auto (try 1 and --threads, keep the faster)")
    ap.add_argument("--omp-wait", default=None, choices=["ACTIVE", "PASSIVE"],
                    help="OMP_WAIT_POLICY (default: PASSIVE when OpenBLAS uses more than 1 thread)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()

    if "OPENBLAS_NUM_THREADS" not in os.environ and args.blas_threads == "auto" and args.threads > 1:
        return tune(args)
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        blas = 1 if args.blas_threads == "auto" else int(args.blas_threads)
        os.environ["OPENBLAS_NUM_THREADS"] = str(blas)
        if "OMP_WAIT_POLICY" not in os.environ:
            os.environ["OMP_WAIT_POLICY"] = args.omp_wait or ("PASSIVE" if blas > 1 else "ACTIVE")
    elif args.omp_wait:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait
    run(args)


def tune(args):
    """Run the benchmark in child processes under each threading setting; print the faster."""
    best = None
    for blas, wait in ((1, "ACTIVE"), (args.threads, "PASSIVE")):
        cmd = [sys.executable, os.path.abspath(__file__)] + [a for a in sys.argv[1:]]
        cmd += ["--blas-threads", str(blas), "--omp-wait", wait]
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if r.returncode != 0:
            sys.exit(r.returncode)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        if args.verbose:
            print("blas_threads=%d omp_wait=%s: step_ms=%.2f" % (blas, wait, res["step_ms"]), file=sys.stderr)
        if best is None or res["step_ms"] < best["step_ms"]:
            best = res
    print(json.dumps(best))


def run(args):
    import torch
    sys.path.insert(0, TOOLS)
    import torch_reference as ref

    torch.set_num_threads(args.threads)
    cfg = load_config(args, ref)
    B = args.batch_size
    T = args.seq_len or cfg["context_length"]
    if T > cfg["context_length"]:
        sys.exit("--seq-len %d exceeds context_length %d" % (T, cfg["context_length"]))

    torch.manual_seed(args.seed)
    params = ref.build_params(cfg, seed=args.seed, dtype=torch.float32)
    opt = ref.make_optimizer(params, args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True)
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_batches = 4
    data = torch.randint(0, cfg["vocab_size"], (n_batches, B, T + 1), generator=gen)
    batches = [(data[i, :, :T].contiguous(), data[i, :, 1:].contiguous()) for i in range(n_batches)]

    def step(i):
        x, y = batches[i % n_batches]
        loss, _ = ref.train_step(params, cfg, opt, x, y, args.lr, args.grad_clip)
        return loss.item()  # synchronises on the value, as a real training loop logging loss would

    for i in range(args.warmup_steps):
        step(i)
    times, losses = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step(args.warmup_steps + i))
        times.append(time.perf_counter() - t0)

    step_s = sorted(times)[len(times) // 2]  # the median, as lmforge_bench reports
    out = {"impl": "pytorch", "tok_s": B * T / step_s, "step_ms": step_s * 1e3,
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.verbose:
        n = ref.num_params(cfg, include_pos=False)
        flops = 6 * n + 12 * cfg["n_layer"] * cfg["d_model"] * T
        print("OPENBLAS_NUM_THREADS=%s OMP_WAIT_POLICY=%s" % (os.environ.get("OPENBLAS_NUM_THREADS"),
              os.environ.get("OMP_WAIT_POLICY")), file=sys.stderr)
        print("config=%s B=%d T=%d params(no pos)=%d step_ms min=%.2f median=%.2f GFLOP/s=%.2f losses=%s"
              % (ref.config_json(cfg), B, T, n, min(times) * 1e3, step_s * 1e3,
                 flops * B * T / step_s / 1e9, ["%.4f" % l for l in losses]), file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
