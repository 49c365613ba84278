#!/usr/bin/env python3
"""Torch baselines for bench_gpu_sgmv, run on the same GPU in the same session.

For the points of bench_gpu_sgmv (token t routed to expert t % experts, bf16, hidden 4096):
  - loop: what a naive mixture-of-LoRA server runs, one matmul pair per expert over its tokens,
    y[idx] += w * (x[idx] @ A_e^T) @ B_e^T;
  - bmm: the gathered batched matmul, A and B gathered per token, two torch.bmm calls.
Times are medians of CUDA-event-timed batches of back-to-back calls, like the C++ bench.

  python3 bench/gpu/torch_sgmv_baseline.py --out /tmp/torch_sgmv.json
"""
import argparse
import json

import torch


def timed(fn, iters):
    for _ in range(10):
        fn()
    times = []
    for _ in range(7):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) * 1e3 / iters)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--tokens", default="1,4,16,64,256")
    ap.add_argument("--experts", default="1,4,16,64")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    dev = torch.device("cuda")
    h = args.hidden
    points = []
    for rank in map(int, args.ranks.split(",")):
        for tokens in map(int, args.tokens.split(",")):
            for experts in map(int, args.experts.split(",")):
                if experts > tokens:
                    continue
                a = torch.randn(experts, rank, h, device=dev, dtype=torch.bfloat16) * 0.02
                b = torch.randn(experts, h, rank, device=dev, dtype=torch.bfloat16) * 0.02
                x = torch.randn(tokens, h, device=dev, dtype=torch.bfloat16)
                y = torch.randn(tokens, h, device=dev, dtype=torch.bfloat16)
                expert_of = torch.arange(tokens, device=dev) % experts
                idx = [torch.nonzero(expert_of == e).flatten() for e in range(experts)]
                w = 0.5

                def loop():
                    for e in range(experts):
                        i = idx[e]
                        y.index_add_(0, i, (x[i] @ a[e].T) @ b[e].T, alpha=w)

                def bmm():
                    v = torch.bmm(a[expert_of], x[:, :, None])
                    y.add_(torch.bmm(b[expert_of], v)[:, :, 0], alpha=w)

                points.append({"tokens": tokens, "experts": experts, "rank": rank, "hidden": h,
                               "torch_loop_us": timed(loop, args.iters),
                               "torch_bmm_us": timed(bmm, args.iters)})
                print(points[-1], flush=True)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(0),
                   "points": points}, f, indent=1)


if __name__ == "__main__":
    main()
