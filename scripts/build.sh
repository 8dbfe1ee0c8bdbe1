#!/usr/bin/env bash
# Configures and builds lmforge (Release) into ./build. Installs dependencies first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release ${LMF_CMAKE_ARGS:-} >/dev/null
ninja -C build ${LMF_BUILD_TARGETS:-}
