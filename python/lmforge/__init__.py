"""lmforge from Python: load, score, generate and train with the same C++ engine as the CLI.

>>> import lmforge
>>> tok = lmforge.Tokenizer("byte")
>>> tok.decode(tok.encode("In the beginning"))
'In the beginning'

The API (docs/PYTHON.md):

- :func:`load` a model (an lmforge checkpoint or training out-dir, a Hugging Face directory, a GGUF
  file) -> :class:`Model` with ``.config``, ``.tokenizer``, ``.logprobs()`` and ``.generate()``;
- :class:`Tokenizer` (byte-level BPE from a tokenizer.json, or bytes);
- :func:`train` -> :class:`Run`, which yields the metrics records while it trains.

Errors are ``ValueError`` (bad input), ``FileNotFoundError`` (a missing path), ``TypeError`` (an
argument of the wrong type) or ``RuntimeError`` (a failure inside the engine), each with the one-line
message the CLI prints.
"""
from __future__ import annotations

import difflib
import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core

__version__: str = _core.__version__

__all__ = [
    "Completion",
    "Model",
    "Run",
    "Tokenizer",
    "cuda_available",
    "load",
    "presets",
    "train",
]

PathLike = Union[str, "os.PathLike[str]"]
TokenIds = Union[Sequence[int], np.ndarray]
Prompt = Union[str, TokenIds]


def cuda_available() -> bool:
    """True when this build has the CUDA backend and a GPU is visible."""
    return _core.cuda_built() and _core.cuda_device_count() > 0


def presets() -> List[str]:
    """The names of the bundled model presets (``lmforge train --preset``)."""
    return list(_core.config_preset_names())


def _type_error(func: str, name: str, want: str, value: Any) -> TypeError:
    return TypeError(f"{func}(): {name} must be {want}, not {type(value).__name__}")


