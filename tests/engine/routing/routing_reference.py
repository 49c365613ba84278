#!/usr/bin/env python3
"""Independent torch reference for engine/routing (routing_test.cc's cross-check).

Each rule is written the way the public implementation computes it, as described in
MOLE_FORMAT.md (sections 1.3-3.6 and (c)); nothing here calls moleserve. Prints one JSON object
{"cases": [...]} on stdout. Every case carries its inputs (float32 values, exact in JSON's double
text) and the expected selection, ordered by descending probability or key.

Inputs are drawn from a seeded torch.Generator and redrawn until they avoid the places where the
two sides may legitimately differ:
- exact or near ties (relative gap < 1e-5) between the values a rule sorts on: torch.topk / sort
  leave the order of ties unspecified, moleserve breaks them towards the lower index;
- cumulative masses within 1e-5 of the top-p threshold: torch's CPU cumsum accumulates in double,
  MOLE_FORMAT (c) (and moleserve) in fp32;
- normalised entropies within 1e-4 of DynMoLE's threshold: torch computes it in fp32, moleserve
  in double.

Usage: routing_reference.py [--seed N] [--per_rule N]
"""
import argparse
import json

import torch

torch.set_num_threads(1)


def f32list(t):
    return [float(x) for x in t.to(torch.float32).tolist()]


def distinct(values, rel=1e-5):
    """True when no two values are within `rel` (relative) of each other."""
    s = torch.sort(values.to(torch.float64)).values
    gaps = s[1:] - s[:-1]
    scale = torch.maximum(s[1:].abs(), s[:-1].abs()).clamp_min(1e-30)
    return bool((gaps > rel * scale).all())


def away_from(values, threshold, margin):
    return bool(((values.to(torch.float64) - threshold).abs() > margin).all())


# --- rules, as the public code computes them ---------------------------------------------------


def mixlora_topk(logits, k, renormalize, temperature):
    # MixLoRA / MoLA: softmax in fp32 -> torch.topk -> divide by the sum of the kept weights.
    p = torch.softmax(logits / temperature, dim=-1, dtype=torch.float32)
    w, idx = torch.topk(p, k)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return idx.tolist(), f32list(w), p


def mixlora_dynamic(logits, top_p, prob_temperature, temperature):
    # MixLoRA-dynamic `_dynamic_top_p` on the softmax probabilities: optional division of the
    # probabilities, sort, cumsum, keep c <= p plus the first position where c > p.
    p = torch.softmax(logits / temperature, dim=-1, dtype=torch.float32)
    if prob_temperature > 0:
        p = p / prob_temperature
    sorted_p, sorted_idx = torch.sort(p, dim=-1, descending=True)
    c = torch.cumsum(sorted_p, dim=-1)
    over = c > top_p
    first = over.long().argmax(dim=-1)
    crossing = torch.nn.functional.one_hot(first, num_classes=p.numel()).bool()
    dropped = over & ~crossing
    keep = ~dropped
    return sorted_idx[keep].tolist(), f32list(sorted_p[keep]), sorted_p, c


def tsallis_normalized(p, q, eps):
    # DynMoLE moe_utils.tsallis_entropy(normalize=True), in fp32 like the original.
    n = p.numel()
    pe = p + eps
    if q == 1.0:
        h = -torch.sum(pe * torch.log(pe))
        h_max = torch.log(torch.tensor(float(n), dtype=torch.float32))
    else:
        h = (1 - torch.sum(pe**q)) / (q - 1)
        h_max = torch.tensor((1 - n ** (1 - q)) / (q - 1), dtype=torch.float32)
    return float(h / h_max)


def dynmole(logits, top_p, keep_top_k, q, threshold, eps, temperature):
    # DynMoLE `_dynamic_routing` on softmax probabilities: top-p "within" (c <= p) mask, the first
    # keep_top_k sorted positions forced on, every expert on when the normalised Tsallis entropy
    # exceeds the threshold, weights = p * mask (no renormalisation).
    p = torch.softmax(logits / temperature, dim=-1, dtype=torch.float32)
    sorted_p, sorted_idx = torch.sort(p, dim=-1, descending=True)
    c = torch.cumsum(sorted_p, dim=-1)
    mask_sorted = (c <= top_p).to(p.dtype)
    mask_sorted[:keep_top_k] = 1
    mask = torch.zeros_like(p).scatter(-1, sorted_idx, mask_sorted)
    h = tsallis_normalized(p, q, eps)
    if q > 0 and threshold < 1 and h > threshold:
        mask[:] = 1
    w = p * mask
    kept = [e for e in sorted_idx.tolist() if mask[e] > 0]
    return kept, [float(w[e]) for e in kept], p, c, h


