#!/usr/bin/env bash
# Configures and builds with CMake presets; CUDA is compiled when nvcc exists.
#   ./scripts/build.sh [targets...]             # preset dev (RelWithDebInfo, tests) into build/dev
#   ./scripts/build.sh --release [targets...]   # preset image (Release, no tests or benchmarks)
#                                               # into build/image: what the Docker images ship
# Targets are ninja targets (default: everything).
set -euo pipefail
cd "$(dirname "$0")/.."
preset=dev
if [ "${1:-}" = --release ]; then
  preset=image
  shift
fi
cuda=OFF
[ -x /usr/local/cuda/bin/nvcc ] && cuda=ON
cmake --preset "$preset" -DMOLESERVE_ENABLE_CUDA=$cuda > build-configure.log 2>&1 || {
  cat build-configure.log; exit 1; }
rm -f build-configure.log
ninja -C "build/$preset" -j"$(nproc)" "$@"
