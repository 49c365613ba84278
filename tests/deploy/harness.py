"""Shared by the tests of deploy/: moleserve replicas, Prometheus and nginx as child processes.

Standard library only. Every child runs with its output in a log file under the test's
temporary directory and is killed when the test ends; every wait is bounded.
"""

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STARTUP_TIMEOUT_S = 60
COMMAND_TIMEOUT_S = 60


class TestFailure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise TestFailure(message)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, timeout=COMMAND_TIMEOUT_S):
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise TestFailure(f"timed out after {timeout}s: {' '.join(cmd)}") from e


def wait_until(what, fn, timeout_s):
    """Polls fn() until it returns a true value (returned) or timeout_s passes."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.2)
    raise TestFailure(f"{what}: not within {timeout_s}s (last: {last!r})")


class Process:
    """A child process with its combined output in `log_path`."""

    def __init__(self, name, cmd, log_path):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def output(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout_s=30):
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Moleserve(Process):
    """moleserve on free ports (gRPC and /metrics), read back from its log."""

    def __init__(self, binary, args, log_path, name="moleserve"):
        super().__init__(name, [binary, "--port", "0", "--http-port", "0", "--metrics-port", "0",
                                "--threads", "1", "--log-level", "info"] + args, log_path)
        self.port = self.metrics_port = self.admin_port = None

    def wait_ready(self):
        def ports():
            out = self.output()
            grpc = re.search(r"serving gRPC on [^\s:]+:(\d+)", out)
            metrics = re.search(r"serving /metrics on port (\d+)", out)
            if not self.alive():
                raise TestFailure(f"{self.name} exited with {self.proc.returncode}:\n{out}")
            return (int(grpc.group(1)), int(metrics.group(1))) if grpc and metrics else None
        self.port, self.metrics_port = wait_until(f"{self.name} serving", ports,
                                                  STARTUP_TIMEOUT_S)
        # With --admin-port 0 the admin port is read back too (no free-port race: moleserve's
        # listeners do not share ports, so a port taken in between would fail the start).
        admin = re.search(r"serving AdapterAdmin on [^\s:]+:(\d+)", self.output())
        self.admin_port = int(admin.group(1)) if admin else None
        return self

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as r:
            return r.read().decode()


def parse_samples(text):
    """Prometheus text format -> {(name, frozenset(labels.items())): value}."""
    samples = {}
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)')
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = line_re.match(line)
        if m:
            labels = frozenset(label_re.findall(m.group(3) or ""))
            samples[(m.group(1), labels)] = float(m.group(4))
    return samples


def counter_sum(text, name):
    """Sum of a counter family's samples in a scrape (0 when the family has none yet)."""
    return sum(v for (n, _), v in parse_samples(text).items() if n == name)


def molectl(binary, *args, timeout=COMMAND_TIMEOUT_S):
    return run([binary] + list(args), timeout=timeout)


def run_tests(tests, tmp, logs=()):
    """Runs (name, fn(tmp)) pairs; prints a line per test and the total, and on a failure the
    tail of each of `logs` (file names in tmp) that exists; returns the exit code."""
    import traceback
    failed = 0
    for name, fn in tests:
        try:
            fn(tmp)
            print(f"PASS {name}", flush=True)
        except Exception as e:  # a failed check or a broken harness: both fail the test
            failed += 1
            print(f"FAIL {name}: {e}", flush=True)
            if not isinstance(e, TestFailure):
                traceback.print_exc()
    print(f"{len(tests) - failed} passed, {failed} failed", flush=True)
    for log in logs if failed else ():
        path = os.path.join(tmp, log)
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                print(f"--- {log} (tail)\n" + f.read()[-3000:])
    return 1 if failed else 0
