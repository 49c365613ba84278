#!/usr/bin/env python3
"""Checks the dependency rule of DESIGN.md section 2 on every source file's #include lines.

- engine/ never includes gRPC, protobuf, prometheus or generated proto headers;
- kernels/ never includes absl, engine/ or server/;
- kernels/cpu and kernels/common never include CUDA headers;
- only engine/backend (and kernels/cuda itself, and tests) include kernels/cuda;
- host .cc files never include a .cuh;
- a folder of engine/ includes only folders of a lower layer than its own (ENGINE_LAYERS; the
  top-level engine/*.h are shared types, and engine/engine.cc is the facade above them all).
Prints one line per violation; exit 1 when there is any.
"""
import pathlib
import re
import sys

root = pathlib.Path(sys.argv[1])
include = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)
rules = [
    ("engine/", re.compile(r"^(grpc|grpcpp|google/protobuf|prometheus|moleserve/v1)/"),
     "engine must not see gRPC, protobuf or prometheus"),
    ("kernels/", re.compile(r"^(absl|engine|server)/"), "kernels must not include absl/engine/server"),
    ("kernels/cpu/", re.compile(r"^(cuda|cublas|cuda_runtime|kernels/cuda)"), "no CUDA in kernels/cpu"),
    ("kernels/common/", re.compile(r"^(cuda|cublas|cuda_runtime)"), "no CUDA in kernels/common"),
]
# engine/ folders by layer: one includes only folders of lower layers (and itself).
ENGINE_LAYERS = {
    "core": 0,
    "model_io": 1, "backend": 1, "chat": 1, "tokenizer": 1, "kv_cache": 1, "routing": 1,
    "sampling": 2, "adapters": 2,
    "expert_cache": 3, "scheduler": 3, "lifecycle": 3,
    "model": 4,
    "executor": 5,
}
engine_folder = re.compile(r"^engine/([a-z_]+)/")
violations = []
checked = 0
for path in sorted(root.rglob("*")):
    rel = path.relative_to(root).as_posix()
    if path.suffix not in {".h", ".cc", ".cu", ".cuh"} or rel.startswith(("build/", ".")):
        continue
    checked += 1
    for inc in include.findall(path.read_text(errors="replace")):
        for prefix, pattern, why in rules:
            if rel.startswith(prefix) and pattern.search(inc):
                violations.append(f"{rel}: includes {inc}: {why}")
        if inc.startswith("kernels/cuda/") and not rel.startswith(
                ("engine/backend/", "kernels/cuda/", "tests/", "bench/")):
            violations.append(f"{rel}: includes {inc}: only engine/backend may use kernels/cuda")
        own, dep = engine_folder.match(rel), engine_folder.match(inc)
        if own and dep and own.group(1) != dep.group(1):
            mine, theirs = ENGINE_LAYERS.get(own.group(1)), ENGINE_LAYERS.get(dep.group(1))
            if mine is None or theirs is None:
                violations.append(f"{rel}: engine/{own.group(1) if mine is None else dep.group(1)}"
                                  " has no layer in tests/layering_test.py ENGINE_LAYERS")
            elif theirs >= mine:
                violations.append(f"{rel}: includes {inc}: engine/{own.group(1)} (layer {mine}) "
                                  f"may not depend on engine/{dep.group(1)} (layer {theirs})")
        if path.suffix == ".cc" and inc.endswith(".cuh"):
            violations.append(f"{rel}: includes {inc}: host .cc files never include a .cuh")
for v in violations:
    print(v)
print(f"layering: {checked} files checked, {len(violations)} violations")
sys.exit(1 if violations or checked == 0 else 0)
