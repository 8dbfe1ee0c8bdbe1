#!/usr/bin/env python3
"""tools/bi_serve_check.py: batch invariance through `lmforge serve` (docs/BATCH_INVARIANCE.md).

For each mode (default, --batch-invariant) it starts `lmforge serve` on a checkpoint and sends one
prompt N times at temperature 0 (with logprobs), each probe together with a random mix of other
concurrent requests (random prompts, lengths, temperatures, seeds and start times), then counts the
distinct outputs (texts, and token logprob sequences). In every mode it also scores one probe's text
with `lmforge score` (the trainer's forward + loss, with --batch-invariant in that mode) and
compares the completion's logprobs with the server's, bit for bit (JSON numbers round-trip floats).

    tools/bi_serve_check.py --lmforge build-gpu/lmforge --checkpoint RUN [--probes 1000] [--device cuda]

Prints a table; exits 1 when the batch-invariant mode gives more than one distinct output or its
server logprobs differ from the trainer's.
"""
import argparse
import concurrent.futures as cf
import json
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request

PROMPT = "And God said"
WORDS = ("the and of to in that he shall unto for his i a lord they be is him not them it with all thou "
         "thy was god which my me said but ye their have will").split()


def post(port, body, timeout=300):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        sys.exit(f"bi_serve_check: HTTP {e.code} for {json.dumps(body)}: {e.read().decode(errors='replace')}")


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return json.loads(r.read())


class Server:
    def __init__(self, args, bi, port, log):
        cmd = [args.lmforge, "serve", "--device", args.device, "--checkpoint", args.checkpoint, "--port", str(port),
               "--max-seqs", str(args.max_seqs)] + (["--batch-invariant"] if bi else [])
        self.port = port
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        t0 = time.time()
        for line in self.p.stdout:
            if "listening" in line:
                break
            if time.time() - t0 > 300:
                break
        if self.p.poll() is not None:
            sys.exit(f"bi_serve_check: lmforge serve exited ({self.p.returncode}); see its log")
        self.model = get(port, "/v1/models")["data"][0]

    def stop(self):
        self.p.terminate()
        self.p.wait(timeout=120)


def probe_body(model, max_tokens):
    return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1}


def other_body(model, rng, ctx):
    """A random request that fits a context of ctx tokens (at most ~8 bytes a word: byte tokenizers too)."""
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max(1, min(60, ctx // 16)))))
    return {"model": model, "prompt": words, "max_tokens": rng.randint(1, max(1, min(96, ctx // 3))),
            "temperature": 1.0, "seed": rng.randint(0, 2**31 - 1)}


def run_probes(server, n, max_tokens, seed):
    """n probes in rounds: up to 8 probes and 0..24 others a round, shuffled, with random start delays."""
    rng = random.Random(seed)
    model = server.model["id"]
    outs = []
    with cf.ThreadPoolExecutor(max_workers=40) as pool:
        while len(outs) < n:
            jobs = [("probe", probe_body(model, max_tokens)) for _ in range(min(8, n - len(outs)))]
            ctx = server.model.get("max_model_len", 128)
            jobs += [("other", other_body(model, rng, ctx)) for _ in range(rng.randint(0, 24))]
            rng.shuffle(jobs)
            delays = [rng.random() * 0.02 for _ in jobs]

            def send(job, delay):
                time.sleep(delay)
                return job[0], post(server.port, job[1])

            for kind, r in [f.result() for f in [pool.submit(send, j, d) for j, d in zip(jobs, delays)]]:
                if kind == "probe":
                    ch = r["choices"][0]
                    outs.append((ch["text"], tuple(ch["logprobs"]["token_logprobs"])))
    return outs


def trainer_logprobs(args, bi, text):
    """The trainer's logprobs of PROMPT + text (lmforge score), all positions."""
    cmd = [args.lmforge, "score", "--device", args.device, "--checkpoint", args.checkpoint, "--prompt",
           PROMPT + text] + (["--batch-invariant"] if bi else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bi_serve_check: lmforge score failed: {r.stderr.strip()}")
    return json.loads(r.stdout)["logprobs"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lmforge", default="build/lmforge")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--probes", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--port", type=int, default=8790)
    ap.add_argument("--modes", default="default,batch-invariant")
    ap.add_argument("--log", default="bi_serve_check.log")
    args = ap.parse_args()
    rows, bad = [], 0
    with open(args.log, "w") as log:
        for i, mode in enumerate(args.modes.split(",")):
            bi = mode == "batch-invariant"
            t0 = time.time()
            srv = Server(args, bi, args.port + i, log)
            try:
                assert srv.model.get("batch_invariant") == bi, f"/v1/models says {srv.model}"
                outs = run_probes(srv, args.probes, args.max_tokens, seed=17 + i)
            finally:
                srv.stop()
            texts = {o[0] for o in outs}
            lps = {o[1] for o in outs}
            # the trainer's forward on the most common output: its completion's logprobs vs the server's
            text, lp = max(((o, sum(1 for x in outs if x == o)) for o in set(outs)), key=lambda t: t[1])[0]
            if "\ufffd" in text:  # bytes that are not UTF-8: the text does not give back the token ids
                equal, worst = None, float("nan")
            else:
                full = trainer_logprobs(args, bi, text)
                tail = full[-len(lp):] if lp else []
                equal = len(tail) == len(lp) and all(a == b for a, b in zip(tail, lp))
                worst = max((abs(a - b) for a, b in zip(tail, lp)), default=0.0)
            rows.append((mode, len(outs), len(texts), len(lps), equal, worst, time.time() - t0))
            if bi and (len(texts) != 1 or len(lps) != 1 or equal is False):
                bad += 1
    print(f"checkpoint {args.checkpoint}, prompt {PROMPT!r}, max_tokens {args.max_tokens}, device {args.device}")
    print("| mode | probes | distinct outputs | distinct logprob sequences | trainer = server (bitwise) | worst abs diff | s |")
    print("|---|---|---|---|---|---|---|")
    for m, n, t, l, e, w, s in rows:
        eq = "n/a (output not UTF-8)" if e is None else "yes" if e else "no"
        print(f"| {m} | {n} | {t} | {l} | {eq} | {w:.3g} | {s:.0f} |")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
