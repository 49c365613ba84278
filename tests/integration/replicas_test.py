#!/usr/bin/env python3
"""molectl admin ... --all-replicas against three moleserve processes and a DNS test double.

    replicas_test.py MOLESERVE MOLECTL MOLESERVE_WRITE_DEMO

Three servers of the demo model, each with its own adapter root (they share no volume), are
published by a DNS server in this process (dnspython, on 127.0.0.1): SRV records for
_admin._tcp.moleserve.test point at their admin ports and at a fourth port where nothing
listens (a replica that is down). molectl resolves them (--dns-server), uploads an adapter to
each, loads one from each server's own root, and unloads: the report names the replica that
failed, the exit status is 1 while one is down, and a retry changes nothing on the others
(idempotent: the same version, the unload "absent"). Prints "N passed, M failed".
"""

import hashlib
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import STARTUP_TIMEOUT_S, Server, TestFailure, check, run, text  # noqa: E402

TOKEN = "replicas-test-token-0123456789abcdef"
ADMIN_RE = re.compile(r"serving AdapterAdmin on 127\.0\.0\.1:(\d+)")


class DnsDouble:
    """A UDP DNS server on 127.0.0.1 answering from `zone`: {(name, type): [rdata text]}."""

    def __init__(self, zone):
        self.zone = zone
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stop:
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            # Authoritative: glibc takes an empty answer without AA or RA for a referral.
            response.flags |= dns.flags.AA | dns.flags.RA
            question = query.question[0]
            name = question.name.to_text()
            rtype = dns.rdatatype.to_text(question.rdtype)
            answers = self.zone.get((name, rtype))
            if answers:
                response.answer.append(dns.rrset.from_text_list(name, 30, "IN", rtype, answers))
            elif not any(n == name for n, _ in self.zone):
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


