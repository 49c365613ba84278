#!/usr/bin/env bash
# Scheduling benchmark: FCFS against the expert-aware policy, side by side, on the CPU build.
#
# N MoLE adapters (demo model, 8 experts of rank 8 on q_proj and o_proj of every layer), Zipf
# popularity, the device expert pool holding 100%, 25% and 10% of their experts. For each pool
# size and policy: start moleserve, drive it with molebench (closed loop, more requests in flight
# than the running batch holds, so the policy has a queue to choose from), read its /metrics.
# Writes every run's molebench JSON and a summary to $OUT and prints the table.
#
#   bench/scheduling/run.sh                       # defaults below
#   ADAPTERS=100 REQUESTS=2000 CONCURRENCY=64 bench/scheduling/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

BUILD=${BUILD:-build/dev}
OUT=${OUT:-bench/results/scheduling.json}
ADAPTERS=${ADAPTERS:-100}
REQUESTS=${REQUESTS:-2000}  # p99 of fewer is a handful of requests: too noisy to compare
CONCURRENCY=${CONCURRENCY:-64}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-16}
THREADS=${THREADS:-2}
PROMPT_LEN=${PROMPT_LEN:-uniform:16:64}
OUTPUT_LEN=${OUTPUT_LEN:-uniform:8:32}
FRACTIONS=${FRACTIONS:-"1.0 0.25 0.10"}
# expert_aware_nofair: the expert-aware policy with the per-adapter fair share off (to separate
# the effect of grouping from that of fairness); expert_aware_noslack: with relative aging off
# (--queue-delay-slack 0).
POLICIES=${POLICIES:-"fcfs expert_aware expert_aware_nofair expert_aware_noslack"}
# Extra moleserve flags for every run (e.g. SERVER_FLAGS="--max-bypass 4" to try a setting).
SERVER_FLAGS=${SERVER_FLAGS:-}
PORT=${PORT:-51051}
METRICS_PORT=${METRICS_PORT:-51090}

cmake --build "$BUILD" --target moleserve molebench bench_write_demo_adapters >/dev/null

work=$(mktemp -d)
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; fi
  if [[ -z "${KEEP:-}" ]]; then rm -rf "$work"; else echo "runs kept in $work"; fi
}
trap cleanup EXIT

info=$("$BUILD/bench/bench_write_demo_adapters" --dir "$work/adapters" --count "$ADAPTERS" \
  --experts 8 --rank 8)
working_set=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['working_set_bytes'])" "$info")
adapter_flags=$(python3 -c "
import sys; n, d = int(sys.argv[1]), sys.argv[2]
print(','.join(f'a{i}={d}/a{i}' for i in range(n)))" "$ADAPTERS" "$work/adapters")
echo "$ADAPTERS adapters, working set $((working_set >> 20)) MiB of experts"

for fraction in $FRACTIONS; do
  pool=$(python3 -c "import math,sys; print(math.ceil(int(sys.argv[1]) * float(sys.argv[2])))" \
    "$working_set" "$fraction")
  for policy in $POLICIES; do
    policy_flags=(--scheduling-policy "$policy")
    if [[ "$policy" == expert_aware_nofair ]]; then
      policy_flags=(--scheduling-policy expert_aware --fair-share-tokens 1000000000000)
    elif [[ "$policy" == expert_aware_noslack ]]; then
      policy_flags=(--scheduling-policy expert_aware --queue-delay-slack 0)
    fi
    "$BUILD/server/moleserve" --port "$PORT" --http-port -1 --metrics-port "$METRICS_PORT" --admin-port -1 \
      --threads "$THREADS" --max-num-seqs "$MAX_NUM_SEQS" --max-queue 1024 \
      --expert-cache-bytes "$pool" "${policy_flags[@]}" --adapter "$adapter_flags" $SERVER_FLAGS \
      --log-level warn >"$work/server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 600); do
      if "$BUILD/server/molectl" health --addr "127.0.0.1:$PORT" >/dev/null 2>&1; then break; fi
      sleep 0.1
    done
    "$BUILD/bench/molebench" --addr "127.0.0.1:$PORT" --metrics-addr "127.0.0.1:$METRICS_PORT" \
      --mode closed --concurrency "$CONCURRENCY" --num-requests "$REQUESTS" --seed 7 \
      --adapters "a:$ADAPTERS" --popularity zipf --prompt-len "$PROMPT_LEN" \
      --output-len "$OUTPUT_LEN" --timeout 600s --label "$policy pool=$fraction" \
      --out "$work/run_${fraction}_${policy}.json" >"$work/run_${fraction}_${policy}.txt"
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  done
done

python3 bench/scheduling/summarize.py --working-set "$working_set" --pool-fractions "$FRACTIONS" \
  --policies "$POLICIES" --runs "$work" \
  --config "adapters=$ADAPTERS requests=$REQUESTS concurrency=$CONCURRENCY max_num_seqs=$MAX_NUM_SEQS threads=$THREADS prompt=$PROMPT_LEN output=$OUTPUT_LEN popularity=zipf(1.0)" \
  --out "$OUT"
