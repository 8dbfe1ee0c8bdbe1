#!/usr/bin/python3
"""CPU benchmark: lmforge's fp32 training step against the same step in PyTorch, in one run.

    /usr/bin/python3 bench/bench_cpu.py            # after scripts/build.sh
    /usr/bin/python3 bench/bench_cpu.py --threads 2 --quick

For each shape it runs build/lmforge_bench and bench/torch_cpu_step.py (tools/torch_reference.py,
the same model in PyTorch fp32 with its best threading setting) with the same batch, sequence
length and thread count, and prints tokens/s of both and the ratio lmforge / PyTorch.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [  # (preset, B, T, steps)
    ("tiny", 8, 128, 10),
    ("gpt2-124m", 1, 256, 3),
]


def run_json(cmd, env):
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--bench-binary", default=os.path.join(ROOT, "build", "lmforge_bench"))
    ap.add_argument("--quick", action="store_true", help="only the tiny shape")
    args = ap.parse_args()
    if not os.path.exists(args.bench_binary):
        sys.exit("%s: not built (run scripts/build.sh)" % args.bench_binary)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rows = []
    for preset, B, T, steps in SHAPES[:1] if args.quick else SHAPES:
        common = ["--preset", preset, "--batch-size", str(B), "--seq-len", str(T), "--steps", str(steps),
                  "--warmup-steps", "2"]
        lmf = run_json([args.bench_binary] + common, env)
        pt = run_json([sys.executable, os.path.join(ROOT, "bench", "torch_cpu_step.py"), "--threads",
                       str(args.threads)] + common, {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"})
        rows.append((preset, B, T, lmf, pt))
        print("%-10s B=%-3d T=%-5d lmforge %10.0f tok/s (%8.1f ms)  pytorch %10.0f tok/s (%8.1f ms)  ratio %.2fx"
              % (preset, B, T, lmf["tok_s"], lmf["step_ms"], pt["tok_s"], pt["step_ms"], lmf["tok_s"] / pt["tok_s"]),
              flush=True)
    print("\n| shape | B | T | lmforge tok/s | PyTorch %s tok/s | lmforge / PyTorch |" % rows[0][4].get("torch", "?"))
    print("|---|---|---|---|---|---|")
    for preset, B, T, lmf, pt in rows:
        print("| %s | %d | %d | %.0f | %.0f | %.2fx |" % (preset, B, T, lmf["tok_s"], pt["tok_s"], lmf["tok_s"] / pt["tok_s"]))
    print("threads=%d (training step: forward + backward + grad clip + AdamW, fp32)" % args.threads)


if __name__ == "__main__":
    main()
