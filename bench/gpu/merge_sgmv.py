#!/usr/bin/env python3
"""Joins bench_gpu_sgmv's JSON with torch_sgmv_baseline.py's, prints the ratios and writes
bench/results/gpu_sgmv.json (device, date, commit, every point with both baselines).

  python3 bench/gpu/merge_sgmv.py ours.json torch.json out.json --commit <sha> --date <YYYY-MM-DD>
"""
import argparse
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("torch")
    ap.add_argument("out")
    ap.add_argument("--commit", required=True)
    ap.add_argument("--date", required=True)
    args = ap.parse_args()
    ours = json.load(open(args.ours))
    theirs = json.load(open(args.torch))
    key = lambda p: (p["tokens"], p["experts"], p["rank"], p["hidden"])
    base = {key(p): p for p in theirs["points"]}
    rows = []
    print(f"{'tokens':>7} {'experts':>7} {'rank':>5} {'ours us':>9} {'frac bw':>8} "
          f"{'loop/ours':>10} {'bmm/ours':>9}")
    for p in ours["points"]:
        t = base.get(key(p))
        if t is None:
            continue
        row = dict(p)
        row["torch_loop_us"] = t["torch_loop_us"]
        row["torch_bmm_us"] = t["torch_bmm_us"]
        row["speedup_vs_torch_loop"] = t["torch_loop_us"] / p["us_per_call"]
        row["speedup_vs_torch_bmm"] = t["torch_bmm_us"] / p["us_per_call"]
        rows.append(row)
        print(f"{p['tokens']:>7} {p['experts']:>7} {p['rank']:>5} {p['us_per_call']:>9.2f} "
              f"{p['fraction_of_copy_bandwidth']:>8.3f} {row['speedup_vs_torch_loop']:>10.2f} "
              f"{row['speedup_vs_torch_bmm']:>9.2f}")
    json.dump({"bench": "gpu_sgmv", "device": ours["device"], "date": args.date,
               "commit": args.commit, "torch": theirs["torch"],
               "copy_bandwidth_bytes_per_s": ours["copy_bandwidth_bytes_per_s"],
               "dtype": ours["dtype"], "points": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
