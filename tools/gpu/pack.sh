#!/usr/bin/env bash
# Builds what tools/gpu/run_gpu_checks.sh runs, for Hopper (preset gpu-hopper: sm_90a), writes
# the MoLE fixtures, and packs binaries + fixtures into .gpu/ with ../shared/gpu/pack.sh.
# Then, with the device tool: carry .gpu and run `OUT=$OUT tools/gpu/run_gpu_checks.sh all`.
set -euo pipefail
cd "$(dirname "$0")/../.."
targets="kernels_cuda_test kernels_cuda_sgmv_attention_test cuda_backend_test cuda_forward_test
         mole_families_test bench_gpu_sgmv bench_gpu_decode"
cmake --preset gpu-hopper >/dev/null
cmake --build build/gpu-hopper --target $targets
# The fixtures come from Debian's python3-torch here; the GPU host reads them from .gpu/data.
(cd build/gpu-hopper && ./tests/engine/mole_families_test --gtest_filter='*peft_lora' >/dev/null)
fixtures=$(ls -d build/gpu-hopper/test_fixtures/mole_* | grep -v tmp | head -1)
rm -rf /tmp/mole_fixtures && cp -r "$fixtures" /tmp/mole_fixtures
git rev-parse --short HEAD > /tmp/commit.txt
mkdir -p /tmp/gpu_commit && mv /tmp/commit.txt /tmp/gpu_commit/commit.txt
bins=""
for t in kernels_cuda_test kernels_cuda_sgmv_attention_test cuda_backend_test cuda_forward_test; do
  bins="$bins $(find build/gpu-hopper/tests -name $t -type f)"
done
bins="$bins build/gpu-hopper/bench/bench_gpu_sgmv build/gpu-hopper/bench/bench_gpu_decode"
# The CUDA backend plugin is dlopen-ed (not in ldd): packed as a binary, moved to .gpu/lib below.
bins="$bins build/gpu-hopper/lib/libmoleserve_cuda.so"
../shared/gpu/pack.sh $bins /tmp/mole_fixtures
cp /tmp/gpu_commit/commit.txt .gpu/data/commit.txt
mv .gpu/bin/libmoleserve_cuda.so .gpu/lib/
