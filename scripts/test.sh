#!/usr/bin/env bash
# Builds lmforge with its tests and runs them all through CTest (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
cd build
ctest --output-on-failure --timeout 900 -j2 "$@"
