#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to every test: installs packages, builds everything
# (CUDA code is compiled when nvcc exists), runs ctest. GPU tests (label `gpu`) skip themselves
# without a device.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh
cd build/dev
ctest -j"$(nproc)" --output-on-failure --timeout 600
