#!/usr/bin/env bash
# Runs on the GPU host (see ../shared/GPU.md), from the repository root, after
#   ../shared/gpu/pack.sh build/dev/tests/kernels/kernels_cuda_test \
#       build/dev/tests/engine/cuda_backend_test /tmp/demo-model
# It runs the `gpu`-labelled tests, compute-sanitizer memcheck on them, and the transformers
# reference for the demo model; everything lands in $OUT.
set -uo pipefail
export LD_LIBRARY_PATH=$PWD/.gpu/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export PATH=/usr/local/cuda/bin:$PATH
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
status=0
for t in kernels_cuda_test cuda_backend_test; do
  .gpu/bin/$t --gtest_output=json:$OUT/$t.json > "$OUT/$t.log" 2>&1 || status=1
  tail -3 "$OUT/$t.log"
  compute-sanitizer --tool memcheck --error-exitcode 99 .gpu/bin/$t --gtest_filter=-*OutOfMemory* \
    > "$OUT/memcheck_$t.log" 2>&1
  rc=$?; [ $rc -eq 0 ] || status=1
  echo "memcheck $t: exit $rc"
  tail -1 "$OUT/memcheck_$t.log"
done
PYTHONUNBUFFERED=1 python3 tools/gpu/hf_reference.py .gpu/data/demo-model > "$OUT/demo_model_hf_logits.json" \
  2> "$OUT/hf_reference.log" || { status=1; tail -20 "$OUT/hf_reference.log"; }
ls -la "$OUT"
exit $status
