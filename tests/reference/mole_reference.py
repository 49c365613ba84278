#!/usr/bin/env python3
"""Independent float64 reference of every MoLE family, on the adapters' PUBLIC on-disk formats.

  mole_reference.py BASE_DIR ADAPTER_DIR --family F --prompt 1,2,3 [--prompt ...] [--greedy N]
                    [--k-per-layer 2,2] [--ordering FILE] > out.json

F: peft_lora | mixlora | mola | loramoe | dynmole | mola_original | xlora | flylora | sora | nola | randlora | mos | smora
| mor | output_gate (native mole/1: SMoRA, MoR and output-gated MoLE have no public LLM format)
| auto.
Reads the base model as llama_reference.py does (Llama, Mistral, Qwen2) and the adapter directory as
its public code writes it: PEFT adapter_config.json + adapter_model.safetensors, MixLoRA / MoE-PEFT
adapter_model.bin (torch pickle), original MoLA (GCYZSL) adapter_model.bin + mola_sidecar.json,
X-LoRA in the peft layout (adapter_config.json with peft_type XLORA) or the mistral.rs one
(xlora_config.json, xlora_classifier.safetensors, ordering.json), FlyLoRA's peft fork, SoRA's
opendelta delta checkpoint (config.json + pytorch_model.bin). It never
reads mole/1 and shares no code with tools/mole_convert.py. Each family's forward follows its
public code path (MOLE_FORMAT.md sections 1-4):
  - PEFT LoRA: y = W x + s B A x, s = alpha/r or alpha/sqrt(r) (rsLoRA) after rank/alpha patterns.
  - SoRA: y = W x + s ((x A^T) * gate) B^T, s = lora_alpha / lora_r (src/lora.py).
  - NOLA: A and B are each weight + einsum(c, seeded uniform bases / sqrt(n)) (NOLALinear).
  - MixLoRA: one fp32 router per layer on the FFN input; expert e is a whole LoRA-adapted FFN o_e
    and y = sum_e w_e o_e (the naive form). mixlora: softmax -> top-k -> renormalise;
    mixlora-dynamic: softmax [/ temperature] -> top-p keeping the first crossing expert, raw
    weights; mixlora-switch: argmax with weight p_max (no capacity). Attention LoRAs are plain.
  - MoLA / LoRAMoE / DynMoLE (MoE-PEFT) and original MoLA: an fp32 router per module on the
    module input, y = W x + sum_e w_e s B_e A_e x; top-k + renormalise / soft / DynMoLE's
    Tsallis-entropy gate with top-p "within" + keep_top_k.
  - X-LoRA: a scaling pass with dummy scalings (scaling_pass_value), the classifier on the
    final-norm hidden state of every position, then the real pass; per module the scalings go
    through top_k (mask, no renormalisation) [and softmax over the kept entries] and multiply x
    before A, times global_scaling_weight.
  - FlyLoRA: z = A x, keep the top_k ranks of z + d (lora_topk_bias, frozen), y = W x + s B z_kept.
Router math (logits, softmax, top-p, entropy) is float32 where the public code uses float32 (the
MixLoRA / MoE-PEFT gates; original MoLA is treated the same way, as MOLE_FORMAT (c) does);
everything else, including the X-LoRA classifier (model dtype in peft), is float64.

Output (stdout, nothing else): {"logits": [prompt][position][vocab],
"routing": [prompt][position]{key: dense weights}, "greedy": [prompt][ids]}. Keys are
"{layer}.{module}" for module routers, "{layer}.ffn" for MixLoRA's block router; weights are dense
over the experts (0 when unselected); X-LoRA: the module's weights after top_k / softmax_topk and
before global_scaling_weight; FlyLoRA: 1.0 for the kept ranks, 0 otherwise. Greedy continuation
recomputes the whole sequence per step and takes the lowest id among equal maxima.
"""
import argparse
import json
import math
import os
import re
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from llama_reference import (load_safetensors, load_weights, rms_norm,  # noqa: E402
                             rope_inv_freq, rotate_half)

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL = ATTN + MLP
F32 = torch.float32
F64 = torch.float64


def fail(msg):
    sys.exit(f"mole_reference: {msg}")


def module_path(l, m):
    return f"model.layers.{l}.{'self_attn' if m in ATTN else 'mlp'}.{m}"


def read_json(path):
    with open(path) as f:
        return json.load(f)


def load_adapter_tensors(d, names=("adapter_model.safetensors", "adapter_model.bin")):
    """{name: tensor} in the stored dtype (float32 here; safetensors come back as float64)."""
    for n in names:
        p = os.path.join(d, n)
        if not os.path.exists(p):
            continue
        if n.endswith(".bin"):
            return torch.load(p, map_location="cpu", weights_only=True)
        return load_safetensors(p)
    fail(f"no adapter weights in {d}")


def f64(t):
    return t.to(F64)


def act_fn(name):
    if name in ("silu", "swish"):
        return F.silu
    fail(f"unsupported activation {name}")


# ------------------------------------------------------------------------------------------------
# Base model with hooks


