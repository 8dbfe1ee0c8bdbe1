"""lmforge.load / Model.logprobs / Model.generate: bitwise the CLI's (`lmforge score`, `lmforge
generate`), and against an independent reference (transformers' logits of the Hugging Face fixture)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import lmforge
from conftest import FIXTURES, cli, read_safetensors


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def test_load_reports_the_model(tiny_model, tiny_run):
    m = tiny_model
    assert m.device == "cpu"
    assert m.config["n_layer"] == 4 and m.config["vocab_size"] == 256
    assert m.tokenizer.name == "byte"
    assert "step_000030" in m.path
    assert "4 layers" in repr(m)


def test_logprobs_are_bitwise_lmforge_score(tiny_model, tiny_run):
    text = "And God said, Let there be light"
    ids = tiny_model.tokenizer.encode(text)
    out = json.loads(cli("score", "--checkpoint", str(tiny_run), "--prompt", text, "--device", "cpu").stdout)
    assert out["tokens"] == ids
    lp = tiny_model.logprobs(ids)
    assert isinstance(lp, np.ndarray) and lp.dtype == np.float32 and lp.shape == (len(ids) - 1,)
    assert lp.tobytes() == np.array(out["logprobs"], dtype=np.float32).tobytes()
    assert all(v < 0 for v in lp)
    # by token ids on the CLI as well
    out2 = json.loads(cli("score", "--checkpoint", str(tiny_run), "--tokens", ",".join(map(str, ids[:5]))).stdout)
    assert tiny_model.logprobs(ids[:5]).tobytes() == np.array(out2["logprobs"], dtype=np.float32).tobytes()


def test_logprobs_batch_shapes(tiny_model):
    rows = np.array([[65, 110, 100, 32], [71, 111, 100, 32]], dtype=np.int64)
    lp = tiny_model.logprobs(rows)
    assert lp.shape == (2, 3)
    lp_list = tiny_model.logprobs(rows.tolist())
    assert lp_list.tobytes() == lp.tobytes()


def test_logprobs_match_transformers_on_the_hugging_face_fixture():
    ref = read_safetensors(FIXTURES / "hf" / "llama" / "reference.safetensors")
    tokens, logits = ref["tokens"], ref["logits"]  # (B, T) and (B, T, V) from transformers
    m = lmforge.load(FIXTURES / "hf" / "llama", device="cpu")
    got = m.logprobs(tokens)
    want = np.take_along_axis(log_softmax(logits)[:, :-1, :], tokens[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_gguf_file_loads_with_its_tokenizer():
    m = lmforge.load(FIXTURES / "gguf" / "tiny_llama.gguf", device="cpu")
    assert m.config["n_layer"] >= 1
    assert m.tokenizer.vocab_size > 256
    ids = m.tokenizer.encode("hello world")
    assert m.tokenizer.decode(ids) == "hello world"
    c = m.generate("hello", max_tokens=4, temperature=0)
    assert len(c.token_ids) >= 1 and c.finish_reason in ("stop", "length")


def test_greedy_generation_is_bitwise_lmforge_generate(tiny_model, tiny_run):
    prompt = "And God said"
    p = cli("generate", "--checkpoint", str(tiny_run), "--prompt", prompt, "--max-new-tokens", "40",
            "--temperature", "0", "--device", "cpu", text=False)
    cli_text = p.stdout.decode("utf-8", "replace")
    assert cli_text.startswith(prompt) and cli_text.endswith("\n")
    c = tiny_model.generate(prompt, max_tokens=40, temperature=0)
    assert isinstance(c, lmforge.Completion)
    assert c.text == cli_text[len(prompt):-1]
    assert len(c.token_ids) == 40 and c.finish_reason == "length"
    assert len(c.logprobs) == 40 and all(v <= 0 for v in c.logprobs)


def test_sampling_is_keyed_on_the_seed_and_batched(tiny_model):
    a = tiny_model.generate("In the beginning", max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    b = tiny_model.generate("In the beginning", max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert a.token_ids == b.token_ids
    batch = tiny_model.generate(["In the beginning", "Jesus wept", [65, 110, 100]], max_tokens=8, seed=3, top_k=20)
    assert len(batch) == 3 and all(len(c.token_ids) == 8 for c in batch)
    top = tiny_model.generate("And", max_tokens=3, temperature=0, logprobs=4)
    assert len(top.top_logprobs) == 3 and all(len(t) == 4 for t in top.top_logprobs)
    assert top.top_logprobs[0][0][0] == top.token_ids[0]  # greedy takes the most likely token


def test_stop_strings_cut_the_text(tiny_model):
    free = tiny_model.generate("And God said", max_tokens=30, temperature=0)
    stop = free.text[3:5]
    assert stop  # the stop string occurs at position 3 at the latest
    c = tiny_model.generate("And God said", max_tokens=30, temperature=0, stop=[stop])
    assert c.finish_reason == "stop"
    assert c.text == free.text[:free.text.find(stop)]


def test_bad_input_raises_with_the_cli_message(tiny_model, tmp_path):
    m = tiny_model
    with pytest.raises(FileNotFoundError, match="not found"):
        lmforge.load(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    with pytest.raises(ValueError):
        lmforge.load(bad)
    with pytest.raises(ValueError, match="--device"):
        lmforge.load(FIXTURES / "hf" / "llama", device="tpu")
    with pytest.raises(TypeError):
        lmforge.load(42)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        m.logprobs([65])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m.logprobs([65, 999])
    with pytest.raises(ValueError, match="one length"):
        m.logprobs([[65, 66, 67], [65, 66]])
    with pytest.raises(ValueError, match="context"):
        m.logprobs([65] * 500)
    with pytest.raises(TypeError):
        m.logprobs("text")
    with pytest.raises(ValueError, match="top_p"):
        m.generate("x", top_p=2.0)
    with pytest.raises(ValueError, match="temperature"):
        m.generate("x", temperature=-1.0)
    with pytest.raises(TypeError, match="temperature"):
        m.generate("x", temperature="hot")
    with pytest.raises(ValueError, match="max_tokens"):
        m.generate("x", max_tokens=0)
    with pytest.raises(ValueError, match="context length"):
        m.generate("x", max_tokens=10**9)
    with pytest.raises(ValueError, match="stop string is empty"):
        m.generate("x", stop=[""])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m.generate([65, 7000])
    with pytest.raises(ValueError, match="empty"):
        m.generate("")
    with pytest.raises(ValueError, match="logprobs"):
        m.generate("x", logprobs=50)
    with pytest.raises(TypeError):
        m.generate(3.5)
    # values beyond the engine's integer fields, and non-finite floats, are ValueErrors, not crashes
    for kwargs in (dict(top_k=2**40), dict(max_tokens=2**70), dict(temperature=float("nan")),
                   dict(top_p=float("inf")), dict(seed=2**64), dict(top_k=-1)):
        with pytest.raises(ValueError):
            m.generate("x", **kwargs)
    with pytest.raises(ValueError, match="not a token id"):
        m.logprobs([1, 2**40])
    with pytest.raises(ValueError, match="not a token id"):
        m.generate([1, -3])
    with pytest.raises(TypeError, match="integer array"):
        m.logprobs(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="--precision"):
        m.logprobs([1, 2, 3], precision="fp8")
    # the model still works after every refusal
    assert len(m.generate("And", max_tokens=2, temperature=0).token_ids) == 2


def test_batch_invariant_generation_and_logprobs_agree_bitwise(tiny_run):
    """lmforge.load(batch_invariant=True) (docs/BATCH_INVARIANCE.md): a greedy completion is the same
    alone and among other prompts, and its logprobs are bitwise Model.logprobs' of the same tokens."""
    m = lmforge.load(tiny_run, device="cpu", batch_invariant=True, max_seqs=8)
    prompt = "And God said"
    alone = m.generate(prompt, max_tokens=20, temperature=0)
    among = m.generate(["Jesus wept", prompt, "In the beginning was the Word", "A"], max_tokens=20, temperature=0)[1]
    assert among.token_ids == alone.token_ids and among.logprobs == alone.logprobs
    ids = m._prompt_ids(prompt)  # the prompt as generate() feeds it (the tokenizer's BOS, if any, first)
    lp = m.logprobs(ids + alone.token_ids)
    assert [float(v) for v in lp[-20:]] == alone.logprobs
    with pytest.raises(TypeError, match="batch_invariant"):
        lmforge.load(tiny_run, device="cpu", batch_invariant="yes")
