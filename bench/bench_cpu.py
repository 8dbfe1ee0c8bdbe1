#!/usr/bin/python3
"""CPU benchmark: lmforge's fp32 training step against the same step in PyTorch, in one run.

    /usr/bin/python3 bench/bench_cpu.py --torch-python /path/to/venv/bin/python   # after scripts/build.sh
    /usr/bin/python3 bench/bench_cpu.py --threads 2 --rounds 3 --quick

For each shape it runs build/lmforge_bench and bench/torch_cpu_step.py (tools/torch_reference.py,
the same model, parameter count, batch, sequence length and AdamW step in PyTorch fp32) with the same
thread count, alternating: every round runs each implementation once (in a rotating order), so a
machine whose load changes during the run slows all of them alike. Each run reports the median of its
timed steps; the table shows the median over rounds.

PyTorch runs under two threading settings, both with torch.set_num_threads(--threads):
  default   the environment as it is (OpenMP's default wait policy; a Debian/OpenBLAS build also gets
            OPENBLAS_NUM_THREADS=--threads, its default)
  passive   OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep instead of spinning between parallel
            regions, so they do not fight the BLAS threads or another process for the cores)
and, with --torch-modes including it, blas1 (OPENBLAS_NUM_THREADS=1, OMP_WAIT_POLICY=ACTIVE: GEMMs
parallelised by torch's own OpenMP loops; matters only for an OpenBLAS build of torch).
The ratio is lmforge / the best PyTorch setting of that shape.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [  # (preset, B, T, timed steps, warm-up steps)
    ("tiny", 8, 128, 10, 2),
    ("gpt2-124m", 1, 256, 3, 1),
]
TORCH_MODES = {  # name -> environment changes (None: remove the variable)
    "default": {"OMP_WAIT_POLICY": None},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "blas1": {"OMP_WAIT_POLICY": "ACTIVE", "OPENBLAS_NUM_THREADS": "1"},
}


def run_json(cmd, env):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("%s failed (%d):\n%s" % (" ".join(cmd), r.returncode, r.stderr[-2000:]))
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=5, help="runs of each implementation per shape, alternating")
    ap.add_argument("--bench-binary", default=os.path.join(ROOT, "build", "lmforge_bench"))
    ap.add_argument("--torch-python", default=sys.executable, help="a Python that imports torch")
    ap.add_argument("--torch-modes", default="default,passive",
                    help="comma-separated PyTorch threading settings: " + ", ".join(TORCH_MODES))
    ap.add_argument("--quick", action="store_true", help="only the tiny shape")
    ap.add_argument("--shapes", default=None, help="comma-separated presets to run (default: all)")
    args = ap.parse_args()
    if not os.path.exists(args.bench_binary):
        sys.exit("%s: not built (run scripts/build.sh)" % args.bench_binary)
    modes = args.torch_modes.split(",")
    for m in modes:
        if m not in TORCH_MODES:
            sys.exit("--torch-modes: unknown setting %s (have: %s)" % (m, ", ".join(TORCH_MODES)))
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        shapes = [s for s in SHAPES if s[0] in args.shapes.split(",")]
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    base.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))  # torch_cpu_step.py then uses it as given

    impls = [("lmforge", None)] + [("pytorch-" + m, m) for m in modes]
    rows = []
    torch_version = "?"
    for preset, B, T, steps, warmup in shapes:
        common = ["--preset", preset, "--batch-size", str(B), "--seq-len", str(T), "--steps", str(steps),
                  "--warmup-steps", str(warmup)]
        ms = {name: [] for name, _ in impls}
        for r in range(args.rounds):
            order = impls[r % len(impls):] + impls[:r % len(impls)]
            for name, mode in order:
                if mode is None:
                    env = dict(base, OMP_NUM_THREADS=str(args.threads))
                    res = run_json([args.bench_binary] + common, env)
                else:
                    env = dict(base)
                    for k, v in TORCH_MODES[mode].items():
                        if v is None:
                            env.pop(k, None)
                        else:
                            env[k] = v
                    res = run_json([args.torch_python, os.path.join(ROOT, "bench", "torch_cpu_step.py"),
                                    "--threads", str(args.threads)] + common, env)
                    torch_version = res.get("torch", torch_version)
                ms[name].append(res["step_ms"])
            print("%-10s round %d: %s" % (preset, r + 1, "  ".join("%s %.1f ms" % (n, ms[n][-1]) for n, _ in impls)),
                  flush=True)
        med = {n: statistics.median(v) for n, v in ms.items()}
        best = min((n for n, m in impls if m is not None), key=lambda n: med[n])
        rows.append((preset, B, T, med, best))

    print("\nmedian over %d rounds, tok/s (step ms); threads=%d; PyTorch %s" % (args.rounds, args.threads,
                                                                                  torch_version))
    names = [n for n, _ in impls]
    print("| shape | B | T | " + " | ".join(names) + " | lmforge / best PyTorch |")
    print("|---|---|---|" + "---|" * len(names) + "---|")
    for preset, B, T, med, best in rows:
        cells = ["%.0f (%.1f)" % (B * T / (med[n] / 1e3), med[n]) for n in names]
        print("| %s | %d | %d | %s | %.2fx (vs %s) |" % (preset, B, T, " | ".join(cells), med[best] and
                                                         med[best] / med["lmforge"], best))
    print("training step: forward + backward + grad clip + AdamW, fp32")


if __name__ == "__main__":
    main()
