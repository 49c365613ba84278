#!/usr/bin/env bash
# Runs on the GPU host (see ../shared/GPU.md), from the repository root, after tools/gpu/pack.sh
# packed the binaries and fixtures into .gpu/. In one run, results under $OUT:
#   1. every `gpu`-labelled test binary (CUDA kernels vs CPU twins, CUDA backend, CUDA forward of
#      the demo model and of every MoLE family vs CPU, 64 streams), gtest JSON + logs;
#   2. compute-sanitizer --tool memcheck on the kernel and backend tests (memcheck);
#   3. the benchmarks: bench_gpu_sgmv + the torch baselines (merged with ratios), bench_gpu_decode;
#   4. the transformers reference of the demo model (tools/gpu/hf_reference.py).
# Usage: OUT=/tmp/out tools/gpu/run_gpu_checks.sh [tests|memcheck|bench|all]
set -uo pipefail
what=${1:-all}
export LD_LIBRARY_PATH=$PWD/.gpu/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export PATH=/usr/local/cuda/bin:$PATH
export MOLESERVE_TEST_FIXTURES=$PWD/.gpu/data/mole_fixtures
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
commit=$(cat .gpu/data/commit.txt 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  for t in kernels_cuda_test kernels_cuda_sgmv_attention_test cuda_backend_test cuda_forward_test; do
    [ -x .gpu/bin/$t ] || { echo "missing .gpu/bin/$t"; status=1; continue; }
    .gpu/bin/$t --gtest_output=json:$OUT/$t.json > "$OUT/$t.log" 2>&1 || status=1
    tail -3 "$OUT/$t.log"
  done
fi
if [ "$what" = memcheck ] || [ "$what" = all ]; then
  for t in kernels_cuda_test kernels_cuda_sgmv_attention_test cuda_backend_test; do
    compute-sanitizer --tool memcheck --error-exitcode 99 .gpu/bin/$t --gtest_filter=-*OutOfMemory* \
      > "$OUT/memcheck_$t.log" 2>&1
    rc=$?; [ $rc -eq 0 ] || status=1
    echo "memcheck $t: exit $rc"; tail -1 "$OUT/memcheck_$t.log"
  done
  compute-sanitizer --tool memcheck --error-exitcode 99 .gpu/bin/cuda_forward_test \
    --gtest_filter='*DemoModel*:*peft_lora*:*moepeft_dynmole*:*flylora*' \
    > "$OUT/memcheck_cuda_forward_test.log" 2>&1
  rc=$?; [ $rc -eq 0 ] || status=1
  echo "memcheck cuda_forward_test (subset): exit $rc"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  .gpu/bin/bench_gpu_sgmv --out "$OUT/gpu_sgmv_raw.json" | tee "$OUT/gpu_sgmv.txt" || status=1
  python3 bench/gpu/torch_sgmv_baseline.py --out "$OUT/torch_sgmv.json" > "$OUT/torch_sgmv.log" 2>&1 || status=1
  python3 bench/gpu/merge_sgmv.py "$OUT/gpu_sgmv_raw.json" "$OUT/torch_sgmv.json" \
    "$OUT/gpu_sgmv.json" --commit "$commit" --date "$(date +%F)" | tee -a "$OUT/gpu_sgmv.txt" || status=1
  .gpu/bin/bench_gpu_decode --out "$OUT/gpu_decode.json" 2>&1 | tee "$OUT/gpu_decode.txt" || status=1
fi
if [ "$what" = all ] && [ -d .gpu/data/demo-model ]; then
  PYTHONUNBUFFERED=1 python3 tools/gpu/hf_reference.py .gpu/data/demo-model > "$OUT/demo_model_hf_logits.json" \
    2> "$OUT/hf_reference.log" || { status=1; tail -20 "$OUT/hf_reference.log"; }
fi
ls -la "$OUT"
exit $status
