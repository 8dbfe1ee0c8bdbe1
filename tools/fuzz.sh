#!/usr/bin/env bash
# Builds lmforge's fuzz targets (fuzz/: libFuzzer, clang, ASan + UBSan) and runs each for SECONDS
# (default 60) on a copy of its seed corpus (fuzz/corpus/<target>/), with the dictionary fuzz/<target>.dict
# when there is one, else fuzz/json.dict. docs/ROBUSTNESS.md has the details.
#
#   tools/fuzz.sh [SECONDS] [TARGET...]     every target when none is named
#
# Environment: LMF_FUZZ_BUILD   build directory (default build-fuzz)
#              LMF_FUZZ_WORK    working corpora, crashes and logs (default $LMF_FUZZ_BUILD/work)
#              LMF_FUZZ_JOBS    parallel fuzzing processes per target (default 1)
#              LMF_FUZZ_ARGS    extra libFuzzer flags
#              LMF_FUZZ_BUILD_JOBS  ninja's -j for the build (default: ninja's own)
# A finding (crash, sanitizer report, leak, timeout, out-of-memory) leaves its input in
# $LMF_FUZZ_WORK/<target>/crash-* and makes the script exit 1; rerun it with
#   $LMF_FUZZ_BUILD/fuzz/<target> <that file>
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(fuzz_model_config fuzz_checkpoint_state fuzz_safetensors fuzz_shard fuzz_completion_request
                                     fuzz_gguf fuzz_hf_config fuzz_chat_template fuzz_series)
build="${LMF_FUZZ_BUILD:-build-fuzz}"
work="${LMF_FUZZ_WORK:-$build/work}"
jobs="${LMF_FUZZ_JOBS:-1}"

cmake -S . -B "$build" -G Ninja -DLMF_FUZZ=ON -DLMF_CUDA=OFF -DLMF_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER="${CXX:-clang++}" -DCMAKE_C_COMPILER="${CC:-clang}" >/dev/null
ninja -C "$build" ${LMF_FUZZ_BUILD_JOBS:+-j "$LMF_FUZZ_BUILD_JOBS"} "${targets[@]}"

status=0
for t in "${targets[@]}"; do
  mkdir -p "$work/$t/corpus"
  log="$work/$t/fuzz.log"
  # The working corpus grows across runs; the seeds in the repository stay as they are.
  # -rss_limit_mb / -malloc_limit_mb: a parser that allocates gigabytes for a small input is a finding.
  # a target's own dictionary (fuzz/<target>.dict) when it has one, else the JSON one
  dict=fuzz/json.dict
  [ -f "fuzz/$t.dict" ] && dict="fuzz/$t.dict"
  parallel=()
  [ "$jobs" -gt 1 ] && parallel=(-jobs="$jobs" -workers="$jobs")
  set +e
  "$build/fuzz/$t" "$work/$t/corpus" "fuzz/corpus/$t" -dict="$dict" -max_total_time="$seconds" \
    "${parallel[@]}" -timeout=10 -rss_limit_mb=4096 -malloc_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 -artifact_prefix="$work/$t/" ${LMF_FUZZ_ARGS:-} >"$log" 2>&1
  rc=$?
  set -e
  [ "$jobs" -gt 1 ] && cat fuzz-*.log >>"$log" 2>/dev/null && rm -f fuzz-*.log
  execs=$(grep -ho 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s += $2} END {print s + 0}')
  cov=$(grep -ho 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  ft=$(grep -ho 'ft: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  corpus=$(ls "$work/$t/corpus" | wc -l)
  if [ $rc -eq 0 ]; then
    echo "$t: ok, ${seconds}s, $execs executions, coverage $cov edges, $ft features, corpus $corpus inputs"
  else
    echo "$t: FINDING (exit $rc), see $log and $work/$t/crash-* / timeout-* / oom-* / leak-*"
    grep -m1 -E 'ERROR: |fuzz finding|runtime error' "$log" || true
    status=1
  fi
done
exit $status
