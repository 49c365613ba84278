#!/usr/bin/env python3
"""Writes the seed corpora of tests/fuzz (one folder per target, next to this script).

Deterministic, Python 3 stdlib only: `python3 tests/fuzz/corpus/make_seeds.py` rewrites every
seed-*. file (crash-* regression inputs are never touched). Seeds are small (a few KB): adapters
are for the fuzzers' tiny base shape (2 layers, hidden 32, intermediate 48, 4/2 heads of 8),
with ranks 1-2 and 2 experts, stored as BF16. Multi-part inputs use the separator of
tests/fuzz/fuzz_util.h.
"""

import json
import os
import random
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SEP = b"\n@@@@\n"
rng = random.Random(20261202)


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def clean():
    for target in os.listdir(HERE):
        d = os.path.join(HERE, target)
        if os.path.isdir(d):
            for f in os.listdir(d):
                if f.startswith("seed-"):
                    os.remove(os.path.join(d, f))


# --- safetensors -------------------------------------------------------------------------------

DTYPES = {"F32": ("<f", 4), "F16": ("<e", 2), "BF16": (None, 2), "I64": ("<q", 8),
          "I32": ("<i", 4), "U8": ("<B", 1), "I8": ("<b", 1), "F64": ("<d", 8),
          "I16": ("<h", 2), "BOOL": ("<B", 1)}


def bf16(x):
    return struct.pack("<I", struct.unpack("<I", struct.pack("<f", x))[0])[2:4]


