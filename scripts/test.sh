#!/usr/bin/env bash
# Builds lmforge with its tests and runs them all through CTest, then installs the Python package
# (`pip install .` into third_party/pyvenv) and runs its tests (pytest tests/python). On a machine
# without a GPU the CUDA tests skip themselves; the list CTest prints of them is folded into the
# one-line summary at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
cd build
log=$(mktemp)
set +e
ctest --output-on-failure --timeout 900 -j2 "$@" 2>&1 | tee "$log" |
  awk '/^The following tests did not run:/ {skip = 1; next} skip && /^\t/ {next} {skip = 0; print}'
rc=${PIPESTATUS[0]}
set -e
skipped=$(awk '/^The following tests did not run:/ {on = 1; next} on && /^\t/ {n++} on && !/^\t/ {on = 0} END {print n + 0}' "$log")
gpu_skipped=$(awk '/^The following tests did not run:/ {on = 1; next} on && /^\t/ && /Cuda|GPU|Gpu/ {n++} on && !/^\t/ {on = 0} END {print n + 0}' "$log")
passed=$(grep -oE '[0-9]+% tests passed, [0-9]+ tests failed out of [0-9]+' "$log" | tail -1)
if grep -qE '^CMAKE_CUDA_COMPILER:[A-Z]+=/' CMakeCache.txt; then
  why=$(command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && echo "see the log above" ||
        echo "no GPU on this machine; tools/gpu_check.sh runs them on one")
else
  why="built without CUDA"
fi

# The Python package, built the way a user builds it (docs/PYTHON.md).
cd ..
venv=third_party/pyvenv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pylog=$(mktemp)
if "$venv/bin/python" -m pip install -q --disable-pip-version-check ".[test]" >"$pylog" 2>&1; then
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/python 2>&1 | tee -a "$pylog"
  py_rc=${PIPESTATUS[0]}
  py_summary=$(tail -1 "$pylog" | sed 's/=//g; s/^ *//; s/ *$//')
else
  tail -30 "$pylog"
  py_rc=1
  py_summary="pip install . failed"
fi
echo "summary: ${passed:-no CTest summary}; $skipped skipped ($gpu_skipped GPU tests: $why); python: $py_summary"
rm -f "$log" "$pylog"
[ "$rc" -ne 0 ] && exit "$rc"
exit "$py_rc"
