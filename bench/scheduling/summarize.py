#!/usr/bin/env python3
"""Merges the molebench runs of bench/scheduling/run.sh into one JSON report and prints the table.

For each pool fraction, FCFS and the expert-aware policy side by side: request and output-token
throughput, TTFT p50/p99, expert swaps (experts copied into the pool: misses + prefetches) per
1000 generated tokens, expert bytes moved per generated token and mean distinct experts per step,
with the expert-aware/FCFS ratio of each.
"""
import argparse
import json
import pathlib
import sys


def row(run):
    t, lat, sm = run["totals"], run["latency_ms"], run["server_metrics"]
    d = sm["deltas"]
    gen = d.get("moleserve_generation_tokens_total", 0) or 1
    swaps = (d.get('moleserve_expert_cache_lookups_total{tier="device",result="miss"}', 0) +
             d.get("moleserve_expert_cache_prefetched_total", 0))
    steps = d.get("moleserve_step_distinct_experts_count", 0)
    return {
        "completed": t["completed"],
        "failed": t["failed"],
        "duration_s": t["duration_s"],
        "request_throughput": t["request_throughput"],
        "output_token_throughput": t["output_token_throughput"],
        "ttft_p50_ms": lat["ttft"]["p50"],
        "ttft_p99_ms": lat["ttft"]["p99"],
        "tpot_p50_ms": lat["tpot"]["p50"],
        "e2e_p99_ms": lat["e2e"]["p99"],
        "swaps_per_1000_tokens": 1000.0 * swaps / gen,
        "expert_bytes_per_token": d.get("moleserve_expert_cache_bytes_to_device_total", 0) / gen,
        "distinct_experts_per_step": (d.get("moleserve_step_distinct_experts_sum", 0) / steps
                                      if steps else 0.0),
        "steps": d.get("moleserve_steps_total", 0),
        "preemptions": d.get("moleserve_requests_preempted_total", 0),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True)
    ap.add_argument("--working-set", type=int, required=True)
    ap.add_argument("--pool-fractions", required=True)
    ap.add_argument("--policies", required=True)
    ap.add_argument("--config", default="")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    runs = pathlib.Path(a.runs)
    policies = a.policies.split()
    report = {"benchmark": "scheduling policies (bench/scheduling/run.sh)", "config": a.config,
              "working_set_bytes": a.working_set, "rows": []}
    cols = ["req/s", "out tok/s", "TTFT p50", "TTFT p99", "swaps/1k tok", "MiB/1k tok",
            "experts/step"]
    print(f"{'pool':>6} {'policy':<13}" + "".join(f"{c:>13}" for c in cols))
    for fraction in a.pool_fractions.split():
        by_policy = {}
        for policy in policies:
            path = runs / f"run_{fraction}_{policy}.json"
            if not path.exists():
                sys.exit(f"missing run {path}")
            r = row(json.loads(path.read_text()))
            r.update({"pool_fraction": float(fraction), "policy": policy,
                      "pool_bytes": int(a.working_set * float(fraction) + 0.999999)})
            by_policy[policy] = r
            report["rows"].append(r)
            print(f"{float(fraction) * 100:>5.0f}% {policy[:13]:<13}"
                  f"{r['request_throughput']:>13.2f}{r['output_token_throughput']:>13.1f}"
                  f"{r['ttft_p50_ms']:>13.1f}{r['ttft_p99_ms']:>13.1f}"
                  f"{r['swaps_per_1000_tokens']:>13.1f}"
                  f"{r['expert_bytes_per_token'] * 1000 / 1048576:>13.2f}"
                  f"{r['distinct_experts_per_step']:>13.1f}")
        for other in [p for p in policies if p != "fcfs" and "fcfs" in by_policy]:
            f, e = by_policy["fcfs"], by_policy[other]

            def ratio(k):
                return e[k] / f[k] if f[k] else None

            keys = ["request_throughput", "output_token_throughput", "ttft_p50_ms", "ttft_p99_ms",
                    "swaps_per_1000_tokens", "expert_bytes_per_token",
                    "distinct_experts_per_step"]
            ratios = {k: ratio(k) for k in keys}
            report["rows"].append({"pool_fraction": float(fraction),
                                   "policy": f"{other}/fcfs", **ratios})
            print(f"{'':>6} {other[:8] + '/fcfs':<13}" + "".join(
                f"{(ratios[k] if ratios[k] is not None else float('nan')):>12.2f}x"
                for k in keys))
    pathlib.Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
