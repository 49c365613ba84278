#!/usr/bin/env bash
# Builds the libFuzzer targets (preset `fuzz`: clang 14, ASan + UBSan, build/fuzz) and runs one
# or all of them for SECONDS each. Installs nothing (scripts/setup.sh has clang and
# libclang-rt-14-dev).
#   ./scripts/fuzz.sh TARGET SECONDS [libFuzzer flags...]   # e.g. safetensors_fuzz 60
#   ./scripts/fuzz.sh all SECONDS [libFuzzer flags...]      # every target, one after the other
#   ./scripts/fuzz.sh all 0                                 # every seed once, no fuzzing
#   ./scripts/fuzz.sh list                                  # the target names
# Each run reads the committed seeds tests/fuzz/corpus/TARGET/ (never written) and keeps what it
# finds in build/fuzz/runs/TARGET/corpus/ (a working copy that grows across runs), with
# tests/fuzz/TARGET.dict when there is one; flags: -max_total_time=SECONDS -rss_limit_mb=2048
# -timeout=10. Exit status 1 when any target crashed, leaked, timed out or hit a UBSan report:
# the input is kept in build/fuzz/runs/TARGET/artifacts/ and the command to reproduce it is
# printed. The log of each run is build/fuzz/runs/TARGET/log.txt.
# Environment: FUZZ_BUILD_JOBS (default: nproc) for the build.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
targets=(generate_request_fuzz safetensors_fuzz adapter_config_fuzz tokenizer_fuzz
         tokenizer_codec_fuzz model_config_fuzz stop_strings_fuzz admin_request_fuzz
         chat_template_fuzz)

usage() { echo "usage: $0 TARGET|all SECONDS [libFuzzer flags...] | $0 list" >&2; exit 2; }
[ $# -ge 1 ] || usage
if [ "$1" = list ]; then printf '%s\n' "${targets[@]}"; exit 0; fi
[ $# -ge 2 ] || usage
what=$1 seconds=$2
shift 2
[[ "$seconds" =~ ^[0-9]+$ ]] || usage
if [ "$what" = all ]; then
  run=("${targets[@]}")
else
  what=${what%_fuzz}_fuzz  # "safetensors" works too
  printf '%s\n' "${targets[@]}" | grep -qx "$what" || { echo "fuzz: unknown target $what" >&2; usage; }
  run=("$what")
fi

build=build/fuzz
jobs=${FUZZ_BUILD_JOBS:-$(nproc)}
[ -f "$build/build.ninja" ] || cmake --preset fuzz >/dev/null
if [ "$what" = all ]; then
  cmake --build "$build" -j"$jobs" --target moleserve_fuzzers
else
  cmake --build "$build" -j"$jobs" --target "$what"
fi

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=()
for t in "${run[@]}"; do
  bin="$root/$build/tests/fuzz/$t"
  seeds="$root/tests/fuzz/corpus/$t"
  dir="$root/$build/runs/$t"
  mkdir -p "$dir/corpus" "$dir/artifacts" "$seeds"
  flags=(-rss_limit_mb=2048 -timeout=10 -print_final_stats=1 -artifact_prefix="$dir/artifacts/")
  # 0 seconds: run every seed and kept input once (a regression run), no fuzzing.
  if [ "$seconds" -eq 0 ]; then flags+=(-runs=0); else flags+=(-max_total_time="$seconds"); fi
  [ -f "$root/tests/fuzz/$t.dict" ] && flags+=(-dict="$root/tests/fuzz/$t.dict")
  echo "== $t: ${seconds}s on $(ls "$seeds" | wc -l) seeds (+$(ls "$dir/corpus" | wc -l) kept)"
  before=$(ls "$dir/artifacts" | wc -l)
  set +e
  "$bin" "${flags[@]}" "$@" "$dir/corpus" "$seeds" >"$dir/log.txt" 2>&1
  rc=$?
  set -e
  grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE|INITED)' "$dir/log.txt" | tail -1 || true
  if [ $rc -ne 0 ]; then
    failed+=("$t")
    echo "!! $t failed (exit $rc); log: $dir/log.txt"
    grep -E 'ERROR: |runtime error: |FUZZ_CHECK|SUMMARY: ' "$dir/log.txt" | head -5 || true
    tail -n 20 "$dir/log.txt"
    for a in $(ls -t "$dir/artifacts" | head -n $(( $(ls "$dir/artifacts" | wc -l) - before ))); do
      echo "   input:      $dir/artifacts/$a"
      echo "   reproduce:  $bin $dir/artifacts/$a"
      echo "   minimize:   $bin -minimize_crash=1 -runs=100000 -artifact_prefix=$dir/artifacts/min- $dir/artifacts/$a"
    done
  fi
done
if [ ${#failed[@]} -ne 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}"
  exit 1
fi
echo "fuzz: ${#run[@]} target(s) ran ${seconds}s each without a finding"
