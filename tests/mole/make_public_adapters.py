#!/usr/bin/env python3
"""Writes seeded random MoLE adapters for a base model in every family's PUBLIC on-disk format, one
sub-directory each, laid out as the public code saves them (see MOLE_FORMAT.md sections 1-4), using
only Debian's python3-torch and numpy.

  make_public_adapters.py BASE_DIR OUT_DIR      # prints "name family" per adapter written

Shapes come from BASE_DIR/config.json (Llama, Mistral and Qwen2 module names). Weights are large
enough that every adapter visibly changes the logits (A ~ N(0, 1/in), B ~ N(0, 0.5/r), B != 0) and
routers are peaked enough that routing choices are not near-ties on ordinary prompts. `.bin` files
are torch.save'd state dicts (MixLoRA / MoE-PEFT / original MoLA), `.safetensors` files come from
the small writer of make_tiny_checkpoints.py. Each directory's weights come from its own seed, so a
directory does not change when another one is added.

Directories ("name  family flag  what it exercises"; the flag is the --family of
tools/mole_convert.py and tests/reference/mole_reference.py):
  peft_lora             peft_lora      r 8, alpha 16, rsLoRA, q/v/down, rank + alpha patterns
  peft_lora_all_linear  peft_lora      target_modules "all-linear", layers_to_transform [last]
  mixlora               mixlora        top-k (E 4, k 2), attention LoRAs q,v, experts on
                                       gate/up/down, expert_lora overriding r/alpha, act_fn silu
  mixlora_legacy        mixlora        routing_strategy "mixtral", legacy gate / w1,w2,w3 names
  mixlora_dynamic       mixlora        top-p 0.6, temperature 0
  mixlora_dynamic_temp  mixlora        top-p 0.6, temperature 0.9 (probabilities divided by T)
  mixlora_switch        mixlora        switch (top-1, weight p_max)
  moepeft_mola          mola           MoE-PEFT MoLA, E 3, k 2, all 7 modules
  moepeft_loramoe       loramoe        MoE-PEFT LoRAMoE: soft routers on gate/up/down, plain q,v
  moepeft_dynmole       dynmole        DynMoLE defaults, E 8; both the entropy and top-p branches
  mola_original         mola_original  GCYZSL layout, E per layer 2,4, r per layer 4,8, k 1,3
                                       in mola_sidecar.json
  xlora_peft            xlora          peft layout, 3 adapters, depth 2, dropout 0.2, pass value
                                       0.25
  xlora_peft_topk       xlora          peft layout, depth 1, layerwise, top_k 2, T 0.5, gsw 0.8
  xlora_mistralrs       xlora          mistral.rs layout (xlora_classifier.safetensors inner/last,
                                       ordering.json with a permuted adapter order), depth 3,
                                       no ReLU
  flylora               flylora        FlyLoRA peft fork: sparse A, lora_topk_bias, top_k 4 of 16
  sora                  sora           SoRA (opendelta delta checkpoint): gated ranks, 3 of 8 pruned
                                       per module, one module fully pruned
  nola                  nola           NOLA peft fork: A and B = frozen weight + a mix of 16 seeded
                                       random bases (CPU generator), r 4
  randlora              randlora       PEFT randlora: lambda / gamma per module and the saved
                                       fp16 shared bases (also per module), q/k/down, r 4
  randlora_sparse       randlora       sparse bases not saved: regenerated from the PRNG key
  mos                   mos            Mixture of Shards training checkpoint: shard pools shared
                                       by the layers, per-layer shard masks (public + private),
                                       q/o/up, r 4 of 2 shards
  mos_materialized      mos            the same as MoS's save_tied_lora writes it (plain LoRA)
Native mole/1 (families with no public code or checkpoint format; written by write_native):
  smora                 smora          SMoRA: rank-granular group, linear router over the 8 ranks
                                       plus a selection-only bias, k 3, renormalised gates
  mor                   mor            Mixture of Routers: mixture routers (3 and 2 sub-routers)
                                       on a q/o module group and a block-routed FFN, top-2 of 4
  output_gate           output_gate    Microsoft's MoLE: a dense gate over 3 LoRAs' normalised
                                       outputs on q/v, temperature 0.5
(Per-layer lists alternate with the layer parity on bases with more than 2 layers.)
"""
import json
import math
import os
import shutil
import sys
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
from make_tiny_checkpoints import write_safetensors  # noqa: E402

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL = ATTN + MLP


class Base:
    def __init__(self, base_dir):
        self.dir = os.path.abspath(base_dir)
        with open(os.path.join(base_dir, "config.json")) as f:
            cfg = json.load(f)
        h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
        nkv = cfg.get("num_key_value_heads") or nh
        hd = cfg.get("head_dim") or h // nh
        inter = cfg["intermediate_size"]
        self.layers = cfg["num_hidden_layers"]
        self.hidden = h
        self.dims = {"q_proj": (h, nh * hd), "k_proj": (h, nkv * hd), "v_proj": (h, nkv * hd),
                     "o_proj": (nh * hd, h), "gate_proj": (h, inter), "up_proj": (h, inter),
                     "down_proj": (inter, h)}  # module -> (in, out)


def block(m):
    return "self_attn" if m in ATTN else "mlp"


