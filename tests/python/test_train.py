"""lmforge.train: the CLI's training run from Python (bitwise the same losses and weights), metrics
while it trains, save/resume, stop, Ctrl-C, and errors with the CLI's messages."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lmforge
from conftest import cli, metrics
from lmforge._cli import binary

SMALL = dict(batch_size=4, seq_len=32, device="cpu")
SMALL_FLAGS = ["-B", "4", "-T", "32", "--device", "cpu"]
KEYS = ("step", "loss", "val_loss", "lr", "grad_norm")


def numbers(records):
    return [{k: r[k] for k in KEYS if k in r} for r in records]


def test_losses_and_weights_are_bitwise_the_cli_run(tmp_path):
    a, b = tmp_path / "cli", tmp_path / "py"
    cli("train", "--preset", "tiny", "--steps", "8", "--log-every", "1", "--eval-every", "4", "--eval-batches", "2",
        *SMALL_FLAGS, "--out-dir", str(a))
    run = lmforge.train("tiny", steps=8, log_every=1, eval_every=4, eval_batches=2, out_dir=str(b), verbose=False,
                        **SMALL)
    seen = [r for r in run]  # the records, while it trains
    assert run.done and run.step == 8 and not run.stopped_early
    assert numbers(seen) == numbers(metrics(a / "metrics.jsonl"))
    assert numbers(seen) == numbers(metrics(b / "metrics.jsonl"))
    assert sum("loss" in r for r in seen) == 8 and sum("val_loss" in r for r in seen) == 3  # steps 0, 4, 8
    assert len(run.losses) == 8
    wa = (a / "checkpoints" / "step_000008" / "model.safetensors").read_bytes()
    wb = (b / "checkpoints" / "step_000008" / "model.safetensors").read_bytes()
    assert wa == wb
    # the trained model loads and scores like any checkpoint
    m = lmforge.load(b, device="cpu")
    assert m.logprobs([65, 110, 100]).shape == (2,)


def test_resume_continues_bitwise(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    lmforge.train("tiny", steps=6, log_every=1, out_dir=full, verbose=False, **SMALL).wait()
    lmforge.train("tiny", steps=6, log_every=1, checkpoint_every=3, out_dir=part, verbose=False, **SMALL).wait()
    resumed = lmforge.train(resume=str(part / "checkpoints" / "step_000003"), out_dir=tmp_path / "resumed",
                            verbose=False).wait()
    assert resumed.step == 6
    assert resumed.options["batch_size"] == 4  # the run's settings come from its state.json
    want = [r["loss"] for r in metrics(full / "metrics.jsonl") if "loss" in r and r["step"] > 3]
    assert [r["loss"] for r in resumed.metrics if "loss" in r] == want


def test_stop_and_save_at_step_boundaries(tmp_path):
    run = lmforge.train("tiny", steps=50, log_every=1, out_dir=tmp_path / "r", verbose=False, **SMALL)
    first = next(run)  # step 0's validation loss: the run waits here until the next record is taken
    assert first["step"] == 0 and "val_loss" in first
    assert next(run)["step"] == 1
    saved = run.save()  # at the end of step 1
    assert saved.endswith("step_000001") and os.path.isdir(saved)
    run.stop()
    run.wait()
    assert run.stopped_early and run.step == 2  # step 2 was already on its way when stop() came
    assert (tmp_path / "r" / "checkpoints" / "step_000002" / "model.safetensors").exists()
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text().strip() == "step_000002"


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import signal, lmforge
        run = lmforge.train("tiny", steps=100000, log_every=1, out_dir={str(out)!r}, verbose=False,
                            batch_size=4, seq_len=32, device="cpu")
        try:
            with run:
                for rec in run:
                    if rec.get("step") == 3:
                        signal.raise_signal(signal.SIGINT)  # as Ctrl-C, wherever the interpreter is
        except KeyboardInterrupt:
            print("interrupted", run.step, run.last_checkpoint, flush=True)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    words = p.stdout.split()
    assert words[0] == "interrupted"
    step = int(words[1])
    assert 3 <= step < 100000
    assert words[2].endswith(f"step_{step:06d}")
    assert (out / "checkpoints" / f"step_{step:06d}" / "model.safetensors").exists()
    # and the run resumes from there
    resumed = lmforge.train(resume=str(out), steps=step + 2, verbose=False).wait()
    assert resumed.step == step + 2


def test_cli_train_stops_on_sigint_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([binary(), "train", "--preset", "tiny", "--steps", "100000", "--log-every", "1",
                          *SMALL_FLAGS, "--out-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    for line in p.stdout:
        if line.startswith("step=2 "):
            p.send_signal(signal.SIGINT)
            break
    rest = p.stdout.read()
    assert p.wait(timeout=600) == 130
    stopped = [l for l in rest.splitlines() if l.startswith("stopped at step ")]
    assert stopped, rest
    step = int(stopped[0].split()[3])
    assert (out / "checkpoints" / f"step_{step:06d}" / "model.safetensors").exists()


def test_bad_input_raises_with_the_cli_message(tmp_path):
    with pytest.raises(TypeError, match="did you mean 'steps'"):
        lmforge.train("tiny", stpes=10)
    with pytest.raises(TypeError, match="steps must be an int"):
        lmforge.train("tiny", steps=2.5)
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        lmforge.train("tiny", overwrite=1)
    with pytest.raises(ValueError, match="--steps"):
        lmforge.train("tiny", steps=-1, out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="steps=9223372036854775808 is out of range"):
        lmforge.train("tiny", steps=2**63, out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="--batch-size"):
        lmforge.train("tiny", batch_size=10**12, out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="--device"):
        lmforge.train("tiny", device="tpu", out_dir=tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        lmforge.train(resume=str(tmp_path / "no_run"))
    with pytest.raises(ValueError, match="lr=inf is not a finite number"):
        lmforge.train("tiny", lr=float("inf"), out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="--lr"):
        lmforge.train("tiny", lr=-1.0, out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="neither a preset"):
        lmforge.train("tinyy", out_dir=tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no data shard matches"):
        lmforge.train("tiny", data="/nonexistent/*.bin", out_dir=tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="model config"):
        lmforge.train(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="exclude each other"):
        lmforge.train(resume="x", init_from="y")
    with pytest.raises(ValueError, match="n_head"):
        lmforge.train({"n_layer": 2, "d_model": 30, "n_head": 4, "vocab_size": 256, "context_length": 32},
                      out_dir=tmp_path / "a")
    # an out-dir holding a run is never clobbered without overwrite
    lmforge.train("tiny", steps=1, out_dir=tmp_path / "done", verbose=False, **SMALL).wait()
    with pytest.raises(ValueError, match="overwrite"):
        lmforge.train("tiny", steps=1, out_dir=tmp_path / "done", verbose=False, **SMALL)
    lmforge.train("tiny", steps=1, out_dir=tmp_path / "done", overwrite=True, verbose=False, **SMALL).wait()


def test_a_config_dict_trains(tmp_path):
    cfg = lmforge._core.config_preset("tiny")
    import json
    d = json.loads(cfg)
    d["n_layer"] = 1
    run = lmforge.train(d, steps=2, out_dir=tmp_path / "d", verbose=False, **SMALL).wait()
    assert run.step == 2
    assert lmforge.load(tmp_path / "d", device="cpu").config["n_layer"] == 1
