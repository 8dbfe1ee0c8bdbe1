#!/usr/bin/env bash
# tools/gpu_check.sh: the one script for the GPU machine. Builds lmforge with CUDA (sm_90a), runs
# every GPU test (tests/test_cuda_*), a GPU training run, and the GPU benchmark against PyTorch
# (same GPU, same script), then prints a short table.
#
#   tools/gpu_check.sh            # build + tests + train + bench
#   tools/gpu_check.sh tests      # build + tests only
#   tools/gpu_check.sh bench      # build + bench only
# Logs go to $OUT (the device tool's output folder) or /tmp/lmf_gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-/tmp/lmf_gpu}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
summary=()
failures=0
add() { summary+=("$(printf '%-44s %s' "$1" "$2")"); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
if ! cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DLMF_CUDA=ON >"$OUT/cmake.log" 2>&1; then
  tail -30 "$OUT/cmake.log"; echo "CONFIGURE FAILED"; exit 1
fi
if ! ninja -C build-gpu >"$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40; echo "BUILD FAILED"; exit 1
fi
add "build" "ok ($(( $(date +%s) - t0 )) s)"

if [ "$what" = all ] || [ "$what" = tests ]; then
  : >"$OUT/tests.log"
  for t in build-gpu/tests/test_cuda_* build-gpu/tests/test_launch; do
    [ -x "$t" ] && [ -f "$t" ] && [[ "$t" != *.cmake ]] || continue
    name=$(basename "$t")
    "$t" >/tmp/lmf_test.log 2>&1
    rc=$?
    cat /tmp/lmf_test.log >>"$OUT/tests.log"
    passed=$(grep -oE '\[  PASSED  \] [0-9]+' /tmp/lmf_test.log | grep -oE '[0-9]+$')
    failed=$(grep -oE '[0-9]+ FAILED TEST' /tmp/lmf_test.log | grep -oE '^[0-9]+')
    skipped=$(grep -oE '\[  SKIPPED \] [0-9]+' /tmp/lmf_test.log | grep -oE '[0-9]+$')
    add "$name" "rc=$rc passed=${passed:-0} failed=${failed:-0} skipped=${skipped:-0}"
    [ $rc -eq 0 ] || failures=$((failures + 1))
    if [ $rc -ne 0 ]; then grep -E "Failure|error|Error|FAILED|Expected|Which is|value|seed" /tmp/lmf_test.log | head -30; fi
    grep "measured" /tmp/lmf_test.log
  done
fi

if [ "$what" = all ]; then
  ./build-gpu/lmforge train --device cuda --preset tiny -B 16 -T 128 --steps 200 --warmup 30 --log-every 50 --eval-every 100 \
    --out-dir "$OUT/train_gpu" >"$OUT/train_gpu.log" 2>&1
  rc=$?
  add "train tiny on GPU (200 steps)" "rc=$rc $(grep val_loss "$OUT/train_gpu.log" | tail -1)"
  [ $rc -eq 0 ] || failures=$((failures + 1))
  tail -5 "$OUT/train_gpu.log"
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
  B=${LMF_BENCH_B:-16}
  ./build-gpu/lmforge_bench --device cuda --preset gpt2-124m --batch-size "$B" --seq-len 1024 --steps 5 \
    --warmup-steps 2 >"$OUT/bench_lmforge.json" 2>"$OUT/bench_lmforge.err" || failures=$((failures + 1))
  ./build-gpu/lmforge_bench --device cuda --precision tf32 --preset gpt2-124m --batch-size "$B" --seq-len 1024 \
    --steps 5 --warmup-steps 2 --profile >"$OUT/bench_lmforge_tf32.json" 2>"$OUT/bench_lmforge_tf32.err" ||
    failures=$((failures + 1))
  cat "$OUT/bench_lmforge.err" "$OUT/bench_lmforge_tf32.err"
  for mode in eager-fp32 eager-tf32 eager-bf16 compile-bf16; do
    python3 bench/torch_gpu_gpt2.py --mode $mode --batch-size "$B" --seq-len 1024 >"$OUT/bench_$mode.json" \
      2>"$OUT/bench_$mode.err" || tail -5 "$OUT/bench_$mode.err"
  done
  python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
rows = []
for f in ["bench_lmforge.json", "bench_lmforge_tf32.json", "bench_eager-fp32.json", "bench_eager-tf32.json",
          "bench_eager-bf16.json", "bench_compile-bf16.json"]:
    try:
        rows.append(json.loads(open(os.path.join(out, f)).read().strip().splitlines()[-1]))
    except Exception as e:
        rows.append({"impl": f, "error": str(e)})
base = rows[0].get("tok_s")
print("\nGPT-2 124M training step, B=%s T=1024 (lmforge fp32 vs PyTorch on the same GPU)" % os.environ.get("LMF_BENCH_B", "16"))
print("%-22s %12s %10s %8s %10s %14s" % ("impl", "tok/s", "step_ms", "mfu", "peak_GB", "lmforge-fp32/this"))
for r in rows:
    if "error" in r:
        print("%-22s error: %s" % (r["impl"], r["error"])); continue
    ratio = base / r["tok_s"] if base else float("nan")
    print("%-22s %12.0f %10.1f %8.3f %10.2f %14.2f" % (r["impl"], r["tok_s"], r["step_ms"], r["mfu"], r["peak_mem_gb"], ratio))
PY
fi

echo; echo "== summary =="
printf '%s\n' "${summary[@]}"
echo "failures: $failures"
[ "$failures" -eq 0 ]