class Gen:
    """Seeded tensors: every directory gets its own generator."""

    def __init__(self, name):
        self.g = torch.Generator().manual_seed(1000 + zlib.crc32(name.encode()))

    def normal(self, shape, std):
        return (torch.randn(shape, generator=self.g, dtype=torch.float64) * std).float()

    def lora(self, r, din, dout):
        return self.normal((r, din), 1 / math.sqrt(din)), self.normal((dout, r), math.sqrt(0.5 / r))

    def router(self, e, din, logit_std):
        # Router inputs are RMS-normalised hidden states (|x|^2 ~ din) or FFN activations; the
        # caller picks logit_std so that the routing is decisive but not degenerate.
        return self.normal((e, din), logit_std / math.sqrt(din))


def save_bin(path, tensors):
    torch.save({k: v.contiguous() for k, v in tensors.items()}, path)


def save_st(path, tensors):
    write_safetensors(path, [(k, v.double()) for k, v in tensors.items()], "F32")


def dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def peft_config(base, **kw):
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base.dir,
           "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "bias": "none",
           "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
           "use_rslora": False, "use_dora": False, "modules_to_save": None,
           "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
           "alpha_pattern": {}, "revision": None}
    cfg.update(kw)
    return cfg


def peft_lora_dir(base, out, g, modules_by_layer, rank_of):
    """PEFT LoRA weights: modules_by_layer {l: [module]}, rank_of(l, m) -> r."""
    w = {}
    for l, mods in modules_by_layer.items():
        for m in mods:
            din, dout = base.dims[m]
            a, b = g.lora(rank_of(l, m), din, dout)
            p = f"base_model.model.model.layers.{l}.{block(m)}.{m}"
            w[p + ".lora_A.weight"], w[p + ".lora_B.weight"] = a, b
    save_st(os.path.join(out, "adapter_model.safetensors"), w)


def make_peft_lora(base, out, g):
    # Overridden modules get mole/1 `.scale` tensors, which are float32: their scales here
    # (32/sqrt(16), 16/sqrt(4)) are exact in float32, the default 16/sqrt(8) lives in the JSON.
    last = base.layers - 1
    cfg = peft_config(base, r=8, lora_alpha=16, use_rslora=True,
                      target_modules=["q_proj", "v_proj", "down_proj"],
                      rank_pattern={"v_proj": 16, f"layers.{last}.mlp.down_proj": 4},
                      alpha_pattern={"v_proj": 32})
    dump(os.path.join(out, "adapter_config.json"), cfg)
    ranks = {"v_proj": 16}
    peft_lora_dir(base, out, g, {l: ["q_proj", "v_proj", "down_proj"] for l in range(base.layers)},
                  lambda l, m: 4 if (l, m) == (last, "down_proj") else ranks.get(m, 8))


def make_peft_lora_all_linear(base, out, g):
    last = base.layers - 1
    cfg = peft_config(base, r=4, lora_alpha=8, target_modules="all-linear",
                      layers_to_transform=[last])
    dump(os.path.join(out, "adapter_config.json"), cfg)
    peft_lora_dir(base, out, g, {last: list(ALL)}, lambda l, m: 4)


def moe_peft_config(base, peft_type, targets, r, alpha, **kw):
    # MoE-PEFT LoraConfig.export() plus the family's own keys.
    cfg = {"bias": "none", "peft_type": peft_type, "task_type": "CAUSAL_LM",
           "base_model_name_or_path": base.dir, "r": r, "lora_alpha": alpha,
           "lora_dropout": 0.05, "target_modules": list(targets)}
    cfg.update(kw)
    return cfg


MIXLORA_VARIANTS = {
    # name: (routing_strategy, extra config keys, router logit std)
    "mixlora": ("mixlora", {"top_k": 2}, 2.5),
    "mixlora_legacy": ("mixtral", {"top_k": 2}, 2.5),
    "mixlora_dynamic": ("mixlora-dynamic", {"top_p": 0.6, "temperature": 0.0}, 1.5),
    "mixlora_dynamic_temp": ("mixlora-dynamic", {"top_p": 0.6, "temperature": 0.9}, 1.5),
    "mixlora_switch": ("mixlora-switch", {"expert_capacity": 32, "sparse_step": None}, 2.5),
}


def make_mixlora(base, out, g, name):
    strategy, extra, logit_std = MIXLORA_VARIANTS[name]
    legacy = strategy == "mixtral"
    e, attn, ffn = 4, ["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"]
    legacy_names = {"gate_proj": "w1_proj", "down_proj": "w2_proj", "up_proj": "w3_proj"}
    targets = attn + ([legacy_names[m] for m in ffn] if legacy else ffn)
    expert_lora = {"bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": base.dir,
                   "r": 4, "lora_alpha": 12, "lora_dropout": 0.05}
    cfg = moe_peft_config(base, "MIXLORA", targets, 8, 16, expert_lora=expert_lora,
                          routing_strategy=strategy, num_experts=e, **extra)
    if name == "mixlora":
        cfg["act_fn"] = "silu"
    dump(os.path.join(out, "adapter_config.json"), cfg)
    w = {}
    for l in range(base.layers):
        for m in attn:
            a, b = g.lora(8, *base.dims[m])
            p = f"mixlora.layers.{l}.self_attn.{m}"
            w[p + ".lora_A.weight"], w[p + ".lora_B.weight"] = a, b
        gate = g.router(e, base.hidden, logit_std)
        w[f"mixlora.layers.{l}.gate.weight" if legacy else
          f"mixlora.layers.{l}.mlp.moe_gate.weight"] = gate
        for m in ffn:
            for x in range(e):
                a, b = g.lora(4, *base.dims[m])
                p = (f"mixlora.layers.{l}.experts.{x}.{legacy_names[m]}" if legacy else
                     f"mixlora.layers.{l}.mlp.{m}.experts.{x}")
                w[p + ".lora_A.weight"], w[p + ".lora_B.weight"] = a, b
    save_bin(os.path.join(out, "adapter_model.bin"), w)


