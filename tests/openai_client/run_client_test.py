#!/usr/bin/env python3
"""ctest openai_client_test: moleserve (demo model, a demo MoLE adapter, the ChatML template of
tests/chat_template) driven by the official `openai` SDK for JavaScript (client_test.js).

    run_client_test.py MOLESERVE WRITE_DEMO_ADAPTERS

Exits 77 (skipped) without node or node_modules, or 1 when CI=true, where scripts/setup.sh must
have run `npm ci` here. Every child runs under a timeout and is killed on the way out.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def main():
    moleserve, write_adapters = sys.argv[1], sys.argv[2]
    missing = None
    if shutil.which("node") is None:
        missing = "node is not installed"
    elif not os.path.isdir(os.path.join(HERE, "node_modules", "openai")):
        missing = f"{HERE}/node_modules is missing (run: npm ci --prefix {HERE})"
    if missing:
        if os.environ.get("CI") == "true":
            print(f"openai_client: FAILED: {missing}", file=sys.stderr)
            return 1
        print(f"openai_client: skipped: {missing}")
        return 77
    tmp = tempfile.mkdtemp(prefix="openai_client_")
    server = None
    try:
        r = subprocess.run([write_adapters, "--dir", tmp, "--count", "1", "--experts", "4",
                            "--rank", "4"], capture_output=True, timeout=120)
        if r.returncode != 0:
            print(f"writing the adapter failed: {r.stderr!r}", file=sys.stderr)
            return 1
        log_path = os.path.join(tmp, "moleserve.log")
        log = open(log_path, "wb")
        server = subprocess.Popen(
            [moleserve, "--port", "0", "--http-port", "0", "--http-host", "127.0.0.1",
             "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--admin-port", "-1",
             "--threads", "2",
             "--adapter", f"mole={os.path.join(tmp, 'a0')}",
             "--chat-template", os.path.join(REPO, "tests/chat_template/templates/chatml.jinja")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        port = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and port is None:
            with open(log_path, "rb") as f:
                m = re.search(rb"OpenAI-compatible HTTP API on [^\s:]+:(\d+)", f.read())
            if m:
                port = int(m.group(1))
            elif server.poll() is not None:
                break
            else:
                time.sleep(0.05)
        if port is None:
            with open(log_path, "rb") as f:
                print(f"moleserve did not serve HTTP:\n{f.read().decode(errors='replace')}",
                      file=sys.stderr)
            return 1
        r = subprocess.run(["node", os.path.join(HERE, "client_test.js"),
                            f"http://127.0.0.1:{port}/v1", "moleserve-demo", "mole"],
                           timeout=240)
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        if code != 0:
            print(f"moleserve exited {code} after SIGTERM", file=sys.stderr)
            return 1
        return r.returncode
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