class BaseModel:
    def __init__(self, model_dir):
        self.cfg = read_json(os.path.join(model_dir, "config.json"))
        supported = [["LlamaForCausalLM"], ["MistralForCausalLM"], ["Qwen2ForCausalLM"]]
        if self.cfg["architectures"] not in supported:
            fail(f"unsupported architecture {self.cfg['architectures']}")
        self.w = load_weights(model_dir)
        self.layers = self.cfg["num_hidden_layers"]
        arch = self.cfg["architectures"][0]
        self.biased = set()
        if arch == "Qwen2ForCausalLM" or (arch == "LlamaForCausalLM" and
                                          self.cfg.get("attention_bias")):
            self.biased = {"q_proj", "k_proj", "v_proj"}
        if arch == "LlamaForCausalLM" and self.cfg.get("attention_bias"):
            self.biased.add("o_proj")

    def weight(self, l, m):
        return self.w[module_path(l, m) + ".weight"]

    def base_linear(self, l, m, x):
        y = x @ self.weight(l, m).T
        if m in self.biased:
            y = y + self.w[module_path(l, m) + ".bias"]
        return y

    def forward(self, ids, adapter):
        """(logits [T, vocab], final-norm hidden [T, H]); `adapter` supplies linear() / ffn()."""
        cfg, w = self.cfg, self.w
        h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
        nkv = cfg.get("num_key_value_heads") or nh
        hd = cfg.get("head_dim") or h // nh
        eps = cfg.get("rms_norm_eps", 1e-6)
        window = (cfg.get("sliding_window", 4096)
                  if cfg["architectures"] == ["MistralForCausalLM"] else None)
        t = len(ids)
        x = w["model.embed_tokens.weight"][torch.tensor(ids)]
        inv_freq = rope_inv_freq(cfg, hd)
        freqs = torch.outer(torch.arange(t, dtype=F64), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        qi, ki = torch.arange(t)[:, None], torch.arange(t)[None, :]
        allowed = ki <= qi
        if window:
            allowed &= ki > qi - window
        mask = torch.zeros((t, t), dtype=F64).masked_fill(~allowed, float("-inf"))

        def lin(l, m, inp):
            return adapter.linear(l, m, inp, self.base_linear(l, m, inp))

        for l in range(self.layers):
            p = f"model.layers.{l}."
            a = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            q = lin(l, "q_proj", a).view(t, nh, hd)
            k = lin(l, "k_proj", a).view(t, nkv, hd)
            v = lin(l, "v_proj", a).view(t, nkv, hd)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / (hd ** 0.5) + mask
            att = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v).reshape(t, nh * hd)
            x = x + lin(l, "o_proj", att)
            mm = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            y = adapter.ffn(l, mm)
            if y is None:
                g = lin(l, "gate_proj", mm)
                u = lin(l, "up_proj", mm)
                y = lin(l, "down_proj", F.silu(g) * u)
            x = x + y
        x = rms_norm(x, w["model.norm.weight"], eps)
        head = (w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings")
                else w["lm_head.weight"])
        return x @ head.T, x


# ------------------------------------------------------------------------------------------------
# Adapters


class Adapter:
    """No adapter: the base model. Subclasses override linear() and/or ffn()."""

    def __init__(self):
        self.routing = {}  # key -> [T, E] dense weights of the last forward

    def linear(self, l, m, x, y):
        return y

    def ffn(self, l, h):
        return None

    def run(self, base, ids):
        self.routing = {}
        return base.forward(ids, self)[0]


def peft_targeted(cfg, l, m):
    """peft check_target_module_exists on the module name relative to the base model."""
    key = module_path(l, m)
    tm = cfg.get("target_modules")
    if tm == "all-linear":
        found = True  # every nn.Linear but the output layer
    elif isinstance(tm, str):
        found = re.fullmatch(tm, key) is not None
    else:
        found = key in tm or any(key.endswith("." + t) for t in tm)
    ltt = cfg.get("layers_to_transform")
    if found and ltt is not None:
        found = l == ltt if isinstance(ltt, int) else l in ltt
    return found


def peft_pattern(patterns, l, m, default):
    key = module_path(l, m)
    for p, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({p})$", key):
            return v
    return default


class PeftLora(Adapter):
    """A PEFT LoRA directory: lora[(l, m)] = (A, B, scale)."""

    def __init__(self, d, base, check_extra=True):
        super().__init__()
        self.cfg = cfg = read_json(os.path.join(d, "adapter_config.json"))
        if cfg.get("peft_type", "LORA") != "LORA":
            fail(f"{d}: peft_type {cfg.get('peft_type')} is not LORA")
        for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
            if cfg.get(key) == bad:
                fail(f"{d}: {key} is not supported")
        if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
            fail(f"{d}: bias / modules_to_save are not supported")
        w = load_adapter_tensors(d)
        self.lora = {}
        self.tensors = w
        for l in range(base.layers):
            for m in ALL:
                if not peft_targeted(cfg, l, m):
                    continue
                p = "base_model.model." + module_path(l, m)
                r = peft_pattern(cfg.get("rank_pattern"), l, m, cfg["r"])
                alpha = peft_pattern(cfg.get("alpha_pattern"), l, m, cfg["lora_alpha"])
                s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
                a, b = w[p + ".lora_A.weight"], w[p + ".lora_B.weight"]
                if a.shape[0] != r or b.shape[1] != r:
                    fail(f"{d}: {p} has rank {a.shape[0]}, config says {r}")
                self.lora[(l, m)] = (f64(a), f64(b), s)
        if check_extra:
            used = {"base_model.model." + module_path(l, m) + f".lora_{x}.weight"
                    for (l, m) in self.lora for x in "AB"}
            extra = [k for k in w if k not in used and not k.endswith("lora_topk_bias")]
            if extra:
                fail(f"{d}: tensors outside the targeted modules: {extra[:3]}")

    def linear(self, l, m, x, y):
        if (l, m) in self.lora:
            a, b, s = self.lora[(l, m)]
            y = y + s * ((x @ a.T) @ b.T)
        return y


def lora_scale(cfg):
    return cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])


def moe_peft_targets(cfg):
    """MoE-PEFT target_modules: a list or a {name: bool} dict (legacy w1/w2/w3 renamed)."""
    legacy = {"w1_proj": "gate_proj", "w2_proj": "down_proj", "w3_proj": "up_proj"}
    tm = cfg["target_modules"]
    names = [k for k, v in tm.items() if v] if isinstance(tm, dict) else tm
    return {legacy.get(n, n) for n in names} & set(ALL)


