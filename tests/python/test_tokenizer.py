"""lmforge.Tokenizer: the engine's tokenizers from Python, against Hugging Face's ids and the CLI."""
from __future__ import annotations

import pytest

import lmforge
from conftest import FIXTURES, cli

GPT2 = FIXTURES / "tokenizer" / "gpt2.json"


def lines_and_ids():
    """The fixture's lines that are valid UTF-8 (a Python str can hold no other) and their ids."""
    raw = (FIXTURES / "tokenizer" / "lines.txt").read_bytes().split(b"\n")
    ids = [[int(x) for x in row.split()] for row in (FIXTURES / "tokenizer" / "gpt2.ids").read_text().split("\n")]
    pairs = []
    for line, want in zip(raw, ids):
        try:
            pairs.append((line.decode("utf-8"), want))
        except UnicodeDecodeError:
            continue
    return [p[0] for p in pairs], [p[1] for p in pairs]


def test_bpe_ids_equal_hugging_face_tokenizers_one_by_one_and_batched():
    tok = lmforge.Tokenizer(GPT2)
    lines, ids = lines_and_ids()
    assert len(lines) > 100
    assert [tok.encode(line) for line in lines] == ids
    assert tok.encode_batch(lines, threads=3) == ids
    assert tok.decode_batch(ids) == lines


def test_encode_equals_the_cli():
    text = "And God said, Let there be light: and there was light. 1234 héllo"
    out = cli("tokenizer", "encode", "--tokenizer", str(GPT2), "--text", text, text=False).stdout
    cli_ids = [int(x) for x in out.split(b"\n")[0].split()]  # line 1: the ids; line 2: the pieces (bytes)
    assert lmforge.Tokenizer(GPT2).encode(text) == cli_ids


def test_byte_tokenizer_round_trip_and_invalid_utf8():
    tok = lmforge.Tokenizer()
    assert tok.name == "byte" and tok.vocab_size == 256
    text = "In the beginning — ἐν ἀρχῇ 🙂"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([0xC3]) == "\ufffd"  # half a character
    assert tok.token_id("x") is None or isinstance(tok.token_id("x"), int)


def test_bad_input_raises_the_right_exception():
    with pytest.raises(FileNotFoundError, match="nope.json"):
        lmforge.Tokenizer("/nonexistent/nope.json")
    with pytest.raises(ValueError, match="tokenizer"):
        lmforge.Tokenizer("sentencepiece")
    tok = lmforge.Tokenizer()
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(TypeError):
        tok.encode_batch("one string")
    with pytest.raises(TypeError):
        tok.decode(["a"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([300])
    with pytest.raises(ValueError, match="threads"):
        tok.encode_batch(["a"], threads=-1)
