#!/usr/bin/env python3
"""Soak test of `lmforge serve` (the serving issue): many requests over loopback with random prompt
and output lengths, streaming and plain, clients that disconnect mid-stream, and bad requests mixed in.

Checks: the server never dies; every valid request that was not cancelled is answered (200 with the
asked number of tokens, or a stop); every bad request gets 400 with an error object; at the end the KV
block pool is back to full and nothing runs or waits; resident memory is flat (the RSS after the
second half grows by less than --rss-slack-mb over the RSS after the first half).

  python3 tools/soak_serve.py --binary build/lmforge [--requests 2000] [--concurrency 32] [--checkpoint DIR]

Without --checkpoint it trains the tiny preset for a few steps into a temporary directory. Prints a
summary and exits non-zero when a check fails.
"""
import argparse
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def metrics(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    out = {}
    for line in c.getresponse().read().decode().splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


WORDS = "and god said let there be light in the beginning was the word it came to pass".split()


def make_request(rng, i, model, ctx):
    kind = rng.random()
    if kind < 0.08:  # bad requests
        bad = rng.choice([
            "{broken json",
            json.dumps({"model": "nope", "prompt": "x"}),
            json.dumps({"model": model, "prompt": "x", "max_tokens": 0}),
            json.dumps({"model": model, "prompt": "x", "temperature": -2}),
            json.dumps({"model": model, "prompt": "x", "top_p": "high"}),
            json.dumps({"model": model, "prompt": "x" * (ctx + 5)}),
            json.dumps({"model": model, "prompt": [1, 2, 10 ** 9]}),
            json.dumps({"model": model, "prompt": "x", "surprise": True}),
        ])
        return "bad", bad, 0
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))[: ctx // 2]
    max_tokens = rng.randint(1, min(48, ctx - len(prompt.encode())))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": rng.choice([0, 0.7, 1.0]),
            "seed": i, "stream": rng.random() < 0.5}
    if rng.random() < 0.1:
        body["stop"] = [rng.choice(["e", "th", "\n"])]
    if rng.random() < 0.1:
        body["logprobs"] = rng.randint(0, 3)
    cancel = body["stream"] and rng.random() < 0.15
    return ("cancel" if cancel else "valid"), json.dumps(body), max_tokens


def run_one(port, kind, body, max_tokens, rng_seed):
    rng = random.Random(rng_seed)
    if kind == "cancel":  # read a few events, then hang up
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        data = body.encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        want, got = rng.randint(0, 3), b""
        while got.count(b"data:") < want:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        s.close()
        return None
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    text = r.read().decode("utf-8", "replace")
    if kind == "bad":
        if r.status != 400 or "error" not in json.loads(text):
            return f"bad request got {r.status}: {text[:200]}"
        return None
    if r.status != 200:
        return f"valid request got {r.status}: {text[:200]}"
    req = json.loads(body)
    if req["stream"]:
        events = [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return "stream did not end with [DONE]"
        reason = json.loads(events[-2])["choices"][0]["finish_reason"]
        n = sum(1 for e in events[:-1] if json.loads(e)["choices"][0]["finish_reason"] is None)
    else:
        j = json.loads(text)
        reason, n = j["choices"][0]["finish_reason"], j["usage"]["completion_tokens"]
    if reason == "length" and n != max_tokens:
        return f"finish_reason length after {n} of {max_tokens} tokens"
    if reason not in ("length", "stop"):
        return f"finish_reason {reason}"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="build/lmforge")
    ap.add_argument("--checkpoint")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rss-slack-mb", type=float, default=16.0)
    ap.add_argument("--server-flags", default="--max-seqs 16 --max-prefill-tokens 128 --kv-cache-gb 0.001",
                    help="extra flags for lmforge serve (the default pool is small: preemptions happen)")
    a = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    ckpt = a.checkpoint
    if not ckpt:
        ckpt = os.path.join(tmp.name, "soak")
        subprocess.run([a.binary, "train", "--preset", "tiny", "--steps", "3", "--out-dir", ckpt], check=True,
                       stdout=subprocess.DEVNULL)
    proc = subprocess.Popen([a.binary, "serve", "--checkpoint", ckpt, "--port", "0", "--model-name", "soak",
                             *a.server_flags.split()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    m = re.search(r":(\d+)", proc.stdout.readline())
    if not m:
        sys.exit("server did not start: " + proc.stderr.read())
    port = int(m.group(1))
    ctx = json.loads(urlopen_models(port))["data"][0]["max_model_len"]

    rng = random.Random(a.seed)
    jobs = [make_request(rng, i, "soak", ctx) for i in range(a.requests)]
    failures, counts, lock = [], {"valid": 0, "cancel": 0, "bad": 0}, threading.Lock()
    next_job = [0]
    rss = {}
    t0 = time.time()

    def worker():
        while True:
            with lock:
                i = next_job[0]
                if i >= len(jobs):
                    return
                next_job[0] += 1
                if i == len(jobs) // 2:
                    rss["half"] = rss_mb(proc.pid)
            kind, body, mt = jobs[i]
            try:
                err = run_one(port, kind, body, mt, a.seed * 100003 + i)
            except Exception as e:  # noqa: BLE001 - a failed request is a finding
                err = f"{kind} request raised {e!r}"
            with lock:
                counts[kind] += 1
                if err:
                    failures.append(f"request {i}: {err}")
                if (i + 1) % 250 == 0:
                    print(f"  {i + 1}/{len(jobs)} requests, {len(failures)} failures, {time.time() - t0:.0f} s",
                          flush=True)

    threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    alive = proc.poll() is None
    deadline = time.time() + 30
    final = {}
    while alive and time.time() < deadline:
        final = metrics(port)
        if final["lmforge_requests_running"] == 0 and final["lmforge_requests_waiting"] == 0 and \
                final["lmforge_kv_blocks_used"] == 0:
            break
        time.sleep(0.2)
    rss["end"] = rss_mb(proc.pid) if alive else 0
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)

    checks = {
        "server alive through the soak": alive,
        "every request answered as expected": not failures,
        "KV pool back to full": final.get("lmforge_kv_blocks_used", -1) == 0,
        "nothing running or waiting": final.get("lmforge_requests_running", -1) == 0 and
                                      final.get("lmforge_requests_waiting", -1) == 0,
        f"RSS flat (second half grew < {a.rss_slack_mb} MiB)": rss.get("end", 1e9) - rss.get("half", 0) < a.rss_slack_mb,
        "clean exit on SIGTERM": code == 0,
    }
    print(f"soak: {a.requests} requests ({counts['valid']} valid, {counts['cancel']} cancelled mid-stream, "
          f"{counts['bad']} bad) in {elapsed:.1f} s at concurrency {a.concurrency}")
    print(f"      generated {final.get('lmforge_generation_tokens_total', 0):.0f} tokens, "
          f"{final.get('lmforge_preemptions_total', 0):.0f} preemptions, "
          f"{final.get('lmforge_kv_blocks_total', 0):.0f} KV blocks; RSS {rss.get('half', 0):.1f} MiB at half, "
          f"{rss.get('end', 0):.1f} MiB at the end")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    for f in failures[:20]:
        print("   ", f)
    sys.exit(0 if all(checks.values()) else 1)


def urlopen_models(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/v1/models")
    return c.getresponse().read()


if __name__ == "__main__":
    main()
