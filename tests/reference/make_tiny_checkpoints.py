#!/usr/bin/env python3
"""Writes tiny random checkpoints of every supported architecture as Hugging Face directories,
laid out as the Hub's files are (config.json in the transformers 4 layout, generation_config.json,
model.safetensors or a sharded model.safetensors.index.json, tokenizer.json), using only Debian's
python3-torch and numpy.

  make_tiny_checkpoints.py OUT_DIR          # prints the names it wrote

Fixtures (all GQA 4 query / 2 KV heads, vocab 512 so the byte-level tokenizer fits):
  llama_rope_llama3_bf16_sharded  Llama 3 style: rope_theta 5e5, llama3 rope scaling, explicit
                                  head_dim 32 != hidden/heads, bf16 weights in 3 shards
  llama_rope_linear_fp32          linear rope scaling, attention_bias (q/k/v/o biases), fp32
  mistral_sliding_window_fp32     MistralForCausalLM, sliding_window 8, fp32
  qwen2_bias_tied_fp16            Qwen2ForCausalLM, q/k/v biases, tied embeddings, fp16
Weights: projections ~ N(0, 1/in), embeddings ~ N(0, 1), norms 1 + N(0, 0.1), biases N(0, 0.1),
from a fixed torch seed per fixture.
"""
import json
import math
import os
import shutil
import struct
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "fixtures", "byte_level_tokenizer.json")
COMMON = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
          "bos_token_id": 256, "eos_token_id": 257, "rms_norm_eps": 1e-5, "hidden_act": "silu"}
FIXTURES = [
    ("llama_rope_llama3_bf16_sharded", "LlamaForCausalLM", "llama",
     {"head_dim": 32, "rope_theta": 500000.0, "tie_word_embeddings": False,
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
     "BF16", 3),
    ("llama_rope_linear_fp32", "LlamaForCausalLM", "llama",
     {"rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": True,
      "rope_scaling": {"type": "linear", "factor": 2.0}},
     "F32", 1),
    ("mistral_sliding_window_fp32", "MistralForCausalLM", "mistral",
     {"rope_theta": 1000000.0, "sliding_window": 8, "tie_word_embeddings": False},
     "F32", 1),
    ("qwen2_bias_tied_fp16", "Qwen2ForCausalLM", "qwen2",
     {"rope_theta": 1000000.0, "tie_word_embeddings": True, "use_sliding_window": False,
      "sliding_window": 32768, "max_window_layers": 2},
     "F16", 1),
]


def tensor_specs(cfg, arch):
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim", h // nh)
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    qkv_bias = arch == "Qwen2ForCausalLM" or cfg.get("attention_bias", False)
    o_bias = arch == "LlamaForCausalLM" and cfg.get("attention_bias", False)
    specs = [("model.embed_tokens.weight", (vocab, h))]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        specs += [(p + "input_layernorm.weight", (h,)),
                  (p + "self_attn.q_proj.weight", (nh * hd, h)),
                  (p + "self_attn.k_proj.weight", (nkv * hd, h)),
                  (p + "self_attn.v_proj.weight", (nkv * hd, h)),
                  (p + "self_attn.o_proj.weight", (h, nh * hd))]
        if qkv_bias:
            specs += [(p + "self_attn.q_proj.bias", (nh * hd,)),
                      (p + "self_attn.k_proj.bias", (nkv * hd,)),
                      (p + "self_attn.v_proj.bias", (nkv * hd,))]
        if o_bias:
            specs += [(p + "self_attn.o_proj.bias", (h,))]
        specs += [(p + "post_attention_layernorm.weight", (h,)),
                  (p + "mlp.gate_proj.weight", (inter, h)),
                  (p + "mlp.up_proj.weight", (inter, h)),
                  (p + "mlp.down_proj.weight", (h, inter))]
    specs.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings"):
        specs.append(("lm_head.weight", (vocab, h)))
    return specs


def random_tensor(name, shape, g):
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if name.endswith(".bias"):
        return 0.1 * x
    if len(shape) == 1:
        return 1 + 0.1 * x
    if "embed_tokens" in name:
        return x
    return x / math.sqrt(shape[-1])


def to_bytes(t, dtype):
    if dtype == "BF16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    if dtype == "F16":
        return t.to(torch.float16).numpy().tobytes()
    return t.to(torch.float32).numpy().tobytes()


def write_safetensors(path, tensors, dtype):
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, t in tensors:
        data = to_bytes(t, dtype)
        header[name] = {"dtype": dtype, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


def main():
    out_root = sys.argv[1]
    for i, (name, arch, model_type, extra, dtype, shards) in enumerate(FIXTURES):
        out = os.path.join(out_root, name)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        cfg = dict(COMMON, **extra, architectures=[arch], model_type=model_type,
                   torch_dtype={"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype])
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": 256, "eos_token_id": 257}, f, indent=2)
        shutil.copy(TOKENIZER, os.path.join(out, "tokenizer.json"))
        g = torch.Generator().manual_seed(1000 + i)
        tensors = [(n, random_tensor(n, s, g)) for n, s in tensor_specs(cfg, arch)]
        if shards == 1:
            write_safetensors(os.path.join(out, "model.safetensors"), tensors, dtype)
        else:
            per = math.ceil(len(tensors) / shards)
            weight_map = {}
            for k in range(shards):
                fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
                part = tensors[k * per:(k + 1) * per]
                write_safetensors(os.path.join(out, fname), part, dtype)
                weight_map.update({n: fname for n, _ in part})
            with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
        print(name)


if __name__ == "__main__":
    main()
