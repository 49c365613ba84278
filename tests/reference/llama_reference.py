#!/usr/bin/env python3
"""Independent Llama-family reference forward pass in PyTorch (Debian's python3-torch, CPU).

Reads a Hugging Face-style directory (config.json + model.safetensors or a sharded
model.safetensors.index.json) with its own safetensors parser and computes the logits of every
position of each prompt, with the formulas of HF transformers' LlamaForCausalLM,
MistralForCausalLM and Qwen2ForCausalLM: RMSNorm, rotate-half RoPE with "linear"/"llama3" scaling
(transformers' _compute_*_parameters), grouped-query attention with a causal (Mistral: sliding
window) mask, q/k/v(/o) biases, SwiGLU, tied embeddings. It shares no code with moleserve.

  llama_reference.py MODEL_DIR --prompt 1,2,3 --prompt 4,5 [--greedy 64] > out.json

Output: {"logits": [[[...vocab] per position] per prompt], "greedy": [[ids] per prompt]} in
float64 (so the reference error is negligible next to the engine's fp32). Greedy continuation
runs a full forward per step (no cache) and takes the argmax (lowest id on ties).
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import torch

DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def load_weights(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        w = {}
        for name in files:
            w.update(load_safetensors(os.path.join(model_dir, name)))
        return w
    return load_safetensors(os.path.join(model_dir, "model.safetensors"))


def rope_inv_freq(cfg, hd):
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        inv = inv / rope["factor"]
    elif kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        sys.exit(f"reference: unsupported rope type {kind}")
    return inv


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = data[base + begin:base + end]
        if info["dtype"] == "BF16":
            u16 = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            arr = u16.view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=DTYPES[info["dtype"]])
        tensors[name] = torch.from_numpy(arr.astype(np.float64).reshape(info["shape"]))
    return tensors


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def forward(cfg, w, ids):
    h = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or h // nh
    eps = cfg.get("rms_norm_eps", 1e-6)
    # transformers' MistralConfig defaults sliding_window to 4096; an explicit null turns it off.
    window = cfg.get("sliding_window", 4096) if cfg["architectures"] == ["MistralForCausalLM"] else None
    t = len(ids)
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    inv_freq = rope_inv_freq(cfg, hd)
    pos = torch.arange(t, dtype=torch.float64)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    q_idx = torch.arange(t)[:, None]
    k_idx = torch.arange(t)[None, :]
    allowed = k_idx <= q_idx
    if window:
        allowed &= k_idx > q_idx - window
    mask = torch.zeros((t, t), dtype=torch.float64).masked_fill(~allowed, float("-inf"))

    # Which projections have biases, decided from the config as transformers does (Qwen2: q/k/v;
    # Llama attention_bias: q/k/v/o), and the checkpoint must agree.
    arch = cfg["architectures"][0]
    biased = set()
    if arch == "Qwen2ForCausalLM" or (arch == "LlamaForCausalLM" and cfg.get("attention_bias")):
        biased = {"q_proj", "k_proj", "v_proj"}
    if arch == "LlamaForCausalLM" and cfg.get("attention_bias"):
        biased.add("o_proj")

    def linear(name, inp):
        y = inp @ w[name + ".weight"].T
        has_bias = name.split(".")[-1] in biased
        if (name + ".bias" in w) != has_bias:
            sys.exit(f"reference: {name}.bias {'missing' if has_bias else 'unexpected'}")
        return y + w[name + ".bias"] if has_bias else y

    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        a = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = linear(p + "self_attn.q_proj", a).view(t, nh, hd)
        k = linear(p + "self_attn.k_proj", a).view(t, nkv, hd)
        v = linear(p + "self_attn.v_proj", a).view(t, nkv, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = nh // nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / (hd ** 0.5) + mask
        attn = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v).reshape(t, nh * hd)
        x = x + linear(p + "self_attn.o_proj", attn)
        m = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = m @ w[p + "mlp.gate_proj.weight"].T
        u = m @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--prompt", action="append", required=True, help="comma-separated token ids")
    ap.add_argument("--greedy", type=int, default=0, help="greedy continuation length")
    args = ap.parse_args()
    with open(f"{args.model_dir}/config.json") as f:
        cfg = json.load(f)
    supported = [["LlamaForCausalLM"], ["MistralForCausalLM"], ["Qwen2ForCausalLM"]]
    if cfg["architectures"] not in supported:
        sys.exit(f"unsupported architecture {cfg['architectures']}")
    w = load_weights(args.model_dir)
    out, greedy = [], []
    with torch.no_grad():
        for p in args.prompt:
            ids = [int(i) for i in p.split(",")]
            out.append(forward(cfg, w, ids).tolist())
            seq = list(ids)
            for _ in range(args.greedy):
                seq.append(int(torch.argmax(forward(cfg, w, seq)[-1])))
            greedy.append(seq[len(ids):])
    json.dump({"logits": out, "greedy": greedy}, sys.stdout)


if __name__ == "__main__":
    main()
