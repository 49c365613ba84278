#!/usr/bin/env bash
# Prefix cache benchmark on the CPU build: the same workloads with --prefix-caching on and off.
#
#   1. chat: CONVERSATIONS multi-turn conversations (molebench --mode chat), TURNS turns each, all
#      starting with one shared system prompt, over ADAPTERS MoLE adapters with Zipf popularity;
#      each turn repeats the conversation so far (the answers the server gave) and adds a
#      question. TTFT per turn, throughput, hit rate.
#   2. no shared prefixes: random prompts (molebench closed loop), for the cost of the cache when
#      nothing repeats.
# Writes every run's molebench JSON and a summary with the ratios to $OUT and prints the table.
#
#   bench/prefix_cache/run.sh
#   CONVERSATIONS=48 TURNS=5 bench/prefix_cache/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

BUILD=${BUILD:-build/dev}
OUT=${OUT:-bench/results/prefix_cache.json}
ADAPTERS=${ADAPTERS:-16}
CONVERSATIONS=${CONVERSATIONS:-32}
TURNS=${TURNS:-4}
CONCURRENCY=${CONCURRENCY:-8}
SYSTEM_PROMPT_LEN=${SYSTEM_PROMPT_LEN:-384}
QUESTION_LEN=${QUESTION_LEN:-uniform:16:48}
OUTPUT_LEN=${OUTPUT_LEN:-uniform:16:32}
RANDOM_REQUESTS=${RANDOM_REQUESTS:-128}
THREADS=${THREADS:-2}
PORT=${PORT:-52051}
METRICS_PORT=${METRICS_PORT:-52090}

cmake --build "$BUILD" --target moleserve molectl molebench bench_write_demo_adapters >/dev/null

work=$(mktemp -d)
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; fi
  if [[ -z "${KEEP:-}" ]]; then rm -rf "$work"; else echo "runs kept in $work"; fi
}
trap cleanup EXIT

"$BUILD/bench/bench_write_demo_adapters" --dir "$work/adapters" --count "$ADAPTERS" \
  --experts 8 --rank 8 >/dev/null
adapter_flags=$(python3 -c "
import sys; n, d = int(sys.argv[1]), sys.argv[2]
print(','.join(f'a{i}={d}/a{i}' for i in range(n)))" "$ADAPTERS" "$work/adapters")

for caching in true false; do
  "$BUILD/server/moleserve" --port "$PORT" --http-port -1 --metrics-port "$METRICS_PORT" \
    --admin-port -1 --threads "$THREADS" --max-num-seqs 16 --max-queue 1024 \
    --kv-cache-mib 512 --prefix-caching="$caching" --adapter "$adapter_flags" \
    --log-level warn >"$work/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 600); do
    if "$BUILD/server/molectl" health --addr "127.0.0.1:$PORT" >/dev/null 2>&1; then break; fi
    sleep 0.1
  done
  "$BUILD/bench/molebench" --addr "127.0.0.1:$PORT" --metrics-addr "127.0.0.1:$METRICS_PORT" \
    --mode chat --num-requests "$CONVERSATIONS" --turns "$TURNS" --concurrency "$CONCURRENCY" \
    --system-prompt-len "$SYSTEM_PROMPT_LEN" --prompt-len "$QUESTION_LEN" \
    --output-len "$OUTPUT_LEN" --adapters "a:$ADAPTERS" --popularity zipf --seed 11 \
    --timeout 600s --label "chat caching=$caching" --out "$work/chat_$caching.json" \
    >"$work/chat_$caching.txt"
  "$BUILD/bench/molebench" --addr "127.0.0.1:$PORT" --metrics-addr "127.0.0.1:$METRICS_PORT" \
    --mode closed --concurrency "$CONCURRENCY" --num-requests "$RANDOM_REQUESTS" \
    --prompt-len uniform:64:256 --output-len "$OUTPUT_LEN" --adapters "a:$ADAPTERS" \
    --popularity zipf --seed 12 --timeout 600s --label "random caching=$caching" \
    --out "$work/random_$caching.json" >"$work/random_$caching.txt"
  curl -s "127.0.0.1:$METRICS_PORT/metrics" | grep '^moleserve_prefix_cache' \
    >"$work/metrics_$caching.txt" || true
  kill "$server_pid"
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
done

python3 - "$work" "$OUT" "$(git rev-parse --short HEAD)" <<'EOF'
import json, sys, datetime
work, out, commit = sys.argv[1:4]
load = lambda name: json.load(open(f"{work}/{name}.json"))
ttft = lambda report: report["latency_ms"]["ttft"]
tput = lambda report: report["totals"]["output_token_throughput"]
on, off = load("chat_true"), load("chat_false")
ron, roff = load("random_true"), load("random_false")
metrics = {}
for line in open(f"{work}/metrics_true.txt"):
    name, value = line.split()
    metrics[name] = float(value)
turns = []
for t_on, t_off in zip(on["per_turn"], off["per_turn"]):
    turns.append({"turn": t_on["turn"], "mean_prompt_tokens": t_on["mean_prompt_tokens"],
                  "ttft_p50_ms_cached": t_on["ttft_ms"]["p50"],
                  "ttft_p50_ms_uncached": t_off["ttft_ms"]["p50"],
                  "ttft_p50_uncached_over_cached": t_off["ttft_ms"]["p50"] / t_on["ttft_ms"]["p50"],
                  "ttft_p99_ms_cached": t_on["ttft_ms"]["p99"],
                  "ttft_p99_ms_uncached": t_off["ttft_ms"]["p99"]})
queries = metrics.get("moleserve_prefix_cache_queries_tokens_total", 0)
hits = metrics.get("moleserve_prefix_cache_hits_tokens_total", 0)
summary = {
    "bench": "prefix_cache", "date": datetime.date.today().isoformat(), "commit": commit,
    "backend": "cpu (demo model), 2 threads",
    "config": on["config"],
    "chat": {
        "per_turn": turns,
        "ttft_p50_ms": {"cached": ttft(on)["p50"], "uncached": ttft(off)["p50"]},
        "ttft_p99_ms": {"cached": ttft(on)["p99"], "uncached": ttft(off)["p99"]},
        "output_tokens_per_s": {"cached": tput(on), "uncached": tput(off)},
        "throughput_cached_over_uncached": tput(on) / tput(off),
        "hit_rate_tokens": hits / queries if queries else 0,
    },
    "random_prompts": {
        "output_tokens_per_s": {"cached": tput(ron), "uncached": tput(roff)},
        "throughput_cached_over_uncached": tput(ron) / tput(roff),
        "ttft_p50_ms": {"cached": ttft(ron)["p50"], "uncached": ttft(roff)["p50"]},
    },
}
json.dump(summary, open(out, "w"), indent=1)
open(out, "a").write("\n")
print(f"{'turn':>5} {'prompt':>7} {'TTFT p50 cached':>16} {'uncached':>9} {'ratio':>6}")
for t in turns:
    print(f"{t['turn']:>5} {t['mean_prompt_tokens']:>7} {t['ttft_p50_ms_cached']:>16.1f} "
          f"{t['ttft_p50_ms_uncached']:>9.1f} {t['ttft_p50_uncached_over_cached']:>6.2f}")
c = summary["chat"]
print(f"chat: hit rate {c['hit_rate_tokens']:.2f}, throughput cached/uncached "
      f"{c['throughput_cached_over_uncached']:.2f}")
print(f"random prompts: throughput cached/uncached "
      f"{summary['random_prompts']['throughput_cached_over_uncached']:.2f}")
print(f"wrote {out}")
EOF
