#!/usr/bin/env python3
"""Converts a public MoLE checkpoint into moleserve's `mole/1` directory format.

  mole_convert.py SRC_DIR DST_DIR [--family auto|peft_lora|mixlora|mola|loramoe|dynmole|
                  mola_original|xlora|flylora|sora|nola|randlora|mos] [--k-per-layer 2,2,...]
                  [--ordering FILE] [--dtype float32|bfloat16] [--base BASE_DIR] [--name NAME]
                  [--nola-device cpu|cuda] [--randlora-basis-dtype float16|bfloat16]

Writes DST_DIR/mole_config.json and DST_DIR/model.safetensors as engine/adapters/README.md and
MOLE_FORMAT.md section (b) define them. Needs only Debian's python3-torch (to read the `.bin`
pickles that MixLoRA, MoE-PEFT and MoLA save) and numpy; the safetensors reader and writer are
the small ones below.

Families (MOLE_FORMAT.md b.4):
  peft_lora      PEFT LoRA (adapter_config.json + adapter_model.safetensors|.bin): one static LoRA;
                 rank_pattern / alpha_pattern / rsLoRA become per-module ranks and scale tensors.
  mixlora        MixLoRA / MoE-PEFT MIXLORA (adapter_model.bin, modern or legacy "mixtral" names):
                 attention LoRAs -> static "attn", FFN experts -> block_ffn group "ffn".
  mola, loramoe, dynmole
                 MoE-PEFT / DynMoLE plugin layouts: module-scope groups, plain modules -> static.
  mola_original  GCYZSL/MoLA (lora_A_{e}, router.router): E per layer from the router rows, k per
                 layer from --k-per-layer, else SRC_DIR/mola_sidecar.json {"top_k": [...]}, else 2.
  xlora          X-LoRA, peft layout (adapter_config.json with peft_type XLORA, classifier
                 internal_xlora_classifier.layers.{j}) or mistral.rs layout (xlora_config.json,
                 xlora_classifier.safetensors with inner.{i}/last); experts padded to the largest
                 rank with a per-expert scale tensor; module_index from --ordering (or
                 SRC_DIR/ordering.json), else a replay of peft's module traversal order.
  flylora        FlyLoRA's peft fork: a rank-granular group, lora_topk_bias -> router.select_bias.
  sora           SoRA (TsinghuaC3I/SoRA, an opendelta delta checkpoint: config.json with
                 delta_type "lora" + pytorch_model.bin with {module}.lora.{lora_A,lora_B,gate}):
                 the gate folds into B (B' = B diag(gate), one float32 rounding per element),
                 zero-gated ranks are pruned (a module with none left is dropped), scale
                 lora_alpha / lora_r of the trained rank: static LoRAs of per-module rank.
  nola           NOLA's peft fork (UCDvision/NOLA, adapter_config.json use_nola): A and B are each
                 the stored frozen weight plus sum_b c_b U_b / sqrt(nola_num_basis), the bases U_b
                 regenerated from the module's stored seed with torch's generator on the training
                 device (--nola-device, required: CPU and CUDA generators differ): a static LoRA.
  randlora       PEFT's randlora tuner: per module lambda [r, n] and gamma [n, min(in, out)] with
                 the shared random bases (saved, or regenerated from projection_prng_key: sparse
                 exactly, dense in --randlora-basis-dtype) folded into one static LoRA of rank
                 n * r, the product get_scaled_bases forms; scale randlora_alpha / r.
  mos            Mixture of Shards (Forence1999/MoS): a training checkpoint's shard pools and
                 per-layer shard masks materialised into each layer's LoRA (transform_chunks),
                 or the plain LoRA save_tied_lora writes; scale lora_alpha / r.
A PERFT checkpoint (adapters beside the experts of a Mixture-of-Experts base) is refused with
that reason.
`auto` (the default) picks the family from the files. Anything the format cannot express exactly
(DoRA, modules_to_save, embedding LoRAs, fan_in_fan_out, LoRA biases, Renyi entropy, a non-SiLU
MixLoRA act_fn, ...) is rejected with a message naming it and exit status 1.
"""
import argparse
import json
import math
import os
import re
import struct
import sys

import torch

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN = MODULES[:4]
FFN = MODULES[4:]
FAMILIES = ("peft_lora", "mixlora", "mola", "loramoe", "dynmole", "mola_original", "xlora",
            "flylora", "sora", "nola", "randlora", "mos")


class ConvertError(Exception):
    pass


def block(m):
    return "self_attn" if m in ATTN else "mlp"


# ------------------------------------------------------------------------------------------------
# Files

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F64": torch.float64}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in ST_DTYPES:
            raise ConvertError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        raw = bytearray(data[8 + n + begin:8 + n + end])
        t = torch.frombuffer(raw, dtype=ST_DTYPES[info["dtype"]]) if raw else \
            torch.zeros(0, dtype=ST_DTYPES[info["dtype"]])
        out[name] = t.reshape(info["shape"])
    return out


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_weights(src, names=("adapter_model.safetensors", "adapter_model.bin")):
    for n in names:
        p = os.path.join(src, n)
        if os.path.exists(p):
            if n.endswith(".bin"):
                return torch.load(p, map_location="cpu", weights_only=True)
            return read_safetensors(p)
    raise ConvertError(f"{src}: no {' or '.join(names)}")


def tensor_bytes(t, dtype):
    """(safetensors dtype, little-endian bytes) of t stored as dtype ("F32" or "BF16")."""
    t = t.detach().contiguous()
    if dtype == "BF16":
        return "BF16", t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return "F32", t.to(torch.float32).numpy().astype("<f4").tobytes()