def moe_peft_plugin(base, out, g, prefix, e, routed, plain, r, logit_std):
    """MoE-PEFT plugin layout: moe_gate + experts per `routed` module, plain LoRA for `plain`."""
    w = {}
    for l in range(base.layers):
        for m in ALL:
            p = f"{prefix}.layers.{l}.{block(m)}.{m}"
            din, dout = base.dims[m]
            if m in routed:
                # down_proj's input (the FFN activation, LoRA-adapted) is ~3x larger than the
                # normalised hidden states.
                std = logit_std * (0.35 if m == "down_proj" else 1.0)
                w[p + ".moe_gate.weight"] = g.router(e, din, std)
                for x in range(e):
                    a, b = g.lora(r, din, dout)
                    w[f"{p}.experts.{x}.lora_A.weight"], w[f"{p}.experts.{x}.lora_B.weight"] = a, b
            elif m in plain:
                a, b = g.lora(r, din, dout)
                w[p + ".lora_A.weight"], w[p + ".lora_B.weight"] = a, b
    save_bin(os.path.join(out, "adapter_model.bin"), w)


def make_mola(base, out, g):
    cfg = moe_peft_config(base, "MOLA", ALL, 4, 8, routing_strategy="mola", num_experts=3, top_k=2)
    dump(os.path.join(out, "adapter_config.json"), cfg)
    moe_peft_plugin(base, out, g, "mola", 3, ALL, (), 4, 2.5)


def make_loramoe(base, out, g):
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = moe_peft_config(base, "LORAMOE", targets, 4, 8, use_rslora=True,
                          routing_strategy="loramoe", num_experts=3)
    dump(os.path.join(out, "adapter_config.json"), cfg)
    moe_peft_plugin(base, out, g, "loramoe", 3, MLP, ("q_proj", "v_proj"), 4, 1.5)


def make_dynmole(base, out, g):
    # Defaults of MOLE_FORMAT 3.3 written out as DynMoleConfig.export() does. Router logits of
    # std ~1.4 over 8 experts: flat tokens trip the entropy gate (all 8 experts), peaked ones
    # go through top-p "within" 0.75 plus keep_top_k 2.
    cfg = moe_peft_config(base, "DYNMOLE", ALL, 4, 8, routing_strategy="dynmole", num_experts=8,
                          entropy_threshold=0.9, entropy_index=1.1, entropy_type="tsallis",
                          entropy_eps=1e-5, keep_top_k=2, top_p=0.75)
    dump(os.path.join(out, "adapter_config.json"), cfg)
    moe_peft_plugin(base, out, g, "dynmole", 8, ALL, (), 4, 1.4)


def make_mola_original(base, out, g):
    # GCYZSL/MoLA: the peft LoraConfig (r is a per-layer list), adapter_model.bin with
    # lora_A_{e} / lora_B_{e} and router.router per module; E and k per layer live only on the
    # training command line, so they go to a sidecar named after its flags.
    experts = [2 + 2 * (l % 2) for l in range(base.layers)]        # [2, 4, ...]
    ranks = [4 + 4 * (l % 2) for l in range(base.layers)]          # [4, 8, ...]
    top_k = [1 + 2 * (l % 2) for l in range(base.layers)]          # [1, 3, ...]
    cfg = peft_config(base, r=ranks, lora_alpha=16, target_modules=list(ALL))
    for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern"):
        del cfg[k]  # the hacked LoraConfig predates them
    dump(os.path.join(out, "adapter_config.json"), cfg)
    dump(os.path.join(out, "mola_sidecar.json"), {"number_experts": experts, "top_k": top_k})
    w = {}
    for l in range(base.layers):
        for m in ALL:
            p = f"base_model.model.model.layers.{l}.{block(m)}.{m}"
            din, dout = base.dims[m]
            w[p + ".router.router.weight"] = g.router(experts[l], din,
                                                      0.9 if m == "down_proj" else 2.5)
            for x in range(experts[l]):
                a, b = g.lora(ranks[l], din, dout)
                w[f"{p}.lora_A_{x}.weight"], w[f"{p}.lora_B_{x}.weight"] = a, b
    save_bin(os.path.join(out, "adapter_model.bin"), w)


XLORA_EXPERTS = [  # (name, r, alpha, use_rslora, target modules)
    ("adapter_1", 4, 8, False, ["q_proj", "v_proj"]),
    ("adapter_2", 16, 16, True, ["q_proj", "down_proj"]),  # rsLoRA: 16/sqrt(16), exact in f32
    ("adapter_3", 2, 4, False, ["v_proj", "gate_proj", "up_proj"]),
]


