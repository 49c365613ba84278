#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to every test: installs packages, builds everything
# (CUDA code is compiled when nvcc exists), runs ctest, then every fuzz target briefly
# (scripts/fuzz.sh). GPU tests (label `gpu`) skip themselves without a device.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh
(cd build/dev && ctest -j"$(nproc)" --output-on-failure --timeout 600)
# Fuzz smoke run: every libFuzzer target of tests/fuzz for MOLESERVE_FUZZ_SECONDS (default 20)
# on its seeds and regression inputs, ASan + UBSan (its own clang build in build/fuzz); 0 skips.
if [ "${MOLESERVE_FUZZ_SECONDS:-20}" != 0 ]; then
  ./scripts/fuzz.sh all "${MOLESERVE_FUZZ_SECONDS:-20}"
fi
