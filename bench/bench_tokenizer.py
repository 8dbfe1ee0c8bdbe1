#!/usr/bin/env python3
"""`lmforge prepare --tokenizer FILE` against Hugging Face `tokenizers`' batch encoding, same file, same
tokenizer, same number of threads, in one run: MB/s of both and the ratio; the ids must be identical.

  python bench/bench_tokenizer.py --tokenizer TOKENIZER.json [--text FILE] [--threads 2] [--repeat 3]

The text defaults to the bundled corpus (data/kjv.txt) repeated to --mb megabytes. `tokenizers` encodes
it with encode_batch (RAYON_NUM_THREADS threads) over the pieces lmforge also cuts at (after a newline
between two non-space characters: no pre-tokenizer piece crosses one), so both must give the ids of
the whole text; lmforge is timed as the whole `prepare` process (reading the tokenizer.json and the
text, encoding, writing the shard) and by the encoding rate `prepare` prints.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--text", default=os.path.join(ROOT, "data", "kjv.txt"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mb", type=float, default=8.0, help="size of the default text")
    ap.add_argument("--lmforge", default=os.path.join(ROOT, "build", "lmforge"))
    a = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(a.threads)  # before tokenizers starts its pool
    import numpy as np
    from tokenizers import Tokenizer

    import re
    work = tempfile.mkdtemp()
    data = open(a.text, "rb").read()
    if a.text == ap.get_default("text"):
        data = data * max(1, int(a.mb * 1e6 / len(data) + 0.5))
        a.text = os.path.join(work, "text.txt")
        open(a.text, "wb").write(data)
    mb = len(data) / 1e6
    text = data.decode("utf-8", "replace")
    pieces = re.split(r"(?<=\S\n)(?=\S)", text)
    tok = Tokenizer.from_file(a.tokenizer)

    best_hf = float("inf")
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        enc = tok.encode_batch(pieces, add_special_tokens=False)
        best_hf = min(best_hf, time.perf_counter() - t0)
    hf_ids = np.fromiter((i for e in enc for i in e.ids), dtype=np.int64)

    best_lmf, best_rate = float("inf"), 0.0
    with tempfile.TemporaryDirectory() as d:
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            r = subprocess.run([a.lmforge, "prepare", "--input", a.text, "--out-dir", d, "--name", "b",
                                "--val-fraction", "0", "--tokenizer", a.tokenizer, "--threads", str(a.threads)],
                               capture_output=True, text=True)
            elapsed = time.perf_counter() - t0
            if r.returncode != 0:
                sys.exit("lmforge prepare failed: " + r.stderr.strip())
            best_lmf = min(best_lmf, elapsed)
            best_rate = max(best_rate, float(re.search(r"([0-9.]+) MB/s", r.stdout).group(1)))
        raw = open(os.path.join(d, "b_train.bin"), "rb").read()
    header = np.frombuffer(raw[:1024], dtype=np.int32)
    body = np.frombuffer(raw[1024:], dtype=np.uint16 if header[1] == 1 else np.uint32).astype(np.int64)
    same = len(body) == len(hf_ids) and bool((body == hf_ids).all())
    print(f"text: {a.text} ({mb:.2f} MB), tokenizer: {a.tokenizer}, threads: {a.threads}, best of {a.repeat}")
    print(f"{'':<34}{'seconds':>10}{'MB/s':>10}")
    print(f"{'tokenizers encode_batch':<34}{best_hf:>10.3f}{mb / best_hf:>10.1f}")
    print(f"{'lmforge prepare (whole process)':<34}{best_lmf:>10.3f}{mb / best_lmf:>10.1f}")
    print(f"{'lmforge prepare (encoding)':<34}{mb / best_rate:>10.3f}{best_rate:>10.1f}")
    print(f"ratio lmforge / tokenizers: {best_hf / best_lmf:.2f}x whole process, {best_rate * best_hf / mb:.2f}x encoding;"
          f" ids identical: {same} ({len(body)} tokens)")
    os.remove(os.path.join(work, "text.txt")) if os.path.exists(os.path.join(work, "text.txt")) else None
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