def switch(logits, temperature):
    p = torch.softmax(logits / temperature, dim=-1, dtype=torch.float32)
    w, e = torch.max(p, dim=-1)
    return [int(e)], [float(w)], p


def soft(logits, temperature):
    # LoRAMoE: every expert, weights softmax(l).
    p = torch.softmax(logits / temperature, dim=-1, dtype=torch.float32)
    order = torch.sort(p, descending=True).indices
    return order.tolist(), f32list(p[order]), p


def xlora(scalings, top_k, softmax_topk):
    # peft XLoraLayer.get_maybe_topk_scalings, per token: topk mask multiply, then a softmax over
    # the non-zero entries.
    s = scalings.clone()
    if top_k is not None:
        _, idx = torch.topk(s, k=top_k)
        mask = torch.zeros_like(s, dtype=torch.bool)
        mask[idx] = True
        s = s * mask.to(s.dtype)
    if softmax_topk:
        nz = s != 0
        s[nz] = torch.softmax(s[nz], dim=-1)
    return f32list(s)


def flylora(z, d, k, use_abs):
    # FlyLoRA: top-k of (z + d) (flylora.py: of |z + d|) selects ranks; the kept values are z.
    key = (z + d).abs() if use_abs else z + d
    _, idx = torch.topk(key, k)
    mask = torch.zeros_like(z).scatter(-1, idx, 1.0)
    return idx.tolist(), f32list(z * mask), key


def smora(z, logits, b, k, renormalize, temperature):
    # SMoRA (MOLE_FORMAT 3.5 / (c) route_smora): select on logits + b, gate softmax(logits) on the
    # kept ranks, optionally renormalised over them.
    key = logits + b
    _, idx = torch.topk(key, k)
    g = torch.softmax(logits / temperature, dim=-1, dtype=torch.float32)[idx]
    if renormalize:
        g = g / g.sum()
    u = torch.zeros_like(z)
    u[idx] = g * z[idx]
    return idx.tolist(), f32list(u), key


