#!/usr/bin/env python3
"""Checks an `lmforge train --profile` trace (Chrome trace JSON) of a GPU run.

    python3 tools/check_trace.py OUT_DIR/trace.json [--tolerance 0.10]

Parses the file as Chrome trace JSON, takes the device slices (tid 2, "GPU (CUDA events)") and the
step slices (tid 3), and checks that in every profiled step the per-op device time adds up to within
the tolerance of the step's measured time (the step slice: first op start to last op end). Prints one
line per step and exits non-zero when a step is outside the bound or the trace is malformed.
"""
import argparse
import json
import sys
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--tolerance", type=float, default=0.10)
    a = ap.parse_args()
    with open(a.trace) as f:
        t = json.load(f)
    events = t["traceEvents"]
    assert isinstance(events, list) and events, "traceEvents must be a non-empty array"
    threads = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    dev_tid = next((tid for tid, n in threads.items() if n.startswith("GPU")), None)
    step_tid = next((tid for tid, n in threads.items() if n == "steps"), None)
    assert dev_tid is not None, "no device track in the trace (was it a GPU run?)"
    assert step_tid is not None, "no step track in the trace"
    for e in events:
        if e.get("ph") == "X":
            assert all(k in e for k in ("name", "ts", "dur", "pid", "tid")) and e["dur"] >= 0, e
    steps = [e for e in events if e.get("ph") == "X" and e["tid"] == step_tid]
    ops = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e["tid"] == dev_tid:
            ops[e["args"]["step"]] += e["dur"]
    ok = True
    for s in steps:
        step = s["args"]["step"]
        frac = ops[step] / s["dur"] if s["dur"] > 0 else 0.0
        good = abs(1.0 - frac) <= a.tolerance
        ok &= good
        print("trace step %s: ops on the device %.2f ms of a %.2f ms step (%.1f%%) %s" %
              (step, ops[step] / 1e3, s["dur"] / 1e3, 100 * frac, "ok" if good else "OUTSIDE %.0f%%" % (100 * a.tolerance)))
    if not steps:
        print("no step slices"); ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