def _int(func: str, name: str, value: Any, bits: int = 64) -> int:
    """An int that fits the engine's signed `bits`-bit field (ValueError naming it otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _type_error(func, name, "an int", value)
    v = int(value)
    if not -(2 ** (bits - 1)) <= v < 2 ** (bits - 1):
        raise ValueError(f"{func}(): {name}={v} is out of range (a {bits}-bit integer)")
    return v


def _float(func: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _type_error(func, name, "a number", value)
    return float(value)


def _path(func: str, name: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise _type_error(func, name, "a path (str or os.PathLike)", value)
    return os.fspath(value)


def _ids(func: str, name: str, value: Any) -> List[int]:
    """A sequence of token ids (list, tuple or 1-D integer array) as a list of int."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
            raise TypeError(f"{func}(): {name} must be a 1-D integer array, not {value.ndim}-D {value.dtype}")
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise _type_error(func, name, "a sequence of token ids", value)
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{func}(): {name} must hold token ids (int), found {type(v).__name__}")
        if not 0 <= int(v) < 2**31:
            raise ValueError(f"{func}(): {name}: {int(v)} is not a token id (outside [0, 2^31))")
        out.append(int(v))
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A tokenizer: ``"byte"`` (one token per byte) or a Hugging Face ``tokenizer.json`` (byte-level
    BPE). Encoding and decoding are exact: ``decode(encode(text)) == text`` for any text."""

    def __init__(self, name_or_path: PathLike = "byte") -> None:
        self._t = _core.Tokenizer(_path("Tokenizer", "name_or_path", name_or_path))

    @classmethod
    def _wrap(cls, core: "_core.Tokenizer") -> "Tokenizer":
        t = cls.__new__(cls)
        t._t = core
        return t

    @property
    def name(self) -> str:
        return self._t.name

    @property
    def vocab_size(self) -> int:
        return self._t.vocab_size

    def encode(self, text: str) -> List[int]:
        """The token ids of ``text`` (no special tokens added)."""
        if not isinstance(text, str):
            raise _type_error("encode", "text", "a str", text)
        return self._t.encode(text)

    def encode_batch(self, texts: Sequence[str], threads: int = 0) -> List[List[int]]:
        """``encode`` of each text, on ``threads`` threads (0: one per core)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise _type_error("encode_batch", "texts", "a sequence of str", texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch(): texts must hold str, found {type(t).__name__}")
        return self._t.encode_batch(list(texts), _int("encode_batch", "threads", threads, bits=32))

    def decode(self, ids: TokenIds) -> str:
        """The text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        return self._t.decode(_ids("decode", "ids", ids))

    def decode_batch(self, batch: Sequence[TokenIds]) -> List[str]:
        return [self.decode(ids) for ids in batch]

    def token_id(self, text: str) -> Optional[int]:
        """The id of a token written as ``text`` (e.g. ``"<|endoftext|>"``), or None."""
        i = self._t.token_id(text)
        return None if i < 0 else i

    @property
    def end_tokens(self) -> List[int]:
        """Tokens that end a generation (end-of-text, end-of-turn)."""
        return self._t.end_tokens()

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class Completion:
    """One prompt's generation."""

    text: str  #: the generated text, cut before the first stop string
    token_ids: List[int]  #: the generated tokens (an end token that stopped it included)
    logprobs: List[float]  #: log-probability of each generated token
    finish_reason: str  #: "stop" (an end token or a stop string) or "length" (max_tokens)
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None  #: with ``logprobs=N``: N best per token


class Model:
    """A model loaded on a device by :func:`load`."""

    def __init__(self, core: "_core.Model") -> None:
        self._m = core
        self._config: Dict[str, Any] = json.loads(core.config_json)
        self._tokenizer = Tokenizer._wrap(core.tokenizer())

    @property
    def path(self) -> str:
        """What was loaded (a checkpoint directory, a Hugging Face directory, a GGUF file)."""
        return self._m.path

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda"``."""
        return self._m.device

    @property
    def config(self) -> Dict[str, Any]:
        """The model config (docs/MODEL.md), as a dict (a copy)."""
        return json.loads(json.dumps(self._config))

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's own tokenizer (its tokenizer.json), else the byte tokenizer."""
        return self._tokenizer

    @property
    def chat_template(self) -> Optional[str]:
        return self._m.chat_template or None

    def logprobs(self, token_ids: Union[TokenIds, Sequence[TokenIds]], *, precision: str = "auto") -> Any:
        """Log-probability of each token given the ones before it, computed as training computes its
        loss (bitwise ``lmforge score``'s values and the trainer's).

        ``token_ids``: one sequence of n >= 2 ids -> an array of n - 1 values, value ``i`` being
        ``log p(token_ids[i + 1] | token_ids[:i + 1])``; or B sequences of one length n (a list of lists
        or a 2-D array) -> a (B, n - 1) array. A NumPy float32 array on the CPU; on the GPU a torch
        tensor on the device (through DLPack, no copy) when PyTorch is installed, else NumPy.
        """
        if not isinstance(precision, str):
            raise _type_error("logprobs", "precision", "a str", precision)
        if isinstance(token_ids, np.ndarray) and token_ids.ndim == 2:
            rows = [_ids("logprobs", "token_ids", r) for r in token_ids]
            single = False
        elif (isinstance(token_ids, Sequence) and not isinstance(token_ids, (str, bytes)) and len(token_ids) > 0
              and not isinstance(token_ids[0], (int, np.integer))):
            rows = [_ids("logprobs", "token_ids", r) for r in token_ids]
            single = False
        else:
            rows = [_ids("logprobs", "token_ids", token_ids)]
            single = True
        out = self._m.logprobs(rows, precision)
        if self.device == "cuda" and not isinstance(out, np.ndarray):
            return out[0] if single else out
        out = np.asarray(out)
        return out[0] if single else out

    def _prompt_ids(self, prompt: Prompt) -> List[int]:
        if isinstance(prompt, str):
            ids = self._tokenizer._t.special_prefix() + self._tokenizer.encode(prompt)
            if len(ids) == 0:
                raise ValueError("generate(): a prompt is empty")
            return ids
        return _ids("generate", "prompts", prompt)

    def generate(
        self,
        prompts: Union[Prompt, Sequence[Prompt]],
        *,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: Optional[int] = None,
        stop: Union[None, str, Sequence[str]] = None,
        logprobs: int = 0,
    ) -> Union[Completion, List[Completion]]:
        """Continue each prompt, all of them batched through the serving engine.

        ``prompts``: a text, a sequence of token ids, or a list of either -> one :class:`Completion`
        or a list of them, in order. A text gets the tokenizer's BOS token first, as ``lmforge
        generate``. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off. ``seed``: each
        request's sampling seed (random numbers are keyed on the seed and the position, so a prompt's
        samples do not depend on the others); None draws one per prompt. Generation ends at the
        model's end token, at a ``stop`` string (cut from the text) or after ``max_tokens``.
        ``logprobs=N`` (<= 20) adds the N most likely tokens at each step. Ctrl-C interrupts it.
        """
        single = isinstance(prompts, str) or (
            isinstance(prompts, (Sequence, np.ndarray)) and len(prompts) > 0
            and isinstance(prompts[0], (int, np.integer)) and not isinstance(prompts[0], bool))
        if single:
            batch = [prompts]
        elif isinstance(prompts, (Sequence, np.ndarray)) and not isinstance(prompts, bytes):
            batch = list(prompts)
        else:
            raise _type_error("generate", "prompts", "a str, a sequence of token ids, or a list of them", prompts)
        if len(batch) == 0:
            raise ValueError("generate(): no prompts")
        ids = [self._prompt_ids(p) for p in batch]
        if stop is None:
            stops: List[str] = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, Sequence) and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise _type_error("generate", "stop", "a str or a sequence of str", stop)
        if any(s == "" for s in stops):
            raise ValueError("generate(): a stop string is empty")
        if seed is None:
            seeds = [secrets.randbits(63) for _ in ids]
        else:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                raise _type_error("generate", "seed", "an int", seed)
            s = int(seed)
            if s < 0 or s >= 2**64:
                raise ValueError(f"generate(): seed={s} must be in [0, 2^64)")
            seeds = [s] * len(ids)
        n_top = _int("generate", "logprobs", logprobs)
        if n_top < 0 or n_top > 20:
            raise ValueError(f"generate(): logprobs={n_top} must be in [0, 20]")
        raw = self._m.generate(ids, _int("generate", "max_tokens", max_tokens),
                               _float("generate", "temperature", temperature), _float("generate", "top_p", top_p),
                               _int("generate", "top_k", top_k, bits=32), seeds, stops, True, n_top)
        out = [Completion(text, tokens, lps, reason, [list(map(tuple, t)) for t in top] if n_top > 0 else None)
               for text, tokens, lps, reason, top in raw]
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"Model({self.path!r}, device={self.device!r}: {self._m.summary})"


