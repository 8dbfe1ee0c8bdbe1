#!/usr/bin/env bash
# tools/gpu_check.sh: the one script for the GPU machine. Builds lmforge with CUDA (sm_90a), runs
# every GPU test (tests/test_cuda_*), a GPU training run, and the GPU benchmark against PyTorch
# (same GPU, same script), then prints a short table.
#
#   tools/gpu_check.sh            # build + tests + train + bench
#   tools/gpu_check.sh tests      # build + tests only
#   tools/gpu_check.sh bench      # build + bench only
#   tools/gpu_check.sh train      # build + the GPU training runs (tiny, tiny-moe, GPT-2 --profile trace check)
#   tools/gpu_check.sh moe        # build + MoE tests + MoE benchmark + --cuda-graph on/off (GPT-2, MoE)
#   tools/gpu_check.sh moebench   # build + MoE benchmark + --cuda-graph on/off
#   tools/gpu_check.sh ncu        # build + per-kernel device time of one step (Nsight Compute), MoE and GPT-2,
#                                 # and the grouped GEMMs' hardware counters (ncugg: only those)
#   tools/gpu_check.sh quick      # build + the GPU tests + lmforge's benchmarks (no PyTorch)
#   tools/gpu_check.sh gemms      # build + every bf16 GEMM of the GPT-2 step against cuBLASLt's other candidates
#   tools/gpu_check.sh refactor   # build this tree and a baseline (LMF_BASE_SRC, default .base: another commit's
#                                 # source, e.g. `git archive COMMIT | tar -x -C .base`), then tools/same_bits.sh
#                                 # gpu with both binaries: the losses must print the same
#   tools/gpu_check.sh serve      # (carry .debs from `tools/device_debs.sh fetch` for the HTTP server)
#                                 # builds only what serving needs, runs the serving GPU tests (paged attention,
#                                 # sampler, engine vs CPU, graphs vs eager, rope, embedding), generate on GPU vs CPU,
#                                 # and `lmforge serve --device cuda` answering curl; `lmforge check-invariance
#                                 # --device cuda` (its table's differing rows)
#   tools/gpu_check.sh servebench # the serving benchmark: lmforge_bench_serve (batch-1 decode vs the copy-bandwidth
#                                 # floor; 512 requests all at once and Poisson) and bench/serve_reference_hf.py on
#                                 # the same workloads; LMF_SERVE_PRESETS (llama-1b gpt2-124m), LMF_HF_MAX_REQUESTS,
#                                 # LMF_HF_BATCH_SIZES (16,32,64), LMF_SERVE_LMF / LMF_SERVE_HF (1; 0 skips that side),
#                                 # LMF_SERVE_DIR (where workloads and lmforge's results go; default $OUT)
#   tools/gpu_check.sh refactorbench  # the same builds: lmforge_bench before/after, alternated, GPT-2 and moe-bench
#   tools/gpu_check.sh python     # builds the Python extension (carry third_party/pydeps: nanobind + pytest, from
#                                 # `pip install --target third_party/pydeps pytest nanobind`) and runs tests/python
#                                 # (test_gpu.py: DLPack logprobs, generation and training bitwise the CLI's on the GPU)
#   tools/gpu_check.sh bi         # batch-invariant mode (docs/BATCH_INVARIANCE.md): tools/bi_serve_check.py (LMF_BI_PROBES
#                                 # temperature-0 probes through lmforge serve among random others, both modes; trainer =
#                                 # server logprobs) on tiny, tiny-moe and a tiny model after 10 --batch-invariant steps;
#                                 # then the cost: lmforge_bench_serve and lmforge_bench (GPT-2 124M step) in both modes;
#                                 # LMF_BI_QUICK=1: only the GPU tests and the harness (check-invariance, both modes)
#   tools/gpu_check.sh shapes     # issue 23's shapes (GPT-2 124M, GPT-2 350M, Llama-style 1B; LMF_SHAPES "preset:B:T ...")
#                                 # lmforge vs PyTorch eager and torch.compile: tok/s, MFU, peak GB, one table
#   tools/gpu_check.sh ts         # the time-series model (docs/TIMESERIES.md): test_cuda_timeseries, tiny-ts trained on
#                                 # the GPU (fp32, bf16), forecast on the GPU vs the CPU, and the speed benchmark
#                                 # (bench/timeseries_gpu.py: timemoe-field, lmforge bf16/fp32 vs PyTorch eager/compile)
# LMF_WITH_MOEROUTE=1 adds the MoE routing comparison against PyTorch (tools/moe_routing_compare.py, moe-bench);
# LMF_WITH_SHAPES=1 the shapes mode's table; LMF_WITH_HEADS=1 its head-size training runs (HS 80, 96, 112, 256).
# LMF_WITH_PYTHON=1 adds the python mode's build and tests to any other mode (one build for both); LMF_WITH_TS=1
# adds the ts mode's (LMF_TS_BENCH=0 skips its benchmark). LMF_WITH_DIST=1 (or mode dist) runs the NCCL path at world
# size 1: `lmforge launch -n 1 -- train --device cuda` (graphs on) against the plain run, bitwise (docs/DISTRIBUTED.md).
# LMF_TESTS="build-gpu/tests/test_x ..." runs only those tests (any mode that runs tests); LMF_EXTRA_TARGETS adds
# build targets to the modes that build only some (serve, servebench).
# LMF_CUDNN_ROOT picks the cuDNN (default: the newer of the system's and PyTorch's; empty: the system's).
# LMF_BENCH_B (16) and LMF_BENCH_BIG_B (256; 0 skips) set the GPT-2 batch sizes, LMF_MOE_COMPILE_TIMEOUT
# (240 s) bounds the torch.compile MoE run.
# Logs go to $OUT (the device tool's output folder) or /tmp/lmf_gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-/tmp/lmf_gpu}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# The GPU machine has cuDNN: its attention tests must run, not skip (carry third_party/ from
# scripts/install_deps.sh; the build reports "cuDNN attention ON/OFF").
export LMF_REQUIRE_CUDNN=${LMF_REQUIRE_CUDNN:-1}
summary=()
failures=0
add() { summary+=("$(printf '%-44s %s' "$1" "$2")"); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# cuDNN: the newer of the system's and the one PyTorch loads (its pip wheel), unless LMF_CUDNN_ROOT is
# set (empty: the system's). The benchmark's PyTorch runs use that same library.
if [ -z "${LMF_CUDNN_ROOT+set}" ]; then
  sys_header=$(find /usr/include /usr/local/include /usr/local/cuda/include -name 'cudnn_version*.h' 2>/dev/null | head -1)
  sys_cudnn=$([ -n "$sys_header" ] && sed -n 's/^#define CUDNN_\(MAJOR\|MINOR\|PATCHLEVEL\) \([0-9]*\).*/\2/p' \
    "$sys_header" | head -3 | paste -sd' ' | awk '{print $1 * 10000 + $2 * 100 + $3}')
  read -r torch_cudnn torch_cudnn_dir < <(python3 -c "import torch, nvidia.cudnn as c; \
print(torch.backends.cudnn.version(), c.__path__[0])" 2>/dev/null)
  LMF_CUDNN_ROOT=""
  if [ -n "${torch_cudnn:-}" ] && [ -d "${torch_cudnn_dir:-}/lib" ] && [ "$torch_cudnn" -gt "${sys_cudnn:-0}" ]; then
    LMF_CUDNN_ROOT=$torch_cudnn_dir
  fi
  chosen=${LMF_CUDNN_ROOT:-system}
  echo "cuDNN: system ${sys_cudnn:-none}, PyTorch ${torch_cudnn:-none}; using $chosen"
fi
[ -n "$LMF_CUDNN_ROOT" ] && export LD_LIBRARY_PATH="$LMF_CUDNN_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Debian packages the image lacks (cpp-httplib for lmforge serve), carried in .debs/ (tools/device_debs.sh)
[ -d .debs ] && eval "$(tools/device_debs.sh env)"
t0=$(date +%s)
base_src=${LMF_BASE_SRC:-.base}
if [ "$what" = refactor ] || [ "$what" = refactorbench ]; then
  # the baseline builds beside this tree's (same cuDNN, same flags), its binaries only
  [ -d "$base_src/src" ] || { echo "no baseline source in $base_src"; exit 1; }
  [ -e "$base_src/third_party" ] || ln -s "$PWD/third_party" "$base_src/third_party"
  ( cmake -S "$base_src" -B "$base_src/build-gpu" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLMF_CUDA=ON \
      -DLMF_BUILD_TESTS=OFF -DLMF_CUDNN_ROOT="$LMF_CUDNN_ROOT" >"$OUT/cmake_base.log" 2>&1 &&
    ninja -C "$base_src/build-gpu" lmforge lmforge_bench >"$OUT/build_base.log" 2>&1; echo $? >"$OUT/build_base.rc" ) &
  base_pid=$!
fi
py_args=()
[ "$what" = python ] && LMF_WITH_PYTHON=1
if [ "${LMF_WITH_PYTHON:-0}" = 1 ]; then
  export PYTHONPATH="$PWD/third_party/pydeps${PYTHONPATH:+:$PYTHONPATH}"
  if ! python3 -c "import nanobind, pytest, os, sysconfig; \
assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))" 2>"$OUT/python_check.log"; then
    add "python package" "SKIPPED: no Python.h or no nanobind/pytest (carry third_party/pydeps)"
    failures=$((failures + 1))
    LMF_WITH_PYTHON=0
  fi
fi
if [ "${LMF_WITH_PYTHON:-0}" = 1 ]; then
  py_args=(-DLMF_PYTHON=ON -DPython_EXECUTABLE="$(command -v python3)"
           -Dnanobind_DIR="$(python3 -c 'import nanobind; print(nanobind.cmake_dir())')")
fi
if ! cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DLMF_CUDA=ON -DLMF_CUDNN_ROOT="$LMF_CUDNN_ROOT" \
    "${py_args[@]}" >"$OUT/cmake.log" 2>&1; then
  tail -30 "$OUT/cmake.log"; echo "CONFIGURE FAILED"; exit 1
fi
targets=""
[ "$what" = servebench ] && targets="lmforge_bench_serve"
[ "$what" = shapes ] && targets="lmforge_bench lmforge"
[ "$what" = serve ] && targets="lmforge test_cuda_paged_attention test_cuda_sampling test_cuda_serve test_cuda_rope test_cuda_embedding test_cuda_gemm test_cuda_cross_entropy"
[ "$what" = python ] && targets="lmforge"
[ "$what" = bi ] && targets="lmforge lmforge_bench lmforge_bench_serve test_cuda_gemm test_cuda_paged_attention test_cuda_cross_entropy test_cuda_flash_attention"
[ "$what" = bi ] && [ "${LMF_BI_QUICK:-0}" = 1 ] && targets="lmforge test_cuda_gemm test_cuda_paged_attention test_cuda_cross_entropy test_cuda_flash_attention"
[ "$what" = ts ] && targets="lmforge test_cuda_timeseries"
[ "$what" = ts ] && LMF_WITH_TS=1
[ "$what" = dist ] && targets="lmforge test_cuda_dist" && LMF_WITH_DIST=1
[ -n "$targets" ] && [ "${LMF_WITH_TS:-0}" = 1 ] && targets="$targets lmforge test_cuda_timeseries"
[ -n "$targets" ] && [ "${LMF_WITH_DIST:-0}" = 1 ] && targets="$targets lmforge test_cuda_dist"
[ -n "$targets" ] && [ "${LMF_WITH_MOEROUTE:-0}" = 1 ] && targets="$targets lmforge"
[ -n "$targets" ] && [ "${LMF_WITH_SHAPES:-0}" = 1 ] && targets="$targets lmforge_bench"
[ -n "$targets" ] && [ "${LMF_WITH_HEADS:-0}" = 1 ] && targets="$targets lmforge"
[ -n "$targets" ] && [ -n "${LMF_EXTRA_TARGETS:-}" ] && targets="$targets $LMF_EXTRA_TARGETS"
[ -n "$targets" ] && [ "${LMF_WITH_PYTHON:-0}" = 1 ] && targets="$targets lmforge _core _core_stub"
if ! ninja -C build-gpu $targets >"$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40; echo "BUILD FAILED"; exit 1
fi
add "build" "ok ($(( $(date +%s) - t0 )) s), $(grep -o 'cuDNN attention [A-Z]*' "$OUT/cmake.log")"
if [ -n "${base_pid:-}" ]; then
  wait "$base_pid"
  if [ "$(cat "$OUT/build_base.rc")" != 0 ]; then grep -E "error|Error" "$OUT/build_base.log" | head -20; echo "BASE BUILD FAILED"; exit 1; fi
  add "baseline build ($base_src)" "ok ($(( $(date +%s) - t0 )) s)"
fi

if [ "$what" = all ] || [ "$what" = tests ] || [ "$what" = moe ] || [ "$what" = quick ] || [ "$what" = serve ] || [ "$what" = bi ]; then
  : >"$OUT/tests.log"
  tests=(build-gpu/tests/test_cuda_* build-gpu/tests/test_launch)
  [ "$what" = serve ] && tests=(build-gpu/tests/test_cuda_paged_attention build-gpu/tests/test_cuda_sampling
                                build-gpu/tests/test_cuda_serve build-gpu/tests/test_cuda_rope build-gpu/tests/test_cuda_embedding
                                build-gpu/tests/test_cuda_gemm build-gpu/tests/test_cuda_cross_entropy)
  [ "$what" = moe ] && tests=(build-gpu/tests/test_cuda_moe build-gpu/tests/test_cuda_grouped_gemm build-gpu/tests/test_cuda_train)
  [ "$what" = bi ] && tests=(build-gpu/tests/test_cuda_gemm build-gpu/tests/test_cuda_paged_attention
                             build-gpu/tests/test_cuda_cross_entropy build-gpu/tests/test_cuda_flash_attention)
  [ -n "${LMF_TESTS:-}" ] && read -r -a tests <<<"$LMF_TESTS"
  for t in "${tests[@]}"; do
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

if [ "${LMF_WITH_PYTHON:-0}" = 1 ]; then
  # the package as `pip install .` lays it out: python/lmforge + the extension, its stubs and the CLI
  pkg=build-gpu/pypkg/lmforge
  rm -rf build-gpu/pypkg && mkdir -p "$pkg/bin"
  cp python/lmforge/*.py build-gpu/_core*.so build-gpu/_core.pyi "$pkg/" && cp build-gpu/lmforge "$pkg/bin/"
  PYTHONPATH="$PWD/build-gpu/pypkg:$PYTHONPATH" python3 -m pytest -q -p no:cacheprovider tests/python \
    >"$OUT/pytest.log" 2>&1
  rc=$?
  add "pytest tests/python" "rc=$rc $(tail -1 "$OUT/pytest.log")"
  [ $rc -eq 0 ] || { failures=$((failures + 1)); grep -E "^(FAILED|ERROR|E )" "$OUT/pytest.log" | head -30; }
  if [ $rc -ne 0 ]; then  # which call crashes, and in which import order (tools/py_gpu_diag.py)
    build-gpu/lmforge train --preset tiny --steps 2 -B 2 -T 32 --device cuda --out-dir build-gpu/diag_run \
      --overwrite >/dev/null 2>&1
    for mode in numpy torch-first lmforge-first; do
      PYTHONPATH="$PWD/build-gpu/pypkg:$PYTHONPATH" timeout 120 python3 -X faulthandler tools/py_gpu_diag.py \
        "$mode" build-gpu/diag_run >"$OUT/py_diag_$mode.log" 2>&1
      add "python diag $mode" "rc=$? $(grep -E '^\[' "$OUT/py_diag_$mode.log" | tail -1)"
      tail -n 25 "$OUT/py_diag_$mode.log"
    done
    # the native stack of the crash (the device image has cuda-gdb, no gdb)
    command -v cuda-gdb >/dev/null && PYTHONPATH="$PWD/build-gpu/pypkg:$PYTHONPATH" timeout 300 cuda-gdb -batch \
      -ex run -ex bt --args python3 tools/py_gpu_diag.py lmforge-first build-gpu/diag_run 2>&1 | tail -n 40
  fi
fi

if [ "$what" = all ] || [ "$what" = train ]; then
  ./build-gpu/lmforge train --device cuda --preset tiny -B 16 -T 128 --steps 200 --warmup 30 --log-every 50 --eval-every 100 \
    --out-dir "$OUT/train_gpu" >"$OUT/train_gpu.log" 2>&1
  rc=$?
  add "train tiny on GPU (200 steps)" "rc=$rc $(grep val_loss "$OUT/train_gpu.log" | tail -1)"
  [ $rc -eq 0 ] || failures=$((failures + 1))
  tail -5 "$OUT/train_gpu.log"
  ./build-gpu/lmforge train --device cuda --preset tiny-moe -B 16 -T 128 --steps 200 --warmup 30 --log-every 50 \
    --eval-every 100 --out-dir "$OUT/train_gpu_moe" >"$OUT/train_gpu_moe.log" 2>&1
  rc=$?
  add "train tiny-moe on GPU (200 steps)" "rc=$rc $(grep val_loss "$OUT/train_gpu_moe.log" | tail -1)"
  [ $rc -eq 0 ] || failures=$((failures + 1))
  grep -E "^params|^moe|^step=200 " "$OUT/train_gpu_moe.log"
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

if [ "$what" = serve ]; then
  # a tiny model trained briefly; greedy generation on the GPU (bf16) and the CPU (fp32) from it
  ./build-gpu/lmforge train --device cuda --preset tiny -B 16 -T 128 --steps 150 --warmup 20 --log-every 50 \
    --eval-every 150 --out-dir "$OUT/serve_ckpt" >"$OUT/serve_train.log" 2>&1
  for d in cuda cpu; do
    ./build-gpu/lmforge generate --device $d --checkpoint "$OUT/serve_ckpt" --prompt "And God said" \
      --max-new-tokens 200 --temperature 0 >"$OUT/gen_$d.txt" 2>"$OUT/gen_$d.log"
  done
  same=$(python3 -c "import sys; a, b = (open(sys.argv[i], 'rb').read() for i in (1, 2)); \
n = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b))); print(n, len(a))" \
    "$OUT/gen_cuda.txt" "$OUT/gen_cpu.txt")
  add "generate greedy GPU vs CPU (same bytes, of)" "$same"
  head -c 300 "$OUT/gen_cuda.txt"; echo; tail -1 "$OUT/gen_cuda.log"
  # the batch-invariance harness on the GPU (default mode: where it differs, and the first op that does)
  # and --batch-invariant (docs/BATCH_INVARIANCE.md), which must pass; the same for tiny-moe (dropless)
  ./build-gpu/lmforge train --device cuda --preset tiny-moe -B 16 -T 128 --steps 100 --warmup 20 --log-every 50 \
    --eval-every 100 --out-dir "$OUT/serve_moe_ckpt" >"$OUT/serve_moe_train.log" 2>&1
  for model in serve_ckpt serve_moe_ckpt; do
    for mode in default batch-invariant; do
      flag=""; [ $mode = batch-invariant ] && flag="--batch-invariant"
      timeout 150 ./build-gpu/lmforge check-invariance --device cuda $flag --batches "${LMF_INV_BATCHES:-1,2,3,5,8,16,32}" \
        --checkpoint "$OUT/$model" \
        >"$OUT/invariance_${model}_$mode.md" 2>"$OUT/invariance_${model}_$mode.log"
      rc=$?
      add "check-invariance $model $mode" "rc=$rc $(tail -1 "$OUT/invariance_${model}_$mode.md")"
      [ $mode = default ] || [ $rc = 0 ] || failures=$((failures + 1))
      grep -v "| 0 | -1 | 0 |" "$OUT/invariance_${model}_$mode.md" | head -14 | cut -c1-220
      [ -s "$OUT/invariance_${model}_$mode.md" ] || tail -3 "$OUT/invariance_${model}_$mode.log"
    done
  done
  # a batch-invariant training run's losses (forward: the split attention; backward: flash) and eval
  ./build-gpu/lmforge train --device cuda --preset tiny -B 16 -T 128 --steps 100 --warmup 20 --log-every 50 \
    --eval-every 100 --batch-invariant --out-dir "$OUT/train_bi" >"$OUT/train_bi.log" 2>&1
  add "train tiny --batch-invariant (100 steps)" "rc=$? $(grep val_loss "$OUT/train_bi.log" | tail -1)"
  grep -E "^numerics|^step=100 |error" "$OUT/train_bi.log" | head -3
  ./build-gpu/lmforge serve --device cuda --checkpoint "$OUT/serve_ckpt" --port 8765 >"$OUT/serve.out" 2>"$OUT/serve.err" &
  spid=$!
  for _ in $(seq 1 300); do grep -q listening "$OUT/serve.out" 2>/dev/null && break; kill -0 $spid 2>/dev/null || break; sleep 0.2; done
  if grep -q "without the HTTP server" "$OUT/serve.err"; then
    add "serve --device cuda" "not built here (no cpp-httplib on this machine)"
  else
  models=$(curl -s localhost:8765/v1/models)
  r1=$(curl -s localhost:8765/v1/completions -d '{"model":"serve_ckpt","prompt":"And God said","max_tokens":64,"temperature":0}')
  r2=$(curl -sN localhost:8765/v1/completions -d '{"model":"serve_ckpt","prompt":"And God said","max_tokens":64,"temperature":0,"stream":true}' | grep -c '^data:')
  bad=$(curl -s -o /dev/null -w '%{http_code}' localhost:8765/v1/completions -d '{"model":"serve_ckpt","prompt":"x","max_tokens":0}')
  kill -TERM $spid; wait $spid; src=$?
  cat "$OUT/serve.err"
  echo "$r1" | head -c 400; echo
  gen=$(echo "$r1" | python3 -c "import json,sys; j=json.load(sys.stdin); print(j['usage']['completion_tokens'], j['choices'][0]['text'] == open('$OUT/gen_cuda.txt').read()[len('And God said'):][:len(j['choices'][0]['text'])])" 2>&1)
  add "serve --device cuda (tokens, = generate)" "$gen; stream events $r2; bad request $bad; exit $src"
  echo "$models"
  [ "$src" = 0 ] && [ "$bad" = 400 ] || failures=$((failures + 1))
  fi
fi

if [ "${LMF_WITH_TS:-0}" = 1 ]; then
  t=build-gpu/tests/test_cuda_timeseries
  GTEST_FILTER='*' "$t" >"$OUT/ts_tests.log" 2>&1
  rc=$?
  add "test_cuda_timeseries" "rc=$rc passed=$(grep -oE '\[  PASSED  \] [0-9]+' "$OUT/ts_tests.log" | grep -oE '[0-9]+$') \
failed=$(grep -oE '[0-9]+ FAILED TEST' "$OUT/ts_tests.log" | grep -oE '^[0-9]+')"
  [ $rc -eq 0 ] || { failures=$((failures + 1)); grep -E "Failure|Expected|Which is|value|seed|error" "$OUT/ts_tests.log" | head -30; }
  grep "measured" "$OUT/ts_tests.log"
  # tiny-ts with 2 heads (head size 32, which flash attention takes); MoE layers run in bf16 on the GPU
  cat >"$OUT/ts_config.json" <<'JSON'
{"activation": "swiglu", "bias": false, "context_length": 512, "d_ff": 256, "d_model": 64, "family": "timeseries",
 "horizons": [1, 8, 32, 64], "huber_delta": 2.0, "moe": {"aux_coef": 0.02, "d_expert": 64, "experts": 4, "shared": 1,
 "shared_gate": true, "top_k": 2}, "n_head": 2, "n_kv_head": 2, "n_layer": 4, "norm": "rmsnorm", "norm_eps": 1e-6,
 "pad_vocab_multiple": 1, "positions": "rope", "tied_embeddings": false, "vocab_size": 1}
JSON
  for prec in bf16; do
    ./build-gpu/lmforge train --device cuda --precision $prec --config "$OUT/ts_config.json" -B 16 -T 512 --steps 200 --warmup 20 \
      --lr 2e-3 --log-every 50 --eval-every 100 --out-dir "$OUT/ts_$prec" >"$OUT/ts_train_$prec.log" 2>&1
    rc=$?
    add "train tiny-ts on GPU $prec (200 steps)" "rc=$rc $(grep val_loss "$OUT/ts_train_$prec.log" | tail -1) \
$(grep -oE 'points/s=[0-9,]+' "$OUT/ts_train_$prec.log" | tail -1)"
    [ $rc -eq 0 ] || { failures=$((failures + 1)); tail -5 "$OUT/ts_train_$prec.log"; }
  done
  # forecast on the GPU (bf16: MoE layers) and on the CPU (fp32) from the run
  python3 -c "import math; print('time,a,b'); [print(f'{i},{math.sin(i/8)+i/300:.6f},{math.cos(i/5)*2:.6f}') for i in range(700)]" \
    >"$OUT/ts_history.csv"
  for d in cuda cpu; do
    ./build-gpu/lmforge forecast --device $d --checkpoint "$OUT/ts_bf16" --input "$OUT/ts_history.csv" --horizon 200 \
      --out "$OUT/ts_forecast_$d.csv" --overwrite >"$OUT/ts_forecast_$d.log" 2>&1 || failures=$((failures + 1))
  done
  add "forecast GPU vs CPU (max abs diff)" "$(python3 -c "import csv,sys; a,b=[list(csv.reader(open(sys.argv[i]))) for i in (1,2)]; \
print(max(abs(float(x)-float(y)) for r,s in zip(a[1:],b[1:]) for x,y in zip(r[1:],s[1:])), len(a)-1, 'rows')" \
    "$OUT/ts_forecast_cuda.csv" "$OUT/ts_forecast_cpu.csv" 2>&1)"
  if [ "${LMF_TS_BENCH:-1}" = 1 ]; then
    timeout "${LMF_TS_BENCH_TIMEOUT:-420}" python3 bench/timeseries_gpu.py --lmforge build-gpu/lmforge --out-dir "$OUT/tsbench" \
      >"$OUT/tsbench.log" 2>&1
    rc=$?
    cat "$OUT/tsbench.log" | tail -20
    add "time-series bench (timemoe-field)" "rc=$rc $(grep -E '^ratio' "$OUT/tsbench.log" | tr '\n' ' ')"
    [ $rc -eq 0 ] || failures=$((failures + 1))
  fi
fi

if [ "${LMF_WITH_DIST:-0}" = 1 ]; then
  grep -o "NCCL [A-Z]*" "$OUT/cmake.log" | head -1
  build-gpu/tests/test_cuda_dist >"$OUT/cuda_dist.log" 2>&1
  rc=$?
  add "test_cuda_dist (buckets on the side stream)" "rc=$rc $(grep -E '^\[  (PASSED|FAILED) ' "$OUT/cuda_dist.log" | tr '\n' ' ')"
  [ $rc -eq 0 ] || { failures=$((failures + 1)); grep -E "Failure|Expected|seed|error" "$OUT/cuda_dist.log" | head -20; }
  # launched: the default gradient buckets (tiny's 3.4 MB: one, at the end, on the side stream);
  # buckets: one a layer, forked to the side stream during the backward; nobuckets: --grad-bucket-mb 0
  for how in plain launched buckets nobuckets; do
    pre=""; [ $how != plain ] && pre="launch -n 1 --"
    extra=""; [ $how = buckets ] && extra="--grad-bucket-mb 0.2"; [ $how = nobuckets ] && extra="--grad-bucket-mb 0"
    ./build-gpu/lmforge $pre train --device cuda --preset tiny -B 16 -T 128 --steps 60 --log-every 1 --cuda-graph on \
      $extra --out-dir "$OUT/dist_$how" >"$OUT/dist_$how.log" 2>&1
    echo "$how rc=$?" >>"$OUT/dist_rc.txt"
  done
  grep -E "^dist|error" "$OUT/dist_launched.log" "$OUT/dist_buckets.log" | head -4
  add "NCCL world 1 (launch -n 1, graphs) vs plain" "$(cat "$OUT/dist_rc.txt" | tr '\n' ' ') $(python3 -c "import json,sys; \
l=[[json.loads(x).get('loss') for x in open(p)] for p in sys.argv[1:]]; l=[[v for v in a if v is not None] for a in l]; \
print('losses bitwise equal' if all(x==l[0] for x in l) and len(l[0])==60 else f'DIFFER ({[len(x) for x in l]} steps)')" \
    "$OUT/dist_plain/metrics.jsonl" "$OUT/dist_launched/metrics.jsonl" "$OUT/dist_buckets/metrics.jsonl" \
    "$OUT/dist_nobuckets/metrics.jsonl" 2>&1)"
  grep -q "losses bitwise equal" <<<"${summary[-1]}" || failures=$((failures + 1))
fi

if [ "$what" = shapes ] || [ "${LMF_WITH_HEADS:-0}" = 1 ]; then
  # Head sizes beyond GPT-2's (issue 23): Llama-style models (RMSNorm, SwiGLU, RoPE, GQA) at head size 80, 96, 112
  # (lmforge's kernels and cuDNN's) and 256 (cuDNN's), 30 steps with graphs on, again, and with graphs off: the
  # losses of the three runs must be bitwise equal, and the first loss near ln(vocab).
  for hk in 80:lmforge 96:lmforge 112:lmforge 80:cudnn 256:cudnn; do
    IFS=: read -r hs kern <<<"$hk"
    nh=4; cfg="$OUT/hs$hs.json"
    printf '{"vocab_size": 512, "context_length": 256, "n_layer": 2, "n_head": %d, "n_kv_head": 2, "d_model": %d, "norm": "rmsnorm", "activation": "swiglu", "positions": "rope", "tied_embeddings": false, "bias": false}\n' \
      $nh $((nh * hs)) >"$cfg"
    for run in a b nograph; do
      g=on; [ $run = nograph ] && g=off
      ./build-gpu/lmforge train --device cuda --config "$cfg" --attention $kern -B 4 -T 200 --steps 30 --log-every 1 \
        --cuda-graph $g --out-dir "$OUT/hs_${hk/:/_}_$run" >"$OUT/hs_${hk/:/_}_$run.log" 2>&1 ||
        { echo "hs $hk $run rc=$?"; tail -3 "$OUT/hs_${hk/:/_}_$run.log"; }
    done
    add "train HS=$hs --attention $kern (a, b, no graph)" "$(python3 -c "import json,sys; \
l=[[json.loads(x).get('loss') for x in open(p)] for p in sys.argv[1:]]; l=[[v for v in a if v is not None] for a in l]; \
print(('losses bitwise equal' if all(x==l[0] for x in l) and len(l[0])==30 else f'DIFFER ({[len(x) for x in l]} steps)') \
+ f', loss {l[0][0]:.4f} -> {l[0][-1]:.4f}')" "$OUT/hs_${hk/:/_}_a/metrics.jsonl" "$OUT/hs_${hk/:/_}_b/metrics.jsonl" \
      "$OUT/hs_${hk/:/_}_nograph/metrics.jsonl" 2>&1 | tail -1)"
    grep -q "losses bitwise equal" <<<"${summary[-1]}" || failures=$((failures + 1))
    # serving's paged attention at this head size: greedy generation on the GPU (default and batch-invariant,
    # which runs the flash forward's step: lmforge's sizes only) against the CPU's, same bytes of 48
    [ $kern = lmforge ] || [ $hs = 256 ] || continue
    gens=""
    for gm in cpu cuda cuda-bi; do
      gd=${gm%-bi}; gf=""; [ $gm = cuda-bi ] && gf="--batch-invariant"
      [ $gm = cuda-bi ] && [ $hs = 256 ] && continue
      ./build-gpu/lmforge generate --device $gd $gf --checkpoint "$OUT/hs_${hk/:/_}_a" --prompt "And God said" \
        --max-new-tokens 48 --temperature 0 >"$OUT/hs_gen_${hs}_$gm.txt" 2>"$OUT/hs_gen_${hs}_$gm.log" ||
        { failures=$((failures + 1)); tail -2 "$OUT/hs_gen_${hs}_$gm.log"; }
      [ $gm = cpu ] || gens="$gens $gm: $(python3 -c "import sys; a, b = (open(sys.argv[i], 'rb').read() for i in (1, 2)); \
print(next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b))), 'of', len(b))" \
        "$OUT/hs_gen_${hs}_$gm.txt" "$OUT/hs_gen_${hs}_cpu.txt" 2>&1)"
    done
    add "generate HS=$hs GPU vs CPU (same bytes)" "$gens"
  done
fi

if [ "$what" = bi ]; then
  probes=${LMF_BI_PROBES:-1000}
  train_ck() {  # preset steps dir [flags]
    ./build-gpu/lmforge train --device cuda --preset "$1" -B 16 -T 128 --steps "$2" --warmup 5 --log-every 50 \
      --eval-every 0 --out-dir "$OUT/$3" ${4:-} >"$OUT/$3.log" 2>&1 || { failures=$((failures + 1)); tail -3 "$OUT/$3.log"; }
  }
  train_ck tiny 150 bi_tiny
  train_ck tiny-moe 150 bi_moe
  train_ck tiny 10 bi_tiny10 --batch-invariant
  for ck in bi_tiny bi_moe; do
    for mode in default batch-invariant; do
      flag=""; [ $mode = batch-invariant ] && flag="--batch-invariant"
      timeout 150 ./build-gpu/lmforge check-invariance --device cuda $flag --checkpoint "$OUT/$ck" \
        >"$OUT/inv_${ck}_$mode.md" 2>"$OUT/inv_${ck}_$mode.log"
      rc=$?
      add "check-invariance $ck $mode" "rc=$rc $(tail -1 "$OUT/inv_${ck}_$mode.md")"
      [ $mode = default ] || [ $rc = 0 ] || failures=$((failures + 1))
      grep -v "| 0 | -1 | 0 |" "$OUT/inv_${ck}_$mode.md" | head -8 | cut -c1-200
    done
  done
  [ "${LMF_BI_QUICK:-0}" = 1 ] && ckpts="" || ckpts="bi_tiny bi_moe bi_tiny10"
  for ck in $ckpts; do
    n=$probes; modes=default,batch-invariant
    [ $ck = bi_tiny10 ] && n=64 && modes=batch-invariant
    timeout 240 python3 tools/bi_serve_check.py --lmforge build-gpu/lmforge --checkpoint "$OUT/$ck" --probes "$n" \
      --modes $modes --log "$OUT/bi_serve_$ck.log" >"$OUT/bi_serve_$ck.md" 2>&1
    rc=$?
    cat "$OUT/bi_serve_$ck.md"
    add "bi_serve_check $ck ($n probes)" "rc=$rc $(grep -E '^\| (default|batch)' "$OUT/bi_serve_$ck.md" | \
awk -F'|' '{printf "%s: %s distinct, trainer=server %s; ", $2, $4, $6}')"
    [ $rc = 0 ] || failures=$((failures + 1))
  done
  # the cost, both modes in this run: serving (LMF_BI_SERVE_PRESET, 512 requests at once) and a training step
  sp=${LMF_BI_SERVE_PRESET:-gpt2-124m}
  [ "${LMF_BI_QUICK:-0}" = 1 ] && cost_modes="" || cost_modes="default bi"
  for mode in $cost_modes; do
    flag=""; [ $mode = bi ] && flag="--batch-invariant"
    timeout 200 ./build-gpu/lmforge_bench_serve --preset "$sp" --skip-batch1 $flag >"$OUT/bi_servebench_$mode.json" \
      2>"$OUT/bi_servebench_$mode.log" || { failures=$((failures + 1)); tail -3 "$OUT/bi_servebench_$mode.log"; }
    timeout 120 ./build-gpu/lmforge_bench --device cuda --precision bf16 --preset gpt2-124m --batch-size 16 --seq-len 1024 \
      --steps 5 --warmup-steps 2 --cuda-graph $flag >"$OUT/bi_trainbench_$mode.json" 2>"$OUT/bi_trainbench_$mode.log" \
      || { failures=$((failures + 1)); tail -3 "$OUT/bi_trainbench_$mode.log"; }
  done
  [ -n "$cost_modes" ] && add "batch-invariant cost" "$(python3 -c "import json,sys; o=sys.argv[1]; \
ld=lambda f: json.loads(open(f).read().strip().splitlines()[-1]); \
s=[ld(f'{o}/bi_servebench_{m}.json')['throughput']['output_tokens_per_s'] for m in ('default','bi')]; \
t=[ld(f'{o}/bi_trainbench_{m}.json')['tok_s'] for m in ('default','bi')]; \
print(f'serve {sys.argv[2]} {s[0]:.0f} -> {s[1]:.0f} tok/s ({s[1]/s[0]:.2f}x); GPT-2 train step {t[0]:.0f} -> {t[1]:.0f} tok/s ({t[1]/t[0]:.2f}x)')" \
    "$OUT" "$sp" 2>&1 | tail -1)"
  # a decode step's ops in both modes, side by side (ms per step, 32 sequences, eager)
  [ -n "$cost_modes" ] && python3 -c "import json,sys; o=sys.argv[1]; \
ld=lambda f: json.loads(open(f).read().strip().splitlines()[-1]).get('decode_step_breakdown', {}); \
d, b = ld(f'{o}/bi_servebench_default.json'), ld(f'{o}/bi_servebench_bi.json'); \
dm = {r['op']: r['ms_per_step'] for r in d.get('ops', [])}; bm = {r['op']: r['ms_per_step'] for r in b.get('ops', [])}; \
print(f\"decode step: default {d.get('total_ms', 0):.3f} ms, batch-invariant {b.get('total_ms', 0):.3f} ms\"); \
[print(f'  {op:32s} {dm.get(op, 0):8.4f} {bm.get(op, 0):8.4f}') for op in sorted(set(dm) | set(bm), key=lambda k: -bm.get(k, 0))]" \
    "$OUT" 2>&1 | head -20
fi

if [ "${LMF_WITH_MOEROUTE:-0}" = 1 ]; then
  # MoE routing health (issue 23): moe-bench trained by lmforge (bf16) and by the PyTorch reference MoE
  # (bench/torch_gpu_moe.py, bf16 autocast) from the same weights on the same batches, per-layer expert loads
  # compared step by step; LMF_MOEROUTE_LRS: "lr:warmup ..." (default: the gpu_check runs' 3e-3 with 2 steps)
  for lw in ${LMF_MOEROUTE_LRS:-3e-3:2}; do
    lr=${lw%%:*}; wu=${lw##*:}
    timeout "${LMF_MOEROUTE_TIMEOUT:-200}" python3 tools/moe_routing_compare.py --lmforge build-gpu/lmforge \
      --preset moe-bench -B 8 -T "${LMF_MOEROUTE_T:-2048}" --steps "${LMF_MOEROUTE_STEPS:-300}" --lr "$lr" --warmup "$wu" \
      --device cuda --work "$OUT/moeroute_$lr" --json "$OUT/moeroute_$lr.json" >"$OUT/moeroute_$lr.md" 2>"$OUT/moeroute_$lr.log"
    rc=$?
    grep -v "^lmforge: /" "$OUT/moeroute_$lr.md"
    [ $rc = 0 ] || { failures=$((failures + 1)); tail -5 "$OUT/moeroute_$lr.log"; }
    add "MoE routing vs PyTorch (moe-bench, lr $lr warm-up $wu)" "rc=$rc $(grep -E '^step 1:' "$OUT/moeroute_$lr.md" | cut -c1-60)"
    add "  health" "$(grep -E '^(lmforge|PyTorch): ' "$OUT/moeroute_$lr.md" | cut -c1-110 | tr '\n' ' ')"
  done
fi

if [ "$what" = shapes ] || [ "${LMF_WITH_SHAPES:-0}" = 1 ]; then
  # Issue 23's shapes, lmforge (bf16, the step as one CUDA graph) against PyTorch eager and torch.compile (bf16
  # autocast, flash SDPA, fused AdamW; bench/torch_gpu_gpt2.py --shape) on this GPU in this run: tok/s, MFU, peak GB.
  # LMF_SHAPES: "preset:B:T[:recompute] ..." (default the issue's table, and llama-1b with --recompute attention and
  # full: lmforge's rows only, the same PyTorch rows)
  shapes=${LMF_SHAPES:-gpt2-124m:16:1024 gpt2-350m:8:1024 llama-1b:4:2048 llama-1b:4:2048:attention llama-1b:4:2048:full}
  for st in $shapes; do
    IFS=: read -r sp sb stt src <<<"$st"
    tag=$sp${src:+-$src}
    timeout 300 ./build-gpu/lmforge_bench --device cuda --precision bf16 --preset "$sp" --batch-size "$sb" --seq-len "$stt" \
      --steps 10 --warmup-steps 3 --cuda-graph --recompute "${src:-none}" >"$OUT/shape_lmf_$tag.json" 2>"$OUT/shape_lmf_$tag.err" ||
      { failures=$((failures + 1)); tail -3 "$OUT/shape_lmf_$tag.err"; }
    [ -n "$src" ] && continue  # the PyTorch rows of this shape ran with its plain row
    # where the step's time goes: per op against the GEMM and copy ceilings measured now (eager, --profile)
    timeout 200 ./build-gpu/lmforge_bench --device cuda --precision bf16 --preset "$sp" --batch-size "$sb" --seq-len "$stt" \
      --steps 3 --warmup-steps 2 --profile >/dev/null 2>"$OUT/shape_profile_$sp.txt" || tail -3 "$OUT/shape_profile_$sp.txt"
    echo "== $sp B=$sb T=$stt: per-op profile (eager) =="; grep -A16 "^per-op time" "$OUT/shape_profile_$sp.txt"
    for mode in eager-bf16 compile-bf16; do
      timeout 400 python3 bench/torch_gpu_gpt2.py --shape "$sp" --mode $mode --batch-size "$sb" --seq-len "$stt" \
        --steps 10 --warmup-steps 3 >"$OUT/shape_torch_${sp}_$mode.json" 2>"$OUT/shape_torch_${sp}_$mode.err" ||
        tail -3 "$OUT/shape_torch_${sp}_$mode.err"
    done
  done
  python3 - "$OUT" $shapes <<'PY'
import json, os, sys
out = sys.argv[1]
def ld(f):
    try:
        return json.loads(open(os.path.join(out, f)).read().strip().splitlines()[-1])
    except Exception as e:
        return {"error": str(e)}
print("| shape | B x T | lmforge tok/s | torch.compile tok/s | eager tok/s | lmforge / compile | MFU lmforge / compile "
      "| peak GB lmforge / compile |")
print("|---|---|---|---|---|---|---|---|")
for st in sys.argv[2:]:
    sp, b, t, *rc = st.split(":")
    tag = sp + ("-" + rc[0] if rc else "")
    l, c, e = ld(f"shape_lmf_{tag}.json"), ld(f"shape_torch_{sp}_compile-bf16.json"), ld(f"shape_torch_{sp}_eager-bf16.json")
    g = lambda r, k, f="%.0f": (f % r[k]) if k in r else "n/a"
    ratio = "%.2f" % (l["tok_s"] / c["tok_s"]) if "tok_s" in l and "tok_s" in c else "n/a"
    print(f"| {tag} | {b} x {t} | {g(l, 'tok_s')} | {g(c, 'tok_s')} | {g(e, 'tok_s')} | {ratio} | "
          f"{g(l, 'mfu', '%.3f')} / {g(c, 'mfu', '%.3f')} | {g(l, 'peak_mem_gb', '%.1f')} / {g(c, 'peak_mem_gb', '%.1f')} |")
PY
fi

if [ "$what" = servebench ]; then
  # LMF_SERVE_LMF=0 skips lmforge's runs and LMF_SERVE_HF=0 the transformers reference; the workload files
  # (and lmforge's results, for the ratio) live in LMF_SERVE_DIR (default $OUT), so a later call can run
  # the reference alone on an earlier call's files (carried in the working tree, or left in /tmp when warm).
  sdir=${LMF_SERVE_DIR:-$OUT}
  mkdir -p "$sdir"
  for preset in ${LMF_SERVE_PRESETS:-llama-1b gpt2-124m}; do
    hf=$([ "$preset" = gpt2-124m ] && echo gpt2-124m || echo llama-1b)
    for rate in 0 ${LMF_SERVE_RATE:-8}; do
      [ "${LMF_SERVE_LMF:-1}" = 1 ] || break
      timeout "${LMF_SERVE_TIMEOUT:-300}" ./build-gpu/lmforge_bench_serve --preset "$preset" --rate "$rate" \
        $([ "$rate" != 0 ] && echo --skip-batch1) --workload-out "$sdir/workload_${preset}_$rate.json" \
        >"$sdir/serve_${preset}_$rate.json" 2>"$sdir/serve_${preset}_$rate.log"
      rc=$?
      [ "$sdir" = "$OUT" ] || cp "$sdir/serve_${preset}_$rate".* "$sdir/workload_${preset}_$rate.json" "$OUT"/
      [ $rc -eq 0 ] || { failures=$((failures + 1)); tail -5 "$sdir/serve_${preset}_$rate.log"; }
      [ "$rate" = 0 ] && cat "$sdir/serve_${preset}_$rate.log"
      add "lmforge serve bench $preset rate=$rate" "rc=$rc $(python3 -c "import json,sys; j=json.load(open(sys.argv[1])); \
t=j['throughput']; b=j.get('batch1'); print(f\"{t['output_tokens_per_s']:.0f} tok/s ttft p50/p99 {t['ttft_p50_s']:.3f}/{t['ttft_p99_s']:.3f} \
tpot p50/p99 {t['tpot_p50_s']*1e3:.1f}/{t['tpot_p99_s']*1e3:.1f} ms launches/step {t['launches_per_step']:.2f}\" + \
(f\" | batch-1 {b['ms_per_token']:.3f} ms/token = {b['ratio_to_floor']:.2f}x floor\" if b else ''))" "$sdir/serve_${preset}_$rate.json" 2>&1)"
    done
    [ "${LMF_SERVE_HF:-1}" = 1 ] || continue
    timeout "${LMF_HF_TIMEOUT:-540}" python3 bench/serve_reference_hf.py --model "$hf" --workload "$sdir/workload_${preset}_0.json" \
      --out "$OUT/hf_$preset.json" --max-requests "${LMF_HF_MAX_REQUESTS:-512}" --batch-sizes "${LMF_HF_BATCH_SIZES:-16,32,64}" \
      --skip-poisson >"$OUT/hf_$preset.log" 2>&1
    rc=$?
    tail -25 "$OUT/hf_$preset.log"
    add "transformers reference $hf" "rc=$rc $(python3 -c "import json,sys; h=json.load(open(sys.argv[1])); l=json.load(open(sys.argv[2])); \
a=h['all_at_once']['output_tokens_per_s']; print(f\"{a:.0f} tok/s ({h['mode']}); lmforge/HF = {l['throughput']['output_tokens_per_s']/a:.2f}x; \
batch-1 HF {h.get('batch1_decode_ms_per_token') or 0:.3f} ms/token\")" "$OUT/hf_$preset.json" "$sdir/serve_${preset}_0.json" 2>&1)"
  done
fi

if [ "$what" = gemms ]; then
  ./build-gpu/lmforge_bench --device cuda --precision bf16 --preset gpt2-124m --batch-size "${LMF_BENCH_B:-16}" \
    --seq-len 1024 --steps 3 --warmup-steps 1 --gemm-report >"$OUT/gemms.json" 2>"$OUT/gemms.log"
  rc=$?
  cat "$OUT/gemms.log"
  add "GEMM candidates report" "rc=$rc $(tail -1 "$OUT/gemms.log")"
  [ $rc -eq 0 ] || failures=$((failures + 1))
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
  # lmforge (bf16, tf32, fp32) and PyTorch (eager and torch.compile) on GPT-2 124M, T=1024, at
  # B=16 and at a large batch (LMF_BENCH_BIG_B, default 256: the largest power of two at which
  # torch.compile fits on an H200, 116.6 GB). The throughput rows run without --profile: the per-op
  # timing records events around every op, which costs time; a separate --profile run prints the
  # per-op table (at the large batch too with LMF_BENCH_BIG_PROFILE=1).
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
  bench_lmf bf16 "$B" lmf_bf16
  bench_lmf bf16 "$B" lmf_bf16_profile --profile
  bench_lmf bf16 "$B" lmf_bf16_graph --cuda-graph
  bench_lmf bf16 "$B" lmf_bf16_own "--attention lmforge"
  bench_lmf tf32 "$B" lmf_tf32
  bench_lmf fp32 "$B" lmf_fp32
  cat "$OUT/bench_lmf_bf16_profile.err"
  for mode in eager-fp32 eager-tf32 eager-bf16 compile-bf16; do bench_torch $mode "$B" "torch_$mode"; done
  if [ "$BIG" != 0 ]; then  # LMF_BENCH_BIG_B=0 skips the largest-batch rows
    bench_lmf bf16 "$BIG" lmf_bf16_big
    bench_lmf bf16 "$BIG" lmf_bf16_big_graph --cuda-graph
    if [ "${LMF_BENCH_BIG_PROFILE:-0}" = 1 ]; then
      bench_lmf bf16 "$BIG" lmf_bf16_big_profile --profile
      grep -A24 "per-op time" "$OUT/bench_lmf_bf16_big_profile.err"
    fi
    bench_torch compile-bf16 "$BIG" torch_compile-bf16_big
  fi
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
      ["lmf_bf16", "lmf_bf16_graph", "lmf_bf16_own", "lmf_tf32", "lmf_fp32", "torch_eager-fp32", "torch_eager-tf32", "torch_eager-bf16", "torch_compile-bf16"],
      "torch_compile-bf16")
bf, fp = load("lmf_bf16").get("tok_s"), load("lmf_fp32").get("tok_s")
if bf and fp: print("lmforge bf16 / lmforge fp32: %.2f" % (bf / fp))
if BIG != "0":
    table("GPT-2 124M training step, B=%s T=1024" % BIG, ["lmf_bf16_big", "lmf_bf16_big_graph", "torch_compile-bf16_big"],
          "torch_compile-bf16_big")
PY
fi

# MoE (issue 4) and whole-step CUDA graphs (issue 5): the MoE benchmark config against a PyTorch MoE LM
# (sort + per-expert loop) in eager and torch.compile, lmforge's dense model of the same active size,
# and tok/s of the training loop with --cuda-graph on and off (GPT-2 124M and the MoE config).
if [ "$what" = all ] || [ "$what" = moe ] || [ "$what" = moebench ]; then
  bench_lmf_moe() {  # preset tag [extra flags]
    ./build-gpu/lmforge_bench --device cuda --precision bf16 --preset "$1" --batch-size 8 --seq-len 2048 \
      --steps 5 --warmup-steps 2 ${3:-} >"$OUT/bench_$2.json" 2>"$OUT/bench_$2.err" || { failures=$((failures + 1)); tail -3 "$OUT/bench_$2.err"; }
  }
  bench_torch_moe() {  # mode tag timeout [extra flags]
    timeout "$3" python3 bench/torch_gpu_moe.py --mode "$1" --batch-size 8 --seq-len 2048 ${4:-} >"$OUT/bench_$2.json" \
      2>"$OUT/bench_$2.err" || { echo "$2: rc=$? (timeout $3 s?)"; tail -3 "$OUT/bench_$2.err"; }
  }
  bench_lmf_moe moe-bench lmf_moe --profile
  bench_lmf_moe moe-bench lmf_moe_graph --cuda-graph
  bench_lmf_moe moe-bench-dense lmf_moe_dense
  bench_lmf_moe moe-bench-dense lmf_moe_dense_graph --cuda-graph
  grep -A14 "per-op time" "$OUT/bench_lmf_moe.err"
  bench_torch_moe eager-bf16 torch_moe_eager-bf16 300
  bench_torch_moe compile-bf16 torch_moe_compile-bf16-loopeager "${LMF_MOE_COMPILE_TIMEOUT:-240}" --compile-loop-eager
  bench_torch_moe eager-bf16 torch_dense6144_eager-bf16 300 "--dense-ff 6144"
  graph_run() {  # preset B T graph tag
    ./build-gpu/lmforge train --device cuda --preset "$1" -B "$2" -T "$3" --steps 12 --warmup 2 --log-every 6 \
      --eval-batches 1 --eval-every 0 --cuda-graph "$4" --out-dir "$OUT/graph_$5" >"$OUT/graph_$5.log" 2>&1 ||
      { failures=$((failures + 1)); tail -3 "$OUT/graph_$5.log"; }
  }
  graph_run gpt2-124m 16 1024 on gpt2_on
  graph_run gpt2-124m 16 1024 off gpt2_off
  graph_run moe-bench 8 2048 on moe_on
  graph_run moe-bench 8 2048 off moe_off
  grep -hE "^params|^moe layers|^step=12 " "$OUT/graph_moe_on.log"
  python3 - "$OUT" <<'PY'
import json, os, re, sys
out = sys.argv[1]
def load(tag):
    try:
        return json.loads(open(os.path.join(out, "bench_%s.json" % tag)).read().strip().splitlines()[-1])
    except Exception as e:
        return {"impl": tag, "error": str(e)}
print("\nMoE LM (12L d768 12H, 8 experts top-2, d_expert 3072, vocab 32768), B=8 T=2048, same GPU")
print("%-34s %12s %10s %8s %10s %14s" % ("impl", "tok/s", "step_ms", "mfu", "peak_GB", "this/eager"))
ref = load("torch_moe_eager-bf16").get("tok_s")
for tag in ["lmf_moe", "lmf_moe_graph", "torch_moe_eager-bf16", "torch_moe_compile-bf16-loopeager", "lmf_moe_dense",
            "lmf_moe_dense_graph", "torch_dense6144_eager-bf16"]:
    r = load(tag)
    if "error" in r:
        print("%-34s error: %s" % (tag, r["error"])); continue
    print("%-34s %12.0f %10.1f %8.3f %10.2f %14.2f" % (tag, r["tok_s"], r["step_ms"], r["mfu"], r["peak_mem_gb"],
                                                       r["tok_s"] / ref if ref else float("nan")))
for sfx, what in (("", "eager launches"), ("_graph", "one CUDA graph per step")):
    m, dn = load("lmf_moe" + sfx).get("mfu"), load("lmf_moe_dense" + sfx).get("mfu")
    if m and dn: print("lmforge MoE MFU / lmforge dense (same active size) MFU, %s: %.2f (target >= 0.75)" % (what, m / dn))
def last_step(tag):
    try:
        lines = [l for l in open(os.path.join(out, "graph_%s.log" % tag)) if l.startswith("step=") and "toks/s=" in l]
        l = lines[-1]
        tok = float(re.search(r"toks/s=([0-9,]+)", l).group(1).replace(",", ""))
        la = re.search(r"kernel_launches_per_step=(\S+)", l).group(1)
        return tok, la, re.search(r" loss=(\S+)", l).group(1)
    except Exception as e:
        return None, str(e), None
print("\nWhole-step CUDA graph: training loop tok/s (steps 7-12), --cuda-graph on vs off")
def losses(tag):  # every logged train and validation loss, as stored (exact doubles)
    try:
        recs = [json.loads(l) for l in open(os.path.join(out, "graph_%s" % tag, "metrics.jsonl"))]
        return [(r["step"], r.get("loss", r.get("val_loss"))) for r in recs if "loss" in r or "val_loss" in r]
    except Exception as e:
        return str(e)
print("%-12s %12s %12s %8s %16s  %s" % ("model", "graph on", "graph off", "ratio", "launches on/off", "logged losses on vs off"))
for name in ["gpt2", "moe"]:
    on, lon, loss_on = last_step(name + "_on")
    off, loff, loss_off = last_step(name + "_off")
    lo, lf = losses(name + "_on"), losses(name + "_off")
    same = "bitwise equal (%d values)" % len(lo) if lo == lf and isinstance(lo, list) and lo else "DIFFER: %s vs %s" % (lo, lf)
    if on and off:
        print("%-12s %12.0f %12.0f %8.2f %16s  %s" % (name, on, off, on / off, lon + "/" + loff, same))
    else:
        print("%-12s error: %s %s" % (name, lon, loff))
PY
fi

# The refactor check (docs/ARCHITECTURE.md): 20 steps of GPT-2 124M and moe-bench, CUDA graphs on and off,
# with the baseline's binary and this tree's: every logged loss must be the same double.
if [ "$what" = refactor ]; then
  for side in base new; do
    bin=./build-gpu/lmforge
    [ $side = base ] && bin=$base_src/build-gpu/lmforge
    tools/same_bits.sh gpu "$bin" "/tmp/same_bits_$side" >"$OUT/same_bits_$side.txt" 2>&1
    add "same_bits.sh gpu ($side)" "rc=$? $(wc -l <"$OUT/same_bits_$side.txt") runs"
  done
  if diff "$OUT/same_bits_base.txt" "$OUT/same_bits_new.txt" >"$OUT/same_bits.diff"; then
    add "GPU losses, baseline vs this tree" "bitwise equal: $(grep -o ' [0-9]*:' "$OUT/same_bits_new.txt" | wc -l) losses"
  else
    add "GPU losses, baseline vs this tree" "DIFFER (same_bits.diff)"; failures=$((failures + 1)); head -c 3000 "$OUT/same_bits.diff"
  fi
  cut -c1-160 "$OUT/same_bits_new.txt"
fi
# Speed before/after: the same benchmark with both binaries, alternated (base, new, base, new) so that
# clock and thermal drift hit both alike.
if [ "$what" = refactorbench ]; then
  rb() {  # side tag preset B T [flags]
    local bin=./build-gpu/lmforge_bench
    [ "$1" = base ] && bin=$base_src/build-gpu/lmforge_bench
    "$bin" --device cuda --precision bf16 --preset "$3" --batch-size "$4" --seq-len "$5" --steps 10 --warmup-steps 3 \
      ${6:-} >"$OUT/rb_$2_$1.json" 2>"$OUT/rb_$2_$1.err" || { failures=$((failures + 1)); tail -3 "$OUT/rb_$2_$1.err"; }
    cat "$OUT/rb_$2_$1.json" >>"$OUT/rb_$2_$1.all"
  }
  for rep in 1 2; do
    for side in base new; do
      rb $side gpt2 gpt2-124m 16 1024
      rb $side gpt2_graph gpt2-124m 16 1024 --cuda-graph
      rb $side moe_graph moe-bench 8 2048 --cuda-graph
    done
  done
  python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
print("\nlmforge_bench before (baseline) / after (this tree), same GPU, 2 alternated runs each (step_ms)")
print("%-12s %22s %22s %10s" % ("config", "baseline step_ms", "this tree step_ms", "after/before"))
for tag in ["gpt2", "gpt2_graph", "moe_graph"]:
    def ms(side):
        try:
            return [json.loads(l)["step_ms"] for l in open(os.path.join(out, "rb_%s_%s.all" % (tag, side))) if l.strip()]
        except Exception as e:
            return []
    b, n = ms("base"), ms("new")
    if b and n:
        print("%-12s %22s %22s %10.3f" % (tag, " ".join("%.2f" % x for x in b), " ".join("%.2f" % x for x in n),
                                          (sum(n) / len(n)) / (sum(b) / len(b))))
    else:
        print("%-12s missing: %s %s" % (tag, b, n))
PY
fi

# Per-kernel time of one eager training step under Nsight Compute (Firecracker machines read the
# counters; --clock-control none leaves the clocks as found). tools/ncu_step.py cuts one step out of
# the window of launches, from one AdamW launch to the next.
if [ "$what" = ncu ]; then
  ncu_step() {  # tag skip count preset B T
    ncu --clock-control none --metrics gpu__time_duration.sum --csv --launch-skip "$2" --launch-count "$3" \
      --log-file "$OUT/ncu_$1.csv" ./build-gpu/lmforge_bench --device cuda --precision bf16 --preset "$4" \
      --batch-size "$5" --seq-len "$6" --steps 2 --warmup-steps 2 >"$OUT/ncu_$1.log" 2>&1
    local rc=$?
    add "ncu $1" "rc=$rc"
    [ $rc -eq 0 ] || { failures=$((failures + 1)); tail -5 "$OUT/ncu_$1.log"; }
    python3 tools/ncu_step.py "$OUT/ncu_$1.csv" --top "${LMF_NCU_TOP:-45}" | tee "$OUT/ncu_$1.txt"
  }
  ncu_step moe "${LMF_NCU_SKIP_MOE:-1100}" 1000 moe-bench 8 2048
  ncu_step gpt2 "${LMF_NCU_SKIP_GPT2:-900}" 800 gpt2-124m 16 1024
fi
# Hardware counters of the grouped GEMM kernels (bench_grouped_gemm's first NT launch and first TN
# launch, after 4 x 103 NT/NN launches): throughput against the ceilings, memory, warp stalls.
if [ "$what" = ncu ] || [ "$what" = ncugg ]; then
  for pick in "nt 0" "tn ${LMF_NCU_TN_SKIP:-412}"; do
    set -- $pick
    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
      --section SchedulerStats --section Occupancy -k regex:grouped_gemm_tma --launch-skip "$2" --launch-count 1 \
      ./build-gpu/bench_grouped_gemm >"$OUT/ncu_gg_$1.txt" 2>&1
    add "ncu grouped gemm $1" "rc=$?"
    grep -E "grouped_gemm_tma|Duration|Throughput|Busy|Hit Rate|Bandwidth|Stall|Issued|Eligible|No Eligible|Warp Cycles" \
      "$OUT/ncu_gg_$1.txt" | head -40
  done
fi
# Quick loop: build, the tests named in LMF_TESTS (default: all GPU tests), lmforge's MoE and GPT-2
# benchmarks with --profile (no PyTorch runs).
if [ "$what" = quick ]; then  # (its tests ran in the tests section above)
  ./build-gpu/lmforge_bench --device cuda --precision bf16 --preset moe-bench --batch-size 8 --seq-len 2048 --steps 5 \
    --warmup-steps 2 --profile >"$OUT/quick_moe.json" 2>"$OUT/quick_moe.err" || failures=$((failures + 1))
  grep -A16 "per-op time" "$OUT/quick_moe.err"
  add "lmforge MoE bench" "$(tail -1 "$OUT/quick_moe.json")"
  ./build-gpu/lmforge_bench --device cuda --precision bf16 --preset moe-bench --batch-size 8 --seq-len 2048 --steps 5 \
    --warmup-steps 2 --cuda-graph >"$OUT/quick_moe_graph.json" 2>"$OUT/quick_moe_graph.err" || failures=$((failures + 1))
  add "lmforge MoE bench, CUDA graph" "$(tail -1 "$OUT/quick_moe_graph.json")"
  ./build-gpu/lmforge_bench --device cuda --precision bf16 --preset gpt2-124m --batch-size 16 --seq-len 1024 --steps 5 \
    --warmup-steps 2 >"$OUT/quick_gpt2.json" 2>"$OUT/quick_gpt2.err" || failures=$((failures + 1))
  add "lmforge GPT-2 bench" "$(tail -1 "$OUT/quick_gpt2.json")"
  ./build-gpu/bench_grouped_gemm | tee "$OUT/bench_grouped_gemm.txt" | head -12
fi

echo; echo "== summary =="
printf '%s\n' "${summary[@]}"
echo "failures: $failures"
[ "$failures" -eq 0 ]
