#!/usr/bin/env python3
"""Self-test of the public-format pipeline: tiny base models -> every public adapter
(make_public_adapters.py) -> mole/1 (tools/mole_convert.py) -> logits.

  converter_check.py [WORK_DIR]      # default: a fresh temporary directory; exit 0 on success

For every base fixture of make_tiny_checkpoints.py and every adapter it
  1. computes the reference on the PUBLIC files (tests/reference/mole_reference.py, float64),
  2. converts the directory to mole/1 and runs a second, independent forward that reads only the
     mole/1 files and follows engine/adapters/README.md (generic routing algorithms of
     MOLE_FORMAT.md (c), the block-FFN rewrite of section 1.3, padded X-LoRA stacks with scale
     tensors, rank groups with select_bias),
  3. requires equal routing weights (max abs diff <= 1e-12) and logits within 1e-9: the
     conversion is lossless and the mole/1 semantics reproduce each family's public forward.
It also checks that both tools auto-detect each family, that every adapter visibly changes the
logits, that the fixtures exercise the routing branches (top-p sizes, DynMoLE's entropy gate and
top-p, ...) with decisions that are not near-ties on the first base, the one the engine tests use
(>= 1e-4 in logit units for rankings, >= 1e-5 in probability for the top-p cut and the entropy
gate), the CLIs (reference JSON on stdout, converter exit codes), --dtype bfloat16,
--k-per-layer, --ordering, regex targets that split into several entries, the float32 rounding
of irrational scales, and the converter's rejections (DoRA, modules_to_save, Renyi entropy,
non-SiLU act_fn, unknown routing strategy), and tools/lora_lego.py's rank-wise merge against the
formulas of its docstring.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, HERE)
import make_public_adapters  # noqa: E402
import lora_lego  # noqa: E402
import mole_convert  # noqa: E402
import mole_reference as ref  # noqa: E402
from llama_reference import load_safetensors  # noqa: E402

F32, F64 = torch.float32, torch.float64
PROMPTS = [
    [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33],
    [256, 1, 2, 3],
    [256, 200, 13, 10, 9, 77, 255, 0, 128, 65, 66, 67, 68, 69, 70, 71, 72],
]
LOGIT_TOL = 1e-9
ROUTING_TOL = 1e-12
MIN_LOGIT_MARGIN = 1e-4
MIN_PROB_MARGIN = 1e-5
BASES = ["llama_rope_linear_fp32", "llama_rope_llama3_bf16_sharded",
         "mistral_sliding_window_fp32", "qwen2_bias_tied_fp16"]


# ------------------------------------------------------------------------------------------------
# A mole/1 interpreter (engine/adapters/README.md), independent of the public formats.


def per_layer(value, l):
    return value[l] if isinstance(value, list) else value


def targets(entry, num_layers):
    layers = entry["targets"]["layers"]
    layers = range(num_layers) if layers == "all" else layers
    return {(l, m) for l in layers for m in entry["targets"]["modules"]}


def order_desc(v):
    """Indices sorted by (-value, index): ties to the lower index."""
    return torch.sort(v, dim=-1, descending=True, stable=True)[1]


class Margins:
    """Smallest distance of any routing decision from flipping, per adapter: in logit units for
    rankings (top-k, switch, rank keys, log X-LoRA scalings) and in probability units for the
    top-p cut and the entropy gate."""

    def __init__(self):
        self.logit = math.inf
        self.prob = math.inf

    def add(self, value, kind="logit"):
        if value.numel():
            setattr(self, kind, min(getattr(self, kind), float(value.min())))

    def ok(self):
        return self.logit >= MIN_LOGIT_MARGIN and self.prob >= MIN_PROB_MARGIN

    def __str__(self):
        return f"{self.logit:.1e}/{self.prob:.1e}"


def route(spec, logits, margins):
    """Dense [T, E] fp32 weights of a lora-granular group (MOLE_FORMAT (c))."""
    alg = spec["algorithm"]
    temperature = spec.get("temperature", 1.0)
    p = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1, dtype=F32)
    t, e = p.shape
    if alg == "soft":
        return p
    order = order_desc(p)
    ranked = p.gather(-1, order)
    ranked_logits = logits.gather(-1, order) / temperature
    if alg == "switch":
        if e > 1:
            margins.add(ranked_logits[:, 0] - ranked_logits[:, 1])
        return torch.zeros_like(p).scatter(-1, order[:, :1], ranked[:, :1])
    if alg == "topk":
        k = spec["k"]
        if k < e:
            margins.add(ranked_logits[:, k - 1] - ranked_logits[:, k])
        w = ranked[:, :k]
        if spec.get("renormalize", True):
            w = w / w.sum(dim=-1, keepdim=True)
        return torch.zeros_like(p).scatter(-1, order[:, :k], w)
    if alg in ("top_p", "dynmole"):
        probs = ranked
        if spec.get("prob_temperature"):
            probs = probs / spec["prob_temperature"]
        cum = torch.cumsum(probs, dim=-1)
        prev = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)
        mode = spec.get("p_mode", "exceed")
        keep = (prev <= spec["p"]) if mode == "exceed" else (cum <= spec["p"])
        keep[:, :spec.get("min_k", 0)] = True
        keep[:, 0] = True  # never empty
        margins.add((cum - spec["p"]).abs(), "prob")
        w = probs * keep.to(F32)
        if spec.get("renormalize", False):
            w = w / w.sum(dim=-1, keepdim=True)
        dense = torch.zeros_like(p).scatter(-1, order, w)
        ent = spec.get("entropy") if alg == "dynmole" else None
        if ent:
            q, eps = ent["q"], ent["eps"]
            pe = p + eps
            if q == 1.0:
                h = -torch.sum(pe * torch.log(pe), dim=-1)
                hmax = torch.log(torch.tensor(e, dtype=F32))
            else:
                h = (1 - torch.sum(pe ** q, dim=-1)) / (q - 1)
                hmax = torch.tensor((1 - e ** (1 - q)) / (q - 1), dtype=F32)
            hn = h / hmax
            margins.add((hn - ent["threshold"]).abs(), "prob")
            dense = torch.where((hn > ent["threshold"])[:, None], p, dense)
        return dense
    raise ValueError(f"unknown routing algorithm {alg}")


class MoleModel(ref.Adapter):
    """Reads DIR/mole_config.json + *.safetensors and applies them on the reference base."""

    def __init__(self, d, base):
        super().__init__()
        self.base = base
        self.cfg = cfg = json.load(open(os.path.join(d, "mole_config.json")))
        assert cfg["format"] == "mole" and cfg["format_version"] == 1
        self.t = {}
        for n in sorted(os.listdir(d)):
            if n.endswith(".safetensors"):
                self.t.update(load_safetensors(os.path.join(d, n)))
        L = base.layers
        self.static = {}  # (l, m) -> [(A, B, scale)]
        for s in cfg["static_loras"]:
            for l, m in targets(s, L):
                p = f"static.{s['id']}.layers.{l}.{m}"
                scale = float(self.t[p + ".scale"].reshape(-1)[0]) if p + ".scale" in self.t \
                    else s["scale"]
                self.static.setdefault((l, m), []).append((self.t[p + ".A"], self.t[p + ".B"],
                                                           scale))
        self.module_group, self.block_group = {}, {}
        for g in cfg["routed_groups"]:
            for l, m in targets(g, L):
                if g["scope"] == "block_ffn":
                    self.block_group[l] = g
                else:
                    assert (l, m) not in self.module_group, "two routed groups on one module"
                    self.module_group[(l, m)] = g
        self.margins = Margins()
        self.scalings = None

    def experts(self, g, l, m):
        p = f"groups.{g['id']}.layers.{l}.{m}"
        a, b = self.t[p + ".A"], self.t[p + ".B"]
        if p + ".scale" in self.t:
            scale = self.t[p + ".scale"].reshape(-1)
            if scale.numel() == 1:
                scale = scale.expand(a.shape[0])
        else:
            scale = torch.full((a.shape[0],), float(per_layer(g["scale"], l)), dtype=F64)
        return a, b, scale

    def router_weight(self, g, l, m=None):
        p = f"groups.{g['id']}.layers.{l}" + (f".{m}" if m else "") + ".router"
        return self.t[p + ".weight"].to(F32), self.t.get(p + ".bias")

    def logits(self, g, l, x, m=None):
        w, b = self.router_weight(g, l, m)
        z = F.linear(x.to(F32), w)
        return z + b.to(F32) if b is not None else z

    def spec(self, g, l):
        spec = dict(g["routing"])
        if "k" in spec:
            spec["k"] = per_layer(spec["k"], l)
        return spec

    def xlora_weights(self, sc):
        x = self.cfg["xlora"]
        if x["top_k"]:
            order = order_desc(sc)
            ranked = sc.gather(-1, order)
            if x["top_k"] < sc.shape[1] and self.scalings_are_real:
                lr = ranked.log() if x["enable_softmax"] else ranked
                self.margins.add(lr[:, x["top_k"] - 1] - lr[:, x["top_k"]])
            keep = torch.zeros_like(sc, dtype=torch.bool).scatter(-1, order[:, :x["top_k"]], True)
            sc = sc * keep.to(sc.dtype)
            if x["softmax_topk"]:
                masked = sc.masked_fill(~keep, float("-inf"))
                sc = torch.softmax(masked, dim=-1) * keep.to(sc.dtype)
        return sc

    def linear(self, l, m, x, y):
        for a, b, s in self.static.get((l, m), []):
            y = y + s * ((x @ a.T) @ b.T)
        g = self.module_group.get((l, m))
        if g is None:
            return y
        a, b, scale = self.experts(g, l, m)
        if g["scope"] == "model_scalings":
            xl = self.cfg["xlora"]
            w = self.xlora_weights(self.scalings[:, xl["module_index"][f"layers.{l}.{m}"], :])
            self.routing[f"{l}.{m}"] = w
            for e in range(a.shape[0]):
                y = y + ((x * w[:, e:e + 1]) @ a[e].T) @ b[e].T * (
                    float(scale[e]) * xl["global_scaling_weight"])
            return y
        if g["granularity"] == "rank":
            z = x @ a[0].T
            key = z
            if g["router"].get("select_bias"):
                key = key + self.t[f"groups.{g['id']}.layers.{l}.{m}.router.select_bias"]
            if g["router"].get("select_on_abs"):
                key = key.abs()
            k = self.spec(g, l)["k"]
            order = order_desc(key)
            ranked = key.gather(-1, order)
            if k < key.shape[1]:
                self.margins.add(ranked[:, k - 1] - ranked[:, k])
            mask = torch.zeros_like(z).scatter(-1, order[:, :k], 1.0)
            self.routing[f"{l}.{m}"] = mask
            return y + float(scale[0]) * ((z * mask) @ b[0].T)
        w = route(self.spec(g, l), self.logits(g, l, x, m), self.margins)
        self.routing[f"{l}.{m}"] = w
        for e in range(a.shape[0]):
            y = y + w[:, e:e + 1].to(F64) * (float(scale[e]) * ((x @ a[e].T) @ b[e].T))
        return y

    def ffn(self, l, h):
        g = self.block_group.get(l)
        if g is None:
            return None
        assert g["act_fn"] in (None, "silu")
        base = self.base
        w = route(self.spec(g, l), self.logits(g, l, h), self.margins)
        self.routing[f"{l}.ffn"] = w
        gate_base = h @ base.weight(l, "gate_proj").T
        up_base = h @ base.weight(l, "up_proj").T
        mixed = torch.zeros_like(gate_base)
        down_lora = torch.zeros_like(h)
        mods = g["targets"]["modules"]
        stacks = {m: self.experts(g, l, m) for m in mods}

        def delta(m, e, inp):
            if m not in stacks:
                return 0.0
            a, b, scale = stacks[m]
            return float(scale[e]) * ((inp @ a[e].T) @ b[e].T)

        for e in range(w.shape[1]):
            we = w[:, e:e + 1].to(F64)
            if not bool((we != 0).any()):
                continue
            act = F.silu(gate_base + delta("gate_proj", e, h)) * (up_base + delta("up_proj", e, h))
            mixed = mixed + we * act
            down_lora = down_lora + we * delta("down_proj", e, act)
        # MOLE_FORMAT 1.3 serving rewrite: the base down-projection runs once on sum_e w_e a_e.
        return mixed @ base.weight(l, "down_proj").T + down_lora

    def run(self, base, ids):
        x = self.cfg.get("xlora")
        self.routing = {}
        if not x:
            self.scalings_are_real = True
            return base.forward(ids, self)[0]
        n_mod = len(x["module_index"])
        n = len(x["adapters"])
        self.scalings_are_real = False
        self.scalings = torch.full((len(ids), n_mod, n), float(x["scaling_pass_value"]),
                                   dtype=F64)
        _, hidden = base.forward(ids, self)
        z = hidden
        depth = x["classifier"]["depth"]
        for i in range(depth):
            z = z @ self.t[f"xlora.classifier.{i}.weight"].T
            if f"xlora.classifier.{i}.bias" in self.t:
                z = z + self.t[f"xlora.classifier.{i}.bias"]
            if i + 1 < depth and x["classifier"]["relu"]:
                z = torch.relu(z)
        z = z.reshape(len(ids), n_mod, n) if x["layerwise_scalings"] else \
            z[:, None, :].expand(len(ids), n_mod, n)
        if x["enable_softmax"]:
            z = torch.softmax(z / x["softmax_temperature"], dim=-1)
        self.scalings = z
        self.scalings_are_real = True
        self.routing = {}
        return base.forward(ids, self)[0]


# ------------------------------------------------------------------------------------------------
# Checks


class Failures:
    def __init__(self):
        self.items = []

    def check(self, ok, msg):
        if not ok:
            self.items.append(msg)
            print("  FAIL", msg)
        return ok


def max_diff(a, b):
    return max((abs(x - y) for pa, pb in zip(a, b) for ra, rb in zip(pa, pb)
                for x, y in zip(ra, rb)), default=0.0)


def routing_diff(a, b):
    worst = 0.0
    for pa, pb in zip(a, b):
        for ra, rb in zip(pa, pb):
            if set(ra) != set(rb):
                return math.inf
            for k in ra:
                worst = max([worst] + [abs(x - y) for x, y in zip(ra[k], rb[k])])
    return worst


def routing_sizes(doc):
    """{key kind: sorted set of the number of non-zero weights seen}."""
    sizes = set()
    for p in doc["routing"]:
        for row in p:
            for v in row.values():
                sizes.add(sum(1 for x in v if x != 0))
    return sorted(sizes)


# What each fixture must exercise on the check prompts: allowed sets of expert counts.
EXPECTED_SIZES = {
    "mixlora": {2}, "mixlora_legacy": {2}, "mixlora_switch": {1}, "moepeft_mola": {2},
    "moepeft_loramoe": {3}, "mola_original": {1, 3}, "flylora": {4}, "xlora_peft": {3},
    "xlora_peft_topk": {2}, "xlora_mistralrs": {3},
}


def check_adapter(fails, base, base_doc, pub, conv, name, family, extra=None, margins=True):
    """Reference on `pub` vs the mole/1 forward on its conversion `conv`. `margins`: also require
    that no routing decision is a near-tie (the primary base, which the engine tests use)."""
    extra = extra or {}
    public = ref.make_adapter(base, pub, family, extra.get("k"), extra.get("ordering"))
    want = ref.evaluate(base, public, PROMPTS)
    mole_convert.convert(pub, conv, family, k_per_layer=extra.get("k"),
                         ordering=extra.get("ordering"),
                         nola_device="cpu" if family == "nola" else None)
    model = MoleModel(conv, base)
    got = ref.evaluate(base, model, PROMPTS)
    d_logits = max_diff(want["logits"], got["logits"])
    d_route = routing_diff(want["routing"], got["routing"])
    change = max_diff(want["logits"], base_doc["logits"])
    sizes = routing_sizes(want)
    print(f"  {name:24s} {family:13s} |d logits| {d_logits:.1e}  |d routing| {d_route:.1e}  "
          f"vs base {change:5.2f}  experts/token {sizes}  margins {model.margins}")
    fails.check(d_logits <= LOGIT_TOL, f"{name}: logits differ by {d_logits:.3e}")
    fails.check(d_route <= ROUTING_TOL, f"{name}: routing differs by {d_route:.3e}")
    fails.check(change > 0.5, f"{name}: the adapter barely changes the logits ({change:.3f})")
    fails.check(not margins or model.margins.ok(),
                f"{name}: a routing decision is a near-tie (margins {model.margins})")
    if name in EXPECTED_SIZES:
        fails.check(set(sizes) == EXPECTED_SIZES[name], f"{name}: expert counts {sizes}")
    if name.startswith("mixlora_dynamic"):
        fails.check(len(sizes) >= 2, f"{name}: top-p always keeps {sizes} experts")
    if name == "moepeft_dynmole":
        fails.check(8 in sizes and 2 in sizes and any(2 < s < 8 for s in sizes),
                    f"dynmole: needs the entropy gate (8), keep_top_k only (2) and top-p (3..7); "
                    f"saw {sizes}")
    return want


def run_cli(args):
    return subprocess.run([sys.executable] + args, capture_output=True, text=True)


def edit_config(src, dst, fname, edit):
    shutil.copytree(src, dst)
    path = os.path.join(dst, fname)
    cfg = json.load(open(path))
    edit(cfg)
    json.dump(cfg, open(path, "w"))


def check_rejections(fails, pub, work):
    def expect_reject(tag, src, fname, edit, words):
        dst = os.path.join(work, "reject", tag)
        edit_config(src, dst, fname, edit)
        err = os.path.join(work, "reject", tag + ".err")
        old = sys.stderr
        with open(err, "w") as f:
            sys.stderr = f
            try:
                rc = mole_convert.main([dst, os.path.join(work, "reject", tag + ".out")])
            finally:
                sys.stderr = old
        msg = open(err).read()
        ok = rc == 1 and all(w in msg for w in words)
        print(f"  reject {tag:22s} rc {rc}  {msg.strip()}")
        fails.check(ok, f"converter did not reject {tag} (rc {rc}, {msg.strip()!r})")

    expect_reject("peft_dora", os.path.join(pub, "peft_lora"), "adapter_config.json",
                  lambda c: c.update(use_dora=True), ["DoRA"])
    expect_reject("peft_modules_to_save", os.path.join(pub, "peft_lora"), "adapter_config.json",
                  lambda c: c.update(modules_to_save=["lm_head"]), ["modules_to_save"])
    expect_reject("mixlora_expert_dora", os.path.join(pub, "mixlora"), "adapter_config.json",
                  lambda c: c["expert_lora"].update(use_dora=True), ["DoRA"])
    expect_reject("mixlora_gelu", os.path.join(pub, "mixlora"), "adapter_config.json",
                  lambda c: c.update(act_fn="gelu_new"), ["act_fn"])
    expect_reject("mixlora_strategy", os.path.join(pub, "mixlora"), "adapter_config.json",
                  lambda c: c.update(routing_strategy="mixlora-magic"), ["routing_strategy"])
    expect_reject("dynmole_renyi", os.path.join(pub, "moepeft_dynmole"), "adapter_config.json",
                  lambda c: c.update(entropy_type="renyi"), ["renyi"])
    expect_reject("xlora_expert_dora", os.path.join(pub, "xlora_peft"),
                  os.path.join("adapter_2", "adapter_config.json"),
                  lambda c: c.update(use_dora=True), ["DoRA"])
    expect_reject("sora_rank", os.path.join(pub, "sora"), "config.json",
                  lambda c: c.update(lora_r=4), ["rank 8", "config says 4"])
    expect_reject("sora_delta_type", os.path.join(pub, "sora"), "config.json",
                  lambda c: c.update(delta_type="adapter"), ["not 'lora'"])
    # Microsoft's output-gated MoLE (diffusion code): refused, saying why.
    mole_dir = os.path.join(work, "reject", "mole_gates")
    shutil.copytree(os.path.join(pub, "peft_lora"), mole_dir)
    torch.save({"base_model.model.text_model.encoder.layers.0.wg.weight": torch.zeros(3, 8)},
               os.path.join(mole_dir, "gates_epoch3.bin"))
    p = run_cli([os.path.join(ROOT, "tools", "mole_convert.py"), mole_dir,
                 os.path.join(work, "reject", "mole_gates.out")])
    print(f"  reject {'mole_output_gates':22s} rc {p.returncode}  {p.stderr.strip()[:100]}")
    fails.check(p.returncode == 1 and "per-token" in p.stderr and "Stable Diffusion" in p.stderr,
                f"output-gated MoLE gates: rc {p.returncode} {p.stderr!r}")
    # NOLA without the training device: its bases cannot be known.
    p = run_cli([os.path.join(ROOT, "tools", "mole_convert.py"), os.path.join(pub, "nola"),
                 os.path.join(work, "reject", "nola_device")])
    print(f"  reject {'nola_no_device':22s} rc {p.returncode}  {p.stderr.strip()}")
    fails.check(p.returncode == 1 and "--nola-device" in p.stderr,
                f"NOLA without --nola-device: rc {p.returncode} {p.stderr!r}")
    # RandLoRA without saved bases: regenerated from projection_prng_key in the dtype given
    # (refused without it); float16 gives back the saved fp16 bases exactly, so the same mole/1.
    unsaved = os.path.join(work, "reject", "randlora_unsaved")
    shutil.copytree(os.path.join(pub, "randlora"), unsaved)
    cfg = ref.read_json(os.path.join(unsaved, "adapter_config.json"))
    cfg["save_projection"] = False
    with open(os.path.join(unsaved, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    w = torch.load(os.path.join(unsaved, "adapter_model.bin"))
    torch.save({k: v for k, v in w.items() if not k.endswith(("randlora_A", "randlora_B"))},
               os.path.join(unsaved, "adapter_model.bin"))
    p = run_cli([os.path.join(ROOT, "tools", "mole_convert.py"), unsaved, unsaved + ".out"])
    print(f"  reject {'randlora_no_dtype':22s} rc {p.returncode}  {p.stderr.strip()[:100]}")
    fails.check(p.returncode == 1 and "--randlora-basis-dtype" in p.stderr,
                f"RandLoRA without saved bases or dtype: rc {p.returncode} {p.stderr!r}")
    saved = os.path.join(work, "reject", "randlora_saved.out")
    mole_convert.convert(os.path.join(pub, "randlora"), saved, "randlora")
    mole_convert.convert(unsaved, unsaved + ".out", "auto", randlora_basis_dtype="float16")
    a = load_safetensors(os.path.join(saved, "model.safetensors"))
    b = load_safetensors(os.path.join(unsaved + ".out", "model.safetensors"))
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"  randlora regenerated fp16 bases equal the saved ones: {same}")
    fails.check(same, "RandLoRA: bases regenerated in float16 differ from the saved ones")
    # Malformed fields refused with a message, never a traceback: a MoS mask shorter than r, a
    # RandLoRA PRNG key that is not an integer, a config.json that is not an object.
    short = os.path.join(work, "reject", "mos_short")
    shutil.copytree(os.path.join(pub, "mos"), short)
    w = torch.load(os.path.join(short, "adapter_model.bin"))
    cfg = ref.read_json(os.path.join(short, "adapter_config.json"))
    cfg.pop("num_chunk_per_vec")
    with open(os.path.join(short, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    torch.save({k: (v[:2] if k.endswith("lora_pair_mask") else v) for k, v in w.items()},
               os.path.join(short, "adapter_model.bin"))
    key = os.path.join(work, "reject", "randlora_key")
    shutil.copytree(os.path.join(pub, "randlora_sparse"), key)
    cfg = ref.read_json(os.path.join(key, "adapter_config.json"))
    cfg["projection_prng_key"] = [1, 2]
    with open(os.path.join(key, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    odd = os.path.join(work, "reject", "config_list")
    os.makedirs(odd, exist_ok=True)
    with open(os.path.join(odd, "config.json"), "w") as f:
        json.dump([1, 2], f)
    for d, want in ((short, "masks"), (key, "projection_prng_key"), (odd, "not a JSON object")):
        p = run_cli([os.path.join(ROOT, "tools", "mole_convert.py"), d, d + ".out"])
        print(f"  reject {os.path.basename(d):22s} rc {p.returncode}  {p.stderr.strip()[:100]}")
        fails.check(p.returncode == 1 and want in p.stderr and "Traceback" not in p.stderr,
                    f"{os.path.basename(d)}: rc {p.returncode} {p.stderr!r}")
    # PERFT (adapters beside the experts of an MoE base): refused, saying why.
    perft = os.path.join(work, "reject", "perft")
    os.makedirs(perft, exist_ok=True)
    with open(os.path.join(perft, "config.json"), "w") as f:
        json.dump({"model_type": "olmoe-adapter", "num_experts": 64, "num_experts_per_tok": 8,
                   "shared_routing_adapter": True, "shared_routing_adapter_num_experts": 4,
                   "shared_routing_adapter_type": "LoRA"}, f)
    p = run_cli([os.path.join(ROOT, "tools", "mole_convert.py"), perft, perft + ".out"])
    print(f"  reject {'perft':22s} rc {p.returncode}  {p.stderr.strip()[:100]}")
    fails.check(p.returncode == 1 and "PERFT" in p.stderr and "Mixture-of-Experts" in p.stderr,
                f"PERFT: rc {p.returncode} {p.stderr!r}")
    # A MoS shard mask that names a row outside its pool.
    bad_mos = os.path.join(work, "reject", "mos_mask")
    shutil.copytree(os.path.join(pub, "mos"), bad_mos)
    w = torch.load(os.path.join(bad_mos, "adapter_model.bin"))
    key = next(k for k in sorted(w) if k.endswith(".lora_pair_mask_B"))
    w[key] = w[key].clone()
    w[key][0] = w[key.replace("lora_pair_mask_B", "lora_A.weight")].shape[0]
    torch.save(w, os.path.join(bad_mos, "adapter_model.bin"))
    p = run_cli([os.path.join(ROOT, "tools", "mole_convert.py"), bad_mos, bad_mos + ".out"])
    print(f"  reject {'mos_mask':22s} rc {p.returncode}  {p.stderr.strip()[:100]}")
    fails.check(p.returncode == 1 and "outside the pool" in p.stderr,
                f"MoS mask out of range: rc {p.returncode} {p.stderr!r}")
    # The CLI itself: exit status and message.
    p = run_cli([os.path.join(ROOT, "tools", "mole_convert.py"),
                 os.path.join(work, "reject", "peft_dora"), os.path.join(work, "reject", "x")])
    fails.check(p.returncode == 1 and "DoRA" in p.stderr, f"CLI on DoRA: rc {p.returncode}")


def check_options(fails, base, base_dir, pub, work):
    # --k-per-layer overrides the MoLA sidecar.
    k = [2] * base.layers
    check_adapter(fails, base, ref.evaluate(base, ref.Adapter(), PROMPTS),
                  os.path.join(pub, "mola_original"), os.path.join(work, "opt", "mola_k2"),
                  "mola_original --k 2", "mola_original", {"k": k})
    # --ordering given explicitly (the directory itself has none).
    src = os.path.join(work, "opt", "xlora_noorder")
    shutil.copytree(os.path.join(pub, "xlora_mistralrs"), src)
    ordering = os.path.join(work, "opt", "ordering.json")
    shutil.move(os.path.join(src, "ordering.json"), ordering)
    check_adapter(fails, base, ref.evaluate(base, ref.Adapter(), PROMPTS), src,
                  os.path.join(work, "opt", "xlora_ordered"), "xlora --ordering", "xlora",
                  {"ordering": ordering})
    # X-LoRA enable_softmax_topk (per token, over the kept top_k entries).
    src = os.path.join(work, "opt", "xlora_softmax_topk")
    edit_config(os.path.join(pub, "xlora_peft_topk"), src, "adapter_config.json",
                lambda c: c.update(enable_softmax_topk=True))
    check_adapter(fails, base, ref.evaluate(base, ref.Adapter(), PROMPTS), src,
                  os.path.join(work, "opt", "xlora_softmax_topk_mole"), "xlora softmax_topk",
                  "xlora")
    # bfloat16 storage: A/B in BF16 (exactly the rounded values), routers F32.
    dst = os.path.join(work, "opt", "mixlora_bf16")
    rc = mole_convert.main([os.path.join(pub, "mixlora"), dst, "--dtype", "bfloat16"])
    header = read_header(os.path.join(dst, "model.safetensors"))
    f32 = MoleModel(os.path.join(work, "conv", "mixlora"), base).t
    bf = load_safetensors(os.path.join(dst, "model.safetensors"))
    ok = rc == 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        want = "F32" if ".router." in name else "BF16"
        ok &= info["dtype"] == want
        ok &= torch.equal(bf[name], f32[name].to(torch.bfloat16).to(F64) if want == "BF16"
                          else f32[name])
    print(f"  --dtype bfloat16: {'ok' if ok else 'WRONG'}")
    fails.check(ok, "--dtype bfloat16 output")
    # mole/1 keeps per-module / per-expert scales in float32 tensors: an irrational scale
    # (rsLoRA r 8, alpha 32 -> 32/sqrt(8)) is stored as its nearest float32, the only rounding.
    src = os.path.join(work, "opt", "peft_irrational")
    os.makedirs(src)
    mpa = make_public_adapters
    gen_base = mpa.Base(base_dir)
    mpa.dump(os.path.join(src, "adapter_config.json"),
             mpa.peft_config(gen_base, r=8, lora_alpha=16, use_rslora=True,
                             target_modules=["q_proj", "v_proj"], alpha_pattern={"v_proj": 32}))
    mpa.peft_lora_dir(gen_base, src, mpa.Gen("irrational"),
                      {l: ["q_proj", "v_proj"] for l in range(base.layers)}, lambda l, m: 8)
    # Regex target_modules whose targets are not layers x modules: the converter splits them
    # into several static entries / rank groups.
    regex = rf"model\.layers\.{base.layers - 1}\.self_attn\.v_proj|.*\.q_proj"
    shape = {l: ["q_proj"] + (["v_proj"] if l == base.layers - 1 else [])
             for l in range(base.layers)}
    for name, extra in (("peft_regex", {}), ("flylora_regex", {"top_k": 4, "r": 16,
                                                                 "lora_alpha": 8})):
        d = os.path.join(work, "opt", name)
        os.makedirs(d)
        cfg = mpa.peft_config(gen_base, r=8, lora_alpha=16, target_modules=regex)
        cfg.update(extra)
        mpa.dump(os.path.join(d, "adapter_config.json"), cfg)
        if name == "peft_regex":
            mpa.peft_lora_dir(gen_base, d, mpa.Gen(name), shape, lambda l, m: 8)
        else:
            g, w = mpa.Gen(name), {}
            for l, mods in shape.items():
                for m in mods:
                    din, dout = gen_base.dims[m]
                    p = f"base_model.model.model.layers.{l}.self_attn.{m}"
                    w[p + ".lora_A.weight"], w[p + ".lora_B.weight"] = g.lora(16, din, dout)
                    w[p + ".lora_topk_bias"] = g.normal((16,), 0.3)
            mpa.save_st(os.path.join(d, "adapter_model.safetensors"), w)
        family = name.split("_")[0].replace("peft", "peft_lora")
        check_adapter(fails, base, ref.evaluate(base, ref.Adapter(), PROMPTS), d,
                      os.path.join(work, "opt", name + "_mole"), name, family)
        n = len(json.load(open(os.path.join(work, "opt", name + "_mole", "mole_config.json")))[
            "static_loras" if family == "peft_lora" else "routed_groups"])
        fails.check(n == 2, f"{name}: {n} entries, expected 2")
    dst = os.path.join(work, "opt", "peft_irrational_mole")
    mole_convert.convert(src, dst, "peft_lora")
    scale = float(load_safetensors(os.path.join(dst, "model.safetensors"))[
        "static.lora.layers.0.v_proj.scale"])
    exact = 32 / math.sqrt(8)
    want = ref.evaluate(base, ref.make_adapter(base, src, "peft_lora"), PROMPTS)
    got = ref.evaluate(base, MoleModel(dst, base), PROMPTS)
    d = max_diff(want["logits"], got["logits"])
    print(f"  irrational scale: stored {scale!r} for {exact!r}; |d logits| {d:.1e}")
    fails.check(scale == float(torch.tensor(exact, dtype=F32)) and d < 1e-5,
                "irrational scale: not the nearest float32")


def check_lego(fails, base, base_dir, work):
    """tools/lora_lego.py against the formulas in its docstring, on two PEFT LoRAs (q/v, r 4)
    whose rank units pair up: the second is the first's units permuted, rescaled to another
    LoRA scale (alpha 16 vs 8) and perturbed by 1e-3, so any k-means finds the pairs at k 4.
      k 4: per module sum_i b_c a_c^T over the pairs' means, each rescaled to its members' mean
           l-inf norm, output factor sqrt(4 / 4);
      k 64 (every unit its own cluster): sqrt(4 / 8) (s_1 B_1 A_1 + s_2 B_2 A_2)."""
    g = torch.Generator().manual_seed(77)
    mods = ["q_proj", "v_proj"]
    dims = {m: (tuple(base.w[ref.module_path(0, m) + ".weight"].shape)) for m in mods}
    r, scales = 4, (16 / 4, 8 / 4)
    srcs, units = [], {}
    for n, alpha in enumerate((16, 8)):
        d = os.path.join(work, "lego", f"lora{n}")
        os.makedirs(d, exist_ok=True)
        cfg = make_public_adapters.peft_config(make_public_adapters.Base(base_dir), r=r,
                                               lora_alpha=alpha, target_modules=mods)
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump(cfg, f)
        w = {}
        for l in range(base.layers):
            for m in mods:
                out_f, in_f = dims[m]
                key = (l, m)
                if n == 0:
                    a = torch.randn(r, in_f, generator=g, dtype=F64) / math.sqrt(in_f)
                    b = torch.randn(out_f, r, generator=g, dtype=F64) * 0.3
                    units[key] = [torch.cat([a * math.sqrt(scales[0]), b.T * math.sqrt(scales[0])],
                                            1)]
                else:
                    first = units[key][0][torch.tensor([2, 0, 3, 1])]
                    first = first * (1 + 1e-3 * torch.randn(first.shape, generator=g, dtype=F64))
                    units[key].append(first)
                    a = first[:, :in_f] / math.sqrt(scales[1])
                    b = first[:, in_f:].T / math.sqrt(scales[1])
                p = "base_model.model." + ref.module_path(l, m)
                w[p + ".lora_A.weight"], w[p + ".lora_B.weight"] = a.float(), b.float()
        make_public_adapters.save_st(os.path.join(d, "adapter_model.safetensors"), w)
        srcs.append(d)
    # The stored float32 units, as the tool reads them.
    for n, d in enumerate(srcs):
        t = load_safetensors(os.path.join(d, "adapter_model.safetensors"))
        for (l, m) in units:
            p = "base_model.model." + ref.module_path(l, m)
            root = math.sqrt(scales[n])
            units[(l, m)][n] = torch.cat([t[p + ".lora_A.weight"] * root,
                                          t[p + ".lora_B.weight"].T * root], 1)
    worst = {4: 0.0, 64: 0.0}
    for k in worst:
        dst = os.path.join(work, "lego", f"merged_k{k}")
        lora_lego.merge(dst, srcs, k)
        got = load_safetensors(os.path.join(dst, "model.safetensors"))
        for (l, m), (u1, u2) in units.items():
            out_f, in_f = dims[m]
            if k == 4:
                order = [2, 0, 3, 1]
                want = torch.zeros(out_f, in_f, dtype=F64)
                for i in range(r):
                    pair = torch.stack([u1[order[i]], u2[i]])
                    c = pair.mean(0)
                    c = c * pair.abs().amax(1).mean() / c.abs().amax()
                    want += torch.outer(c[in_f:], c[:in_f])
            else:
                both = torch.cat([u1, u2])
                want = math.sqrt(4 / 8) * both[:, in_f:].T @ both[:, :in_f]
            a = got[f"static.lego.layers.{l}.{m}.A"]
            b = got[f"static.lego.layers.{l}.{m}.B"]
            fails.check(a.shape[0] == min(k, 8), f"LEGO k {k}: merged rank {a.shape[0]}")
            worst[k] = max(worst[k], float((b @ a - want).abs().max() / want.abs().max()))
    print(f"  lora_lego: k 4 (pairs) rel |d delta W| {worst[4]:.1e}, k 64 (singletons) "
          f"{worst[64]:.1e}")
    fails.check(worst[4] < 1e-6 and worst[64] < 1e-6, f"LEGO merge differs: {worst}")
    # A LoRA merged with itself at rank 2r: r distinct units, each cluster a unit and its copy,
    # so the merge is the LoRA itself (and no cluster is left empty).
    dst = os.path.join(work, "lego", "self")
    lora_lego.merge(dst, [srcs[0], srcs[0]], 2 * r)
    got = load_safetensors(os.path.join(dst, "model.safetensors"))
    worst_self = 0.0
    for (l, m), (u1, _) in units.items():
        in_f = dims[m][1]
        want = u1[:, in_f:].T @ u1[:, :in_f]
        a = got[f"static.lego.layers.{l}.{m}.A"]
        b = got[f"static.lego.layers.{l}.{m}.B"]
        fails.check(a.shape[0] == r and bool(torch.isfinite(a).all() and torch.isfinite(b).all()),
                    f"LEGO self-merge: rank {a.shape[0]}")
        worst_self = max(worst_self, float((b @ a - want).abs().max() / want.abs().max()))
    print(f"  lora_lego: a LoRA with itself at rank {2 * r}: rel |d delta W| {worst_self:.1e}")
    fails.check(worst_self < 1e-6, f"LEGO self-merge differs: {worst_self}")
    # Refusals: one source, rank 0, sources of different shapes.
    for args, want in (([srcs[0]], "at least two"), (srcs + ["--rank", "0"], "at least 1")):
        extra = [] if "--rank" in args else ["--rank", "2"]
        p = run_cli([os.path.join(ROOT, "tools", "lora_lego.py"),
                     os.path.join(work, "lego", "bad")] + args + extra)
        fails.check(p.returncode == 1 and want in p.stderr, f"lora_lego {args}: {p.stderr!r}")


def read_header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def check_reference_cli(fails, base_dir, pub, base):
    # The reference's CLI: only JSON on stdout, same numbers as in-process, greedy continuation.
    d = os.path.join(pub, "xlora_peft")
    args = [os.path.join(ROOT, "tests", "reference", "mole_reference.py"), base_dir, d,
            "--family", "xlora", "--greedy", "3"]
    for p in PROMPTS[:2]:
        args += ["--prompt", ",".join(map(str, p))]
    proc = run_cli(args)
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        fails.check(False, f"reference CLI stdout is not JSON: {proc.stderr[-300:]}")
        return
    want = ref.evaluate(base, ref.make_adapter(base, d, "xlora"), PROMPTS[:2], greedy=3)
    ok = (proc.returncode == 0 and doc["greedy"] == want["greedy"] and
          max_diff(doc["logits"], want["logits"]) == 0 and
          all(len(g) == 3 for g in doc["greedy"]) and
          len(doc["routing"][0]) == len(PROMPTS[0]))
    print(f"  reference CLI: {'ok' if ok else 'WRONG'} (greedy {doc['greedy']})")
    fails.check(ok, "reference CLI output")


def main():
    t0 = time.time()
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="mole_check_")
    os.makedirs(work, exist_ok=True)
    bases_root = os.path.join(work, "bases")
    with open(os.devnull, "w") as devnull:
        subprocess.run([sys.executable, os.path.join(ROOT, "tests", "reference",
                                                     "make_tiny_checkpoints.py"), bases_root],
                       check=True, stdout=devnull)
    fails = Failures()
    torch.set_grad_enabled(False)
    for bi, base_name in enumerate(BASES):
        base_dir = os.path.join(bases_root, base_name)
        root = os.path.join(work, base_name)
        shutil.rmtree(root, ignore_errors=True)
        pub, conv = os.path.join(root, "public"), os.path.join(root, "conv")
        written = make_public_adapters.write_all(base_dir, pub)
        base = ref.BaseModel(base_dir)
        base_doc = ref.evaluate(base, ref.Adapter(), PROMPTS)
        print(f"base {base_name}")
        for name, family in written:
            check_adapter(fails, base, base_doc, os.path.join(pub, name), os.path.join(conv, name),
                          name, family, margins=bi == 0)
        if bi == 0:
            for name, family in written:  # --family auto in both tools
                got = (mole_convert.detect_family(os.path.join(pub, name)),
                       ref.detect_family(os.path.join(pub, name)))
                fails.check(got == (family, family), f"{name}: auto-detected as {got}")
            check_options(fails, base, base_dir, pub, root)
            check_rejections(fails, pub, root)
            check_lego(fails, base, base_dir, root)
            check_reference_cli(fails, base_dir, pub, base)
    elapsed = time.time() - t0
    if fails.items:
        print(f"converter_check: {len(fails.items)} FAILED ({elapsed:.1f} s); work dir {work}")
        return 1
    print(f"converter_check: all passed ({elapsed:.1f} s)")
    if len(sys.argv) <= 1:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