# --- case generation ---------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=20250101)
    ap.add_argument("--per_rule", type=int, default=50)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(args.seed)

    def rand_int(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    def choice(seq):
        return seq[rand_int(0, len(seq) - 1)]

    def rand_vec(n, scale):
        return (torch.randn(n, generator=gen) * scale).to(torch.float32)

    sizes = [2, 3, 4, 8, 8, 16, 32, 64, 80]  # 80: past the 64-entry stack scratch
    scales = [0.05, 0.3, 1.0, 3.0]
    cases = []

    def spec(algorithm, **kw):
        s = {"algorithm": algorithm, "k": 2, "p": 0.0, "p_mode": "exceed", "min_k": 0,
             "temperature": 1.0, "prob_temperature": 0.0, "renormalize": True,
             "entropy": {"enabled": False, "q": 1.1, "threshold": 0.9, "eps": 1e-5}}
        s.update(kw)
        return s

    def add_token_cases(name, make):
        made = 0
        while made < args.per_rule:
            case = make()
            if case is not None:
                case["rule"] = name
                cases.append(case)
                made += 1

    def topk_case():
        e = choice(sizes)
        logits = rand_vec(e, choice(scales))
        k = rand_int(1, min(e, 4))
        renorm = choice([True, True, False])
        t = choice([1.0, 1.0, 0.5, 0.7, 2.0])
        idx, w, p = mixlora_topk(logits, k, renorm, t)
        if not distinct(p):
            return None
        return {"kind": "token", "spec": spec("topk", k=k, renormalize=renorm, temperature=t),
                "logits": f32list(logits), "experts": idx, "weights": w}

    def top_p_case():
        e = choice(sizes)
        logits = rand_vec(e, choice(scales))
        top_p = choice([0.4, 0.5, 0.75, 0.8, 0.9, 0.95])
        pt = choice([0.0, 0.0, 0.5, 1.5])
        t = choice([1.0, 1.0, 0.7])
        idx, w, sorted_p, c = mixlora_dynamic(logits, top_p, pt, t)
        if not distinct(sorted_p) or not away_from(c, top_p, 1e-5):
            return None
        return {"kind": "token",
                "spec": spec("top_p", p=top_p, p_mode="exceed", prob_temperature=pt,
                             temperature=t, renormalize=False),
                "logits": f32list(logits), "experts": idx, "weights": w}

    def dynmole_case():
        e = choice([s for s in sizes if s >= 2])
        logits = rand_vec(e, choice(scales))
        top_p = choice([0.5, 0.75, 0.9])
        # keep_top_k >= 1: with 0 and no mass within p, DynMoLE routes the token to no expert,
        # where MOLE_FORMAT (c) (and moleserve) keep the top one.
        keep = rand_int(1, min(e, 3))
        q = choice([1.1, 1.1, 1.0, 2.0, 0.5])
        threshold = choice([0.9, 0.9, 0.75, 0.99, 1.0])
        eps = choice([1e-5, 0.0])
        t = choice([1.0, 1.0, 0.7])
        idx, w, p, c, h = dynmole(logits, top_p, keep, q, threshold, eps, t)
        if not distinct(p) or not away_from(c, top_p, 1e-5) or abs(h - threshold) < 1e-4:
            return None
        return {"kind": "token",
                "spec": spec("dynmole", p=top_p, p_mode="within", min_k=keep, temperature=t,
                             renormalize=False,
                             entropy={"enabled": True, "q": q, "threshold": threshold,
                                      "eps": eps}),
                "logits": f32list(logits), "experts": idx, "weights": w,
                "entropy_gate_open": q > 0 and threshold < 1 and h > threshold}

    def switch_case():
        e = choice(sizes)
        logits = rand_vec(e, choice(scales))
        t = choice([1.0, 0.7])
        idx, w, p = switch(logits, t)
        if not distinct(p):
            return None
        return {"kind": "token", "spec": spec("switch", temperature=t, renormalize=False),
                "logits": f32list(logits), "experts": idx, "weights": w}

    def soft_case():
        e = choice(sizes)
        logits = rand_vec(e, choice(scales))
        t = choice([1.0, 2.0])
        idx, w, p = soft(logits, t)
        if not distinct(p):
            return None
        return {"kind": "token", "spec": spec("soft", temperature=t), "logits": f32list(logits),
                "experts": idx, "weights": w}

    def xlora_case():
        n = choice([2, 3, 4, 9, 16, 80])
        scalings = torch.softmax(rand_vec(n, choice(scales)), dim=-1)
        top_k = choice([None, 1, 2, 3])
        if top_k is not None and top_k > n:
            top_k = n
        soft_topk = choice([False, True])
        if not distinct(scalings) or bool((scalings == 0).any()):
            return None
        return {"kind": "xlora", "scalings": f32list(scalings),
                "top_k": 0 if top_k is None else top_k, "softmax_topk": soft_topk,
                "weights": xlora(scalings, top_k, soft_topk)}

    def flylora_case():
        r = choice([8, 16, 32, 64, 128])
        z = rand_vec(r, 1.0)
        d = rand_vec(r, choice([0.0, 0.01, 0.3]))
        k = rand_int(1, min(r, 8))
        use_abs = choice([False, True])
        kept, u, key = flylora(z, d, k, use_abs)
        if not distinct(key):
            return None
        return {"kind": "rank", "spec": spec("rank_topk", k=k), "z": f32list(z),
                "router_logits": [], "select_bias": f32list(d), "select_on_abs": use_abs,
                "kept": kept, "u": u}

    def smora_case():
        r = choice([8, 16, 64, 96])
        z = rand_vec(r, 1.0)
        logits = rand_vec(r, choice(scales))
        b = rand_vec(r, choice([0.0, 0.1]))
        k = rand_int(1, min(r, 8))
        renorm = choice([False, True])
        t = choice([1.0, 0.7])
        kept, u, key = smora(z, logits, b, k, renorm, t)
        if not distinct(key):
            return None
        return {"kind": "rank", "spec": spec("rank_topk", k=k, renormalize=renorm, temperature=t),
                "z": f32list(z), "router_logits": f32list(logits), "select_bias": f32list(b),
                "select_on_abs": False, "kept": kept, "u": u}

    add_token_cases("mixlora_topk", topk_case)
    add_token_cases("mixlora_dynamic_top_p", top_p_case)
    add_token_cases("dynmole", dynmole_case)
    add_token_cases("mixlora_switch", switch_case)
    add_token_cases("loramoe_soft", soft_case)
    add_token_cases("xlora", xlora_case)
    add_token_cases("flylora", flylora_case)
    add_token_cases("smora", smora_case)
    print(json.dumps({"seed": args.seed, "cases": cases}))


if __name__ == "__main__":
    main()