def xlora_experts(base, out, g):
    for name, r, alpha, rslora, targets in XLORA_EXPERTS:
        d = os.path.join(out, name)
        os.makedirs(d)
        dump(os.path.join(d, "adapter_config.json"),
             peft_config(base, r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets))
        peft_lora_dir(base, d, g, {l: targets for l in range(base.layers)}, lambda l, m: r)


def xlora_n_modules(base):
    union = {m for _, _, _, _, t in XLORA_EXPERTS for m in t}
    return base.layers * len(union)


def classifier_linears(g, dims):
    """[(weight, bias)] for Linear layers mapping dims[i] -> dims[i + 1]."""
    return [(g.normal((o, i), 2.0 / math.sqrt(i)), g.normal((o,), 0.3))
            for i, o in zip(dims[:-1], dims[1:])]


def xlora_peft_config(base, **kw):
    cfg = {"peft_type": "XLORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base.dir,
           "hidden_size": base.hidden,
           "adapters": {name: name for name, *_ in XLORA_EXPERTS},
           "enable_softmax": True, "enable_softmax_topk": False, "layerwise_scalings": False,
           "xlora_depth": 1, "xlora_size": 2048, "xlora_dropout_p": 0.2,
           "use_trainable_adapters": False, "softmax_temperature": 1.0, "top_k_lora": None,
           "scaling_pass_value": 0.0, "global_scaling_weight": 1.0, "inference_mode": True}
    cfg.update(kw)
    return cfg


def peft_sequential_names(cfg, n):
    """nn.Sequential indices of the Linear layers of peft's XLoraClassifier (ReLU, Dropout)."""
    names, j = [], 0
    for i in range(n):
        names.append(f"internal_xlora_classifier.layers.{j}")
        j += 1
        if i < n - 1:
            j += 1 + (cfg["xlora_dropout_p"] > 0)  # ReLU [+ Dropout]
    return names


def make_xlora_peft(base, out, g, **kw):
    n = len(XLORA_EXPERTS)
    cfg = xlora_peft_config(base, **kw)
    depth, size = cfg["xlora_depth"], cfg["xlora_size"]
    n_out = n * (xlora_n_modules(base) if cfg["layerwise_scalings"] else 1)
    dims = [base.hidden] + [size] * (depth - 1) + [n_out]
    dump(os.path.join(out, "adapter_config.json"), cfg)
    xlora_experts(base, out, g)
    w = {}
    for name, (wt, b) in zip(peft_sequential_names(cfg, depth), classifier_linears(g, dims)):
        w[name + ".weight"], w[name + ".bias"] = wt, b
    save_st(os.path.join(out, "adapter_model.safetensors"), w)


def make_xlora_mistralrs(base, out, g):
    n, depth = len(XLORA_EXPERTS), 3
    names = [name for name, *_ in XLORA_EXPERTS]
    # mistral.rs builds `last` with input hidden_size, so a working depth >= 2 classifier has
    # xlora_size == hidden_size.
    cfg = {"hidden_size": base.hidden, "base_model_id": base.dir, "adapters": names,
           "layerwise_scalings": False, "enable_relu_and_dropout": False, "xlora_depth": depth,
           "xlora_size": base.hidden, "xlora_dropout_p": 0.2, "enable_softmax": True,
           "softmax_temperature": 1.0, "scaling_pass_value": 0.0, "use_trainable_adapters": False,
           "use_bias": True, "global_scaling_weight": 1.0, "top_k_lora": None,
           "enable_softmax_topk": False}
    dump(os.path.join(out, "xlora_config.json"), cfg)
    xlora_experts(base, out, g)
    lin = classifier_linears(g, [base.hidden] * depth + [n])
    w = {}
    for i, (wt, b) in enumerate(lin[:-1]):
        w[f"inner.{i}.weight"], w[f"inner.{i}.bias"] = wt, b
    w["last.weight"], w["last.bias"] = lin[-1]
    save_st(os.path.join(out, "xlora_classifier.safetensors"), w)
    # scripts/create_ordering.py: a replay of peft's module traversal over the union of the
    # targets; the adapter order given there (here a permutation) is the classifier's class order.
    union = {m for _, _, _, _, t in XLORA_EXPERTS for m in t}
    layers, idx = {}, 0
    for l in range(base.layers):
        for m in ALL:
            if m in union:
                layers[f"model.layers.{l}.{block(m)}.{m}"] = idx
                idx += 1
    dump(os.path.join(out, "ordering.json"),
         {"order": [names[2], names[0], names[1]], "layers": layers, "base_model_id": base.dir})


def make_flylora(base, out, g):
    r, k = 16, 4
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    cfg = peft_config(base, r=r, lora_alpha=2 * r, target_modules=targets,
                      init_lora_weights="sparse", top_k=k, bias_u=0.01)
    dump(os.path.join(out, "adapter_config.json"), cfg)
    w = {}
    for l in range(base.layers):
        for m in targets:
            din, dout = base.dims[m]
            nnz = din // (r // k)  # the fork's sparse init: in // (r // top_k) non-zeros per row
            mask = torch.zeros(r, din)
            for i in range(r):
                mask[i, torch.randperm(din, generator=g.g)[:nnz]] = 1
            a = g.normal((r, din), 1 / math.sqrt(nnz)) * mask
            b = g.normal((dout, r), math.sqrt(0.5 / k))
            p = f"base_model.model.model.layers.{l}.{block(m)}.{m}"
            w[p + ".lora_A.weight"], w[p + ".lora_B.weight"] = a, b
            w[p + ".lora_topk_bias"] = g.normal((r,), 0.3)  # as left by the fork's bias updates
    save_st(os.path.join(out, "adapter_model.safetensors"), w)


