#!/usr/bin/env python3
"""ncu_step.py: per-kernel device time of one training step, from an Nsight Compute CSV.

tools/gpu_check.sh ncu runs `ncu --csv --metrics gpu__time_duration.sum` over a window of launches of
lmforge_bench; this script cuts one whole step out of that window (from one launch of the AdamW kernel
to the next) and prints the kernels grouped by name: total microseconds, calls, share of the step.

  tools/ncu_step.py ncu.csv [--top 40] [--step-kernel adamw_flat_kernel]
"""
import argparse
import csv
import re
import sys

UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}


def short(name):
    name = re.sub(r"\(.*", "", name)  # drop the argument list
    name = re.sub(r"^void ", "", name)
    return name[:90]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--step-kernel", default="adamw_flat_kernel")
    a = ap.parse_args()
    rows = []
    with open(a.csv, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # ncu prefixes its own log lines with ==PROF==
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        us = float(r["Metric Value"].replace(",", "")) * UNITS.get(r["Metric Unit"], 1.0)
        rows.append((short(r["Kernel Name"]), us, r.get("Grid Size", ""), r.get("Block Size", "")))
    marks = [i for i, r in enumerate(rows) if a.step_kernel in r[0]]
    if len(marks) < 2:
        sys.exit("ncu_step: fewer than two launches of %s in %s (%d launches): widen the window"
                 % (a.step_kernel, a.csv, len(rows)))
    step = rows[marks[-2] + 1: marks[-1] + 1]
    total = sum(r[1] for r in step)
    by = {}
    for name, us, grid, block in step:
        t, n, g = by.get(name, (0.0, 0, grid))
        by[name] = (t + us, n + 1, g)
    print("one step: %d launches, %.2f ms of kernel time" % (len(step), total / 1e3))
    print("%10s %6s %6s  %s" % ("us", "calls", "share", "kernel (grid of the first call)"))
    for name, (t, n, g) in sorted(by.items(), key=lambda kv: -kv[1][0])[: a.top]:
        print("%10.1f %6d %5.1f%%  %s  %s" % (t, n, 100 * t / total, name, g))


if __name__ == "__main__":
    main()
