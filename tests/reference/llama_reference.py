#!/usr/bin/env python3
"""Independent Llama reference forward pass in PyTorch (Debian's python3-torch, CPU).

Reads a Hugging Face-style directory (config.json + model.safetensors) with its own safetensors
parser and computes the logits of every position of each prompt, with the textbook formulas of
HF transformers' LlamaForCausalLM (RMSNorm, rotate-half RoPE, grouped-query attention with a causal
mask, SwiGLU). It shares no code with moleserve.

  llama_reference.py MODEL_DIR --prompt 1,2,3 --prompt 4,5 > logits.json

Output: {"logits": [[[...vocab] per position] per prompt]} in float64 (computed in float64 so the
reference error is negligible next to the engine's fp32).
"""
import argparse
import json
import struct
import sys

import numpy as np
import torch

DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


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
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or h // nh
    eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta", 10000.0)
    t = len(ids)
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    pos = torch.arange(t, dtype=torch.float64)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        a = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (a @ w[p + "self_attn.q_proj.weight"].T).view(t, nh, hd)
        k = (a @ w[p + "self_attn.k_proj.weight"].T).view(t, nkv, hd)
        v = (a @ w[p + "self_attn.v_proj.weight"].T).view(t, nkv, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = nh // nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / (hd ** 0.5) + mask
        attn = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v).reshape(t, nh * hd)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
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
    args = ap.parse_args()
    with open(f"{args.model_dir}/config.json") as f:
        cfg = json.load(f)
    if cfg["architectures"] != ["LlamaForCausalLM"]:
        sys.exit(f"unsupported architecture {cfg['architectures']}")
    w = load_safetensors(f"{args.model_dir}/model.safetensors")
    out = []
    with torch.no_grad():
        for p in args.prompt:
            ids = [int(i) for i in p.split(",")]
            out.append(forward(cfg, w, ids).tolist())
    json.dump({"logits": out}, sys.stdout)


if __name__ == "__main__":
    main()