def load(path: PathLike, *, device: str = "auto", tokenizer: PathLike = "auto", allow_nonfinite: bool = False,
         max_seqs: int = 32, batch_invariant: bool = False) -> Model:
    """Load a model: an lmforge checkpoint or training out-dir (its latest checkpoint), a Hugging Face
    model directory (config.json + safetensors) or a GGUF file.

    ``device``: "auto" (the GPU when there is one), "cpu" or "cuda". ``tokenizer``: "auto" (the
    model's own, else bytes), "byte" or a tokenizer.json path. ``max_seqs``: prompts that
    :meth:`Model.generate` runs at once. ``batch_invariant``: the CLI's ``--batch-invariant``
    (docs/BATCH_INVARIANCE.md): :meth:`Model.generate` and :meth:`Model.logprobs` give a sequence the
    same numbers whatever else is batched with it, and each other's bit for bit.
    """
    p = _path("load", "path", path)
    if not isinstance(device, str):
        raise _type_error("load", "device", "a str", device)
    if not isinstance(allow_nonfinite, bool):
        raise _type_error("load", "allow_nonfinite", "a bool", allow_nonfinite)
    if not isinstance(batch_invariant, bool):
        raise _type_error("load", "batch_invariant", "a bool", batch_invariant)
    return Model(_core.load(p, device, _path("load", "tokenizer", tokenizer), allow_nonfinite,
                            _int("load", "max_seqs", max_seqs, bits=32), batch_invariant))


# --------------------------------------------------------------------------------------------------
# Training

# Flags of `lmforge train` that state.json does not record, with their types.
_EXTRA_FLAGS: Dict[str, type] = {
    "init_from": str, "resume": str, "overwrite": bool, "allow_change": bool, "allow_nonfinite": bool,
    "mfu_peak_tflops": float, "profile": bool, "profile_steps": int, "profile_warmup": int, "profile_out": str,
}


def _flag_types() -> Dict[str, type]:
    types: Dict[str, type] = {}
    for key, value in json.loads(_core.train_defaults()).items():
        types[key] = bool if isinstance(value, bool) else int if isinstance(value, int) else \
            float if isinstance(value, float) else list if isinstance(value, list) else str
    types.update(_EXTRA_FLAGS)
    types.pop("config", None)
    types.pop("preset", None)
    return types


def _flag_value(key: str, want: type, value: Any) -> Any:
    if want is bool:
        if not isinstance(value, bool):
            raise _type_error("train", key, "a bool", value)
        return value
    if want is int:
        return _int("train", key, value)
    if want is float:
        v = _float("train", key, value)
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"train(): {key}={v} is not a finite number")
        return v
    if want is list:  # shard paths or patterns
        if isinstance(value, (str, os.PathLike)):
            return [os.fspath(value)]
        if isinstance(value, Sequence) and all(isinstance(v, (str, os.PathLike)) for v in value):
            return [os.fspath(v) for v in value]
        raise _type_error("train", key, "a path or a list of paths", value)
    return _path("train", key, value)


