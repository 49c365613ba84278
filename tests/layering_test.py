#!/usr/bin/env python3
"""Checks the dependency rule of DESIGN.md section 2 on every source file's #include lines.

- engine/ never includes gRPC, protobuf, prometheus or generated proto headers;
- kernels/ never includes absl, engine/ or server/;
- kernels/cpu and kernels/common never include CUDA headers;
- only engine/backend (and kernels/cuda itself, and tests) include kernels/cuda;
- host .cc files never include a .cuh.
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
        if path.suffix == ".cc" and inc.endswith(".cuh"):
            violations.append(f"{rel}: includes {inc}: host .cc files never include a .cuh")
for v in violations:
    print(v)
print(f"layering: {checked} files checked, {len(violations)} violations")
sys.exit(1 if violations or checked == 0 else 0)
