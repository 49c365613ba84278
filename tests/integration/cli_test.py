#!/usr/bin/env python3
"""End-to-end test of the moleserve and molectl binaries (Python 3 standard library only).

    cli_test.py MOLESERVE MOLECTL MOLESERVE_WRITE_DEMO

Writes the demo model to a directory, serves it, drives it with molectl (health, list,
generate), checks that the built-in model gives the same greedy output as the directory round
trip, that SIGTERM drains and exits 0, and that broken model directories make moleserve exit
non-zero naming the bad file. Every child process runs under a timeout and is killed on the way
out. Prints "N passed, M failed" and exits non-zero on any failure.
"""

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback

STARTUP_TIMEOUT_S = 60
COMMAND_TIMEOUT_S = 60
SHUTDOWN_TIMEOUT_S = 30
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PORT_RE = re.compile(r"serving gRPC on [^\s:]+:(\d+)")


class TestFailure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise TestFailure(message)


def run(cmd, timeout=COMMAND_TIMEOUT_S):
    """Runs cmd to completion (bounded); returns the CompletedProcess with text output."""
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise TestFailure(f"timed out after {timeout}s: {' '.join(cmd)}") from e


def text(b):
    return b.decode("utf-8", errors="replace")


class Server:
    """A moleserve child process whose combined output goes to a log file."""

    def __init__(self, moleserve, args, log_path):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [moleserve, "--port", "0", "--http-port", "0", "--metrics-port", "0", "--threads",
             "1"] + args,
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.port = None

    def output(self):
        with open(self.log_path, "rb") as f:
            return text(f.read())

    def wait_ready(self):
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            m = PORT_RE.search(self.output())
            if m:
                self.port = int(m.group(1))
                check(self.port > 0, f"bad port in log: {m.group(0)}")
                return self.port
            if self.proc.poll() is not None:
                raise TestFailure(f"moleserve exited with {self.proc.returncode} before serving:\n"
                                  f"{self.output()}")
            time.sleep(0.05)
        raise TestFailure(f"moleserve did not log its port within {STARTUP_TIMEOUT_S}s:\n"
                          f"{self.output()}")

    def terminate(self):
        """SIGTERM; returns the exit code (bounded wait)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise TestFailure(f"moleserve did not exit within {SHUTDOWN_TIMEOUT_S}s of SIGTERM")\
                from e

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.log.close()


class Suite:
    def __init__(self, moleserve, molectl, write_demo, tmp):
        self.moleserve = moleserve
        self.molectl = molectl
        self.write_demo = write_demo
        self.tmp = tmp
        self.model_dir = os.path.join(tmp, "demo-model")
        self.directory_generate_stdout = None

    def molectl_cmd(self, port, *args):
        return run([self.molectl, "--addr", f"127.0.0.1:{port}"] + list(args))

    def generate(self, port):
        r = self.molectl_cmd(port, "generate", "--text", "Hello", "--max-new-tokens", "16",
                             "--temperature", "0", "--ignore-eos")
        check(r.returncode == 0,
              f"generate exit {r.returncode}: {text(r.stdout)} {text(r.stderr)}")
        err = text(r.stderr)
        check("generated_tokens=16" in err, f"summary lacks generated_tokens=16: {err!r}")
        check("FINISH_REASON_LENGTH" in err, f"summary lacks the finish reason: {err!r}")
        check(r.stdout.endswith(b"\n"), f"generate stdout not newline-terminated: {r.stdout!r}")
        return r.stdout

    # ---------------------------------------------------------------------------------------
    def test_write_demo_model(self):
        r = run([self.write_demo, "--out", self.model_dir])
        check(r.returncode == 0, f"moleserve-write-demo exit {r.returncode}: {text(r.stderr)}")
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            path = os.path.join(self.model_dir, name)
            check(os.path.isfile(path) and os.path.getsize(path) > 0, f"missing {path}")

    def test_serve_model_directory(self):
        check(os.path.isdir(self.model_dir), "the demo model was not written")
        server = Server(self.moleserve, ["--model", self.model_dir],
                        os.path.join(self.tmp, "serve-dir.log"))
        try:
            port = server.wait_ready()
            r = self.molectl_cmd(port, "health")
            check(r.returncode == 0, f"health exit {r.returncode}: {text(r.stderr)}")
            check(text(r.stdout).strip() == "SERVING", f"health printed {text(r.stdout)!r}")
            r = self.molectl_cmd(port, "health", "--service", "moleserve.v1.Inference")
            check(r.returncode == 0 and "SERVING" in text(r.stdout),
                  f"service health: {r.returncode} {text(r.stdout)} {text(r.stderr)}")

            r = self.molectl_cmd(port, "list")
            check(r.returncode == 0, f"list exit {r.returncode}: {text(r.stderr)}")
            check("moleserve-demo" in text(r.stdout), f"list output: {text(r.stdout)!r}")
            check("vocab 260" in text(r.stdout), f"list output: {text(r.stdout)!r}")

            out = self.generate(port)
            check(len(out) > 1, "generate printed no text")
            self.directory_generate_stdout = out

            # --n 3, greedy: three sequences, each the text of the single call above.
            r = self.molectl_cmd(port, "generate", "--text", "Hello", "--max-new-tokens", "16",
                                 "--temperature", "0", "--ignore-eos", "--n", "3")
            check(r.returncode == 0, f"generate --n 3 exit {r.returncode}: {text(r.stderr)}")
            single = out[:-1]  # without the final newline
            for i in range(3):
                check(f"[{i}] ".encode() + single + b"\n" in r.stdout,
                      f"sequence {i} missing or not the single call's text: {r.stdout!r}")
                check(f"[{i}] finish=FINISH_REASON_LENGTH" in text(r.stderr),
                      f"no summary for sequence {i}: {text(r.stderr)!r}")
            r = self.molectl_cmd(port, "generate", "--text", "Hello", "--n", "17")
            check(r.returncode != 0 and "at most 16" in text(r.stderr),
                  f"n above --max-n: {r.returncode} {text(r.stderr)!r}")

            r = self.molectl_cmd(port, "generate", "--text", "Hello", "--max-new-tokens",
                                 "5000")
            check(r.returncode != 0, "max_new_tokens past the context was accepted")
            check("context" in text(r.stderr), f"error lacks the reason: {text(r.stderr)!r}")

            code = server.terminate()
            check(code == 0, f"exit code {code} after SIGTERM:\n{server.output()}")
            check("drained" in server.output(), f"no 'drained' log line:\n{server.output()}")
        finally:
            server.kill()

    def test_builtin_model_matches_directory(self):
        check(self.directory_generate_stdout is not None,
              "no output from the directory-served model to compare with")
        server = Server(self.moleserve, [], os.path.join(self.tmp, "serve-builtin.log"))
        try:
            port = server.wait_ready()
            out = self.generate(port)
            check(out == self.directory_generate_stdout,
                  f"built-in model output {out!r} != directory model output "
                  f"{self.directory_generate_stdout!r}")
            code = server.terminate()
            check(code == 0, f"exit code {code} after SIGTERM:\n{server.output()}")
            check("drained" in server.output(), f"no 'drained' log line:\n{server.output()}")
        finally:
            server.kill()

    def test_serve_adapters(self):
        """--adapter name=DIR (PEFT LoRA loaded directly, MixLoRA converted from its public
        .bin layout by tools/mole_convert.py), listed, routed per request; a broken adapter
        stops startup with its name."""
        check(os.path.isdir(self.model_dir), "the demo model was not written")
        public = os.path.join(self.tmp, "public-adapters")
        r = run([sys.executable, os.path.join(REPO, "tests/mole/make_public_adapters.py"),
                 self.model_dir, public], timeout=300)
        check(r.returncode == 0, f"make_public_adapters.py: {text(r.stdout)} {text(r.stderr)}")
        mix = os.path.join(self.tmp, "mixlora-mole")
        r = run([sys.executable, os.path.join(REPO, "tools/mole_convert.py"),
                 os.path.join(public, "mixlora"), mix])
        check(r.returncode == 0, f"mole_convert.py: {text(r.stdout)} {text(r.stderr)}")
        lora = os.path.join(public, "peft_lora")
        server = Server(self.moleserve, ["--model", self.model_dir, "--adapter", f"lora={lora}",
                                         f"--adapter=mix={mix}"],
                        os.path.join(self.tmp, "serve-adapters.log"))
        try:
            port = server.wait_ready()
            r = self.molectl_cmd(port, "list")
            out = text(r.stdout)
            check(r.returncode == 0 and "adapter: lora ADAPTER_STATE_READY lora (peft" in out
                  and "adapter: mix ADAPTER_STATE_READY mixlora (mole/1" in out,
                  f"list output: {out!r} {text(r.stderr)}")
            r = self.molectl_cmd(port, "generate", "--adapter", "mix", "--text", "Hello",
                                 "--max-new-tokens", "4", "--temperature", "0", "--routing")
            err = text(r.stderr)
            check(r.returncode == 0 and "routing: 0.ffn={" in err,
                  f"generate --routing: {r.returncode} {err!r}")
            r = self.molectl_cmd(port, "generate", "--adapter", "nope", "--text", "Hello")
            check(r.returncode != 0 and "is not loaded" in text(r.stderr),
                  f"unknown adapter: {r.returncode} {text(r.stderr)!r}")
            check(server.terminate() == 0, f"exit after SIGTERM:\n{server.output()}")
        finally:
            server.kill()
        # A NaN in an adapter stops startup, naming the adapter and the tensor.
        bad = os.path.join(self.tmp, "nan-lora")
        shutil.copytree(lora, bad)
        path = os.path.join(bad, "adapter_model.safetensors")
        with open(path, "r+b") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            f.seek(8 + header_len)
            f.write(struct.pack("<f", float("nan")))
        self.expect_startup_failure(self.model_dir, "nan-adapter", "adapter 'bad'",
                                    ["--adapter", f"bad={bad}"])
        self.expect_startup_failure(self.model_dir, "bad-flag", "expected name=DIR",
                                    ["--adapter", "just-a-dir"])

    def expect_startup_failure(self, model_dir, name, must_mention, extra_args=()):
        server = Server(self.moleserve, ["--model", model_dir] + list(extra_args),
                        os.path.join(self.tmp, f"{name}.log"))
        try:
            try:
                code = server.proc.wait(timeout=STARTUP_TIMEOUT_S)
            except subprocess.TimeoutExpired as e:
                raise TestFailure(f"moleserve kept running with a broken model:\n"
                                  f"{server.output()}") from e
            out = server.output()
            check(code is not None and code > 0, f"moleserve did not exit with an error (code {code}; negative = killed by a signal):\n{out}")
            check(must_mention in out, f"the error does not name {must_mention}:\n{out}")
            check(not PORT_RE.search(out), f"moleserve served a broken model:\n{out}")
        finally:
            server.kill()

    def test_tls_listeners_fifo_and_audit(self):
        """TLS on both listeners (molectl with and without a CA), a FIFO in the adapter root
        refused at once, unauthenticated admin calls whose strings cannot forge audit lines,
        every listening socket logged, and a SIGTERM drain that exits."""
        pki = os.path.join(self.tmp, "pki")
        os.makedirs(pki)
        with open(os.path.join(pki, "san.ext"), "w") as f:
            f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for cmd in (["openssl", "req", "-x509"] + ec + ["-keyout", "ca.key", "-out", "ca.pem",
                                                        "-days", "2", "-subj", "/CN=ca"],
                    ["openssl", "req"] + ec + ["-keyout", "server.key", "-out", "server.csr",
                                               "-subj", "/CN=localhost"],
                    ["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey",
                     "ca.key", "-CAcreateserial", "-days", "2", "-out", "server.pem",
                     "-extfile", "san.ext"]):
            r = subprocess.run(cmd, cwd=pki, capture_output=True, timeout=COMMAND_TIMEOUT_S)
            check(r.returncode == 0, f"{' '.join(cmd)}: {text(r.stderr)}")
        root = os.path.join(self.tmp, "tls-root")
        os.makedirs(os.path.join(root, "fifo"))
        with open(os.path.join(root, "fifo", "adapter_config.json"), "w") as f:
            f.write('{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}')
        os.mkfifo(os.path.join(root, "fifo", "adapter_model.safetensors"))
        token = os.path.join(self.tmp, "tls-token")
        with open(token, "w") as f:
            f.write("tls-test-token-0123456789abcdef\n")
        server = Server(self.moleserve,
                        ["--tls-cert-file", os.path.join(pki, "server.pem"),
                         "--tls-key-file", os.path.join(pki, "server.key"),
                         "--admin-port", "0", "--admin-token-file", token,
                         "--adapter-root", root],
                        os.path.join(self.tmp, "tls.log"))
        try:
            port = server.wait_ready()
            admin_re = re.compile(r"serving AdapterAdmin on 127\.0\.0\.1:(\d+) \(TLS")
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not admin_re.search(server.output()) and time.monotonic() < deadline:
                time.sleep(0.05)
            m = admin_re.search(server.output())
            check(m, f"no TLS admin listener in the log:\n{server.output()}")
            admin_port = int(m.group(1))
            tls = ["--tls-ca-file", os.path.join(pki, "ca.pem")]
            r = self.molectl_cmd(port, "health", *tls)
            check(r.returncode == 0 and b"SERVING" in r.stdout,
                  f"health over TLS: {r.returncode} {text(r.stdout)} {text(r.stderr)}")
            r = self.molectl_cmd(port, "health", "--timeout", "5s")
            check(r.returncode != 0, "a plaintext client was served by the TLS listener")
            admin = [self.molectl, "--admin-addr", f"127.0.0.1:{admin_port}"] + tls
            # run() fails the test if the load blocks past its timeout.
            r = run(admin + ["--admin-token-file", token, "admin", "load", "fifo", "fifo"])
            check(r.returncode != 0 and "FIFO" in text(r.stderr),
                  f"FIFO load: {r.returncode} {text(r.stderr)!r}")
            forged = "x\nadmin audit: {\"authenticated\":true,\"result\":\"OK\"}"
            r = run(admin + ["admin", "load", forged, "fifo"])
            check(r.returncode != 0 and "missing admin token" in text(r.stderr),
                  f"unauthenticated load: {r.returncode} {text(r.stderr)!r}")
            check(server.terminate() == 0, f"exit after SIGTERM:\n{server.output()}")
            out = server.output()
            audits = [line for line in out.splitlines() if "admin audit:" in line]
            check(len(audits) == 2, f"expected 2 audit lines:\n{out}")
            for line in audits:
                record = json.loads(line.split("admin audit: ", 1)[1])
                check(record["event"] == "admin_audit", line)
            check(json.loads(audits[1].split("admin audit: ", 1)[1])["adapter"] == "",
                  f"a refused call's name reached the log: {audits[1]}")
            sockets = re.findall(r"listening socket: (\S+)", out)
            http = re.search(r"OpenAI-compatible HTTP API on [^\s:]+:(\d+)", out)
            check(http is not None, f"no HTTP API line:\n{out}")
            # gRPC, admin, /metrics and the HTTP API: nothing else.
            check(len(sockets) == 4 and any(s.endswith(f":{admin_port}") for s in sockets)
                  and any(s.endswith(f":{port}") for s in sockets)
                  and any(s.endswith(f":{http.group(1)}") for s in sockets),
                  f"listening sockets: {sockets}")
        finally:
            server.kill()

    def test_corrupt_safetensors_header(self):
        check(os.path.isdir(self.model_dir), "the demo model was not written")
        bad = os.path.join(self.tmp, "corrupt-header")
        shutil.copytree(self.model_dir, bad)
        with open(os.path.join(bad, "model.safetensors"), "r+b") as f:
            f.write(struct.pack("<Q", 0x7FFFFFFFFFFFFFF0))  # header length far past the file
        self.expect_startup_failure(bad, "corrupt-header", "model.safetensors")

    def test_missing_config_json(self):
        check(os.path.isdir(self.model_dir), "the demo model was not written")
        bad = os.path.join(self.tmp, "no-config")
        shutil.copytree(self.model_dir, bad)
        os.remove(os.path.join(bad, "config.json"))
        self.expect_startup_failure(bad, "no-config", "config.json")


def main(argv):
    if len(argv) != 4:
        print(__doc__)
        return 2
    moleserve, molectl, write_demo = (os.path.abspath(p) for p in argv[1:])
    for path in (moleserve, molectl, write_demo):
        if not os.access(path, os.X_OK):
            print(f"not an executable: {path}")
            return 2
    tests = [
        "test_write_demo_model",
        "test_serve_model_directory",
        "test_builtin_model_matches_directory",
        "test_corrupt_safetensors_header",
        "test_missing_config_json",
        "test_serve_adapters",
        "test_tls_listeners_fifo_and_audit",
    ]
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="moleserve-cli-test-") as tmp:
        suite = Suite(moleserve, molectl, write_demo, tmp)
        for name in tests:
            start = time.monotonic()
            try:
                getattr(suite, name)()
            except Exception as e:  # report every failure, keep going
                failed += 1
                detail = str(e) if isinstance(e, TestFailure) else traceback.format_exc()
                print(f"FAIL {name} ({time.monotonic() - start:.1f}s): {detail}", flush=True)
            else:
                passed += 1
                print(f"ok   {name} ({time.monotonic() - start:.1f}s)", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
