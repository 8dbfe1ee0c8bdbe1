"""The Python package on the GPU (tools/gpu_check.sh runs these; skipped without one): logprobs as a
torch tensor on the device through DLPack, and logprobs, greedy generation and a training run bitwise
the CLI's on the GPU."""
from __future__ import annotations

import json

import numpy as np
import pytest

import lmforge
from conftest import cli, metrics

pytestmark = pytest.mark.skipif(not lmforge.cuda_available(), reason="no GPU (or a build without CUDA)")

KEYS = ("step", "loss", "val_loss", "grad_norm")


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "run"
    cli("train", "--preset", "tiny", "--steps", "20", "-B", "8", "-T", "64", "--log-every", "5", "--device", "cuda",
        "--out-dir", str(out))
    return out


def test_logprobs_on_the_device_are_a_torch_tensor_bitwise_lmforge_score(gpu_run):
    torch = pytest.importorskip("torch")
    m = lmforge.load(gpu_run, device="cuda")
    assert m.device == "cuda"
    text = "And God said, Let there be light"
    ids = m.tokenizer.encode(text)
    lp = m.logprobs(ids)
    assert isinstance(lp, torch.Tensor) and lp.is_cuda and lp.dtype == torch.float32 and lp.shape == (len(ids) - 1,)
    out = json.loads(cli("score", "--checkpoint", str(gpu_run), "--prompt", text, "--device", "cuda").stdout)
    assert out["device"] == "cuda"
    assert lp.cpu().numpy().tobytes() == np.array(out["logprobs"], dtype=np.float32).tobytes()
    batch = m.logprobs([ids, ids])
    assert batch.shape == (2, len(ids) - 1) and batch.is_cuda
    # the fp32 path on the GPU agrees with the CPU's within fp32 error (bf16 is the default)
    cpu = lmforge.load(gpu_run, device="cpu").logprobs(ids)
    np.testing.assert_allclose(m.logprobs(ids, precision="fp32").cpu().numpy(), cpu, rtol=0, atol=1e-4)


def test_greedy_generation_on_the_gpu_is_bitwise_lmforge_generate(gpu_run):
    m = lmforge.load(gpu_run, device="cuda")
    prompt = "And God said"
    p = cli("generate", "--checkpoint", str(gpu_run), "--prompt", prompt, "--max-new-tokens", "40",
            "--temperature", "0", "--device", "cuda", text=False)
    cli_text = p.stdout.decode("utf-8", "replace")
    c = m.generate(prompt, max_tokens=40, temperature=0)
    assert c.text == cli_text[len(prompt):-1]
    many = m.generate([prompt, "Jesus wept", "In the beginning"], max_tokens=16, temperature=0.7, seed=5)
    assert [len(x.token_ids) for x in many] == [16, 16, 16]


def test_batch_invariant_generation_on_the_gpu_is_bitwise_the_trainers_logprobs(gpu_run):
    """--batch-invariant on the GPU (docs/BATCH_INVARIANCE.md): a greedy completion alone and among other
    prompts is the same, and its logprobs are bitwise Model.logprobs' (the trainer's forward + loss)."""
    m = lmforge.load(gpu_run, device="cuda", batch_invariant=True, max_seqs=8)
    prompt = "And God said"
    alone = m.generate(prompt, max_tokens=24, temperature=0)
    among = m.generate(["Jesus wept", prompt, "In the beginning was the Word", "A", "And"], max_tokens=24,
                       temperature=0)[1]
    assert among.token_ids == alone.token_ids and among.logprobs == alone.logprobs
    lp = m.logprobs(m._prompt_ids(prompt) + alone.token_ids)
    lp = lp.cpu().numpy() if hasattr(lp, "cpu") else np.asarray(lp)
    assert np.array(alone.logprobs, dtype=np.float32).tobytes() == lp[-24:].astype(np.float32).tobytes()


def test_gpu_training_is_bitwise_the_cli_run(tmp_path):
    a, b = tmp_path / "cli", tmp_path / "py"
    flags = ["--steps", "12", "-B", "8", "-T", "64", "--log-every", "1", "--eval-every", "6", "--device", "cuda"]
    cli("train", "--preset", "tiny", *flags, "--out-dir", str(a))
    run = lmforge.train("tiny", steps=12, batch_size=8, seq_len=64, log_every=1, eval_every=6, device="cuda",
                        out_dir=b, verbose=False).wait()
    want = [{k: r[k] for k in KEYS if k in r} for r in metrics(a / "metrics.jsonl")]
    assert [{k: r[k] for k in KEYS if k in r} for r in run.metrics] == want
    wa = (a / "checkpoints" / "step_000012" / "model.safetensors").read_bytes()
    assert wa == (b / "checkpoints" / "step_000012" / "model.safetensors").read_bytes()
