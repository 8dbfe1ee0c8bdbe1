#!/usr/bin/env bash
# Configures and builds lmforge (Release) into ./build. Installs dependencies first.
# LMF_CMAKE_ARGS (default: CUDA when nvcc is found, tests on), LMF_BUILD_TARGETS (default: all), LMF_DEPS.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh ${LMF_DEPS:-}
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release ${LMF_CMAKE_ARGS:--DLMF_CUDA=AUTO -DLMF_BUILD_TESTS=ON} >/dev/null
ninja -C build ${LMF_BUILD_TARGETS:-}