def write_safetensors(path, tensors):
    """tensors: [(name, safetensors dtype, shape, bytes)], written in order, 8-byte aligned."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


# ------------------------------------------------------------------------------------------------
# The mole/1 directory being built


class Mole:
    def __init__(self, family, base, weight_dtype, name):
        self.family = family
        self.base = base  # base-model facts (may be partial), see base_info()
        self.weight_dtype = weight_dtype  # "F32" or "BF16": LoRA A/B storage
        self.name = name
        self.static = []
        self.groups = []
        self.xlora = None
        self.tensors = {}  # name -> (safetensors dtype, shape, bytes)
        self.touched = set()

    @property
    def num_layers(self):
        return self.base["num_layers"]

    def weight(self, name, t):
        """A LoRA A/B tensor, stored in the weight dtype."""
        dtype, data = tensor_bytes(t, self.weight_dtype)
        self.tensors[name] = (dtype, tuple(t.shape), data)

    def f32(self, name, t):
        """A router / scale / classifier tensor, always float32."""
        dtype, data = tensor_bytes(t, "F32")
        self.tensors[name] = (dtype, tuple(t.shape), data)

    def layers_field(self, layers):
        layers = sorted(layers)
        return "all" if layers == list(range(self.num_layers)) else layers

    def per_layer(self, values):
        """{layer: value} -> one number if uniform, else a list over every base layer (untargeted
        layers repeat the first targeted value: the loader ignores them)."""
        vals = set(values.values())
        if len(vals) == 1:
            return vals.pop()
        first = values[min(values)]
        return [values.get(l, first) for l in range(self.num_layers)]

    def add_static(self, sid, loras, rank_default=None, scale_default=None):
        """loras {(l, m): (A, B, scale)} -> static LoRA entries of product-shaped targets."""
        for i, (layers, mods) in enumerate(product_groups(loras)):
            gid = sid if i == 0 else f"{sid}_{i}"
            keys = [(l, m) for l in layers for m in mods]
            rank = rank_default or most_common([loras[k][0].shape[0] for k in keys])
            scale = scale_default if scale_default is not None else \
                most_common([loras[k][2] for k in keys])
            for l, m in keys:
                a, b, s = loras[(l, m)]
                self.weight(f"static.{gid}.layers.{l}.{m}.A", a)
                self.weight(f"static.{gid}.layers.{l}.{m}.B", b)
                if s != scale:
                    self.f32(f"static.{gid}.layers.{l}.{m}.scale", torch.tensor(float(s)))
            self.static.append({"id": gid, "targets": {"layers": self.layers_field(layers),
                                                       "modules": list(mods)},
                                "rank": rank, "scale": scale})
            self.touched.update(mods)

    def add_group(self, group):
        self.groups.append(group)
        self.touched.update(group["targets"]["modules"])

    def write(self, dst):
        os.makedirs(dst, exist_ok=True)
        base = {k: v for k, v in self.base.items() if v is not None}
        config = {
            "format": "mole", "format_version": 1, "name": self.name,
            "source_family": self.family, "base_model": base,
            "weight_dtype": {"F32": "float32", "BF16": "bfloat16"}[self.weight_dtype],
            "modules": [m for m in MODULES if m in self.touched],
            "static_loras": self.static, "routed_groups": self.groups, "xlora": self.xlora,
            "inference": {"ignore_capacity": True, "freeze_scalings_after": None},
        }
        write_safetensors(os.path.join(dst, "model.safetensors"),
                          [(n,) + self.tensors[n] for n in sorted(self.tensors)])
        with open(os.path.join(dst, "mole_config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")


def most_common(values):
    return max(values, key=values.count)


def product_groups(keys):
    """Splits {(l, m)} into product-shaped (layers, modules) targets: modules with the same layer
    set share one entry (a target set must be layers x modules)."""
    by_module = {}
    for l, m in keys:
        by_module.setdefault(m, set()).add(l)
    out = []
    for m in MODULES:
        if m not in by_module:
            continue
        layers = sorted(by_module[m])
        for entry in out:
            if entry[0] == layers:
                entry[1].append(m)
                break
        else:
            out.append((layers, [m]))
    return out


def base_info(src_config, base_dir, weights_layers):
    """Facts about the base model: from --base, else from a local base_model_name_or_path.
    weights_layers() gives the layer numbers the adapter's tensors use (the fallback)."""
    name = src_config.get("base_model_name_or_path") or src_config.get("base_model_id")
    cfg_dir = base_dir or (name if name and os.path.isfile(os.path.join(name, "config.json"))
                           else None)
    info = {"architecture": None, "name_or_path": name, "num_layers": None, "hidden_size": None,
            "intermediate_size": None, "num_attention_heads": None, "num_key_value_heads": None}
    if cfg_dir:
        cfg = read_json(os.path.join(cfg_dir, "config.json"))
        info.update(architecture=cfg.get("model_type"), num_layers=cfg["num_hidden_layers"],
                    hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                    num_attention_heads=cfg["num_attention_heads"],
                    num_key_value_heads=cfg.get("num_key_value_heads")
                    or cfg["num_attention_heads"])
        if cfg.get("head_dim") is not None:
            info["head_dim"] = cfg["head_dim"]
    else:
        # Without the base config the layer count is the highest layer the adapter touches.
        info["num_layers"] = max(weights_layers()) + 1
        print(f"mole_convert: base config not found; assuming {info['num_layers']} layers "
              "(pass --base to check shapes)", file=sys.stderr)
    return info


LAYER_RE = re.compile(r"layers\.(\d+)\.")


def layers_in(weights):
    return {int(m.group(1)) for k in weights for m in [LAYER_RE.search(k)] if m} or {0}


def lora_scale(alpha, r, rslora):
    return alpha / math.sqrt(r) if rslora else alpha / r


def reject_common(cfg, where):
    if cfg.get("use_dora"):
        raise ConvertError(f"{where}: use_dora (DoRA) is not supported by mole/1 v1")
    if cfg.get("fan_in_fan_out"):
        raise ConvertError(f"{where}: fan_in_fan_out is not supported")
    if cfg.get("bias", "none") != "none":
        raise ConvertError(f"{where}: bias '{cfg['bias']}' is not supported (only 'none')")
    if cfg.get("modules_to_save"):
        raise ConvertError(f"{where}: modules_to_save is not supported")
    if cfg.get("layer_replication"):
        raise ConvertError(f"{where}: layer_replication is not supported")


def reject_tensors(weights, where):
    for k in weights:
        if "lora_magnitude_vector" in k or k.endswith(".magnitude_vector_"):
            raise ConvertError(f"{where}: DoRA magnitude tensor {k} is not supported")
        if "lora_embedding_" in k:
            raise ConvertError(f"{where}: embedding LoRA {k} is not supported")


# ------------------------------------------------------------------------------------------------
# PEFT LoRA (also the experts of X-LoRA and the base of FlyLoRA)


def peft_module_name(l, m):
    return f"model.layers.{l}.{block(m)}.{m}"


def peft_targets(cfg, num_layers):
    """[(l, m)] that peft's check_target_module_exists wraps, in module traversal order."""
    tm = cfg.get("target_modules")
    ltt = cfg.get("layers_to_transform")
    if isinstance(ltt, int):
        ltt = [ltt]
    out = []
    for l in range(num_layers):
        for m in MODULES:
            key = peft_module_name(l, m)
            if tm == "all-linear":
                hit = True
            elif isinstance(tm, str):
                hit = re.fullmatch(tm, key) is not None
            elif tm:
                hit = key in tm or any(key.endswith("." + t) for t in tm)
            else:
                hit = False
            if hit and (ltt is None or l in ltt):
                out.append((l, m))
    return out


