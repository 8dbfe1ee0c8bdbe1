"""Where the Python package's GPU logprobs crash (issue 22; tools/gpu_check.sh runs it when the GPU
pytest fails). Each step prints before it runs, and faulthandler prints the Python stack on a crash.

    python3 -X faulthandler tools/py_gpu_diag.py MODE CHECKPOINT
MODE: lmforge-first  import lmforge, compute, then let the result become a torch tensor
      torch-first    import torch before lmforge (one copy of each CUDA library: PyTorch's)
      numpy          the same call with torch hidden (the result comes back as NumPy)
"""
import faulthandler
import sys

faulthandler.enable()
mode, ckpt = sys.argv[1], sys.argv[2]


def step(what):
    print(f"[{mode}] {what}", flush=True)


if mode == "torch-first":
    step("import torch")
    import torch  # noqa: F401
if mode == "numpy":
    sys.modules["torch"] = None  # `import torch` fails: nanobind hands back NumPy
step("import lmforge")
import lmforge  # noqa: E402

step("load on cuda")
m = lmforge.load(ckpt, device="cuda")
ids = m.tokenizer.encode("And God said, Let there be light")
step("fp32 logprobs (device buffer, DLPack)")
a = m.logprobs(ids, precision="fp32")
step(f"returned {type(a).__name__}")
step("bf16 logprobs")
b = m.logprobs(ids)
step(f"returned {type(b).__name__}; first values {[float(x) for x in b[:3]]}")
step("ok")
