#!/usr/bin/env python3
"""Crash consistency of a training run's out-dir (issue 24), against the real binary.

    python3 tools/crash_test.py [--binary build/lmforge] [--random-kills 100] [--seed 1] [--work DIR]

A reference run (tiny preset, 12 steps, a checkpoint every 2 steps, validation every 4) gives the losses
and the final weights. Then, each on a fresh out-dir:
  1. a SIGKILL at every fault point of the run (LMF_FAULT=kill@N: every write and every rename of the
     checkpoints, `latest` and metrics.jsonl), then --random-kills SIGKILLs at random moments
     (timeout -s KILL after a random delay);
  2. a full disk at every fault point (LMF_FAULT=enospc@N): the run must stop with one error line.
After each: `latest` (if any) must name a complete checkpoint that loads (lmforge generate), and
`lmforge train --resume OUT` with no other flag (or the first command with --overwrite when no checkpoint
was saved yet) must finish the run with every logged loss and the final model.safetensors bitwise the
reference's. Prints one line per case and a summary; exits non-zero on the first inconsistency.
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

FLAGS = ["train", "--preset", "tiny", "-B", "2", "-T", "16", "--steps", "12", "--checkpoint-every", "2",
         "--eval-every", "4", "--eval-batches", "1", "--log-every", "1"]
CKPT_FILES = ["model.safetensors", "optimizer.safetensors", "config.json", "state.json"]


def run(binary, args, env=None, timeout_s=None):
    e = dict(os.environ)
    e.pop("LMF_FAULT", None)
    if env:
        e.update(env)
    cmd = [binary] + args
    if timeout_s is not None:
        cmd = ["timeout", "-s", "KILL", "%.3f" % timeout_s] + cmd
    p = subprocess.run(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p.returncode, p.stdout, p.stderr


def losses(out):
    recs = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            for k in ("loss", "val_loss"):
                if k in r:
                    recs.append((r["step"], k, r[k]))
    return recs


def final_model(out):
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        name = f.read().strip()
    with open(os.path.join(out, "checkpoints", name, "model.safetensors"), "rb") as f:
        return name, hashlib.sha256(f.read()).hexdigest()


class Inconsistent(Exception):
    pass


def check_latest(binary, out, what):
    latest = os.path.join(out, "checkpoints", "latest")
    if not os.path.exists(latest):
        return None
    name = open(latest).read().strip()
    d = os.path.join(out, "checkpoints", name)
    missing = [f for f in CKPT_FILES if not os.path.exists(os.path.join(d, f))]
    if missing:
        raise Inconsistent("%s: latest names %s, which lacks %s" % (what, name, missing))
    rc, _, err = run(binary, ["generate", "--checkpoint", out, "-n", "2"])
    if rc != 0:
        raise Inconsistent("%s: latest names %s, which does not load: %s" % (what, name, err.strip()))
    return name


def finish_and_compare(binary, out, ref, what):
    name = check_latest(binary, out, what)
    if name is None:  # killed before the first checkpoint: the run starts again
        rc, _, err = run(binary, FLAGS + ["--out-dir", out, "--overwrite"])
    else:
        rc, _, err = run(binary, ["train", "--resume", out])
    if rc != 0:
        raise Inconsistent("%s: finishing the run failed: %s" % (what, err.strip()))
    got = losses(out)
    if got != ref["losses"]:
        raise Inconsistent("%s: logged losses differ from the reference:\n  %s\n  %s" % (what, got, ref["losses"]))
    if final_model(out) != ref["model"]:
        raise Inconsistent("%s: the final checkpoint differs from the reference" % what)
    return name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="build/lmforge")
    ap.add_argument("--random-kills", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="lmf_crash_")
    rnd = random.Random(a.seed)

    ref_dir = os.path.join(work, "ref")
    shutil.rmtree(ref_dir, ignore_errors=True)
    rc, _, err = run(a.binary, FLAGS + ["--out-dir", ref_dir])
    if rc != 0:
        sys.exit("reference run failed: " + err)
    ref = {"losses": losses(ref_dir), "model": final_model(ref_dir)}
    print("reference: %d logged losses, final %s" % (len(ref["losses"]), ref["model"][0]), flush=True)

    kills = resumed = disk_full = 0
    # 1a. a kill at every fault point, until a run gets past the last one
    n = 0
    points = None
    while True:
        n += 1
        out = os.path.join(work, "kill_%d" % n)
        shutil.rmtree(out, ignore_errors=True)
        rc, _, err = run(a.binary, FLAGS + ["--out-dir", out], env={"LMF_FAULT": "kill@%d" % n})
        if rc == 0:
            points = n - 1
            shutil.rmtree(out, ignore_errors=True)
            break
        if rc != -9 and rc != 137:
            raise Inconsistent("kill@%d: expected SIGKILL, got exit %d: %s" % (n, rc, err.strip()))
        kills += 1
        name = finish_and_compare(a.binary, out, ref, "kill@%d" % n)
        resumed += name is not None
        print("kill at fault point %3d: latest=%s -> resumed, same losses and weights" % (n, name), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print("%d fault points in a run (every write and rename)" % points, flush=True)

    # 1b. kills at random moments
    i = 0
    while kills < points + a.random_kills:
        i += 1
        out = os.path.join(work, "random_%d" % i)
        shutil.rmtree(out, ignore_errors=True)
        delay = rnd.uniform(0.05, 2.5)
        rc, _, err = run(a.binary, FLAGS + ["--out-dir", out], timeout_s=delay)
        if rc == 0:
            shutil.rmtree(out, ignore_errors=True)
            continue  # finished before the kill
        if rc != 137 and rc != -9:
            raise Inconsistent("random kill after %.3f s: exit %d: %s" % (delay, rc, err.strip()))
        kills += 1
        name = finish_and_compare(a.binary, out, ref, "kill after %.3f s" % delay)
        resumed += name is not None
        print("kill after %.3f s: latest=%s -> resumed, same losses and weights" % (delay, name), flush=True)
        shutil.rmtree(out, ignore_errors=True)

    # 2. a full disk at every fault point
    for n in range(1, points + 1):
        out = os.path.join(work, "enospc_%d" % n)
        shutil.rmtree(out, ignore_errors=True)
        rc, _, err = run(a.binary, FLAGS + ["--out-dir", out], env={"LMF_FAULT": "enospc@%d" % n})
        lines = err.strip().splitlines()
        if rc == 0 or not lines or "No space left on device" not in lines[-1]:
            raise Inconsistent("enospc@%d: expected a failed write, got exit %d: %s" % (n, rc, err.strip()))
        disk_full += 1
        name = finish_and_compare(a.binary, out, ref, "enospc@%d" % n)
        print("disk full at fault point %3d: '%s' -> latest=%s -> resumed, same losses and weights"
              % (n, lines[-1][:90], name), flush=True)
        shutil.rmtree(out, ignore_errors=True)

    print("OK: %d kills (%d at fault points, %d at random moments) and %d full disks; latest always named a "
          "complete checkpoint; %d resumes and %d restarts all ended bitwise equal to the reference"
          % (kills, points, kills - points, disk_full, resumed, kills + disk_full - resumed))
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except Inconsistent as e:
        sys.exit("INCONSISTENT: %s" % e)
