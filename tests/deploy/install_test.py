#!/usr/bin/env python3
"""scripts/install.sh, the last build step of both Docker images, makes a self-contained bundle.

    install_test.py BUILD_DIR

Installs BUILD_DIR into a temporary prefix, then checks that with LD_LIBRARY_PATH=PREFIX/lib
every shared library the binaries (and the CUDA plugin, when built) load resolves inside the
bundle, except those the runtime images provide (glibc, the C++ runtime, CUDA); that the
installed moleserve serves and answers the health probe the images use (molectl health); and
that it finds its CUDA plugin in PREFIX/lib.
"""

import os
import re
import subprocess
import sys
import tempfile

from harness import REPO, Moleserve, check, molectl, run, run_tests

BUILD_DIR = os.path.abspath(sys.argv[1])
# What install.sh leaves to the base image; anything else outside the bundle is a missing library.
SYSTEM = re.compile(r"^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libresolv|libutil|"
                    r"libstdc\+\+|libgcc_s|libcuda|libcudart|libcublas|libcublasLt|libnvidia)\.so")


def test_bundle(tmp):
    prefix = os.path.join(tmp, "prefix")
    r = run([os.path.join(REPO, "scripts/install.sh"), prefix, BUILD_DIR], timeout=120)
    check(r.returncode == 0, f"install.sh failed:\n{r.stdout}\n{r.stderr}")
    lib = os.path.join(prefix, "lib")
    objects = [os.path.join(prefix, "bin", b) for b in ("moleserve", "molectl")]
    plugin = os.path.join(lib, "libmoleserve_cuda.so")
    built_plugin = os.path.exists(os.path.join(BUILD_DIR, "lib", "libmoleserve_cuda.so"))
    check(os.path.exists(plugin) == built_plugin, "the CUDA plugin was not installed")
    if built_plugin:
        objects.append(plugin)
    env = dict(os.environ, LD_LIBRARY_PATH=lib)
    for obj in objects:
        check(os.access(obj, os.X_OK) or obj.endswith(".so"), f"{obj} missing")
        out = subprocess.run(["ldd", obj], env=env, capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.match(r"\s*(\S+) => (\S+)", line)
            if not m or SYSTEM.match(m.group(1)):
                continue
            check(m.group(2) != "not" and m.group(2).startswith(lib + "/"),
                  f"{os.path.basename(obj)}: {m.group(1)} resolves to {m.group(2)}, "
                  "outside the bundle")

    # The installed server runs from the bundle and answers the images' health probe.
    os.environ["LD_LIBRARY_PATH"] = lib
    moleserve, ctl = objects[0], objects[1]
    server = Moleserve(moleserve, ["--admin-port", "-1"], os.path.join(tmp, "server.log"))
    try:
        server.wait_ready()
        r = molectl(ctl, "health", "--addr", f"127.0.0.1:{server.port}", "--timeout", "5s")
        check(r.returncode == 0, f"molectl health: {r.stdout} {r.stderr}")
        r = molectl(ctl, "generate", "--addr", f"127.0.0.1:{server.port}", "--text", "hi",
                    "--max-new-tokens", "4", "--temperature", "0")
        check(r.returncode == 0, f"molectl generate: {r.stderr}")
    finally:
        server.stop()
    if built_plugin and not os.path.exists("/dev/nvidia0"):
        # --backend cuda finds the plugin next to the binary (../lib): without a GPU the error is
        # about the device, not about a missing plugin.
        r = run([moleserve, "--backend", "cuda", "--port", "0", "--http-port", "-1",
                 "--metrics-port", "-1",
                 "--admin-port", "-1"], timeout=60)
        log = r.stdout + r.stderr
        check("cannot load the CUDA backend plugin" not in log, f"plugin not found:\n{log}")
        check(r.returncode == 0 or "no CUDA device" in log or "serving gRPC" in log, log)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="moleserve_install_") as tmp:
        sys.exit(run_tests([("bundle", test_bundle)], tmp))