def route_topk(logits32, k, renormalize=True):
    p = torch.softmax(logits32, dim=-1, dtype=F32)
    w, idx = torch.topk(p, k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return torch.zeros_like(p).scatter(-1, idx, w)


def route_mixlora_dynamic(logits32, top_p, temperature):
    # MoE-PEFT _dynamic_top_p on the softmax probabilities.
    p = torch.softmax(logits32, dim=-1, dtype=F32)
    if temperature > 0.0:
        p = p / temperature
    sorted_p, sorted_idx = torch.sort(p, dim=-1, descending=True)
    cum = sorted_p.cumsum(dim=-1)
    over = cum > top_p
    first = over.long().argmax(dim=-1)
    drop = over & ~F.one_hot(first, num_classes=p.shape[-1]).bool()
    kept = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(p).scatter(-1, sorted_idx, kept)


def route_switch(logits32):
    p = torch.softmax(logits32, dim=-1, dtype=F32)
    pmax, idx = p.max(dim=-1, keepdim=True)
    return torch.zeros_like(p).scatter(-1, idx, pmax)


def route_soft(logits32):
    return torch.softmax(logits32, dim=-1, dtype=F32)


def tsallis_entropy(p, q, eps):
    # DynMoLE moe_utils.tsallis_entropy(normalize=True), with q = entropy_index.
    n = p.shape[-1]
    p = p + eps
    if q == 1.0:
        h = -torch.sum(p * torch.log(p), dim=-1)
        hmax = torch.log(torch.tensor(n, dtype=F32))
    else:
        h = (1 - torch.sum(p ** q, dim=-1)) / (q - 1)
        hmax = torch.tensor((1 - n ** (1 - q)) / (q - 1), dtype=F32)
    return h / hmax


def route_dynmole(logits32, cfg):
    p = torch.softmax(logits32, dim=-1, dtype=F32)
    sorted_p, sorted_idx = torch.sort(p, dim=-1, descending=True)
    cum = torch.cumsum(sorted_p, dim=-1)
    keep = (cum <= cfg["top_p"]).to(F32)
    keep[..., :cfg["keep_top_k"]] = 1
    mask = torch.zeros_like(p).scatter(-1, sorted_idx, keep)
    if cfg["entropy_index"] > 0.0 and cfg["entropy_threshold"] < 1.0:
        ent = tsallis_entropy(p, cfg["entropy_index"], cfg["entropy_eps"])
        mask[ent > cfg["entropy_threshold"]] = 1
    return p * mask


def router_logits(x, gate32):
    return F.linear(x.to(F32), gate32)


class MixLora(Adapter):
    """MixLoRA (pip package and MoE-PEFT), modern and legacy tensor names."""

    def __init__(self, d, base):
        super().__init__()
        self.base = base
        cfg = read_json(os.path.join(d, "adapter_config.json"))
        if cfg.get("peft_type") != "MIXLORA":
            fail(f"{d}: peft_type {cfg.get('peft_type')} is not MIXLORA")
        self.cfg = cfg
        self.strategy = {"mixtral": "mixlora"}.get(cfg["routing_strategy"], cfg["routing_strategy"])
        expert_cfg = dict(cfg)
        expert_cfg.update(cfg.get("expert_lora") or {})
        if cfg.get("use_dora") or expert_cfg.get("use_dora"):
            fail("DoRA experts are not supported")
        self.act = act_fn(cfg.get("act_fn") or base.cfg.get("hidden_act", "silu"))
        self.e = cfg["num_experts"]
        targets = moe_peft_targets(cfg)
        w = load_adapter_tensors(d)
        s_attn, s_exp = lora_scale(cfg), lora_scale(expert_cfg)
        legacy_names = {"gate_proj": "w1_proj", "down_proj": "w2_proj", "up_proj": "w3_proj"}
        self.attn, self.experts, self.gate = {}, {}, {}
        for l in range(base.layers):
            for m in ATTN:
                if m in targets:
                    p = f"mixlora.layers.{l}.self_attn.{m}"
                    self.attn[(l, m)] = (f64(w[p + ".lora_A.weight"]),
                                         f64(w[p + ".lora_B.weight"]), s_attn)
            g = w.get(f"mixlora.layers.{l}.mlp.moe_gate.weight")
            if g is None:
                g = w[f"mixlora.layers.{l}.gate.weight"]
            self.gate[l] = g.to(F32)
            for m in MLP:
                if m not in targets:
                    continue
                for e in range(self.e):
                    cands = [f"mixlora.layers.{l}.mlp.{m}.experts.{e}",
                             f"mixlora.layers.{l}.experts.{e}.{m}",
                             f"mixlora.layers.{l}.experts.{e}.{legacy_names[m]}"]
                    p = next((c for c in cands if c + ".lora_A.weight" in w), None)
                    if p is None:
                        fail(f"missing expert {e} of layer {l} {m}")
                    self.experts[(l, m, e)] = (f64(w[p + ".lora_A.weight"]),
                                               f64(w[p + ".lora_B.weight"]), s_exp)

    def linear(self, l, m, x, y):
        if (l, m) in self.attn:
            a, b, s = self.attn[(l, m)]
            y = y + s * ((x @ a.T) @ b.T)
        return y

    def weights(self, h, l):
        logits = router_logits(h, self.gate[l])
        if self.strategy == "mixlora":
            return route_topk(logits, self.cfg.get("top_k", 2))
        if self.strategy == "mixlora-dynamic":
            return route_mixlora_dynamic(logits, self.cfg.get("top_p", 0.8),
                                         self.cfg.get("temperature", 0.0))
        if self.strategy == "mixlora-switch":
            return route_switch(logits)
        fail(f"unknown routing_strategy {self.cfg['routing_strategy']}")

    def ffn(self, l, h):
        base = self.base
        wts = self.weights(h, l)
        self.routing[f"{l}.ffn"] = wts
        common_g = h @ base.weight(l, "gate_proj").T
        common_u = h @ base.weight(l, "up_proj").T
        y = torch.zeros_like(h)
        for e in range(self.e):
            if not bool((wts[:, e] != 0).any()):
                continue

            def delta(m, inp):
                if (l, m, e) not in self.experts:
                    return 0.0
                a, b, s = self.experts[(l, m, e)]
                return s * ((inp @ a.T) @ b.T)

            act = self.act(common_g + delta("gate_proj", h)) * (common_u + delta("up_proj", h))
            o = act @ base.weight(l, "down_proj").T + delta("down_proj", act)
            y = y + wts[:, e:e + 1].to(F64) * o
        return y


class MoePeftPlugin(Adapter):
    """MoE-PEFT `mola` / `loramoe` / DynMoLE `dynmole`: per-module routers (plugin strategy)."""

    PREFIX = {"mola": ("mola", "MOLA"), "loramoe": ("loramoe", "LORAMOE"),
              "dynmole": ("dynmole", "DYNMOLE")}

    def __init__(self, d, base, family):
        super().__init__()
        prefix, peft_type = self.PREFIX[family]
        cfg = read_json(os.path.join(d, "adapter_config.json"))
        if cfg.get("peft_type") != peft_type:
            fail(f"{d}: peft_type {cfg.get('peft_type')} is not {peft_type}")
        if cfg.get("use_dora"):
            fail("DoRA experts are not supported")
        self.family, self.cfg = family, cfg
        targets = moe_peft_targets(cfg)
        moe_modules = set(MLP) if family == "loramoe" else set(ALL)
        s = lora_scale(cfg)
        w = load_adapter_tensors(d)
        self.static, self.routed = {}, {}
        for l in range(base.layers):
            for m in ALL:
                if m not in targets:
                    continue
                p = f"{prefix}.layers.{l}.{'self_attn' if m in ATTN else 'mlp'}.{m}"
                if m in moe_modules:
                    experts = [(f64(w[f"{p}.experts.{e}.lora_A.weight"]),
                                f64(w[f"{p}.experts.{e}.lora_B.weight"]))
                               for e in range(cfg["num_experts"])]
                    self.routed[(l, m)] = (w[p + ".moe_gate.weight"].to(F32), experts, s)
                else:
                    self.static[(l, m)] = (f64(w[p + ".lora_A.weight"]),
                                           f64(w[p + ".lora_B.weight"]), s)

    def weights(self, logits):
        if self.family == "mola":
            return route_topk(logits, self.cfg.get("top_k", 2))
        if self.family == "loramoe":
            return route_soft(logits)
        cfg = {"top_p": self.cfg.get("top_p", 0.75), "keep_top_k": self.cfg.get("keep_top_k", 2),
               "entropy_index": self.cfg.get("entropy_index", 1.1),
               "entropy_threshold": self.cfg.get("entropy_threshold", 0.9),
               "entropy_eps": self.cfg.get("entropy_eps", 1e-5)}
        if self.cfg.get("entropy_type", "tsallis") != "tsallis":
            fail("only the tsallis entropy is supported")
        return route_dynmole(logits, cfg)

    def linear(self, l, m, x, y):
        if (l, m) in self.static:
            a, b, s = self.static[(l, m)]
            y = y + s * ((x @ a.T) @ b.T)
        if (l, m) in self.routed:
            gate, experts, s = self.routed[(l, m)]
            wts = self.weights(router_logits(x, gate))
            self.routing[f"{l}.{m}"] = wts
            for e, (a, b) in enumerate(experts):
                y = y + wts[:, e:e + 1].to(F64) * (s * ((x @ a.T) @ b.T))
        return y


class MolaOriginal(Adapter):
    """GCYZSL/MoLA Linear_MoE: router.router + lora_A_{e}/lora_B_{e}, E_l from the router rows."""

    def __init__(self, d, base, k_per_layer):
        super().__init__()
        cfg = read_json(os.path.join(d, "adapter_config.json"))
        w = load_adapter_tensors(d, ("adapter_model.bin", "adapter_model.safetensors"))
        if k_per_layer is None:
            side = os.path.join(d, "mola_sidecar.json")
            k_per_layer = (read_json(side)["top_k"] if os.path.exists(side)
                           else [2] * base.layers)
        ranks = cfg["r"] if isinstance(cfg["r"], list) else [cfg["r"]] * base.layers
        self.k = k_per_layer
        self.mods = {}
        for l in range(base.layers):
            for m in ALL:
                p = "base_model.model." + module_path(l, m)
                if p + ".router.router.weight" not in w:
                    continue
                gate = w[p + ".router.router.weight"]
                experts = [(f64(w[f"{p}.lora_A_{e}.weight"]), f64(w[f"{p}.lora_B_{e}.weight"]))
                           for e in range(gate.shape[0])]
                self.mods[(l, m)] = (gate.to(F32), experts, cfg["lora_alpha"] / ranks[l])

    def linear(self, l, m, x, y):
        if (l, m) not in self.mods:
            return y
        gate, experts, s = self.mods[(l, m)]
        wts = route_topk(router_logits(x, gate), self.k[l])
        self.routing[f"{l}.{m}"] = wts
        for e, (a, b) in enumerate(experts):
            y = y + wts[:, e:e + 1].to(F64) * (s * ((x @ a.T) @ b.T))
        return y


class FlyLora(PeftLora):
    def __init__(self, d, base):
        super().__init__(d, base)
        self.k = self.cfg.get("top_k", 8)
        self.bias = {(l, m): f64(self.tensors["base_model.model." + module_path(l, m) +
                                              ".lora_topk_bias"])
                     for (l, m) in self.lora}

    def linear(self, l, m, x, y):
        if (l, m) not in self.lora:
            return y
        a, b, s = self.lora[(l, m)]
        z = x @ a.T
        _, idx = torch.topk(z + self.bias[(l, m)], self.k, dim=-1)
        mask = torch.zeros_like(z).scatter(-1, idx, 1.0)
        self.routing[f"{l}.{m}"] = mask
        return y + s * ((z * mask) @ b.T)


class Sora(Adapter):
    """SoRA (TsinghuaC3I/SoRA src/lora.py, saved by opendelta): per targeted module,
    y += ((x A^T) * gate) B^T * lora_alpha / lora_r, with the gates as trained (zeros included)."""

    def __init__(self, d, base):
        super().__init__()
        cfg = read_json(os.path.join(d, "config.json"))
        if cfg.get("delta_type") != "lora":
            fail(f"{d}: delta_type {cfg.get('delta_type')} is not lora")
        self.scale = cfg["lora_alpha"] / cfg["lora_r"]
        w = load_adapter_tensors(d, ("pytorch_model.bin",))
        self.mods = {}
        for l in range(base.layers):
            for m in ALL:
                p = module_path(l, m) + ".lora"
                if p + ".lora_A" in w:
                    self.mods[(l, m)] = (f64(w[p + ".lora_A"]), f64(w[p + ".lora_B"]),
                                         f64(w[p + ".gate"]).reshape(1, -1))
        if 3 * len(self.mods) != len(w):
            fail(f"{d}: tensors outside the base model's modules")

    def linear(self, l, m, x, y):
        if (l, m) not in self.mods:
            return y
        a, b, gate = self.mods[(l, m)]
        return y + ((x @ a.T) * gate) @ b.T * self.scale


class Nola(Adapter):
    """NOLA's peft fork (UCDvision/NOLA llama/peft/tuners/lora.py): lora_A and lora_B are
    NOLALinear, W = GenerateParams(coefficients, out, in, seed) + weight with
    GenerateParams = einsum('b,boi->oi', c, U / sqrt(n)), U uniform(-1, 1) drawn after
    torch.manual_seed(seed) on the coefficients' device (the CPU here); y += s B(A x),
    s = lora_alpha / r."""

    def __init__(self, d, base):
        super().__init__()
        cfg = read_json(os.path.join(d, "adapter_config.json"))
        if not cfg.get("use_nola"):
            fail(f"{d}: use_nola is not set")
        w = load_adapter_tensors(d, ("adapter_model.bin",))
        self.scale = cfg["lora_alpha"] / cfg["r"]
        self.mods = {}
        for l in range(base.layers):
            for m in ALL:
                if not peft_targeted(cfg, l, m):
                    continue
                p = "base_model.model." + module_path(l, m)
                self.mods[(l, m)] = tuple(self.effective(w, f"{p}.{part}")
                                          for part in ("lora_A", "lora_B"))

    @staticmethod
    def effective(w, p):
        weight, c, seed = w[p + ".weight"], w[p + ".coefficients"], int(w[p + ".seed"][0])
        out_dim, in_dim = weight.shape
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        basis = torch.zeros(c.shape[0], out_dim, in_dim, dtype=c.dtype)
        torch.nn.init.uniform_(basis, a=-1.0, b=1.0)
        basis = basis * (1.0 / math.sqrt(c.shape[0]))
        torch.random.set_rng_state(state)
        return f64(torch.einsum("b,boi->oi", c, basis) + weight)

    def linear(self, l, m, x, y):
        if (l, m) not in self.mods:
            return y
        a, b = self.mods[(l, m)]
        return y + self.scale * ((x @ a.T) @ b.T)


class RandLora(Adapter):
    """PEFT's randlora tuner (huggingface/peft src/peft/tuners/randlora, RandLoRA, Albert et al.
    2025). Shared bases A [r, 1, min_dim], B [max_dim, n_max, r] (saved, or drawn from a CPU
    generator seeded with projection_prng_key: sparse +-1 draws here) for the largest targeted
    (out, in); per module with n = ceil(min(in, out) / r): U = (lambda[:, :, None] * A[:, :n, :min]
    * gamma[None]) flattened to [r * n, min], V = B[:max, :n, :] flattened to [max, n * r];
    y += s F.linear(F.linear(x, first), second), (first, second) = (U, V) when in <= out, else
    (V^T, U^T); s = randlora_alpha / r."""

    def __init__(self, d, base):
        super().__init__()
        cfg = read_json(os.path.join(d, "adapter_config.json"))
        if cfg.get("peft_type") != "RANDLORA":
            fail(f"{d}: peft_type is not RANDLORA")
        w = load_adapter_tensors(d, ("adapter_model.bin",))
        r = cfg["r"]
        self.scale = cfg["randlora_alpha"] / r
        targets = [(l, m) for l in range(base.layers) for m in ALL if peft_targeted(cfg, l, m)]
        shape = {t: tuple(base.w[module_path(*t) + ".weight"].shape) for t in targets}
        if "base_model.randlora_A" in w:
            a, b = w["base_model.randlora_A"].float(), w["base_model.randlora_B"].float()
        else:
            a, b = self.sparse_bases(cfg, r, shape.values())
        self.mods = {}
        for (l, m), (out_f, in_f) in shape.items():
            p = "base_model.model." + module_path(l, m)
            # fp32, as get_scaled_bases on the CPU (cast_to_fp32); the products below in float64.
            lam, gam = w[p + ".randlora_lambda"].float(), w[p + ".randlora_gamma"].float()
            lo, hi = min(out_f, in_f), max(out_f, in_f)
            n = math.ceil(lo / r)
            u = (lam[:, :, None] * a[:, :n, :lo] * gam[None]).flatten(end_dim=1)
            v = b[:hi, :n, :].flatten(start_dim=1)
            self.mods[(l, m)] = tuple(f64(t) for t in ((u, v) if lo == in_f else (v.T, u.T)))

    @staticmethod
    def sparse_bases(cfg, r, shapes):
        if not cfg.get("sparse") or cfg.get("very_sparse"):
            fail("the reference regenerates only sparse (sparsity 3) bases")
        shapes = list(shapes)
        largest = (max(s[0] for s in shapes), max(s[1] for s in shapes))
        hi, lo = max(largest), min(largest)
        n = math.ceil(lo / r)
        g = torch.Generator(device="cpu").manual_seed(cfg.get("projection_prng_key", 0))
        draws = [torch.rand((r, 1, lo), generator=g), torch.rand((hi, n, r), generator=g)]
        out = []
        for t in draws:
            s = torch.where(t < 1 / 6, -1.0, torch.where(t > 5 / 6, 1.0, 0.0))
            out.append((s / s.std()).float())
        return out

    def linear(self, l, m, x, y):
        if (l, m) not in self.mods:
            return y
        first, second = self.mods[(l, m)]
        return y + self.scale * ((x @ first.T) @ second.T)


class Mos(Adapter):
    """Mixture of Shards (Forence1999/MoS modules/Tied_LoRA.py, LoraLinear4bit_Tied_LoRA_forward):
    y += s (x (A^T * (lora_A_vec * lora_A_anti_vec))) B^T, s = lora_alpha / r, where vector j of
    A is the concatenation of the pool rows lora_pair_mask[j * c + i], i < c, and row-vector j of
    B^T likewise from the columns of the B pool named by lora_pair_mask_B. A checkpoint that
    save_tied_lora already materialised holds A and B themselves."""

    def __init__(self, d, base):
        super().__init__()
        cfg = read_json(os.path.join(d, "adapter_config.json"))
        w = load_adapter_tensors(d, ("adapter_model.bin",))
        r = cfg["r"]
        self.scale = cfg["lora_alpha"] / r
        self.mods = {}
        for l in range(base.layers):
            for m in ALL:
                p = "base_model.model." + module_path(l, m)
                if p + ".lora_A.weight" not in w:
                    continue
                a, b = f64(w[p + ".lora_A.weight"]), f64(w[p + ".lora_B.weight"])
                if p + ".lora_pair_mask" in w:
                    mask_a, mask_b = w[p + ".lora_pair_mask"], w[p + ".lora_pair_mask_B"]
                    c = len(mask_a) // r
                    a = self.vectors(a, mask_a, r, c)
                    b = self.vectors(b.T, mask_b, r, c).T
                    a = a * f64(w[p + ".lora_A_vec"] * w[p + ".lora_A_anti_vec"])[:, None]
                self.mods[(l, m)] = (a, b)

    @staticmethod
    def vectors(pool, mask, r, c):
        d = pool.shape[1]
        out = torch.zeros(r, c * d, dtype=F64)
        for j in range(r):
            for i in range(c):
                out[j, i * d:(i + 1) * d] = pool[int(mask[j * c + i])]
        return out

    def linear(self, l, m, x, y):
        if (l, m) not in self.mods:
            return y
        a, b = self.mods[(l, m)]
        return y + self.scale * ((x @ a.T) @ b.T)


class Smora(Adapter):
    """SMoRA from its mole/1 files (it has no public code or format): MOLE_FORMAT (c)
    route_smora. Per token and module: l = x Wg^T; keep the k ranks with the largest l + b_sel;
    g = softmax(l) restricted to them (renormalised when the config says so);
    y += s * B (g * (A x)) on the kept ranks. Router math in float32."""

    def __init__(self, d, base):
        super().__init__()
        cfg = read_json(os.path.join(d, "mole_config.json"))
        (grp,) = cfg["routed_groups"]
        self.k = grp["routing"]["k"]
        self.renormalize = grp["routing"].get("renormalize", True)
        self.scale = grp["scale"]
        t = load_adapter_tensors(d, ("model.safetensors",))
        self.sites = {}
        for l in range(base.layers):
            for m in grp["targets"]["modules"]:
                p = f"groups.{grp['id']}.layers.{l}.{m}"
                self.sites[(l, m)] = (f64(t[p + ".A"][0]), f64(t[p + ".B"][0]),
                                      t[p + ".router.weight"].float(),
                                      t[p + ".router.select_bias"].float())

    def linear(self, l, m, x, y):
        if (l, m) not in self.sites:
            return y
        a, b, wg, sel = self.sites[(l, m)]
        logits = x.float() @ wg.T
        keep = torch.topk(logits + sel, self.k, dim=-1).indices
        mask = torch.zeros_like(logits).scatter(-1, keep, 1.0)
        g = torch.softmax(logits, dim=-1) * mask
        if self.renormalize:
            g = g / g.sum(dim=-1, keepdim=True)
        self.routing[f"{l}.{m}"] = mask.double()
        return y + self.scale * ((f64(g) * (x @ a.T)) @ b.T)


class Mor(Adapter):
    """Mixture of Routers from its mole/1 files (its code is not public): MOLE_FORMAT 3.7's
    equation, p = sum_j softmax(main x)_j softmax(sub_j x) in float32, then top-k and
    renormalisation as the host method (MoLA / MixLoRA) does. Module groups add
    sum_e w_e s B_e A_e x; a block_ffn group mixes whole LoRA-adapted FFNs (MixLoRA's naive
    form)."""

    def __init__(self, d, base):
        super().__init__()
        self.base = base
        cfg = read_json(os.path.join(d, "mole_config.json"))
        t = load_adapter_tensors(d, ("model.safetensors",))
        self.modules, self.ffns = {}, {}
        for grp in cfg["routed_groups"]:
            if grp["router"]["type"] != "mixture" or grp["routing"]["algorithm"] != "topk":
                fail("the MoR reference covers mixture routers with top-k routing")
            m_count, e, s = grp["router"]["num_routers"], grp["num_experts"], grp["scale"]
            k = grp["routing"]["k"]

            def router(p):
                return ([t[f"{p}.sub.{j}.weight"].float() for j in range(m_count)],
                        t[p + ".main.weight"].float())

            def experts(p):
                return [(f64(t[p + ".A"][i]), f64(t[p + ".B"][i])) for i in range(e)]

            for l in range(base.layers):
                if grp["scope"] == "block_ffn":
                    p = f"groups.{grp['id']}.layers.{l}"
                    self.ffns[l] = (router(p + ".router"), k, s,
                                    {m: experts(f"{p}.{m}") for m in grp["targets"]["modules"]})
                else:
                    for m in grp["targets"]["modules"]:
                        p = f"groups.{grp['id']}.layers.{l}.{m}"
                        self.modules[(l, m)] = (router(p + ".router"), k, s, experts(p))

    @staticmethod
    def weights(x, router, k):
        subs, main = router
        x32 = x.to(F32)
        g = torch.softmax(x32 @ main.T, dim=-1)
        p = sum(g[:, j:j + 1] * torch.softmax(x32 @ sub.T, dim=-1) for j, sub in enumerate(subs))
        top, idx = torch.topk(p, k, dim=-1)
        return torch.zeros_like(p).scatter(-1, idx, top / top.sum(dim=-1, keepdim=True))

    def linear(self, l, m, x, y):
        if (l, m) not in self.modules:
            return y
        router, k, s, experts = self.modules[(l, m)]
        wts = self.weights(x, router, k)
        self.routing[f"{l}.{m}"] = wts
        for e, (a, b) in enumerate(experts):
            y = y + wts[:, e:e + 1].to(F64) * (s * ((x @ a.T) @ b.T))
        return y

    def ffn(self, l, h):
        if l not in self.ffns:
            return None
        router, k, s, experts = self.ffns[l]
        base = self.base
        wts = self.weights(h, router, k)
        self.routing[f"{l}.ffn"] = wts
        y = torch.zeros_like(h)
        for e in range(wts.shape[1]):
            def lin(m, inp):
                out = inp @ base.weight(l, m).T
                if m in experts:
                    a, b = experts[m][e]
                    out = out + s * ((inp @ a.T) @ b.T)
                return out

            act = F.silu(lin("gate_proj", h)) * lin("up_proj", h)
            y = y + wts[:, e:e + 1].to(F64) * lin("down_proj", act)
        return y


class OutputGate(Adapter):
    """Microsoft's output-gated MoLE from its mole/1 files (its public code is Stable Diffusion
    only): the paper's equations (MOLE_FORMAT 3.8) per token, E_i = s_i B_i A_i x,
    G = softmax(W F.normalize(E_1 ++ ... ++ E_N) / T) with the gate in float32, and
    y = W0 x + sum_i G_i E_i."""

    def __init__(self, d, base):
        super().__init__()
        cfg = read_json(os.path.join(d, "mole_config.json"))
        (grp,) = cfg["routed_groups"]
        if grp["router"]["type"] != "output_gate" or grp["routing"]["algorithm"] != "soft":
            fail("the output-gate reference covers soft output_gate groups")
        self.t = grp["routing"].get("temperature", 1.0)
        t = load_adapter_tensors(d, ("model.safetensors",))
        self.sites = {}
        for l in range(base.layers):
            for m in grp["targets"]["modules"]:
                p = f"groups.{grp['id']}.layers.{l}.{m}"
                e = grp["num_experts"]
                scale = t[p + ".scale"] if p + ".scale" in t else torch.full((e,), grp["scale"])
                self.sites[(l, m)] = ([(f64(t[p + ".A"][i]), f64(t[p + ".B"][i]), float(scale[i]))
                                       for i in range(e)], t[p + ".router.weight"].float())

    def linear(self, l, m, x, y):
        if (l, m) not in self.sites:
            return y
        experts, gate = self.sites[(l, m)]
        outs = [s * ((x @ a.T) @ b.T) for a, b, s in experts]
        v = F.normalize(torch.cat(outs, dim=-1), dim=-1)
        wts = torch.softmax((v.float() @ gate.T) / self.t, dim=-1)
        self.routing[f"{l}.{m}"] = wts
        for i, o in enumerate(outs):
            y = y + wts[:, i:i + 1].to(F64) * o
        return y


class XLora(Adapter):
    """X-LoRA, peft layout (adapter_config.json, peft_type XLORA) or mistral.rs layout."""

    def __init__(self, d, base, ordering_file):
        super().__init__()
        self.base = base
        mistralrs = os.path.exists(os.path.join(d, "xlora_config.json"))
        cfg = read_json(os.path.join(d, "xlora_config.json" if mistralrs else
                                     "adapter_config.json"))
        if not mistralrs and cfg.get("peft_type") != "XLORA":
            fail(f"{d}: not an X-LoRA directory")
        self.cfg = cfg
        if ordering_file is None and os.path.exists(os.path.join(d, "ordering.json")):
            ordering_file = os.path.join(d, "ordering.json")
        ordering = read_json(ordering_file) if ordering_file else None
        adapters = cfg["adapters"]
        if ordering is not None:
            names = list(ordering["order"])
        else:
            names = list(adapters) if isinstance(adapters, list) else list(adapters.keys())
        paths = adapters if isinstance(adapters, dict) else {}
        self.experts = []
        for n in names:
            sub = self.find_adapter(d, n, paths.get(n))
            self.experts.append(PeftLora(sub, base))
        if any(e.cfg.get("use_dora") for e in self.experts):
            fail("X-LoRA with DoRA is not supported")
        # Module numbering: the ordering file, else peft's convert_layers_to_xlora traversal.
        self.index = {}
        if ordering is not None:
            for path, i in ordering["layers"].items():
                mt = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)", path)
                self.index[(int(mt.group(1)), mt.group(3))] = i
        else:
            for l in range(base.layers):
                for m in ALL:
                    if any((l, m) in e.lora for e in self.experts):
                        self.index[(l, m)] = len(self.index)
        self.n_modules = len(self.index)
        # Classifier Linear layers in order, with peft's or mistral.rs's ReLU rule.
        if mistralrs:
            w = load_safetensors(os.path.join(d, "xlora_classifier.safetensors"))
            depth = cfg.get("xlora_depth", 1)
            names_c = [f"inner.{i}" for i in range(depth - 1)] + ["last"]
            self.relu = bool(cfg.get("enable_relu_and_dropout", False))
        else:
            w = load_adapter_tensors(d)
            found = {}
            for k in w:
                mt = re.search(r"internal_xlora_classifier\.layers\.(\d+)\.weight$", k)
                if mt:
                    found[int(mt.group(1))] = k[:-len(".weight")]
            names_c = [found[j] for j in sorted(found)]
            self.relu = True  # peft's nn.Sequential has a ReLU after every hidden Linear
        self.classifier = [(f64(w[n + ".weight"]),
                            f64(w[n + ".bias"]) if n + ".bias" in w else None) for n in names_c]
        self.scalings = None

    @staticmethod
    def find_adapter(d, name, path):
        cands = []
        if path:
            cands += [path, os.path.join(d, path)]
        cands.append(os.path.join(d, name))
        for c in cands:
            if os.path.exists(os.path.join(c, "adapter_config.json")):
                return c
        for sub in sorted(os.listdir(d)):  # mistral.rs: found by name substring
            if name in sub and os.path.exists(os.path.join(d, sub, "adapter_config.json")):
                return os.path.join(d, sub)
        fail(f"X-LoRA adapter {name} not found under {d}")

    def classify(self, hidden):
        z = hidden
        for i, (wt, b) in enumerate(self.classifier):
            z = z @ wt.T + (b if b is not None else 0)
            if i + 1 < len(self.classifier) and self.relu:
                z = torch.relu(z)
        n = len(self.experts)
        t = hidden.shape[0]
        if self.cfg.get("layerwise_scalings"):
            z = z.reshape(t, self.n_modules, n)
        else:
            z = z.unsqueeze(1).expand(t, self.n_modules, n)
        if self.cfg.get("enable_softmax", True):
            z = torch.softmax(z / self.cfg.get("softmax_temperature", 1.0), dim=-1)
        return z

    def module_weights(self, sc):
        """peft XLoraLayer.get_maybe_topk_scalings on [T, N]; ties go to the lower index."""
        k = self.cfg.get("top_k_lora")
        if k is not None:
            _, ranked = torch.sort(sc, dim=-1, descending=True, stable=True)
            keep = torch.zeros_like(sc, dtype=torch.bool).scatter(-1, ranked[:, :k], True)
            sc = sc * keep.to(sc.dtype)
            if self.cfg.get("enable_softmax_topk"):
                out = torch.zeros_like(sc)
                for t in range(sc.shape[0]):  # per token (peft's masked softmax, per position)
                    out[t, keep[t]] = torch.softmax(sc[t, keep[t]], dim=-1)
                sc = out
        return sc

    def linear(self, l, m, x, y):
        if (l, m) not in self.index:
            return y
        wts = self.module_weights(self.scalings[:, self.index[(l, m)], :])
        self.routing[f"{l}.{m}"] = wts
        gsw = self.cfg.get("global_scaling_weight", 1.0)
        for i, e in enumerate(self.experts):
            if (l, m) in e.lora:
                a, b, s = e.lora[(l, m)]
                y = y + ((x * wts[:, i:i + 1]) @ a.T) @ b.T * s * gsw
        return y

    def run(self, base, ids):
        t, n = len(ids), len(self.experts)
        self.scalings = torch.full((t, self.n_modules, n), float(self.cfg.get("scaling_pass_value",
                                                                             0.0)), dtype=F64)
        self.routing = {}
        _, hidden = base.forward(ids, self)
        self.scalings = self.classify(hidden)
        self.routing = {}
        return base.forward(ids, self)[0]


