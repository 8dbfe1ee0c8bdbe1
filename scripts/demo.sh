#!/usr/bin/env bash
# The main job on the bundled defaults: build the lmforge binary (CPU-only when no GPU is present, so a
# fresh 2-core machine does not compile CUDA it cannot run), turn the bundled corpus into shards, train
# the tiny model, then sample from it. Outputs go to ./out/demo (replaced on every run).
# LMF_DEMO_STEPS (default 300 on the CPU, 1500 on a GPU) sets the training length.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  cuda=AUTO steps=${LMF_DEMO_STEPS:-1500}
else
  cuda=OFF steps=${LMF_DEMO_STEPS:-300}
fi
LMF_DEPS=demo LMF_CMAKE_ARGS="-DLMF_CUDA=$cuda -DLMF_BUILD_TESTS=OFF" LMF_BUILD_TARGETS=lmforge scripts/build.sh
echo "--- built in $(( $(date +%s) - start )) s: $(./build/lmforge --version)"
./build/lmforge prepare --input data/kjv.txt --out-dir out/demo/data
./build/lmforge train --preset tiny --data out/demo/data/kjv_train.bin \
  --batch-size 16 --seq-len 128 --steps "$steps" --lr 3e-3 --warmup 30 \
  --log-every 50 --eval-every 100 --out-dir out/demo --overwrite "$@"
echo "--- sample (temperature 0.8, top-k 40) ---"
./build/lmforge generate --checkpoint out/demo --prompt "And God said" --max-new-tokens 300 \
  --temperature 0.8 --top-k 40 --seed 7
echo "--- done in $(( $(date +%s) - start )) s"
