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
  # --profile on GPT-2 124M: the Chrome trace parses and its per-op device time adds up to the step
  ./build-gpu/lmforge train --device cuda --preset gpt2-124m -B 16 -T 1024 --steps 8 --log-every 4 --eval-batches 1 \
    --profile --profile-steps 3 --out-dir "$OUT/profile_gpt2" >"$OUT/profile_gpt2.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] && python3 tools/check_trace.py "$OUT/profile_gpt2/trace.json" | tee "$OUT/check_trace.log"
  rc=$((rc + ${PIPESTATUS[0]}))
  add "GPT-2 --profile trace (device ops vs step)" "rc=$rc $(tail -1 "$OUT/check_trace.log" 2>/dev/null)"
  [ $rc -eq 0 ] || { failures=$((failures + 1)); tail -5 "$OUT/profile_gpt2.log"; }
  grep -E "^step=4 |utilization=" "$OUT/profile_gpt2.log"
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
  # lmforge (bf16, tf32, fp32) and PyTorch (eager and torch.compile) on GPT-2 124M, T=1024, at
  # B=16 and at a large batch (LMF_BENCH_BIG_B, default 256: the largest power of two at which
  # torch.compile fits on an H200, 116.6 GB); --profile prints lmforge's per-op time.
  bench_lmf() {  # precision B tag [extra flags]
    ./build-gpu/lmforge_bench --device cuda --precision "$1" --preset gpt2-124m --batch-size "$2" --seq-len 1024 \
      --steps 5 --warmup-steps 2 ${4:-} >"$OUT/bench_$3.json" 2>"$OUT/bench_$3.err" || { failures=$((failures + 1)); tail -3 "$OUT/bench_$3.err"; }
  }
  bench_torch() {  # mode B tag
    python3 bench/torch_gpu_gpt2.py --mode "$1" --batch-size "$2" --seq-len 1024 >"$OUT/bench_$3.json" \
      2>"$OUT/bench_$3.err" || tail -5 "$OUT/bench_$3.err"
  }
  B=${LMF_BENCH_B:-16}
  BIG=${LMF_BENCH_BIG_B:-256}
  bench_lmf bf16 "$B" lmf_bf16 --profile
  bench_lmf tf32 "$B" lmf_tf32
  bench_lmf fp32 "$B" lmf_fp32
  cat "$OUT/bench_lmf_bf16.err"
  for mode in eager-fp32 eager-tf32 eager-bf16 compile-bf16; do bench_torch $mode "$B" "torch_$mode"; done
  bench_lmf bf16 "$BIG" lmf_bf16_big
  bench_torch compile-bf16 "$BIG" torch_compile-bf16_big
  python3 - "$OUT" "$B" "$BIG" <<'PY'
import json, os, sys
out, B, BIG = sys.argv[1], sys.argv[2], sys.argv[3]
def load(tag):
    try:
        return json.loads(open(os.path.join(out, "bench_%s.json" % tag)).read().strip().splitlines()[-1])
    except Exception as e:
        return {"impl": tag, "error": str(e)}
def table(title, tags, ref_tag):
    rows = [load(t) for t in tags]
    ref = load(ref_tag).get("tok_s")
    print("\n" + title)
    print("%-26s %12s %10s %8s %10s %18s" % ("impl", "tok/s", "step_ms", "mfu", "peak_GB", "this/%s" % ref_tag))
    for r in rows:
        if "error" in r:
            print("%-26s error: %s" % (r["impl"], r["error"])); continue
        ratio = r["tok_s"] / ref if ref else float("nan")
        print("%-26s %12.0f %10.1f %8.3f %10.2f %18.2f" % (r["impl"], r["tok_s"], r["step_ms"], r["mfu"], r["peak_mem_gb"], ratio))
table("GPT-2 124M training step, B=%s T=1024, same GPU (ratios against torch.compile bf16)" % B,
      ["lmf_bf16", "lmf_tf32", "lmf_fp32", "torch_eager-fp32", "torch_eager-tf32", "torch_eager-bf16", "torch_compile-bf16"],
      "torch_compile-bf16")
bf, fp = load("lmf_bf16").get("tok_s"), load("lmf_fp32").get("tok_s")
if bf and fp: print("lmforge bf16 / lmforge fp32: %.2f" % (bf / fp))
table("GPT-2 124M training step, B=%s T=1024" % BIG, ["lmf_bf16_big", "torch_compile-bf16_big"], "torch_compile-bf16_big")
PY
fi

echo; echo "== summary =="
printf '%s\n' "${summary[@]}"
echo "failures: $failures"
[ "$failures" -eq 0 ]