def detect_family(d):
    if os.path.exists(os.path.join(d, "xlora_config.json")):
        return "xlora"
    if os.path.exists(os.path.join(d, "config.json")) and \
            read_json(os.path.join(d, "config.json")).get("delta_type") == "lora":
        return "sora"
    cfg = read_json(os.path.join(d, "adapter_config.json"))
    pt = cfg.get("peft_type", "LORA")
    by_type = {"MIXLORA": "mixlora", "MOLA": "mola", "LORAMOE": "loramoe",
               "DYNMOLE": "dynmole", "XLORA": "xlora"}
    if pt in by_type:
        return by_type[pt]
    if os.path.exists(os.path.join(d, "adapter_model.bin")) and \
            any(".router.router.weight" in k for k in load_adapter_tensors(
                d, ("adapter_model.bin",))):
        return "mola_original"
    if cfg.get("init_lora_weights") == "sparse" or "top_k" in cfg:
        return "flylora"
    if cfg.get("use_nola"):
        return "nola"
    if pt == "RANDLORA":
        return "randlora"
    if cfg.get("ft_mode") == "mos":
        return "mos"
    return "peft_lora"


def make_adapter(base, d, family, k_per_layer=None, ordering=None):
    if family == "auto":
        family = detect_family(d)
    if family == "peft_lora":
        return PeftLora(d, base)
    if family == "mixlora":
        return MixLora(d, base)
    if family in ("mola", "loramoe", "dynmole"):
        return MoePeftPlugin(d, base, family)
    if family == "mola_original":
        return MolaOriginal(d, base, k_per_layer)
    if family == "xlora":
        return XLora(d, base, ordering)
    if family == "flylora":
        return FlyLora(d, base)
    if family == "smora":
        return Smora(d, base)
    if family == "sora":
        return Sora(d, base)
    if family == "mor":
        return Mor(d, base)
    if family == "nola":
        return Nola(d, base)
    if family == "output_gate":
        return OutputGate(d, base)
    if family == "randlora":
        return RandLora(d, base)
    if family == "mos":
        return Mos(d, base)
    fail(f"unknown family {family}")