class Run:
    """A training run started by :func:`train`. Iterating it trains and yields each metrics record
    (the lines of ``metrics.jsonl``) as a dict; :meth:`wait` trains to the end. Ctrl-C stops the run
    at the end of the current step, with a checkpoint of it, then raises ``KeyboardInterrupt``."""

    def __init__(self, handle: "_core.TrainRun") -> None:
        self._h = handle
        self._done = False
        self.metrics: List[Dict[str, Any]] = []  #: every record taken so far

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._done:
            raise StopIteration
        try:
            while True:
                kind, line = self._h.next(0.1)
                if kind == 0:
                    record = json.loads(line)
                    self.metrics.append(record)
                    return record
                if kind == 2:
                    self._done = True
                    raise StopIteration
        except KeyboardInterrupt:
            self._stop_and_drain()
            raise

    def _stop_and_drain(self) -> None:
        self._h.stop()
        while not self._done:
            kind, line = self._h.next(0.1)
            if kind == 0:
                self.metrics.append(json.loads(line))
            elif kind == 2:
                self._done = True

    def wait(self) -> "Run":
        """Train to the end (or until :meth:`stop`); the records go to :attr:`metrics`."""
        for _ in self:
            pass
        return self

    def stop(self) -> None:
        """Ask the run to stop at the end of the current step (with a checkpoint of it)."""
        self._h.stop()

    def save(self) -> str:
        """Write a checkpoint now (at the next step boundary while training) and return its directory."""
        return self._h.save()

    @property
    def done(self) -> bool:
        return self._done

    @property
    def step(self) -> int:
        """Optimizer steps done so far (a resumed run counts from its checkpoint's step)."""
        return self._h.step

    @property
    def stopped_early(self) -> bool:
        return self._h.stopped_early

    @property
    def last_checkpoint(self) -> Optional[str]:
        return self._h.last_checkpoint or None

    @property
    def options(self) -> Dict[str, Any]:
        """The run's settings, as state.json records them."""
        return json.loads(self._h.options_json)

    @property
    def out_dir(self) -> str:
        return self.options["out_dir"]

    @property
    def losses(self) -> List[float]:
        """The training loss of every step this run took (after it has finished)."""
        return self._h.losses()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._done:
            self._stop_and_drain()

    def __repr__(self) -> str:
        return f"Run(out_dir={self.out_dir!r}, step={self.step}, done={self._done})"


def train(config_or_preset: Union[None, str, PathLike, Dict[str, Any]] = None, *,
          data: Union[None, PathLike, Sequence[PathLike]] = None, verbose: bool = True, **flags: Any) -> Run:
    """Set up a training run as ``lmforge train`` would; iterate the returned :class:`Run` (or call
    ``.wait()``) to train.

    ``config_or_preset``: a preset name (``presets()``), a config JSON file, a config dict, or None
    (the ``tiny`` preset; a resumed run keeps its own model). ``data``: shard paths or patterns
    (default: the bundled corpus). ``flags``: any flag of ``lmforge train`` with ``_`` for ``-``:
    ``steps=200, batch_size=16, lr=3e-3, out_dir="out", resume="out", init_from=..., device=...``.
    Every error the CLI reports is raised here, before any training.
    """
    types = _flag_types()
    options: Dict[str, Any] = {}
    given: List[str] = []
    for key, value in flags.items():
        if key not in types:
            close = difflib.get_close_matches(key, list(types) + ["data"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"train() got an unexpected keyword argument {key!r}{hint}")
        options[key] = _flag_value(key, types[key], value)
        given.append(key)
    if data is not None:
        options["data"] = _flag_value("data", list, data)
        given.append("data")
    if not isinstance(verbose, bool):
        raise _type_error("train", "verbose", "a bool", verbose)
    if options.get("resume") and options.get("init_from"):
        raise ValueError("train(): resume and init_from exclude each other (resume continues a run, init_from "
                         "starts a new one from weights)")
    tmp_config: Optional[str] = None
    if config_or_preset is not None:
        if options.get("init_from"):
            raise ValueError("train(): init_from takes its model from the weights; give no config or preset")
        if isinstance(config_or_preset, dict):
            fd, tmp_config = tempfile.mkstemp(prefix="lmforge-config-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(config_or_preset, f)
            options["config"] = tmp_config
            given.append("config")
        else:
            name = _path("train", "config_or_preset", config_or_preset)
            if name in _core.config_preset_names():
                options["preset"] = name
                given.append("preset")
            elif name.endswith(".json") or os.path.exists(name):
                if not os.path.exists(name):
                    raise FileNotFoundError(f"{name}: model config not found")
                options["config"] = name
                given.append("config")
            else:
                close = difflib.get_close_matches(name, _core.config_preset_names(), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"train(): {name!r} is neither a preset ({', '.join(_core.config_preset_names())}) "
                                 f"nor a config file{hint}")
    try:
        handle = _core.TrainRun(json.dumps(options), given, verbose)
    finally:
        if tmp_config is not None:
            os.unlink(tmp_config)  # the Trainer has read it; checkpoints carry the config
    return Run(handle)