def make_sora(base, out, g):
    """SoRA (TsinghuaC3I/SoRA, src/lora.py): opendelta inserts a parallel module named "lora" next
    to each targeted Linear, y += ((x A^T) * gate) B^T * lora_alpha / lora_r, and saves the delta
    checkpoint (config.json + pytorch_model.bin). The proximal optimizer leaves exact zeros in the
    gates (pruned ranks); here some ranks are zero, one module entirely. Nonzero gates are powers
    of two, so folding them into B is exact in float32 (the converter check compares at 1e-9)."""
    r, alpha = 8, 16
    targets = ["q_proj", "v_proj", "down_proj"]
    dump(os.path.join(out, "config.json"),
         {"delta_type": "lora", "lora_r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
          "modified_modules": targets, "unfrozen_modules": ["deltas"],
          "backbone_class": "LlamaForCausalLM", "backbone_checkpoint_name": base.dir,
          "opendelta_version": "0.3.2"})
    w = {}
    powers = torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0])
    for l in range(base.layers):
        for m in targets:
            din, dout = base.dims[m]
            a, b = g.lora(r, din, dout)
            pick = torch.randint(0, len(powers), (r,), generator=g.g)
            sign = torch.randint(0, 2, (r,), generator=g.g) * 2 - 1
            gate = powers[pick] * sign
            gate[torch.randperm(r, generator=g.g)[:3]] = 0  # pruned ranks
            if (l, m) == (base.layers - 1, "v_proj"):
                gate[:] = 0  # a module whose every rank was pruned
            p = f"model.layers.{l}.{block(m)}.{m}.lora"
            w[p + ".lora_A"], w[p + ".lora_B"], w[p + ".gate"] = a, b, gate.reshape(1, r)
    save_bin(os.path.join(out, "pytorch_model.bin"), w)