def evaluate(base, adapter, prompts, greedy=0):
    """The output document for `prompts` (lists of ids)."""
    logits, routing, continuations = [], [], []
    with torch.no_grad():
        for ids in prompts:
            out = adapter.run(base, ids)
            logits.append(out.tolist())
            rows = [{} for _ in ids]
            for key, wts in adapter.routing.items():
                for t, row in enumerate(wts.tolist()):
                    rows[t][key] = row
            routing.append(rows)
            seq = list(ids)
            for _ in range(greedy):
                seq.append(int(torch.argmax(adapter.run(base, seq)[-1])))
            continuations.append(seq[len(ids):])
    return {"logits": logits, "routing": routing, "greedy": continuations}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base_dir")
    ap.add_argument("adapter_dir")
    ap.add_argument("--family", required=True,
                    choices=["auto", "peft_lora", "mixlora", "mola", "loramoe", "dynmole",
                             "mola_original", "xlora", "flylora", "smora", "sora", "mor", "nola", "output_gate",
                             "randlora", "mos"])
    ap.add_argument("--prompt", action="append", required=True, help="comma-separated token ids")
    ap.add_argument("--greedy", type=int, default=0, help="greedy continuation length")
    ap.add_argument("--k-per-layer", help="original MoLA: top-k per layer (default: sidecar or 2)")
    ap.add_argument("--ordering", help="X-LoRA ordering file (default: ADAPTER_DIR/ordering.json)")
    args = ap.parse_args(argv)
    base = BaseModel(args.base_dir)
    k = [int(v) for v in args.k_per_layer.split(",")] if args.k_per_layer else None
    adapter = make_adapter(base, args.adapter_dir, args.family, k, args.ordering)
    prompts = [[int(i) for i in p.split(",")] for p in args.prompt]
    json.dump(evaluate(base, adapter, prompts, args.greedy), sys.stdout)


if __name__ == "__main__":
    main()
