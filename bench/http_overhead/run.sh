#!/usr/bin/env bash
# HTTP front end's overhead over gRPC: the same molebench plan (closed loop, greedy, ignore_eos,
# token-id prompts) sent to one moleserve through Inference/Generate and through the
# OpenAI-compatible POST /v1/completions (streamed with usage), runs interleaved (grpc, http,
# grpc, http, ...) so that drift of a busy machine hits both alike. For each concurrency: the
# median over the repeats of output throughput and of TTFT p50 per protocol, and the ratios
# (goal of issue 18: HTTP throughput within 5% of gRPC's, TTFT p50 within 1 ms).
# Writes every run's molebench JSON and the summary to $OUT and prints the table.
#
#   bench/http_overhead/run.sh                    # CPU build, demo model
#   CONCURRENCY="1 16" REPEATS=5 bench/http_overhead/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

BUILD=${BUILD:-build/dev}
OUT=${OUT:-bench/results/http_vs_grpc.json}
CONCURRENCY=${CONCURRENCY:-"1 8 32"}
REPEATS=${REPEATS:-3}
REQUESTS=${REQUESTS:-120}
PROMPT_LEN=${PROMPT_LEN:-fixed:64}
OUTPUT_LEN=${OUTPUT_LEN:-fixed:32}
THREADS=${THREADS:-2}
MODEL_FLAGS=${MODEL_FLAGS:-}
PORT=${PORT:-53051}
HTTP_PORT=${HTTP_PORT:-53080}
METRICS_PORT=${METRICS_PORT:-53090}

cmake --build "$BUILD" --target moleserve molebench >/dev/null
work=$(mktemp -d)
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; fi
  if [[ -z "${KEEP:-}" ]]; then rm -rf "$work"; else echo "runs kept in $work"; fi
}
trap cleanup EXIT

# shellcheck disable=SC2086
"$BUILD/server/moleserve" --port "$PORT" --http-port "$HTTP_PORT" --metrics-port "$METRICS_PORT" \
  --admin-port -1 --threads "$THREADS" --max-queue 4096 --log-level warn $MODEL_FLAGS \
  >"$work/server.log" 2>&1 &
server_pid=$!

for c in $CONCURRENCY; do
  for r in $(seq 1 "$REPEATS"); do
    for protocol in grpc http; do
      # The server's CPU time over the run (utime + stime, clock ticks): on a machine where the
      # client shares the cores, CPU per token isolates the server's own cost of each front end.
      before=$(awk '{print $14 + $15}' "/proc/$server_pid/stat")
      "$BUILD/bench/molebench" --protocol "$protocol" --addr "localhost:$PORT" \
        --http-addr "localhost:$HTTP_PORT" --wait-for-server --mode closed --concurrency "$c" \
        --num-requests "$REQUESTS" --prompt-len "$PROMPT_LEN" --output-len "$OUTPUT_LEN" \
        --label "$protocol c=$c #$r" --out "$work/$protocol-c$c-r$r.json" >/dev/null 2>"$work/mb.log" \
        || { cat "$work/mb.log"; exit 1; }
      after=$(awk '{print $14 + $15}' "/proc/$server_pid/stat")
      echo $(( after - before )) >"$work/$protocol-c$c-r$r.ticks"
    done
  done
done

python3 - "$work" "$OUT" "$CONCURRENCY" "$REPEATS" "$(git rev-parse --short HEAD)" \
  "$(nproc)" "$(getconf CLK_TCK)" <<'PY'
import datetime, glob, json, os, statistics, sys
work, out, concurrency, repeats, commit, cores, clk_tck = sys.argv[1:8]
rows = []
for c in concurrency.split():
    row = {"concurrency": int(c)}
    for protocol in ("grpc", "http"):
        runs = [json.load(open(f"{work}/{protocol}-c{c}-r{r}.json")) for r in range(1, int(repeats) + 1)]
        for run in runs:
            assert run["totals"]["failed"] == 0, f"{protocol} c={c}: requests failed"
        row[protocol] = {
            "output_tok_per_s": statistics.median(
                r["totals"]["output_token_throughput"] for r in runs),
            "ttft_p50_ms": statistics.median(r["latency_ms"]["ttft"]["p50"] for r in runs),
            "tpot_p50_ms": statistics.median(r["latency_ms"]["tpot"]["p50"] for r in runs),
            "server_cpu_ms_per_token": statistics.median(
                int(open(f"{work}/{protocol}-c{c}-r{i}.ticks").read()) * 1000 / int(clk_tck)
                / r["totals"]["output_tokens"] for i, r in enumerate(runs, 1)),
            "runs": len(runs),
        }
    row["throughput_ratio_http_over_grpc"] = (row["http"]["output_tok_per_s"] /
                                              row["grpc"]["output_tok_per_s"])
    row["ttft_p50_delta_ms"] = row["http"]["ttft_p50_ms"] - row["grpc"]["ttft_p50_ms"]
    row["server_cpu_ratio_http_over_grpc"] = (row["http"]["server_cpu_ms_per_token"] /
                                              row["grpc"]["server_cpu_ms_per_token"])
    rows.append(row)
summary = {
    "benchmark": "http_vs_grpc",
    "what": "molebench closed loop, the same plan over gRPC Generate and HTTP /v1/completions "
            "(streamed), runs interleaved; medians over repeats",
    "device": f"CPU build, {cores} cores (the client runs on the same cores as the server)",
    "date": datetime.date.today().isoformat(),
    "commit": commit,
    "config": {k: os.environ.get(k, d) for k, d in
               [("REQUESTS", "120"), ("PROMPT_LEN", "fixed:64"), ("OUTPUT_LEN", "fixed:32"),
                ("THREADS", "2"), ("MODEL_FLAGS", "")]},
    "goal": "throughput ratio >= 0.95 and TTFT p50 delta <= 1 ms",
    "rows": rows,
}
with open(out, "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")
print(f"{'conc':>5} {'grpc tok/s':>11} {'http tok/s':>11} {'ratio':>6} "
      f"{'grpc TTFT p50':>14} {'http TTFT p50':>14} {'delta ms':>9} "
      f"{'server CPU ms/tok grpc':>23} {'http':>6} {'ratio':>6}")
for r in rows:
    print(f"{r['concurrency']:>5} {r['grpc']['output_tok_per_s']:>11.1f} "
          f"{r['http']['output_tok_per_s']:>11.1f} {r['throughput_ratio_http_over_grpc']:>6.3f} "
          f"{r['grpc']['ttft_p50_ms']:>14.2f} {r['http']['ttft_p50_ms']:>14.2f} "
          f"{r['ttft_p50_delta_ms']:>9.2f} {r['grpc']['server_cpu_ms_per_token']:>23.3f} "
          f"{r['http']['server_cpu_ms_per_token']:>6.3f} "
          f"{r['server_cpu_ratio_http_over_grpc']:>6.3f}")
print(f"wrote {out}")
PY