def peft_pattern_value(patterns, l, m, default):
    key = peft_module_name(l, m)
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def read_peft_lora(src, num_layers, allow_extra=()):
    """(config, {(l, m): (A, B, scale)}, weights) of a PEFT LoRA directory."""
    cfg = read_json(os.path.join(src, "adapter_config.json"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConvertError(f"{src}: peft_type {cfg.get('peft_type')} is not LORA")
    reject_common(cfg, src)
    w = read_weights(src)
    reject_tensors(w, src)
    loras = {}
    for l, m in peft_targets(cfg, num_layers):
        prefix = "base_model.model." + peft_module_name(l, m)
        if prefix + ".lora_A.weight" not in w:
            raise ConvertError(f"{src}: {prefix}.lora_A.weight missing (targeted by the config)")
        if prefix + ".lora_B.bias" in w:
            raise ConvertError(f"{src}: LoRA bias {prefix}.lora_B.bias is not supported")
        a, b = w[prefix + ".lora_A.weight"], w[prefix + ".lora_B.weight"]
        r = peft_pattern_value(cfg.get("rank_pattern"), l, m, cfg["r"])
        alpha = peft_pattern_value(cfg.get("alpha_pattern"), l, m, cfg["lora_alpha"])
        if a.shape[0] != r or b.shape[1] != r:
            raise ConvertError(f"{src}: {prefix} has rank {a.shape[0]}, the config says {r}")
        loras[(l, m)] = (a, b, lora_scale(alpha, r, cfg.get("use_rslora", False)))
    used = {"base_model.model." + peft_module_name(l, m) + f".lora_{x}.weight"
            for l, m in loras for x in "AB"}
    extra = [k for k in w if k not in used and not any(k.endswith(s) for s in allow_extra)]
    if extra:
        raise ConvertError(f"{src}: tensors the config does not target: {extra[:3]}")
    return cfg, loras, w


def convert_peft_lora(src, opts):
    cfg = read_json(os.path.join(src, "adapter_config.json"))
    mole = new_mole("lora", cfg, src, opts)
    _, loras, _ = read_peft_lora(src, mole.num_layers)
    if not loras:
        raise ConvertError(f"{src}: the config targets no module of the base model")
    mole.add_static("lora", loras, scale_default=lora_scale(cfg["lora_alpha"], cfg["r"],
                                                            cfg.get("use_rslora", False)))
    return mole


def new_mole(family, cfg, src, opts, weights=None):
    def layers():
        return layers_in(weights if weights is not None else read_weights(src))

    return Mole(family, base_info(cfg, opts.base, layers), opts.weight_dtype, opts.name)


# ------------------------------------------------------------------------------------------------
# MixLoRA (TUDB-Labs/MixLoRA, MoE-PEFT "mixlora")

LEGACY_PROJ = {"w1_proj": "gate_proj", "w2_proj": "down_proj", "w3_proj": "up_proj"}


def moe_peft_targets(cfg):
    tm = cfg.get("target_modules") or []
    names = [k for k, v in tm.items() if v] if isinstance(tm, dict) else list(tm)
    return [m for m in MODULES if m in {LEGACY_PROJ.get(n, n) for n in names}]


def moe_peft_scale(cfg):
    return lora_scale(cfg["lora_alpha"], cfg["r"], cfg.get("use_rslora", False))


def routing_spec(algorithm, **kw):
    spec = {"algorithm": algorithm}
    spec.update({k: v for k, v in kw.items() if v is not None})
    return spec


def convert_mixlora(src, opts):
    cfg = read_json(os.path.join(src, "adapter_config.json"))
    if cfg.get("peft_type") != "MIXLORA":
        raise ConvertError(f"{src}: peft_type {cfg.get('peft_type')} is not MIXLORA")
    expert_cfg = dict(cfg)
    expert_cfg.update(cfg.get("expert_lora") or {})
    reject_common(cfg, src)
    reject_common(expert_cfg, src + " expert_lora")
    w = read_weights(src)
    reject_tensors(w, src)
    mole = new_mole("mixlora", cfg, src, opts, w)
    L, E = mole.num_layers, cfg["num_experts"]
    strategy = cfg.get("routing_strategy")
    if strategy in ("mixlora", "mixtral"):  # "mixtral": legacy_weights_convertor renames it
        routing = routing_spec("topk", k=cfg.get("top_k", 2), renormalize=True)
    elif strategy == "mixlora-dynamic":
        t = cfg.get("temperature", 0.0)
        routing = routing_spec("top_p", p=cfg.get("top_p", 0.8), p_mode="exceed",
                               renormalize=False, prob_temperature=t if t > 0 else None)
    elif strategy == "mixlora-switch":
        routing = routing_spec("switch", renormalize=False)
    else:
        raise ConvertError(f"{src}: unknown MixLoRA routing_strategy {strategy!r}")
    act = cfg.get("act_fn")
    if act not in (None, "silu"):
        raise ConvertError(f"{src}: act_fn {act!r} is not supported (only silu or the base act)")
    targets = moe_peft_targets(cfg)
    attn = [m for m in targets if m in ATTN]
    ffn = [m for m in targets if m in FFN]
    if not ffn:
        raise ConvertError(f"{src}: MixLoRA without FFN target modules")
    # Legacy names (pip package <= 0.2, "mixtral"): gate.weight, experts.{e}.{proj|w1,w2,w3}.
    modern_proj = {v: k for k, v in LEGACY_PROJ.items()}
    static, used = {}, set()

    def take(name):
        if name not in w:
            raise ConvertError(f"{src}: missing tensor {name}")
        used.add(name)
        return w[name]

    for l in range(L):
        for m in attn:
            p = f"mixlora.layers.{l}.self_attn.{m}"
            static[(l, m)] = (take(p + ".lora_A.weight"), take(p + ".lora_B.weight"),
                              moe_peft_scale(cfg))
        gate = f"mixlora.layers.{l}.mlp.moe_gate.weight"
        mole.f32(f"groups.ffn.layers.{l}.router.weight",
                 take(gate if gate in w else f"mixlora.layers.{l}.gate.weight"))
        for m in ffn:
            a_list, b_list = [], []
            for e in range(E):
                cands = [f"mixlora.layers.{l}.mlp.{m}.experts.{e}",
                         f"mixlora.layers.{l}.experts.{e}.{m}",
                         f"mixlora.layers.{l}.experts.{e}.{modern_proj[m]}"]
                p = next((c for c in cands if c + ".lora_A.weight" in w), cands[0])
                a_list.append(take(p + ".lora_A.weight"))
                b_list.append(take(p + ".lora_B.weight"))
            mole.weight(f"groups.ffn.layers.{l}.{m}.A", torch.stack(a_list))
            mole.weight(f"groups.ffn.layers.{l}.{m}.B", torch.stack(b_list))
    if set(w) - used:
        raise ConvertError(f"{src}: unexpected tensors {sorted(set(w) - used)[:3]}")
    if static:
        mole.add_static("attn", static)
    mole.add_group({
        "id": "ffn", "scope": "block_ffn", "targets": {"layers": "all", "modules": ffn},
        "granularity": "lora", "num_experts": E, "rank": expert_cfg["r"],
        "scale": moe_peft_scale(expert_cfg), "act_fn": act,
        "router": {"type": "linear", "input": "block_input", "bias": False, "dtype": "float32",
                   "select_bias": False, "select_on_abs": False},
        "routing": routing})
    return mole


# ------------------------------------------------------------------------------------------------
# MoE-PEFT plugin families: mola, loramoe, dynmole


def convert_moe_peft(src, opts, family):
    cfg = read_json(os.path.join(src, "adapter_config.json"))
    want = {"mola": "MOLA", "loramoe": "LORAMOE", "dynmole": "DYNMOLE"}[family]
    if cfg.get("peft_type") != want:
        raise ConvertError(f"{src}: peft_type {cfg.get('peft_type')} is not {want}")
    reject_common(cfg, src)
    w = read_weights(src)
    reject_tensors(w, src)
    mole = new_mole(family, cfg, src, opts, w)
    E, s = cfg["num_experts"], moe_peft_scale(cfg)
    targets = moe_peft_targets(cfg)
    routed = [m for m in targets if family != "loramoe" or m in FFN]  # LoRAMoE: MLP only
    plain = [m for m in targets if m not in routed]
    if family == "mola":
        routing = routing_spec("topk", k=cfg.get("top_k", 2), renormalize=True)
    elif family == "loramoe":
        routing = routing_spec("soft", renormalize=False)
    else:
        if cfg.get("entropy_type", "tsallis") != "tsallis":
            raise ConvertError(f"{src}: entropy_type {cfg['entropy_type']!r} is not supported")
        q, theta = cfg.get("entropy_index", 1.1), cfg.get("entropy_threshold", 0.9)
        entropy = ({"type": "tsallis", "q": q, "threshold": theta,
                    "eps": cfg.get("entropy_eps", 1e-5)} if q > 0 and theta < 1 else None)
        routing = routing_spec("dynmole", p=cfg.get("top_p", 0.75), p_mode="within",
                               min_k=cfg.get("keep_top_k", 2), renormalize=False)
        routing["entropy"] = entropy
    static, used = {}, set()

    def take(name):
        if name not in w:
            raise ConvertError(f"{src}: missing tensor {name}")
        used.add(name)
        return w[name]

    for l in range(mole.num_layers):
        for m in targets:
            p = f"{family}.layers.{l}.{block(m)}.{m}"
            if m in plain:
                static[(l, m)] = (take(p + ".lora_A.weight"), take(p + ".lora_B.weight"), s)
                continue
            g = f"groups.{family}.layers.{l}.{m}"
            mole.f32(g + ".router.weight", take(p + ".moe_gate.weight"))
            mole.weight(g + ".A", torch.stack([take(f"{p}.experts.{e}.lora_A.weight")
                                               for e in range(E)]))
            mole.weight(g + ".B", torch.stack([take(f"{p}.experts.{e}.lora_B.weight")
                                               for e in range(E)]))
    if set(w) - used:
        raise ConvertError(f"{src}: unexpected tensors {sorted(set(w) - used)[:3]}")
    if static:
        mole.add_static("attn" if all(m in ATTN for m in plain) else "lora", static)
    mole.add_group({
        "id": family, "scope": "module", "targets": {"layers": "all", "modules": routed},
        "granularity": "lora", "num_experts": E, "rank": cfg["r"], "scale": s, "act_fn": None,
        "router": {"type": "linear", "input": "module_input", "bias": False, "dtype": "float32",
                   "select_bias": False, "select_on_abs": False},
        "routing": routing})
    return mole


# ------------------------------------------------------------------------------------------------
# Original MoLA (GCYZSL/MoLA)


def convert_mola_original(src, opts):
    cfg = read_json(os.path.join(src, "adapter_config.json"))
    reject_common(cfg, src)
    w = read_weights(src, ("adapter_model.bin", "adapter_model.safetensors"))
    reject_tensors(w, src)
    mole = new_mole("mola", cfg, src, opts, w)
    L = mole.num_layers
    if opts.k_per_layer:
        k_list = opts.k_per_layer
    elif os.path.exists(os.path.join(src, "mola_sidecar.json")):
        k_list = read_json(os.path.join(src, "mola_sidecar.json"))["top_k"]
    else:
        k_list = [2] * L
        print("mole_convert: original MoLA without a sidecar: top_k 2 in every layer",
              file=sys.stderr)
    if len(k_list) != L:
        raise ConvertError(f"k per layer has {len(k_list)} entries, the base has {L} layers")
    ranks = cfg["r"] if isinstance(cfg["r"], list) else [cfg["r"]] * L
    if len(ranks) < L:
        raise ConvertError(f"{src}: r lists {len(ranks)} layers, the base has {L}")
    used, targeted = set(), {}
    experts, rank, scale, k = {}, {}, {}, {}
    for l in range(L):
        for m in MODULES:
            p = f"base_model.model.{peft_module_name(l, m)}"
            if p + ".router.router.weight" not in w:
                continue
            router = w[p + ".router.router.weight"]
            n = router.shape[0]
            names = [f"{p}.lora_{x}_{e}.weight" for e in range(n) for x in "AB"]
            missing = [x for x in names if x not in w]
            if missing:
                raise ConvertError(f"{src}: missing {missing[0]}")
            used.update(names + [p + ".router.router.weight"])
            if experts.setdefault(l, n) != n:
                raise ConvertError(f"{src}: layer {l} has modules with different expert counts")
            if not 1 <= k_list[l] <= n:
                raise ConvertError(f"layer {l}: k {k_list[l]} outside 1..{n}")
            a = torch.stack([w[f"{p}.lora_A_{e}.weight"] for e in range(n)])
            if a.shape[1] != ranks[l]:
                raise ConvertError(f"{src}: {p} has rank {a.shape[1]}, r[{l}] is {ranks[l]}")
            g = f"groups.mola.layers.{l}.{m}"
            mole.f32(g + ".router.weight", router)
            mole.weight(g + ".A", a)
            mole.weight(g + ".B", torch.stack([w[f"{p}.lora_B_{e}.weight"] for e in range(n)]))
            targeted.setdefault(m, set()).add(l)
            rank[l], scale[l], k[l] = ranks[l], cfg["lora_alpha"] / ranks[l], k_list[l]
    if not targeted:
        raise ConvertError(f"{src}: no router.router.weight tensors (not an original MoLA "
                           "checkpoint)")
    if set(w) - used:
        raise ConvertError(f"{src}: unexpected tensors {sorted(set(w) - used)[:3]}")
    for layers, mods in product_groups([(l, m) for m, ls in targeted.items() for l in ls]):
        if len(mole.groups):
            raise ConvertError(f"{src}: modules target different layer sets")
        mole.add_group({
            "id": "mola", "scope": "module",
            "targets": {"layers": mole.layers_field(layers), "modules": mods},
            "granularity": "lora", "num_experts": mole.per_layer(experts),
            "rank": mole.per_layer(rank), "scale": mole.per_layer(scale), "act_fn": None,
            "router": {"type": "linear", "input": "module_input", "bias": False,
                       "dtype": "float32", "select_bias": False, "select_on_abs": False},
            "routing": routing_spec("topk", k=mole.per_layer(k), renormalize=True)})
    return mole


# ------------------------------------------------------------------------------------------------
# X-LoRA (peft and mistral.rs layouts)


def find_adapter_dir(src, name, path):
    cands = ([path, os.path.join(src, path)] if path else []) + [os.path.join(src, name)]
    for c in cands:
        if os.path.isfile(os.path.join(c, "adapter_config.json")):
            return c
    for sub in sorted(os.listdir(src)):  # mistral.rs finds adapter folders by name substring
        if name in sub and os.path.isfile(os.path.join(src, sub, "adapter_config.json")):
            return os.path.join(src, sub)
    raise ConvertError(f"{src}: X-LoRA adapter {name!r} not found")


ORDERING_KEY = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)")


def convert_xlora(src, opts):
    mistralrs = os.path.isfile(os.path.join(src, "xlora_config.json"))
    cfg = read_json(os.path.join(src, "xlora_config.json" if mistralrs else
                                 "adapter_config.json"))
    if not mistralrs and cfg.get("peft_type") != "XLORA":
        raise ConvertError(f"{src}: not an X-LoRA directory")
    ordering_file = opts.ordering
    if ordering_file is None and os.path.isfile(os.path.join(src, "ordering.json")):
        ordering_file = os.path.join(src, "ordering.json")
    ordering = read_json(ordering_file) if ordering_file else None
    adapters = cfg["adapters"]
    paths = adapters if isinstance(adapters, dict) else {}
    names = list(adapters) if isinstance(adapters, list) else list(adapters.keys())
    if ordering is not None:
        if sorted(ordering["order"]) != sorted(names):
            raise ConvertError(f"{ordering_file}: order {ordering['order']} does not list the "
                               f"adapters {names}")
        names = list(ordering["order"])  # the classifier's class order
    mole = Mole("xlora", base_info(cfg, opts.base, lambda: {0}), opts.weight_dtype, opts.name)
    if mole.base["hidden_size"] is None:
        raise ConvertError("X-LoRA needs the base model config (--base)")
    experts = []
    for n in names:
        d = find_adapter_dir(src, n, paths.get(n))
        experts.append(read_peft_lora(d, mole.num_layers)[1])
    N = len(experts)
    # module_index: the ordering file, else peft's convert_layers_to_xlora traversal (every
    # LoRA-wrapped linear, in model.modules() order, numbered from 0).
    if ordering is not None:
        index = {}
        for key, i in ordering["layers"].items():
            mt = ORDERING_KEY.fullmatch(key)
            if not mt or mt.group(2) not in MODULES:
                raise ConvertError(f"{ordering_file}: unsupported module {key}")
            index[(int(mt.group(1)), mt.group(2))] = i
        if sorted(index.values()) != list(range(len(index))):
            raise ConvertError(f"{ordering_file}: layer indices are not 0..{len(index) - 1}")
    else:
        index = {}
        for l in range(mole.num_layers):
            for m in MODULES:
                if any((l, m) in e for e in experts):
                    index[(l, m)] = len(index)
    targeted = [key for key in index if any(key in e for e in experts)]
    missing = [k for e in experts for k in e if k not in index]
    if missing:
        raise ConvertError(f"ordering misses LoRA module layers.{missing[0][0]}.{missing[0][1]}")
    # Classifier: Linear layers in order.
    if mistralrs:
        cw = read_safetensors(os.path.join(src, "xlora_classifier.safetensors"))
        depth = cfg.get("xlora_depth", 1)
        lin = [f"inner.{i}" for i in range(depth - 1)] + ["last"]
        relu = bool(cfg.get("enable_relu_and_dropout", False))
        bias = bool(cfg.get("use_bias", True))
        size = cfg.get("xlora_size", 1)  # mistral.rs's default_2048() returns 1
    else:
        cw = read_weights(src)
        found = {}
        for k in cw:
            mt = re.search(r"internal_xlora_classifier\.layers\.(\d+)\.weight$", k)
            if mt:
                found[int(mt.group(1))] = k[:-len(".weight")]
        lin = [found[j] for j in sorted(found)]
        relu, bias = True, True  # peft: nn.Sequential(Linear, ReLU, [Dropout], ..., Linear)
        depth, size = cfg.get("xlora_depth", 1), cfg.get("xlora_size", 2048)
    if len(lin) != depth or any(n + ".weight" not in cw for n in lin):
        raise ConvertError(f"{src}: expected {depth} classifier Linear layers, found {lin}")
    n_out = N * (len(index) if cfg.get("layerwise_scalings") else 1)
    if cw[lin[-1] + ".weight"].shape[0] != n_out:
        raise ConvertError(f"{src}: classifier has {cw[lin[-1] + '.weight'].shape[0]} outputs, "
                           f"expected {n_out}")
    for i, n in enumerate(lin):
        mole.f32(f"xlora.classifier.{i}.weight", cw[n + ".weight"])
        if n + ".bias" in cw:
            mole.f32(f"xlora.classifier.{i}.bias", cw[n + ".bias"])
        elif bias:
            raise ConvertError(f"{src}: classifier {n}.bias missing")
    bias = all(n + ".bias" in cw for n in lin)
    true_ranks = [max((a.shape[0] for a, _, _ in e.values()), default=0) for e in experts]
    for gi, (layers, mods) in enumerate(product_groups(targeted)):
        gid = "xlora" if gi == 0 else f"xlora_{gi}"
        rmax = 0
        for l in layers:
            for m in mods:
                rmax = max([rmax] + [e[(l, m)][0].shape[0] for e in experts if (l, m) in e])
        for l in layers:
            for m in mods:
                ref = next(e[(l, m)] for e in experts if (l, m) in e)
                din, dout = ref[0].shape[1], ref[1].shape[0]
                a = torch.zeros(N, rmax, din, dtype=torch.float32)
                b = torch.zeros(N, dout, rmax, dtype=torch.float32)
                s = torch.zeros(N, dtype=torch.float32)
                for i, e in enumerate(experts):
                    if (l, m) in e:  # zero rows of A / columns of B pad exactly
                        ea, eb, es = e[(l, m)]
                        a[i, :ea.shape[0]] = ea
                        b[i, :, :eb.shape[1]] = eb
                        s[i] = es
                g = f"groups.{gid}.layers.{l}.{m}"
                mole.weight(g + ".A", a)
                mole.weight(g + ".B", b)
                mole.f32(g + ".scale", s)
        mole.add_group({
            "id": gid, "scope": "model_scalings",
            "targets": {"layers": mole.layers_field(layers), "modules": mods},
            "granularity": "lora", "num_experts": N, "rank": rmax, "scale": 1.0,
            "true_ranks": true_ranks, "act_fn": None,
            "router": {"type": "xlora_ref", "input": "xlora_scalings", "bias": False,
                       "dtype": "float32", "select_bias": False, "select_on_abs": False},
            "routing": routing_spec("soft", renormalize=False)})
    mole.xlora = {
        "adapters": names,
        "classifier": {"depth": depth, "hidden": size, "bias": bias, "relu": relu},
        "layerwise_scalings": bool(cfg.get("layerwise_scalings", False)),
        "enable_softmax": bool(cfg.get("enable_softmax", True)),
        "softmax_temperature": cfg.get("softmax_temperature", 1.0),
        "top_k": cfg.get("top_k_lora"),
        "softmax_topk": bool(cfg.get("enable_softmax_topk", False)),
        "scaling_pass_value": cfg.get("scaling_pass_value", 0.0),
        "global_scaling_weight": cfg.get("global_scaling_weight", 1.0),
        "module_index": {f"layers.{l}.{m}": i
                         for (l, m), i in sorted(index.items(), key=lambda kv: kv[1])},
    }
    return mole


# ------------------------------------------------------------------------------------------------
# FlyLoRA (gfyddha/FlyLoRA peft fork)


def convert_flylora(src, opts):
    cfg = read_json(os.path.join(src, "adapter_config.json"))
    mole = new_mole("flylora", cfg, src, opts)
    _, loras, w = read_peft_lora(src, mole.num_layers, allow_extra=(".lora_topk_bias",))
    k = cfg.get("top_k", 8)
    targeted = {}
    for (l, m), (a, b, s) in loras.items():
        r = a.shape[0]
        p = "base_model.model." + peft_module_name(l, m)
        if p + ".lora_topk_bias" not in w:
            raise ConvertError(f"{src}: {p}.lora_topk_bias missing (not a FlyLoRA checkpoint?)")
        if not 1 <= k <= r:
            raise ConvertError(f"{src}: top_k {k} outside 1..{r} at {p}")
        g = f"groups.flylora.layers.{l}.{m}"
        mole.weight(g + ".A", a.unsqueeze(0))
        mole.weight(g + ".B", b.unsqueeze(0))
        mole.f32(g + ".router.select_bias", w[p + ".lora_topk_bias"])
        targeted[(l, m)] = (r, s)
    extra = [n for n in w if n.endswith(".lora_topk_bias") and
             not any(n == "base_model.model." + peft_module_name(l, m) + ".lora_topk_bias"
                     for l, m in loras)]
    if extra:
        raise ConvertError(f"{src}: lora_topk_bias of untargeted modules: {extra[:3]}")
    for gi, (layers, mods) in enumerate(product_groups(targeted)):
        keys = [(l, m) for l in layers for m in mods]
        ranks = {targeted[key][0] for key in keys}
        if len(ranks) != 1:
            raise ConvertError(f"{src}: FlyLoRA modules of different ranks {sorted(ranks)}")
        gid = "flylora" if gi == 0 else f"flylora_{gi}"
        if gi:
            for l, m in keys:  # rename the tensors written under "flylora"
                for sfx in (".A", ".B", ".router.select_bias"):
                    mole.tensors[f"groups.{gid}.layers.{l}.{m}{sfx}"] = mole.tensors.pop(
                        f"groups.flylora.layers.{l}.{m}{sfx}")
        scale = most_common([targeted[key][1] for key in keys])
        for l, m in keys:
            if targeted[(l, m)][1] != scale:
                mole.f32(f"groups.{gid}.layers.{l}.{m}.scale",
                         torch.tensor([targeted[(l, m)][1]], dtype=torch.float32))
        mole.add_group({
            "id": gid, "scope": "module",
            "targets": {"layers": mole.layers_field(layers), "modules": mods},
            "granularity": "rank", "num_experts": 1, "rank": ranks.pop(), "scale": scale,
            "act_fn": None,
            "router": {"type": "implicit_A", "input": "module_input", "bias": False,
                       "dtype": "float32", "select_bias": True, "select_on_abs": False},
            "routing": routing_spec("rank_topk", k=k, renormalize=False)})
    return mole


# ------------------------------------------------------------------------------------------------


SORA_KEY = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora\.(lora_A|lora_B|gate)$")


def convert_sora(src, opts):
    cfg = read_json(os.path.join(src, "config.json"))
    if cfg.get("delta_type") != "lora":
        raise ConvertError(f"{src}: delta_type {cfg.get('delta_type')!r} is not 'lora' (SoRA)")
    r, alpha = cfg.get("lora_r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or isinstance(alpha, bool) or \
            not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ConvertError(f"{src}: lora_r must be a positive integer and lora_alpha a number")
    w = read_weights(src, ("pytorch_model.bin",))
    parts = {}
    for k, t in w.items():
        match = SORA_KEY.fullmatch(k)
        if not match or match.group(3) not in MODULES or block(match.group(3)) != match.group(2):
            raise ConvertError(f"{src}: tensor {k} is not a SoRA LoRA of a base model module")
        parts.setdefault((int(match.group(1)), match.group(3)), {})[match.group(4)] = t
    mole = new_mole("sora", {"base_model_name_or_path": cfg.get("backbone_checkpoint_name")},
                    src, opts, weights=w)
    scale = alpha / r
    loras, pruned = {}, []
    for (l, m), p in sorted(parts.items()):
        where = f"{src}: model.layers.{l}.{block(m)}.{m}.lora"
        if set(p) != {"lora_A", "lora_B", "gate"}:
            raise ConvertError(f"{where}: needs lora_A, lora_B and gate, has {sorted(p)}")
        a, b, gate = p["lora_A"].double(), p["lora_B"].double(), p["gate"].double().reshape(-1)
        if a.shape[0] != r or b.shape[1] != r or gate.numel() != r:
            raise ConvertError(f"{where}: rank {a.shape[0]} (gate {gate.numel()}), "
                               f"the config says {r}")
        if l >= mole.num_layers:
            raise ConvertError(f"{where}: layer {l} is beyond the base model's {mole.num_layers}")
        if not torch.isfinite(gate).all():
            raise ConvertError(f"{where}: the gate is not finite")
        keep = (gate != 0).nonzero().reshape(-1)
        if keep.numel() == 0:
            pruned.append(f"layers.{l}.{m}")
            continue
        loras[(l, m)] = (a[keep].float(), (b[:, keep] * gate[keep]).float(), scale)
    if not loras:
        raise ConvertError(f"{src}: every rank of every module is gated to zero")
    if pruned:
        print(f"mole_convert: {len(pruned)} SoRA modules have every rank gated to zero and are "
              f"dropped: {', '.join(pruned[:5])}", file=sys.stderr)
    mole.add_static("sora", loras, scale_default=scale)
    return mole


def nola_basis_mix(coefficients, out_dim, in_dim, seed, device):
    """NOLA's GenerateParams.forward: sum_b c_b U_b / sqrt(n), U_b uniform(-1, 1) from torch's
    generator seeded with the module's seed, on `device` (the training device: CPU and CUDA
    generators give different bases). The caller's random state is kept."""
    devices = [torch.device(device)] if device != "cpu" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        c = coefficients.to(device)
        w = torch.zeros(c.shape[0], out_dim, in_dim, device=device, dtype=c.dtype)
        torch.nn.init.uniform_(w, a=-1.0, b=1.0)
        w = w * (1.0 / math.sqrt(c.shape[0]))
        return torch.einsum("b,boi->oi", c, w).cpu()


def convert_nola(src, opts):
    cfg = read_json(os.path.join(src, "adapter_config.json"))
    if not cfg.get("use_nola"):
        raise ConvertError(f"{src}: use_nola is not set (a plain PEFT LoRA: --family peft_lora)")
    device = opts.nola_device
    if device not in ("cpu", "cuda"):
        raise ConvertError(
            f"{src}: NOLA's bases are regenerated from torch's random generator on the device the "
            "adapter was trained on (CPU and CUDA generators differ): pass --nola-device cpu or "
            "--nola-device cuda (the latter on a machine with a GPU)")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConvertError(f"{src}: --nola-device cuda needs a CUDA device here")
    mole = new_mole("nola", cfg, src, opts)
    reject_common(cfg, src)
    w = read_weights(src, ("adapter_model.bin", "adapter_model.safetensors"))
    reject_tensors(w, src)
    r, nb = cfg["r"], cfg.get("nola_num_basis", 128)
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_rslora"):
        raise ConvertError(f"{src}: rank/alpha patterns and rsLoRA are not part of NOLA's fork")
    loras, used = {}, set()
    for l, m in peft_targets(cfg, mole.num_layers):
        prefix = "base_model.model." + peft_module_name(l, m)
        eff = []
        for part, (dout, din) in (("lora_A", (r, None)), ("lora_B", (None, r))):
            names = [f"{prefix}.{part}.{x}" for x in ("weight", "coefficients", "seed")]
            missing = [n for n in names if n not in w]
            if missing:
                raise ConvertError(f"{src}: {missing[0]} missing (targeted by the config)")
            weight, coefficients, seed = (w[n] for n in names)
            used.update(names)
            out_dim, in_dim = weight.shape
            if (dout or out_dim) != out_dim or (din or in_dim) != in_dim or \
                    coefficients.shape != (nb,) or seed.numel() != 1:
                raise ConvertError(f"{src}: {prefix}.{part}: weight {tuple(weight.shape)}, "
                                   f"coefficients {tuple(coefficients.shape)}; the config says "
                                   f"r {r}, nola_num_basis {nb}")
            mix = nola_basis_mix(coefficients, out_dim, in_dim, int(seed.reshape(-1)[0]), device)
            eff.append(mix + weight.to(mix.dtype))
        loras[(l, m)] = (eff[0], eff[1], cfg["lora_alpha"] / r)
    extra = [k for k in w if k not in used]
    if extra:
        raise ConvertError(f"{src}: tensors the config does not target: {extra[:3]}")
    if not loras:
        raise ConvertError(f"{src}: the config targets no module of the base model")
    mole.add_static("nola", loras, scale_default=cfg["lora_alpha"] / r)
    return mole


def module_shape(base, m, where):
    """(out, in) of module m of the base model, from its config (--base)."""
    if base.get("hidden_size") is None:
        raise ConvertError(f"{where}: the base model's config is needed for the module shapes "
                           "(pass --base, or keep base_model_name_or_path a local directory)")
    h, inter, nh = base["hidden_size"], base["intermediate_size"], base["num_attention_heads"]
    hd = base.get("head_dim") or h // nh
    kv = base["num_key_value_heads"] * hd
    return {"q_proj": (nh * hd, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, nh * hd),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}[m]


def randlora_kaiming(shape, generator, dtype):
    """PEFT randlora's _kaiming_init: torch's kaiming_uniform_(a=sqrt(5), generator=...), or,
    on a torch without its generator argument, the same arithmetic written out (fan_in =
    shape[1] * prod(shape[2:]), bound = sqrt(3) * gain / sqrt(fan_in), then uniform_)."""
    t = torch.empty(shape, dtype=dtype)
    try:
        return torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    except TypeError:
        gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
        bound = math.sqrt(3.0) * (gain / math.sqrt(shape[1] * math.prod(shape[2:])))
        return t.uniform_(-bound, bound, generator=generator)


def randlora_bases(cfg, largest, basis_dtype, where):
    """PEFT randlora's shared bases for the largest targeted (out, in), regenerated from
    projection_prng_key as RandLoraModel._init_randlora_A_randlora_B[_sparse] draws them."""
    r = cfg["r"]
    max_dim, min_dim = max(largest), min(largest)
    n = -(-min_dim // r)
    key = cfg.get("projection_prng_key", 0)
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < 2 ** 63:
        raise ConvertError(f"{where}: projection_prng_key must be an integer in [0, 2^63)")
    g = torch.Generator(device="cpu").manual_seed(key)
    if cfg.get("sparse") or cfg.get("very_sparse"):
        sparsity = math.sqrt(min_dim) if cfg.get("very_sparse") else 3
        a, b = torch.rand((r, 1, min_dim), generator=g), torch.rand((max_dim, n, r), generator=g)
        out = []
        for t in (a, b):
            sparse = torch.zeros(t.shape)
            sparse[t < 1 / (2 * sparsity)] = -1
            sparse[t > 1 - 1 / (2 * sparsity)] = 1
            out.append(sparse / sparse.std())
        return out
    if basis_dtype is None:
        raise ConvertError(
            f"{where}: save_projection is false, so the bases are regenerated from "
            "projection_prng_key, in the dtype PEFT drew them in: bfloat16 where training had a "
            "bf16 GPU, else float16. Pass --randlora-basis-dtype bfloat16 or float16")
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[basis_dtype]
    a = randlora_kaiming((r, 1, min_dim), g, dtype)
    b = torch.cat([randlora_kaiming((max_dim, 1, r), g, dtype) for _ in range(n)], dim=1)
    return a / a.std(), b / b.std()


def convert_randlora(src, opts):
    """PEFT's randlora tuner, folded into one static LoRA of rank n * r per module, the product
    get_scaled_bases forms (its two flattens pair B's column b * r + k with U's row k * n + b,
    kept as they are)."""
    cfg = read_json(os.path.join(src, "adapter_config.json"))
    if cfg.get("peft_type") != "RANDLORA":
        raise ConvertError(f"{src}: peft_type {cfg.get('peft_type')!r} is not RANDLORA")
    reject_common(cfg, src)
    r, alpha = cfg.get("r"), cfg.get("randlora_alpha", 640)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or isinstance(alpha, bool) or \
            not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ConvertError(f"{src}: r must be a positive integer and randlora_alpha a number")
    w = read_weights(src)
    mole = new_mole("randlora", cfg, src, opts, weights=w)
    targets = peft_targets(cfg, mole.num_layers)
    if not targets:
        raise ConvertError(f"{src}: the config targets no module of the base model")
    shapes = {t: module_shape(mole.base, t[1], src) for t in targets}
    largest = tuple(max(s[i] for s in shapes.values()) for i in (0, 1))
    used = set()
    if r > min(largest):
        raise ConvertError(f"{src}: r {r} is larger than the targeted modules' dimensions")
    # The shared bases: saved at the model level, or (PEFT before huggingface/peft#3714) under
    # each module as well or only there; else regenerated.
    saved = [("base_model.randlora_A", "base_model.randlora_B")] + [
        (f"base_model.model.{peft_module_name(l, m)}.randlora_A",
         f"base_model.model.{peft_module_name(l, m)}.randlora_B") for l, m in targets]
    saved = [pair for pair in saved if pair[0] in w and pair[1] in w]
    if saved:
        a, b = w[saved[0][0]].float(), w[saved[0][1]].float()
        used.update(saved[0])
    else:
        a, b = (t.float() for t in randlora_bases(cfg, largest, opts.randlora_basis_dtype, src))
    if a.dim() != 3 or a.shape[0] != r or a.shape[1] != 1 or b.dim() != 3 or b.shape[2] != r:
        raise ConvertError(f"{src}: the shared bases are {tuple(a.shape)} and {tuple(b.shape)}; "
                           f"r {r} needs [{r}, 1, min] and [max, n, {r}]")
    scale = alpha / r
    loras = {}
    for (l, m), (out_f, in_f) in shapes.items():
        prefix = "base_model.model." + peft_module_name(l, m)
        lo, hi = min(out_f, in_f), max(out_f, in_f)
        n = -(-lo // r)
        names = (prefix + ".randlora_lambda", prefix + ".randlora_gamma")
        missing = [k for k in names if k not in w]
        if missing:
            raise ConvertError(f"{src}: {missing[0]} missing (targeted by the config)")
        lam, gam = (w[k].float() for k in names)  # PEFT forms the bases in fp32 on the CPU
        used.update(names)
        if lam.shape != (r, n) or gam.shape != (n, lo):
            raise ConvertError(f"{src}: {prefix}: lambda {tuple(lam.shape)}, gamma "
                               f"{tuple(gam.shape)}; the module ({out_f} x {in_f}) with r {r} "
                               f"needs ({r}, {n}) and ({n}, {lo})")
        if a.shape[2] < lo or b.shape[0] < hi or b.shape[1] < n:
            raise ConvertError(f"{src}: the shared bases {tuple(a.shape)}, {tuple(b.shape)} are "
                               f"too small for {prefix} ({out_f} x {in_f})")
        u = (lam[:, :, None] * a[:, :n, :lo] * gam[None]).flatten(end_dim=1)  # [r * n, lo]
        v = b[:hi, :n, :].flatten(start_dim=1)  # [hi, n * r]
        lora_a, lora_b = (u, v) if lo == in_f else (v.T, u.T)
        loras[(l, m)] = (lora_a.contiguous(), lora_b.contiguous(), scale)
        # PEFT before huggingface/peft#3714 also saved the shared bases under each module.
        for part, shared in (("randlora_A", a), ("randlora_B", b)):
            alias = f"{prefix}.{part}"
            if alias in w:
                if not torch.equal(w[alias].float(), shared):
                    raise ConvertError(f"{src}: {alias} differs from the shared base")
                used.add(alias)
    extra = [k for k in w if k not in used]
    if extra:
        raise ConvertError(f"{src}: tensors the config does not target: {extra[:3]}")
    top = max(a.shape[0] for a, _, _ in loras.values())
    print(f"mole_convert: RandLoRA is full rank: the folded LoRAs have rank up to {top} (serve "
          f"with --max-adapter-rank {top} or more)", file=sys.stderr)
    mole.add_static("randlora", loras, scale_default=scale)
    return mole


MOS_PARTS = ("lora_A.weight", "lora_B.weight", "lora_pair_mask", "lora_pair_mask_B", "lora_A_vec",
             "lora_A_anti_vec")


def convert_mos(src, opts):
    """Mixture of Shards (Forence1999/MoS): a training checkpoint holds, under every layer, the
    module type's shard pools and the layer's shard masks; each LoRA vector is c pool rows
    end to end (transform_chunks), so the per-layer LoRA is materialised here. A checkpoint
    save_tied_lora already materialised is a plain PEFT LoRA."""
    cfg = read_json(os.path.join(src, "adapter_config.json"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConvertError(f"{src}: peft_type {cfg.get('peft_type')} is not LORA (MoS)")
    reject_common(cfg, src)
    w = read_weights(src)
    mole = new_mole("mos", cfg, src, opts, weights=w)
    r, alpha, chunks = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("num_chunk_per_vec")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or isinstance(alpha, bool) or \
            not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ConvertError(f"{src}: r must be a positive integer and lora_alpha a number")
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int) or
                               chunks < 1):
        raise ConvertError(f"{src}: num_chunk_per_vec must be a positive integer")
    scale = alpha / r  # MoS's LoraLayer_update_layer: lora_alpha / r, whatever else is set
    if not any(k.endswith(".lora_pair_mask") for k in w):
        # save_tied_lora's plain LoRA, which MoS loads with PEFT (merge_lora.py).
        _, loras, _ = read_peft_lora(src, mole.num_layers)
    else:
        loras = {}
        used = set()
        for l, m in peft_targets(cfg, mole.num_layers):
            prefix = "base_model.model." + peft_module_name(l, m)
            names = [f"{prefix}.{part}" for part in MOS_PARTS]
            missing = [n for n in names if n not in w]
            if missing:
                raise ConvertError(f"{src}: {missing[0]} missing (targeted by the config)")
            used.update(names)
            pool_a, pool_b, mask_a, mask_b, vec, anti = (w[n] for n in names)
            if mask_a.is_floating_point() or mask_b.is_floating_point():
                raise ConvertError(f"{src}: {prefix}: the shard masks are not integers")
            if pool_a.dim() != 2 or pool_b.dim() != 2:
                raise ConvertError(f"{src}: {prefix}: the shard pools are not matrices")
            c = chunks or max(mask_a.numel() // r, 1)
            rows = pool_a.shape[0]
            if pool_b.shape[1] != rows or rows == 0 or \
                    mask_a.numel() != r * c or mask_b.numel() != r * c or \
                    vec.numel() != r or anti.numel() != r:
                raise ConvertError(
                    f"{src}: {prefix}: pools {tuple(pool_a.shape)} / {tuple(pool_b.shape)}, "
                    f"masks {mask_a.numel()} / {mask_b.numel()}, vectors {vec.numel()}; r {r} "
                    f"with {c} shards per vector needs masks of {r * c}")
            for mask in (mask_a, mask_b):
                if mask.min() < 0 or mask.max() >= rows:
                    raise ConvertError(f"{src}: {prefix}: a shard mask names a row outside the "
                                       f"pool of {rows}")
            # Vector j = rows mask[j * c], ..., mask[j * c + c - 1] end to end.
            a = pool_a[mask_a.long().reshape(-1)].reshape(r, c * pool_a.shape[1])
            b = pool_b.t()[mask_b.long().reshape(-1)].reshape(r, c * pool_b.shape[0]).t()
            a = a.float() * (vec.float() * anti.float()).reshape(r, 1)  # fp32, as MoS
            if mole.base.get("hidden_size") is not None and \
                    (b.shape[0], a.shape[1]) != module_shape(mole.base, m, src):
                raise ConvertError(f"{src}: {prefix}: the shards make a {b.shape[0]} x "
                                   f"{a.shape[1]} LoRA; the base module is "
                                   f"{module_shape(mole.base, m, src)}")
            loras[(l, m)] = (a.float().contiguous(), b.float().contiguous(), scale)
        extra = [k for k in w if k not in used]
        if extra:
            raise ConvertError(f"{src}: tensors the config does not target: {extra[:3]}")
    if not loras:
        raise ConvertError(f"{src}: the config targets no module of the base model")
    mole.add_static("mos", loras, scale_default=scale)
    return mole


def detect_family(src):
    if os.path.isfile(os.path.join(src, "xlora_config.json")):
        return "xlora"
    gates = [f for f in sorted(os.listdir(src)) if re.fullmatch(r"gates_epoch\d+\.bin", f)]
    if gates:
        # yushuiwx/Mixture-of-LoRA-Experts (Wu, Huang, Wei, ICLR 2024) saves its gates so.
        raise ConvertError(
            f"{src}: {gates[0]} holds the gates of Microsoft's output-gated MoLE (Wu, Huang, Wei, "
            "2024), whose public code is Stable Diffusion / CLIP only: each gate weighs the LoRAs "
            "once per sample from the whole flattened, fixed-length layer input, which has no "
            "per-token equivalent in autoregressive decoding, so it cannot be served exactly")
    path = os.path.join(src, "adapter_config.json")
    delta = os.path.join(src, "config.json")
    if os.path.isfile(delta) and not os.path.isfile(path):
        model_cfg = read_json(delta)
        if not isinstance(model_cfg, dict):
            raise ConvertError(f"{delta}: not a JSON object")
        perft_keys = ("shared_routing_adapter", "embedded_routing_adapter", "shared_adapter")
        if str(model_cfg.get("model_type", "")).endswith("-adapter") or \
                any(model_cfg.get(k) for k in perft_keys):
            # PERFT's OlmoeAdapterConfig / MixtralAdapterConfig (Liu et al. 2024).
            raise ConvertError(
                f"{src}: a PERFT checkpoint (model_type {model_cfg.get('model_type')!r}): its "
                "adapters run beside the experts of a Mixture-of-Experts base model (OLMoE, "
                "Mixtral), routed by the MoE block's own gate; moleserve serves dense Llama-family "
                "base models, so it cannot be served")
    if not os.path.isfile(path) and os.path.isfile(delta) and "delta_type" in read_json(delta):
        delta_type = read_json(delta)["delta_type"]
        if delta_type != "lora":
            raise ConvertError(f"{src}: opendelta delta_type {delta_type!r} is not 'lora' (SoRA)")
        return "sora"
    if not os.path.isfile(path):
        raise ConvertError(f"{src}: no adapter_config.json or xlora_config.json")
    cfg = read_json(path)
    peft_type = cfg.get("peft_type", "LORA")
    known = {"MIXLORA": "mixlora", "MOLA": "mola", "LORAMOE": "loramoe", "DYNMOLE": "dynmole",
             "XLORA": "xlora", "RANDLORA": "randlora"}
    if peft_type in known:
        return known[peft_type]
    if peft_type != "LORA":
        raise ConvertError(f"{src}: unsupported peft_type {peft_type!r}")
    w = read_weights(src, ("adapter_model.bin", "adapter_model.safetensors"))
    if any(k.endswith(".router.router.weight") for k in w):
        return "mola_original"
    if any(k.endswith(".lora_topk_bias") for k in w):
        return "flylora"
    if cfg.get("use_nola"):
        return "nola"
    if cfg.get("ft_mode") == "mos" or any(k.endswith(".lora_pair_mask") for k in w):
        return "mos"
    return "peft_lora"


CONVERTERS = {
    "peft_lora": convert_peft_lora,
    "mixlora": convert_mixlora,
    "mola": lambda s, o: convert_moe_peft(s, o, "mola"),
    "loramoe": lambda s, o: convert_moe_peft(s, o, "loramoe"),
    "dynmole": lambda s, o: convert_moe_peft(s, o, "dynmole"),
    "mola_original": convert_mola_original,
    "xlora": convert_xlora,
    "flylora": convert_flylora,
    "sora": convert_sora,
    "nola": convert_nola,
    "randlora": convert_randlora,
    "mos": convert_mos,
}


def convert(src, dst, family="auto", k_per_layer=None, ordering=None, dtype="float32",
            base=None, name=None, nola_device=None, randlora_basis_dtype=None):
    """Converts src into dst; returns the family used. Raises ConvertError."""
    if family == "auto":
        family = detect_family(src)
    opts = argparse.Namespace(k_per_layer=k_per_layer, ordering=ordering, base=base,
                              nola_device=nola_device,
                              randlora_basis_dtype=randlora_basis_dtype,
                              weight_dtype={"float32": "F32", "bfloat16": "BF16"}[dtype],
                              name=name or os.path.basename(os.path.normpath(src)))
    mole = CONVERTERS[family](src, opts)
    mole.write(dst)
    return family


def main(argv=None):
    ap = argparse.ArgumentParser(description="Converts a public MoLE checkpoint to mole/1.")
    ap.add_argument("src_dir")
    ap.add_argument("dst_dir")
    ap.add_argument("--family", default="auto", choices=("auto",) + FAMILIES)
    ap.add_argument("--k-per-layer", help="original MoLA: comma-separated top-k per layer")
    ap.add_argument("--ordering", help="X-LoRA ordering file (mistral.rs scripts/create_ordering)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="storage dtype of the LoRA A/B tensors (routers stay float32)")
    ap.add_argument("--base", help="base model directory (config.json) to record and check")
    ap.add_argument("--name", help="adapter name (default: the source directory name)")
    ap.add_argument("--nola-device", choices=("cpu", "cuda"),
                    help="NOLA: the device it was trained on, whose random generator made its "
                         "bases")
    ap.add_argument("--randlora-basis-dtype", choices=("float16", "bfloat16"),
                    help="RandLoRA without saved bases: the dtype PEFT drew them in (bfloat16 "
                         "on a bf16 GPU, else float16)")
    args = ap.parse_args(argv)
    k = [int(v) for v in args.k_per_layer.split(",")] if args.k_per_layer else None
    try:
        family = convert(args.src_dir, args.dst_dir, args.family, k, args.ordering, args.dtype,
                         args.base, args.name, args.nola_device, args.randlora_basis_dtype)
    except (ConvertError, KeyError, ValueError, OSError) as e:
        msg = f"{args.src_dir}: missing key {e}" if isinstance(e, KeyError) else str(e)
        print(f"mole_convert: {msg}", file=sys.stderr)
        return 1
    except (TypeError, IndexError, RuntimeError, ZeroDivisionError, AttributeError) as e:
        # A checkpoint whose fields have the wrong types or shapes for what the checks above
        # expect: refused as malformed rather than with a traceback.
        print(f"mole_convert: {args.src_dir}: malformed checkpoint ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 1
    print(f"mole_convert: {args.src_dir} ({family}) -> {args.dst_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
