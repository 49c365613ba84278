#!/usr/bin/env bash
# Configures and builds with the `dev` preset (RelWithDebInfo; CUDA compiled when nvcc exists)
# into build/dev. Extra arguments are ninja targets (default: everything).
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=OFF
[ -x /usr/local/cuda/bin/nvcc ] && cuda=ON
cmake --preset dev -DMOLESERVE_ENABLE_CUDA=$cuda > build-configure.log 2>&1 || {
  cat build-configure.log; exit 1; }
rm -f build-configure.log
ninja -C build/dev -j"$(nproc)" "$@"