def write_peft_lora(path, model_dir, seed, rank=4):
    """A PEFT LoRA of the demo model on q_proj and v_proj, written with the standard library."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    hidden = config["hidden_size"]
    kv = config["num_key_value_heads"] * (hidden // config["num_attention_heads"])
    tensors = {}
    state = seed
    for layer in range(config["num_hidden_layers"]):
        for module, out in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            for part, shape in (("lora_A", [rank, hidden]), ("lora_B", [out, rank])):
                values = []
                for _ in range(shape[0] * shape[1]):
                    state = (state * 1103515245 + 12345) % (1 << 31)
                    values.append((state / (1 << 31) - 0.5) * 0.2)
                tensors[f"{prefix}.{part}.weight"] = (shape, values)
    header, blobs, offset = {}, [], 0
    for name, (shape, values) in sorted(tensors.items()):
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    os.makedirs(path, exist_ok=True)
    head = json.dumps(header).encode()
    with open(os.path.join(path, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                   "target_modules": ["q_proj", "v_proj"]}, f)


def digest(path):
    """The adapter digest of LoadAdapterRequest.sha256 (find -L | sort | sha256sum | sha256sum)."""
    lines = []
    for dirpath, _, files in os.walk(path, followlinks=True):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                h = hashlib.sha256(f.read()).hexdigest()
            lines.append(("./" + os.path.relpath(full, path), h))
    lines.sort(key=lambda x: x[0].encode())
    return hashlib.sha256("".join(f"{h}  {p}\n" for p, h in lines).encode()).hexdigest()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Suite:
    def __init__(self, moleserve, molectl, write_demo, tmp):
        self.moleserve, self.molectl, self.write_demo, self.tmp = moleserve, molectl, write_demo, tmp
        self.model_dir = os.path.join(tmp, "demo-model")
        self.token = os.path.join(tmp, "token")
        with open(self.token, "w") as f:
            f.write(TOKEN + "\n")

    def admin(self, dns_port, target, *args):
        return run([self.molectl, "--admin-addr", target, "--admin-token-file", self.token,
                    "--dns-server", f"127.0.0.1:{dns_port}", "--timeout", "60s", "admin"]
                   + list(args))

    def test_all_replicas(self):
        r = run([self.write_demo, "--out", self.model_dir])
        check(r.returncode == 0, f"moleserve-write-demo: {text(r.stderr)}")
        servers, ports, roots = [], [], []
        dns_double = None
        try:
            for i in range(3):
                root = os.path.join(self.tmp, f"root{i}")
                os.makedirs(root)
                roots.append(root)
                servers.append(Server(self.moleserve,
                                      ["--model", self.model_dir, "--admin-port", "0",
                                       "--admin-token-file", self.token, "--adapter-root", root],
                                      os.path.join(self.tmp, f"server{i}.log")))
            for s in servers:
                s.wait_ready()
                deadline = time.monotonic() + STARTUP_TIMEOUT_S
                while not ADMIN_RE.search(s.output()) and time.monotonic() < deadline:
                    time.sleep(0.05)
                m = ADMIN_RE.search(s.output())
                check(m, f"no admin listener in the log:\n{s.output()}")
                ports.append(int(m.group(1)))
            down = free_port()  # nothing listens there: a replica that is down
            zone = {("_admin._tcp.moleserve.test.", "SRV"):
                    [f"0 0 {p} r{i}.moleserve.test." for i, p in enumerate(ports + [down])],
                    ("three.moleserve.test.", "A"): ["127.0.0.1", "127.0.0.2", "127.0.0.3"]}
            for i in range(4):
                zone[(f"r{i}.moleserve.test.", "A")] = ["127.0.0.1"]
            dns_double = DnsDouble(zone)
            srv = "srv:_admin._tcp.moleserve.test"
            all_four = sorted(f"127.0.0.1:{p}" for p in ports + [down])

            # Resolution: SRV records, a name's A records, a list.
            r = self.admin(dns_double.port, srv, "replicas")
            check(r.returncode == 0, f"replicas: {text(r.stderr)}")
            check(text(r.stdout).split() == all_four, f"SRV replicas: {text(r.stdout)!r}")
            r = self.admin(dns_double.port, "three.moleserve.test:7000", "replicas")
            check(text(r.stdout).split() == [f"127.0.0.{i}:7000" for i in (1, 2, 3)],
                  f"A replicas: {text(r.stdout)!r} {text(r.stderr)!r}")
            r = self.admin(dns_double.port, "b.example:2, a.example:1", "replicas")
            check(text(r.stdout).split() == ["a.example:1", "b.example:2"],
                  f"list replicas: {text(r.stdout)!r}")
            r = self.admin(dns_double.port, "srv:_nothing._tcp.moleserve.test", "replicas")
            check(r.returncode == 2 and "no DNS records" in text(r.stderr),
                  f"unknown SRV name: {r.returncode} {text(r.stderr)!r}")

            def expect_report(r, verb, what):
                out = text(r.stdout)
                lines = [line.split("\t") for line in out.splitlines() if "\t" in line]
                check(r.returncode == 1, f"{what}: exit {r.returncode} with one replica down:\n"
                      f"{out}{text(r.stderr)}")
                check(sorted(line[0] for line in lines) == all_four, f"{what}: {out}")
                for addr, status, detail in lines:
                    if addr == f"127.0.0.1:{down}":
                        check(status == "FAILED" and "UNAVAILABLE" in detail, f"{what}: {out}")
                    else:
                        check(status == "OK", f"{what}: {out}")
                check(f"{verb}: 3 of 4 replicas succeeded" in out, f"{what}: {out}")
                return {addr: detail for addr, status, detail in lines if status == "OK"}

            # Upload from a local directory to every replica, then again: idempotent.
            lora = os.path.join(self.tmp, "client-lora")
            write_peft_lora(lora, self.model_dir, seed=5)
            sha = digest(lora)
            for attempt in ("upload", "upload retried"):
                ok = expect_report(self.admin(dns_double.port, srv, "--all-replicas", "upload",
                                              "lora", lora), "upload", attempt)
                for detail in ok.values():
                    check(" v1 " in detail and f"sha256={sha}" in detail, f"{attempt}: {detail}")
            for i, root in enumerate(roots):
                check(os.listdir(os.path.join(root, ".uploads", "lora")) == [sha],
                      f"replica {i}'s uploads: {os.listdir(os.path.join(root, '.uploads'))}")
                r = run([self.molectl, "--addr", f"127.0.0.1:{servers[i].port}", "generate",
                         "--adapter", "lora", "--text", "Hello", "--max-new-tokens", "4"])
                check(r.returncode == 0, f"generate on replica {i}: {text(r.stderr)}")

            # Load from each replica's own root, with the digest: a retry is a no-op.
            for root in roots:
                shutil.copytree(lora, os.path.join(root, "lora-copy"))
            for attempt in ("load", "load retried"):
                ok = expect_report(self.admin(dns_double.port, srv, "--all-replicas", "load",
                                              "copy", "lora-copy", "--sha256", sha),
                                   "load", attempt)
                check(all(" v1 " in d for d in ok.values()), f"{attempt}: {ok}")

            # Unload everywhere; then again: the replicas that no longer have it say "absent".
            ok = expect_report(self.admin(dns_double.port, srv, "--all-replicas", "unload",
                                          "lora"), "unload", "unload")
            check(all(d.startswith("unloaded lora") for d in ok.values()), f"unload: {ok}")
            for root in roots:
                check(not os.path.exists(os.path.join(root, ".uploads", "lora")),
                      f"uploaded files left after the unload: {os.listdir(root)}")
            ok = expect_report(self.admin(dns_double.port, srv, "--all-replicas", "unload",
                                          "lora"), "unload", "unload retried")
            check(all(d.startswith("absent") for d in ok.values()), f"unload retried: {ok}")

            # Without the down replica (a list of the three), everything succeeds: exit 0.
            three = ",".join(f"127.0.0.1:{p}" for p in ports)
            r = self.admin(dns_double.port, three, "--all-replicas", "unload", "copy")
            check(r.returncode == 0 and "unload: 3 of 3 replicas succeeded" in text(r.stdout),
                  f"unload on three: {r.returncode} {text(r.stdout)} {text(r.stderr)}")
        finally:
            if dns_double is not None:
                dns_double.close()
            for s in servers:
                s.kill()


def main(argv):
    if len(argv) != 4:
        print(__doc__)
        return 2
    moleserve, molectl, write_demo = (os.path.abspath(p) for p in argv[1:])
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="moleserve-replicas-test-") as tmp:
        suite = Suite(moleserve, molectl, write_demo, tmp)
        for name in ["test_all_replicas"]:
            start = time.monotonic()
            try:
                getattr(suite, name)()
            except Exception as e:  # report every failure
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
