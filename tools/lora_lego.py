#!/usr/bin/env python3
"""Merges PEFT LoRAs rank-wise into one LoRA of rank k ("Merging LoRAs like Playing LEGO", Zhao et
al., ICLR 2025, arXiv 2409.16167) and writes it as mole/1.

  lora_lego.py DST_DIR SRC_DIR [SRC_DIR ...] --rank K [--base BASE_DIR] [--seed 0] [--n-init 10]
               [--max-iter 300] [--name NAME] [--dtype float32|bfloat16]

Per module that any source adapts:
  1. Minimal semantic units: rank i of source n gives u = [sqrt(s_n) A_n[i, :], sqrt(s_n) B_n[:, i]]
     (s_n its LoRA scale, split evenly so that units of differently scaled LoRAs compare).
  2. k-means over the units (k = min(K, units)), squared Euclidean, k-means++ seeding from a CPU
     torch generator seeded with --seed, Lloyd iterations until no unit changes cluster (at most
     --max-iter), the best of --n-init runs by inertia (the first on ties). A cluster that empties
     during the iterations keeps its previous centroid; one empty at the end is dropped (fewer
     distinct units than k), and k below is the number of clusters kept.
  3. Each centroid is its members' mean, rescaled so that its largest absolute entry is the mean of
     its members' (parameter reweighting, against the norm decay of averaging).
  4. Merged LoRA: A = the centroids' first `in` entries [k, in], B = the rest, transposed, times
     sqrt(r / k) with r the sources' mean rank at the module (output reweighting, against the
     variance of summing); scale 1.

The paper's code is not public. Steps 1-4 are where two public re-implementations agree (MSU =
[a_i, b_i], centroid = member mean, l-inf parameter reweighting, output factor sqrt(r / k)); where
they differ (normalised features, where the scale goes, the seeding) this tool chooses as written.
With K at least the number of units every cluster is one unit, and the merged update is
sum_n s_n B_n A_n / sqrt(N) (N sources of rank r): tests/mole/converter_check.py checks that, and a
merge of well-separated clusters against the formulas above.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mole_convert as mc  # noqa: E402


def kmeans_pp(x, k, g):
    """k-means++ seeding: the first centre uniformly, each next one with probability
    proportional to the squared distance to the nearest centre chosen."""
    n = x.shape[0]
    centres = [int(torch.randint(n, (1,), generator=g))]
    d2 = ((x - x[centres[0]]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # every unit coincides with a centre: take the next unused one
            nxt = next(i for i in range(n) if i not in centres)
        else:
            nxt = int(torch.multinomial(d2 / total, 1, generator=g))
        centres.append(nxt)
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    return x[centres].clone()


def kmeans(x, k, seed, n_init, max_iter):
    """(labels [n], centroids [k, d], inertia) of the best of n_init Lloyd runs (float64)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    best = None
    for _ in range(n_init):
        c = kmeans_pp(x, k, g)
        labels = None
        for _ in range(max_iter):
            new = torch.cdist(x, c).argmin(1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            for j in range(k):
                members = x[labels == j]
                if members.shape[0] > 0:
                    c[j] = members.mean(0)
        inertia = float(((x - c[labels]) ** 2).sum())
        if best is None or inertia < best[2]:
            best = (labels, c, inertia)
    return best


def merge_module(units, k, in_dim, mean_rank, seed, n_init, max_iter):
    """units [n, in + out] (float64) -> (A [k, in], B [out, k]) of the merged LoRA, scale 1."""
    k = min(k, units.shape[0])
    labels, _, _ = kmeans(units, k, seed, n_init, max_iter)
    merged = []
    for j in range(k):
        members = units[labels == j]
        if members.shape[0] == 0:  # fewer distinct units than k: the merge has fewer ranks
            continue
        centre = members.mean(0)
        target = members.abs().amax(1).mean()
        peak = centre.abs().amax()
        merged.append(centre * (target / peak) if peak > 0 else centre)
    merged = torch.stack(merged)
    factor = math.sqrt(mean_rank / merged.shape[0])
    return merged[:, :in_dim], merged[:, in_dim:].T * factor


def merge(dst, srcs, rank, base=None, seed=0, n_init=10, max_iter=300, name=None,
          dtype="float32"):
    """Merges the PEFT LoRA directories `srcs` into mole/1 at `dst`. Raises mc.ConvertError."""
    if rank < 1:
        raise mc.ConvertError(f"--rank must be at least 1, not {rank}")
    if n_init < 1 or max_iter < 1:
        raise mc.ConvertError("--n-init and --max-iter must be at least 1")
    if len(srcs) < 2:
        raise mc.ConvertError("a LEGO merge needs at least two LoRAs")
    opts = argparse.Namespace(base=base, weight_dtype={"float32": "F32", "bfloat16": "BF16"}[dtype],
                              name=name or os.path.basename(os.path.normpath(dst)))
    first = mc.read_json(os.path.join(srcs[0], "adapter_config.json"))
    mole = mc.new_mole("lora_lego", first, srcs[0], opts)
    sources = []
    for src in srcs:
        _, loras, _ = mc.read_peft_lora(src, mole.num_layers)
        if not loras:
            raise mc.ConvertError(f"{src}: the config targets no module of the base model")
        sources.append(loras)
    merged = {}
    for key in sorted({k for loras in sources for k in loras}):
        units, ranks, shape = [], [], None
        for src, loras in zip(srcs, sources):
            if key not in loras:
                continue
            a, b, s = loras[key]
            if shape is not None and (b.shape[0], a.shape[1]) != shape:
                raise mc.ConvertError(f"{src}: layers.{key[0]}.{key[1]} is {b.shape[0]} x "
                                      f"{a.shape[1]}, another source's {shape[0]} x {shape[1]}")
            shape = (b.shape[0], a.shape[1])
            root = math.sqrt(s)
            units.append(torch.cat([a.double() * root, b.double().T * root], dim=1))
            ranks.append(a.shape[0])
        units = torch.cat(units)
        in_dim = shape[1]
        a, b = merge_module(units, rank, in_dim, sum(ranks) / len(ranks), seed, n_init, max_iter)
        merged[key] = (a.float().contiguous(), b.float().contiguous(), 1.0)
    mole.add_static("lego", merged, scale_default=1.0)
    mole.write(dst)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dst_dir")
    ap.add_argument("src_dirs", nargs="+", help="PEFT LoRA directories")
    ap.add_argument("--rank", type=int, required=True, help="rank k of the merged LoRA")
    ap.add_argument("--base", help="base model directory (config.json) to record and check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-init", type=int, default=10)
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--name", help="adapter name (default: the destination directory name)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args(argv)
    try:
        merge(args.dst_dir, args.src_dirs, args.rank, args.base, args.seed, args.n_init,
              args.max_iter, args.name, args.dtype)
    except (mc.ConvertError, KeyError, ValueError, OSError) as e:
        print(f"lora_lego: {e}", file=sys.stderr)
        return 1
    except (TypeError, IndexError, RuntimeError, ZeroDivisionError, AttributeError) as e:
        print(f"lora_lego: malformed source ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    print(f"lora_lego: {len(args.src_dirs)} LoRAs -> {args.dst_dir} (rank {args.rank})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