def nola_basis_mix(coefficients, out_dim, in_dim, seed):
    """NOLA's GenerateParams.forward (UCDvision/NOLA llama/peft/tuners/lora.py) on the CPU: the
    basis comes from torch's global generator seeded with the module's seed."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    w = torch.zeros(coefficients.shape[0], out_dim, in_dim, dtype=coefficients.dtype)
    torch.nn.init.uniform_(w, a=-1.0, b=1.0)
    w = w * (1.0 / math.sqrt(coefficients.shape[0]))
    torch.random.set_rng_state(state)
    return torch.einsum("b,boi->oi", coefficients, w)


def make_nola(base, out, g):
    """NOLA's peft fork (UCDvision/NOLA, use_nola): lora_A and lora_B are NOLALinear layers whose
    weight is the frozen nn.Linear weight (kaiming for A, zeros for B) plus a mix of
    nola_num_basis random bases regenerated from a per-module seed; only the coefficients train.
    The checkpoint stores weight, coefficients and seed of each (peft drops the adapter name)."""
    r, nb = 4, 16
    targets = ["q_proj", "v_proj", "up_proj"]
    cfg = peft_config(base, r=r, lora_alpha=8, target_modules=targets, use_nola=True,
                      nola_num_basis=nb)
    dump(os.path.join(out, "adapter_config.json"), cfg)
    w = {}
    for l in range(base.layers):
        for m in targets:
            din, dout = base.dims[m]
            p = f"base_model.model.model.layers.{l}.{block(m)}.{m}"
            for part, shape in (("lora_A", (r, din)), ("lora_B", (dout, r))):
                frozen = (g.normal(shape, 1 / math.sqrt(din)) if part == "lora_A"
                          else torch.zeros(shape))
                w[f"{p}.{part}.weight"] = frozen
                w[f"{p}.{part}.coefficients"] = g.normal((nb,), 2.0 if part == "lora_B" else 0.5)
                w[f"{p}.{part}.seed"] = torch.randint(int(1e10), (1,), generator=g.g)
    save_bin(os.path.join(out, "adapter_model.bin"), w)


def randlora_kaiming(shape, generator, dtype):
    """PEFT's randlora _kaiming_init: kaiming_uniform_(a=sqrt(5)) with the generator, written out
    as torch computes it (Debian's torch predates its generator argument): fan_in = shape[1] *
    prod(shape[2:]), gain = sqrt(2 / (1 + a^2)), bound = sqrt(3) * gain / sqrt(fan_in)."""
    t = torch.empty(shape, dtype=dtype)
    std = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2)) / math.sqrt(shape[1] * math.prod(shape[2:]))
    return t.uniform_(-math.sqrt(3.0) * std, math.sqrt(3.0) * std, generator=generator)


def randlora_bases(r, largest, key, sparse, very_sparse, dtype):
    """PEFT randlora's shared bases (RandLoraModel._init_randlora_A_randlora_B[_sparse]) for the
    largest (out, in) of the targeted modules: A [r, 1, min], B [max, n, r], n = ceil(min / r),
    both divided by their std; dense kaiming in `dtype` (float16 on a machine without a bf16
    GPU), or sparse +-1 / 0 draws in float32."""
    max_dim, min_dim = max(largest), min(largest)
    n = -(-min_dim // r)
    g = torch.Generator(device="cpu").manual_seed(key)
    if sparse or very_sparse:
        sparsity = math.sqrt(min_dim) if very_sparse else 3
        a, b = torch.rand((r, 1, min_dim), generator=g), torch.rand((max_dim, n, r), generator=g)
        a_s, b_s = torch.zeros(a.shape), torch.zeros(b.shape)
        b_s[b < 1 / (2 * sparsity)] = -1
        b_s[b > 1 - 1 / (2 * sparsity)] = 1
        a_s[a < 1 / (2 * sparsity)] = -1
        a_s[a > 1 - 1 / (2 * sparsity)] = 1
        return a_s / a_s.std(), b_s / b_s.std()
    a = randlora_kaiming((r, 1, min_dim), g, dtype)
    b = torch.cat([randlora_kaiming((max_dim, 1, r), g, dtype) for _ in range(n)], dim=1)
    return a / a.std(), b / b.std()


def make_randlora(base, out, g, sparse=False, save_projection=True):
    """RandLoRA (Albert et al., ICLR 2025) as PEFT's randlora tuner saves it: per module
    randlora_lambda [r, n] and randlora_gamma [n, min(in, out)] (trained; n = ceil(min / r)),
    and, with save_projection, the shared random bases base_model.randlora_A / randlora_B, here
    also under each module (PEFT before huggingface/peft#3714 saved those aliases too). q_proj
    (in = out), k_proj (out < in: the transposed branch) and down_proj (in > out), r 4, so each
    module's update has rank n * r >= min(in, out). Saved with torch.save (fp16 bases)."""
    r, alpha, key = 4, 16, 7
    targets = ["q_proj", "k_proj", "down_proj"]
    cfg = {"peft_type": "RANDLORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base.dir,
           "r": r, "randlora_alpha": alpha, "randlora_dropout": 0.05, "bias": "none",
           "fan_in_fan_out": False, "inference_mode": True, "init_weights": True,
           "projection_prng_key": key, "save_projection": save_projection, "sparse": sparse,
           "very_sparse": False, "target_modules": targets, "modules_to_save": None,
           "layers_to_transform": None, "layers_pattern": None, "revision": None}
    dump(os.path.join(out, "adapter_config.json"), cfg)
    shapes = {m: base.dims[m][::-1] for m in targets}  # (out, in)
    largest = tuple(max(s[i] for s in shapes.values()) for i in (0, 1))
    bases = randlora_bases(r, largest, key, sparse, False, torch.float16)
    w = {}
    for l in range(base.layers):
        for m in targets:
            n = -(-min(shapes[m]) // r)
            p = f"base_model.model.model.layers.{l}.{block(m)}.{m}"
            w[p + ".randlora_lambda"] = g.normal((r, n), 1.0)
            w[p + ".randlora_gamma"] = g.normal((n, min(shapes[m])), 2.0 / max(shapes[m]))
            if save_projection:
                w[p + ".randlora_A"], w[p + ".randlora_B"] = bases
    if save_projection:
        w["base_model.randlora_A"], w["base_model.randlora_B"] = bases
    save_bin(os.path.join(out, "adapter_model.bin"), w)


def mos_gather(pool, mask, c):
    """MoS's transform_chunks (Forence1999/MoS modules/Tied_LoRA.py): the rows mask names, and
    each vector the concatenation of c consecutive ones (c shards per vector)."""
    rows = pool[mask]
    return torch.cat([rows[i::c] for i in range(c)], dim=1)


def make_mos(base, out, g, materialized=False):
    """Mixture of Shards (Wang et al., ICLR 2025; Forence1999/MoS, modules/Tied_LoRA.py), on
    q/o/up: per module type one pool of shards shared by every layer (A: [R * L * c, in / c],
    B: [out / c, R * L * c]; R = valid_param_lora_r 3, L layers, c = num_chunk_per_vec 2), the
    first (R - P) * L * c rows public, then P * c private rows per layer (P =
    valid_param_private_r 1). Each layer's r = 4 vectors of A and of B are c shards each: its
    lora_pair_mask (A) and lora_pair_mask_B (B), drawn independently (pair dissociation), name
    (r - P) * c random public shards and the layer's private ones. get_peft_model_state_dict
    gives every layer the pools, masks, lora_A_vec and lora_A_anti_vec (product 1): the form of
    a training checkpoint. `materialized`: what save_tied_lora writes at the end instead, a
    plain LoRA per layer (lora_A = gather * vec, lora_B = gather of B^T, transposed)."""
    r, big_r, private, c = 4, 3, 1, 2
    targets = ["q_proj", "o_proj", "up_proj"]
    cfg = peft_config(base, r=r, lora_alpha=16, target_modules=targets, ft_mode="mos",
                      enable_lora_vec=True, valid_param_lora_r=big_r,
                      valid_param_private_r=private, num_chunk_per_vec=c,
                      init_lora_A_vec_value=1, init_lora_A_vec_std=None)
    dump(os.path.join(out, "adapter_config.json"), cfg)
    layers = base.layers
    rows = big_r * layers * c
    public = (big_r - private) * layers * c
    w = {}
    for m in targets:
        din, dout = base.dims[m]
        pool_a = g.normal((rows, din // c), 1 / math.sqrt(din))
        pool_b = g.normal((dout // c, rows), math.sqrt(0.5 / r))
        for l in range(layers):
            own = public + torch.arange(l * private * c, (l + 1) * private * c)
            masks = [torch.cat([torch.randperm(public, generator=g.g)[:(r - private) * c], own])
                     for _ in range(2)]
            vec, anti = torch.ones(r), torch.ones(r)
            p = f"base_model.model.model.layers.{l}.{block(m)}.{m}"
            if materialized:
                a = mos_gather(pool_a, masks[0], c)
                w[p + ".lora_A.weight"] = (a.t() * (vec * anti)).t()
                w[p + ".lora_B.weight"] = mos_gather(pool_b.t(), masks[1], c).t()
                continue
            w[p + ".lora_A.weight"], w[p + ".lora_B.weight"] = pool_a, pool_b
            w[p + ".lora_pair_mask"], w[p + ".lora_pair_mask_B"] = masks
            w[p + ".lora_A_vec"], w[p + ".lora_A_anti_vec"] = vec, anti
    save_bin(os.path.join(out, "adapter_model.bin"), w)


def make_smora(base, out, g):
    """SMoRA ("each rank is an expert", MOLE_FORMAT 3.5) has no public code or checkpoint
    layout, so it is written directly as mole/1 (engine/adapters/README.md)."""
    r, k, targets = 8, 3, ["q_proj", "up_proj"]
    cfg = {"format": "mole", "format_version": 1, "name": "smora", "source_family": "smora",
           "routed_groups": [{
               "id": "smora", "scope": "module", "granularity": "rank",
               "targets": {"layers": "all", "modules": targets},
               "num_experts": 1, "rank": r, "scale": 2.0,
               "router": {"type": "linear", "select_bias": True},
               "routing": {"algorithm": "rank_topk", "k": k, "renormalize": True}}]}
    dump(os.path.join(out, "mole_config.json"), cfg)
    w = {}
    for l in range(base.layers):
        for m in targets:
            din, dout = base.dims[m]
            p = f"groups.smora.layers.{l}.{m}"
            w[p + ".A"] = g.normal((1, r, din), 1 / math.sqrt(din))
            w[p + ".B"] = g.normal((1, dout, r), math.sqrt(0.5 / k))
            w[p + ".router.weight"] = g.normal((r, din), 3 / math.sqrt(din))
            w[p + ".router.select_bias"] = g.normal((r,), 0.3)
    save_st(os.path.join(out, "model.safetensors"), w)


def make_mor(base, out, g):
    """Mixture of Routers (MoR, arXiv 2503.23362; MOLE_FORMAT 3.7): its code is not public, so
    it is written as mole/1 with router.type "mixture" (the paper's equation as the format
    states it: p = sum_j softmax(main x)_j softmax(sub_j x), then the host method's top-k and
    renormalisation), replacing the router of a MoLA-style module group (q_proj, o_proj; 3
    sub-routers) and of a MixLoRA-style block-routed FFN (2 sub-routers)."""
    e, r, k = 4, 4, 2
    groups = [
        {"id": "attn", "scope": "module", "granularity": "lora",
         "targets": {"layers": "all", "modules": ["q_proj", "o_proj"]},
         "num_experts": e, "rank": r, "scale": 2.0,
         "router": {"type": "mixture", "num_routers": 3},
         "routing": {"algorithm": "topk", "k": k, "renormalize": True}},
        {"id": "ffn", "scope": "block_ffn", "granularity": "lora",
         "targets": {"layers": "all", "modules": list(MLP)},
         "num_experts": e, "rank": r, "scale": 2.0, "act_fn": "silu",
         "router": {"type": "mixture", "num_routers": 2},
         "routing": {"algorithm": "topk", "k": k, "renormalize": True}}]
    dump(os.path.join(out, "mole_config.json"),
         {"format": "mole", "format_version": 1, "name": "mor", "source_family": "mor",
          "routed_groups": groups})
    w = {}

    def stack(p, din, dout):
        w[p + ".A"] = g.normal((e, r, din), 1 / math.sqrt(din))
        w[p + ".B"] = g.normal((e, dout, r), math.sqrt(0.5 / r))

    def mixture(p, din, m):
        for j in range(m):
            w[f"{p}.sub.{j}.weight"] = g.router(e, din, 3.0)
        w[p + ".main.weight"] = g.router(m, din, 2.0)

    for l in range(base.layers):
        for m in ("q_proj", "o_proj"):
            din, dout = base.dims[m]
            stack(f"groups.attn.layers.{l}.{m}", din, dout)
            mixture(f"groups.attn.layers.{l}.{m}.router", din, 3)
        mixture(f"groups.ffn.layers.{l}.router", base.hidden, 2)
        for m in MLP:
            din, dout = base.dims[m]
            stack(f"groups.ffn.layers.{l}.{m}", din, dout)
    save_st(os.path.join(out, "model.safetensors"), w)


def make_output_gate(base, out, g):
    """Microsoft's output-gated MoLE (Wu, Huang, Wei, ICLR 2024; MOLE_FORMAT 3.8): N trained
    LoRAs composed per layer by a gate over their outputs. The public code is Stable Diffusion
    only, so it is written as mole/1 with router.type "output_gate", the paper's equations per
    token: G = softmax(W normalize(E_1(x) + ... + E_N(x)) / T), y = W0 x + sum_i G_i E_i(x), on
    q_proj and v_proj (the modules the diffusion code gates)."""
    n_experts, r, t = 3, 4, 0.5
    targets = ["q_proj", "v_proj"]
    dump(os.path.join(out, "mole_config.json"),
         {"format": "mole", "format_version": 1, "name": "output_gate",
          "source_family": "output_gate",
          "routed_groups": [{
              "id": "mole", "scope": "module", "granularity": "lora",
              "targets": {"layers": "all", "modules": targets},
              "num_experts": n_experts, "rank": r, "scale": 2.0,
              "router": {"type": "output_gate"},
              "routing": {"algorithm": "soft", "temperature": t}}]})
    w = {}
    for l in range(base.layers):
        for m in targets:
            din, dout = base.dims[m]
            p = f"groups.mole.layers.{l}.{m}"
            w[p + ".A"] = g.normal((n_experts, r, din), 1 / math.sqrt(din))
            w[p + ".B"] = g.normal((n_experts, dout, r), math.sqrt(0.5 / r))
            w[p + ".scale"] = torch.tensor([2.0, 1.0, 0.5])  # each LoRA its own alpha / r
            w[p + ".router.weight"] = g.normal((n_experts, n_experts * dout), 2.0)
    save_st(os.path.join(out, "model.safetensors"), w)


NATIVE = [("smora", "smora", make_smora), ("mor", "mor", make_mor),
          ("output_gate", "output_gate", make_output_gate)]  # (dir, family, writer)


def write_native(base_dir, out_root):
    """Writes the native mole/1 adapters; returns [(name, family)]."""
    base = Base(base_dir)
    for name, _, writer in NATIVE:
        out = os.path.join(out_root, name)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        writer(base, out, Gen(name))
    return [(name, family) for name, family, _ in NATIVE]


ADAPTERS = [  # (directory, family flag, writer)
    ("peft_lora", "peft_lora", make_peft_lora),
    ("peft_lora_all_linear", "peft_lora", make_peft_lora_all_linear),
    ("mixlora", "mixlora", lambda b, o, g: make_mixlora(b, o, g, "mixlora")),
    ("mixlora_legacy", "mixlora", lambda b, o, g: make_mixlora(b, o, g, "mixlora_legacy")),
    ("mixlora_dynamic", "mixlora", lambda b, o, g: make_mixlora(b, o, g, "mixlora_dynamic")),
    ("mixlora_dynamic_temp", "mixlora",
     lambda b, o, g: make_mixlora(b, o, g, "mixlora_dynamic_temp")),
    ("mixlora_switch", "mixlora", lambda b, o, g: make_mixlora(b, o, g, "mixlora_switch")),
    ("moepeft_mola", "mola", make_mola),
    ("moepeft_loramoe", "loramoe", make_loramoe),
    ("moepeft_dynmole", "dynmole", make_dynmole),
    ("mola_original", "mola_original", make_mola_original),
    ("xlora_peft", "xlora",
     lambda b, o, g: make_xlora_peft(b, o, g, xlora_depth=2, xlora_size=32,
                                     scaling_pass_value=0.25)),
    ("xlora_peft_topk", "xlora",
     lambda b, o, g: make_xlora_peft(b, o, g, xlora_depth=1, layerwise_scalings=True, top_k_lora=2,
                                     softmax_temperature=0.5, global_scaling_weight=0.8)),
    ("xlora_mistralrs", "xlora", make_xlora_mistralrs),
    ("flylora", "flylora", make_flylora),
    ("sora", "sora", make_sora),
    ("nola", "nola", make_nola),
    ("randlora", "randlora", make_randlora),
    ("randlora_sparse", "randlora",
     lambda b, o, g: make_randlora(b, o, g, sparse=True, save_projection=False)),
    ("mos", "mos", make_mos),
    ("mos_materialized", "mos", lambda b, o, g: make_mos(b, o, g, materialized=True)),
]


# Seed salts, picked so that on llama_rope_linear_fp32 no routing decision of the test prompts
# (tests/mole/converter_check.py, tests/engine/model/mole_families_test.cc incl. 16 greedy
# tokens) lies within 1e-4 of DynMoLE's top-p cut or entropy threshold.
SEED_SALT = {"moepeft_dynmole": "#7"}


def write_all(base_dir, out_root, names=None):
    """Writes the adapters (all, or those in `names`); returns [(name, family)]."""
    base = Base(base_dir)
    written = []
    for name, family, writer in ADAPTERS:
        if names is not None and name not in names:
            continue
        out = os.path.join(out_root, name)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        writer(base, out, Gen(name + SEED_SALT.get(name, "")))
        written.append((name, family))
    return written


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    for name, family in write_all(sys.argv[1], sys.argv[2]) + write_native(sys.argv[1],
                                                                          sys.argv[2]):
        print(name, family)


if __name__ == "__main__":
    main()
