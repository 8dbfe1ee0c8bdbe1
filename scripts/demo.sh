#!/usr/bin/env bash
# The main job on the bundled defaults: build, turn the bundled corpus into shards, train the tiny
# model, then sample from it. Outputs go to ./out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
LMF_BUILD_TARGETS=lmforge scripts/build.sh
./build/lmforge prepare --input data/kjv.txt --out-dir out/demo/data
./build/lmforge train --preset tiny --data out/demo/data/kjv_train.bin --val-data out/demo/data/kjv_val.bin \
  --batch-size 16 --seq-len 128 --steps ${LMF_DEMO_STEPS:-1500} --lr 3e-3 --warmup 50 \
  --log-every 100 --eval-every 250 --out-dir out/demo "$@"
echo "--- sample (temperature 0.8, top-k 40) ---"
./build/lmforge generate --checkpoint out/demo --prompt "And God said" --max-new-tokens 400 \
  --temperature 0.8 --top-k 40 --seed 7