def encode(dtype, values):
    fmt, _ = DTYPES[dtype]
    if dtype == "BF16":
        return b"".join(bf16(v) for v in values)
    if dtype in ("I64", "I32", "U8", "I8", "I16", "BOOL"):
        return b"".join(struct.pack(fmt, int(v)) for v in values)
    return b"".join(struct.pack(fmt, v) for v in values)


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def safetensors(tensors, metadata=None, pad=True):
    """tensors: list of (name, dtype, shape, values or None for random)."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, values in tensors:
        if values is None:
            values = [round(rng.gauss(0, 0.1), 4) for _ in range(numel(shape))]
        blob = encode(dtype, values)
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def safetensors_seeds():
    t = "safetensors_fuzz"
    write(t, "f32", safetensors([("w", "F32", [2, 3], None)]))
    write(t, "bf16_f16", safetensors([("a", "BF16", [4], None), ("b", "F16", [2, 2], None)]))
    write(t, "metadata", safetensors([("x", "F32", [1], [1.0])], {"format": "pt", "k": "v"}))
    write(t, "ints", safetensors([("i64", "I64", [2], [1, -2]), ("i32", "I32", [1], [7]),
                                  ("u8", "U8", [3], [1, 2, 3]), ("bool", "BOOL", [1], [1]),
                                  ("i8", "I8", [1], [-1]), ("i16", "I16", [1], [5]),
                                  ("f64", "F64", [1], [0.5])]))
    write(t, "scalar_empty", safetensors([("s", "F32", [], [3.0]), ("e", "F32", [0, 4], [])]))
    write(t, "empty_header", safetensors([]))
    write(t, "special_floats", safetensors([("f", "F16", [3], [float("inf"), -0.0, 6e-8]),
                                            ("g", "F32", [2], [float("nan"), 1e-45])]))
    write(t, "unpadded", safetensors([("w", "F32", [1, 1], [2.0])], pad=False))


# --- tokenizer.json ----------------------------------------------------------------------------

def byte_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


B2U = byte_to_unicode()


def added(i, content, special=True, normalized=False, lstrip=False, rstrip=False):
    return {"id": i, "content": content, "single_word": False, "lstrip": lstrip,
            "rstrip": rstrip, "normalized": normalized, "special": special}


def byte_level_tokenizer(pre, normalizer=None, merges_as_pairs=False, ignore_merges=False,
                         post=None):
    vocab = {B2U[b]: b for b in range(256)}
    merges = []
    for a, b in [("H", "e"), ("l", "l"), ("He", "ll"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"),
                 ("Hell", "o"), ("Ġwor", "l"), ("Ġworl", "d"), ("1", "2")]:
        vocab.setdefault(a + b, len(vocab))
        merges.append([a, b] if merges_as_pairs else a + " " + b)
    n = len(vocab)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [added(n, "<|begin_of_text|>"), added(n + 1, "<|end_of_text|>"),
                         added(n + 2, "<tool>", special=False, normalized=True, lstrip=True)],
        "normalizer": normalizer, "pre_tokenizer": pre,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
                  "vocab": vocab, "merges": merges},
    }


LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def sentencepiece_tokenizer(metaspace=False):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab["<0x%02X>" % b] = len(vocab)
    merges = []
    for a, b in [("▁", "H"), ("e", "l"), ("el", "l"), ("▁H", "ell"), ("▁Hell", "o"),
                 ("▁", "w"), ("o", "r"), ("▁w", "or")]:
        for p in (a, b):
            vocab.setdefault(p, len(vocab))
        vocab.setdefault(a + b, len(vocab))
        merges.append(a + " " + b)
    for c in "HeloWrd ld":
        vocab.setdefault(c, len(vocab))
    if metaspace:
        normalizer = None
        pre = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
        decoder = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                   "split": False}
    else:
        normalizer = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        pre = None
        decoder = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return {
        "version": "1.0",
        "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")],
        "normalizer": normalizer, "pre_tokenizer": pre,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1],
                                                                  "tokens": ["<s>"]}}},
        "decoder": decoder,
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def tokenizer_seeds():
    t = "tokenizer_fuzz"
    gpt2 = byte_level_tokenizer({"type": "ByteLevel", "add_prefix_space": False,
                                 "trim_offsets": True, "use_regex": True})
    write(t, "gpt2_style.json", json.dumps(gpt2, ensure_ascii=False))
    llama3 = byte_level_tokenizer(
        {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        merges_as_pairs=True, ignore_merges=True,
        post={"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
             "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [], "special_tokens": {}}]})
    write(t, "llama3_style.json", json.dumps(llama3, ensure_ascii=False))
    qwen = byte_level_tokenizer(
        {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\p{N}| ?\p{L}+|\s+"}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
             "use_regex": False}]},
        normalizer={"type": "NFC"})
    write(t, "qwen2_style.json", json.dumps(qwen, ensure_ascii=False))
    smol = byte_level_tokenizer(
        {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
             "use_regex": True}]})
    write(t, "digits.json", json.dumps(smol, ensure_ascii=False))
    write(t, "llama2_style.json", json.dumps(sentencepiece_tokenizer(), ensure_ascii=False))
    write(t, "metaspace.json", json.dumps(sentencepiece_tokenizer(True), ensure_ascii=False))
    write(t, "split_string.json", json.dumps(byte_level_tokenizer(
        {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
         "invert": False}), ensure_ascii=False))
    write(t, "minimal.json", '{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, '
                             '"merges": ["a b"]}}')
    write(t, "unsupported.json", '{"model": {"type": "WordPiece", "vocab": {}}}')
    fixture = os.path.join(HERE, "..", "..", "fixtures", "byte_level_tokenizer.json")
    if os.path.exists(fixture):
        with open(fixture, "rb") as f:
            write(t, "fixture_byte_level.json", f.read())


def tokenizer_codec_seeds():
    t = "tokenizer_codec_fuzz"
    texts = [b"Hello world", "Hello, 世界! 😀 123 4567".encode(), b" leading  spaces\n\n\ttab",
             b"<|begin_of_text|>hi<|end_of_text|>", b"<s> x </s>", b"\xff\xfe bad \xc3 utf8 \xe2\x82",
             "can't won't I'm ĠĊ ▁x".encode(), "ﬁ é é 한국어 ٣".encode()]
    for tok in range(3):
        for i, text in enumerate(texts):
            write(t, "text%d_%d" % (tok, i), bytes([tok]) + text)
    write(t, "ids16_demo", bytes([0x80]) + struct.pack("<8H", 72, 101, 0xE4, 0xBD, 0xA0, 256, 257, 300))
    write(t, "ids16_llama3", bytes([0x81]) + struct.pack("<6H", 9906, 1917, 65000, 60000, 220, 0))
    write(t, "ids16_llama2", bytes([0x82]) + struct.pack("<6H", 1, 15043, 3186, 232, 162, 31999))
    write(t, "ids32", bytes([0xC1]) + struct.pack("<6i", 9906, -1, 1 << 30, 128255, 128000, 128001))


def stop_strings_seeds():
    t = "stop_strings_fuzz"

    def seed(stops, tokens):
        out = bytes([len(stops)])
        for s in stops:
            out += bytes([len(s)]) + s
        for tok in tokens:
            out += bytes([len(tok)]) + tok
        return out

    write(t, "simple", seed([b"\n\n"], [b"Hello", b" world", b"\n", b"\n", b"more"]))
    write(t, "span", seed([b"STOP", b"ab"], [b"xS", b"TO", b"P", b"a"]))
    write(t, "utf8", seed(["世界".encode()], ["你".encode(), b"\xe5", b"\xa5\xbd\xe4", b"\xb8\x96",
                                              "界".encode(), b"!"]))
    write(t, "invalid", seed([b"x"], [b"\xff\xe2\x82", b"\xe2", b"\x82\xac", b"\xf0\x9f"]))
    write(t, "nostop", seed([], [b"plain ", "text é".encode(), b"\xc3"]))
    write(t, "prefix_overlap", seed([b"abc", b"bcd", b"c"], [b"ab", b"b", b"cd"]))


# --- model config ------------------------------------------------------------------------------

def model_config_seeds():
    t = "model_config_fuzz"
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 260,
             "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
             "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 257,
             "attention_bias": False, "hidden_act": "silu", "torch_dtype": "float32"}
    gen = {"bos_token_id": 256, "eos_token_id": [257, 258], "temperature": 0.6, "top_p": 0.9,
           "top_k": 50, "min_p": 0.05, "repetition_penalty": 1.1, "do_sample": True}
    write(t, "llama", json.dumps(llama))
    write(t, "llama_gen", json.dumps(llama).encode() + SEP + json.dumps(gen).encode())
    l3 = dict(llama, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}, max_position_embeddings=131072,
        eos_token_id=[257, 259])
    write(t, "llama3_rope", json.dumps(l3))
    t5 = dict(llama)
    del t5["rope_theta"]
    t5["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    write(t, "transformers5", json.dumps(t5))
    mistral = dict(llama, architectures=["MistralForCausalLM"], model_type="mistral",
                   sliding_window=4096)
    write(t, "mistral", json.dumps(mistral))
    qwen = dict(llama, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                use_sliding_window=False, tie_word_embeddings=True, attention_bias=True)
    write(t, "qwen2", json.dumps(qwen))
    index = {"metadata": {"total_size": 100}, "weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}
    write(t, "sharded", json.dumps(llama).encode() + SEP + json.dumps(gen).encode() + SEP +
          json.dumps(index).encode())
    write(t, "bad_arch", json.dumps(dict(llama, architectures=["GPT2LMHeadModel"])))
    write(t, "yarn", json.dumps(dict(llama, rope_scaling={"type": "yarn", "factor": 4.0})))


# --- adapters (tiny base: 2 layers, hidden 32, intermediate 48, kv 16) -------------------------

IN_OUT = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
          "gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}


def adapter_seed(peft, config, tensors, extra=None):
    out = (b"P" if peft else b"M") + json.dumps(config).encode() + SEP + safetensors(tensors)
    if extra is not None:
        out += SEP + safetensors(extra)
    return out


def mole_base(family):
    return {"format": "mole", "format_version": 1, "name": "seed", "source_family": family,
            "base_model": {"num_layers": 2, "hidden_size": 32}, "weight_dtype": "bf16"}


def adapter_seeds():
    t = "adapter_config_fuzz"
    # MoLA-style: a module-scope top-k group of 2 experts, rank 1, on q_proj of layer 0.
    cfg = mole_base("mola")
    cfg["routed_groups"] = [{
        "id": "g", "scope": "module", "targets": {"layers": [0], "modules": ["q_proj"]},
        "granularity": "lora", "num_experts": 2, "rank": 1, "scale": 2.0,
        "router": {"type": "linear", "bias": True},
        "routing": {"algorithm": "topk", "k": 1}}]
    tensors = [("groups.g.layers.0.q_proj.A", "BF16", [2, 1, 32], None),
               ("groups.g.layers.0.q_proj.B", "BF16", [2, 32, 1], None),
               ("groups.g.layers.0.q_proj.router.weight", "BF16", [2, 32], None),
               ("groups.g.layers.0.q_proj.router.bias", "BF16", [2], None)]
    write(t, "mole_module_topk", adapter_seed(False, cfg, tensors))
    # Same, split over two safetensors files.
    write(t, "mole_two_files", adapter_seed(False, cfg, tensors[:2], tensors[2:]))
    # Static LoRA + per-layer lists.
    cfg = mole_base("lora")
    cfg["static_loras"] = [{"id": "s", "targets": {"layers": "all", "modules": ["v_proj"]},
                            "rank": 1, "scale": [1.0, 0.5]}]
    tensors = []
    for l in range(2):
        tensors += [("static.s.layers.%d.v_proj.A" % l, "BF16", [1, 32], None),
                    ("static.s.layers.%d.v_proj.B" % l, "F16", [16, 1], None)]
    tensors.append(("static.s.layers.1.v_proj.scale", "F32", [], [0.25]))
    write(t, "mole_static", adapter_seed(False, cfg, tensors))
    # MixLoRA: block_ffn on layer 1, top-p / dynmole routing variants.
    for alg, routing in [("topk", {"algorithm": "topk", "k": 2, "renormalize": True}),
                         ("top_p", {"algorithm": "top_p", "p": 0.5, "p_mode": "within"}),
                         ("dynmole", {"algorithm": "dynmole", "p": 0.8, "min_k": 1,
                                      "entropy": {"type": "tsallis", "q": 1.5, "threshold": 0.9,
                                                  "eps": 1e-6}}),
                         ("switch", {"algorithm": "switch", "k": 1}),
                         ("soft", {"algorithm": "soft", "temperature": 2.0})]:
        cfg = mole_base("mixlora")
        cfg["routed_groups"] = [{
            "id": "ffn", "scope": "block_ffn",
            "targets": {"layers": [1], "modules": ["gate_proj", "down_proj"]},
            "granularity": "lora", "num_experts": 2, "rank": 1, "scale": 1.0, "act_fn": "silu",
            "router": {"type": "linear"}, "routing": routing}]
        tensors = [("groups.ffn.layers.1.router.weight", "BF16", [2, 32], None),
                   ("groups.ffn.layers.1.gate_proj.A", "BF16", [2, 1, 32], None),
                   ("groups.ffn.layers.1.gate_proj.B", "BF16", [2, 48, 1], None),
                   ("groups.ffn.layers.1.down_proj.A", "BF16", [2, 1, 48], None),
                   ("groups.ffn.layers.1.down_proj.B", "BF16", [2, 32, 1], None)]
        write(t, "mole_block_ffn_" + alg, adapter_seed(False, cfg, tensors))
    # FlyLoRA (rank granularity, implicit_A) and SMoRA (linear rank router with select_bias).
    for name, router in [("flylora", {"type": "implicit_A"}),
                         ("smora", {"type": "linear", "select_bias": True})]:
        cfg = mole_base(name)
        cfg["routed_groups"] = [{
            "id": "r", "scope": "module", "targets": {"layers": [0], "modules": ["o_proj"]},
            "granularity": "rank", "num_experts": 1, "rank": 4, "scale": 1.0,
            "router": router, "routing": {"algorithm": "rank_topk", "k": 2}}]
        tensors = [("groups.r.layers.0.o_proj.A", "BF16", [1, 4, 32], None),
                   ("groups.r.layers.0.o_proj.B", "BF16", [1, 32, 4], None)]
        if name == "smora":
            tensors += [("groups.r.layers.0.o_proj.router.weight", "BF16", [4, 32], None),
                        ("groups.r.layers.0.o_proj.router.select_bias", "F32", [4], None)]
        write(t, "mole_" + name, adapter_seed(False, cfg, tensors))
    # X-LoRA: two adapters as the experts of a model_scalings group, a depth-1 classifier.
    cfg = mole_base("xlora")
    cfg["routed_groups"] = [{
        "id": "x", "scope": "model_scalings", "targets": {"layers": "all", "modules": ["q_proj"]},
        "granularity": "lora", "num_experts": 2, "rank": 1, "true_ranks": [1, 1],
        "router": {"type": "xlora_ref"}, "routing": {"algorithm": "soft"}}]
    cfg["xlora"] = {"adapters": ["a0", "a1"],
                    "classifier": {"depth": 1, "hidden": 4, "bias": True, "relu": True},
                    "layerwise_scalings": False, "enable_softmax": True,
                    "softmax_temperature": 1.0, "top_k": None, "softmax_topk": False,
                    "scaling_pass_value": 0.0, "global_scaling_weight": 1.0,
                    "module_index": {"layers.0.q_proj": 0, "layers.1.q_proj": 1}}
    cfg["inference"] = {"freeze_scalings_after": None}
    tensors = [("xlora.classifier.0.weight", "BF16", [2, 32], None),
               ("xlora.classifier.0.bias", "BF16", [2], None)]
    for l in range(2):
        tensors += [("groups.x.layers.%d.q_proj.A" % l, "BF16", [2, 1, 32], None),
                    ("groups.x.layers.%d.q_proj.B" % l, "BF16", [2, 32, 1], None),
                    ("groups.x.layers.%d.q_proj.scale" % l, "F32", [2], [1.0, 0.5])]
    write(t, "mole_xlora", adapter_seed(False, cfg, tensors))
    # PEFT LoRA.
    peft = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj", "down_proj"],
            "use_rslora": False, "bias": "none", "modules_to_save": None, "use_dora": False,
            "rank_pattern": {"model.layers.1.mlp.down_proj": 2}, "alpha_pattern": {"q_proj": 4},
            "layers_to_transform": None}
    tensors = []
    for l in range(2):
        p = "base_model.model.model.layers.%d" % l
        r = 2 if l == 1 else 1
        tensors += [(p + ".self_attn.q_proj.lora_A.weight", "BF16", [1, 32], None),
                    (p + ".self_attn.q_proj.lora_B.weight", "BF16", [32, 1], None),
                    (p + ".mlp.down_proj.lora_A.weight", "BF16", [r, 48], None),
                    (p + ".mlp.down_proj.lora_B.weight", "BF16", [32, r], None)]
    write(t, "peft", adapter_seed(True, peft, tensors))
    peft2 = dict(peft, target_modules="all-linear", use_rslora=True, layers_to_transform=[0],
                 rank_pattern={}, alpha_pattern={})
    tensors = []
    p = "base_model.model.model.layers.0"
    for m, (i, o) in IN_OUT.items():
        sub = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
        tensors += [("%s.%s.%s.lora_A.weight" % (p, sub, m), "BF16", [1, i], None),
                    ("%s.%s.%s.lora_B.weight" % (p, sub, m), "BF16", [o, 1], None)]
    write(t, "peft_all_linear", adapter_seed(True, peft2, tensors))
    peft3 = dict(peft, target_modules=r".*\.(q|v)_proj", rank_pattern={}, alpha_pattern={})
    tensors = []
    for l in range(2):
        p = "base_model.model.model.layers.%d.self_attn" % l
        tensors += [(p + ".q_proj.lora_A.weight", "BF16", [1, 32], None),
                    (p + ".q_proj.lora_B.weight", "BF16", [32, 1], None),
                    (p + ".v_proj.lora_A.weight", "BF16", [1, 32], None),
                    (p + ".v_proj.lora_B.weight", "BF16", [16, 1], None)]
    write(t, "peft_regex", adapter_seed(True, peft3, tensors))


# --- protobuf requests (hand-encoded wire format) ----------------------------------------------

def varint(n):
    n &= (1 << 64) - 1
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 0:
        return key + varint(payload)
    if wire == 2:
        if isinstance(payload, str):
            payload = payload.encode()
        return key + varint(len(payload)) + payload
    if wire == 5:
        return key + struct.pack("<f", payload)
    raise ValueError(wire)


def generate_request_seeds():
    t = "generate_request_fuzz"
    sampling = (field(1, 5, 0.8) + field(2, 5, 0.9) + field(3, 0, 40) + field(4, 5, 0.05) +
                field(5, 5, 1.1) + field(6, 5, 0.1) + field(7, 5, 0.2) + field(8, 0, 7))
    stopping = field(1, 0, 16) + field(2, 2, "\n\n") + field(2, 2, "END") + field(3, 2, varint(257)) + \
        field(4, 0, 1)
    output = field(1, 0, 1) + field(2, 0, 5) + field(3, 0, 1)
    write(t, "text", field(1, 2, "req-1") + field(3, 2, "Hello world") + field(6, 2, sampling) +
          field(7, 2, stopping) + field(8, 2, output))
    ids = b"".join(varint(i) for i in [256, 72, 105, 33])
    write(t, "token_ids", field(4, 2, field(1, 2, ids)) + field(5, 0, 0) + field(10, 0, 3))
    write(t, "adapter_override", field(2, 2, "demo") + field(3, 2, "Hi") +
          field(9, 2, field(1, 2, "top_p") + field(3, 5, 0.7)) + field(8, 2, field(3, 0, 1)))
    write(t, "adapter_k", field(2, 2, "demo") + field(3, 2, "x") + field(9, 2, field(2, 0, 1)))
    write(t, "greedy_long", field(3, 2, "a" * 40) + field(6, 2, field(1, 5, 0.0)) +
          field(7, 2, field(1, 0, 2000)))
    write(t, "unknown_adapter", field(2, 2, "nope") + field(3, 2, "Hi"))
    write(t, "bad_ids", field(4, 2, field(1, 2, varint(1 << 31) + varint(5))))
    write(t, "empty", b"")


def admin_request_seeds():
    t = "admin_request_fuzz"
    write(t, "proto_good", field(1, 2, "my-adapter") + field(2, 2, "good") +
          field(3, 2, "0" * 64) + field(4, 0, 1))
    write(t, "proto_sub", field(1, 2, "a.b_c") + field(2, 2, "good/sub/"))
    write(t, "proto_escape", field(1, 2, "x") + field(2, 2, "out"))
    write(t, "proto_leaky", field(1, 2, "x") + field(2, 2, "leaky"))
    write(t, "proto_self", field(1, 2, "x") + field(2, 2, "self/self/good"))
    write(t, "proto_dotdot", field(1, 2, "x") + field(2, 2, "good/../good"))
    write(t, "raw_split", b"name\xffgood/./sub\xff" + b"ab" * 32)
    write(t, "raw_bad", b"bad name\xff/abs\xffXYZ")
    write(t, "raw_file", b"n\xfffile.txt\xff")


def main():
    clean()
    safetensors_seeds()
    tokenizer_seeds()
    tokenizer_codec_seeds()
    stop_strings_seeds()
    model_config_seeds()
    adapter_seeds()
    generate_request_seeds()
    admin_request_seeds()
    return 0


if __name__ == "__main__":
    sys.exit(main())
