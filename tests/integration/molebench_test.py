#!/usr/bin/env python3
"""molebench against a running moleserve over both front ends (Python 3 standard library only).

    molebench_test.py MOLESERVE MOLEBENCH

Serves the demo model, sends one molebench plan through gRPC
(Inference/Generate) and through the OpenAI-compatible HTTP API (--protocol http, streamed
/v1/completions), and checks that both runs complete every request with the planned token
counts, with a TTFT no larger than the E2E of each run, and that a bad
--protocol or an unreachable --http-addr is a setup error (exit 2). This is what
bench/http_overhead/run.sh relies on.
"""

import json
import os
import re
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_test import Server, TestFailure, check, run, text  # noqa: E402

HTTP_RE = re.compile(r"serving the OpenAI-compatible HTTP API on [^\s:]+:(\d+)")


def main():
    moleserve, molebench = sys.argv[1:3]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(moleserve, [], os.path.join(tmp, "serve.log"))
        try:
            port = server.wait_ready()
            m = HTTP_RE.search(server.output())
            check(m is not None, f"no HTTP port in the log:\n{server.output()}")
            http_port = int(m.group(1))
            reports = {}
            for protocol in ("grpc", "http"):
                out = os.path.join(tmp, f"{protocol}.json")
                r = run([molebench, "--protocol", protocol, "--addr", f"127.0.0.1:{port}",
                         "--http-addr", f"127.0.0.1:{http_port}", "--mode", "closed",
                         "--concurrency", "4", "--num-requests", "12", "--prompt-len",
                         "uniform:4:20", "--output-len", "uniform:2:9", "--seed", "5",
                         "--out", out], timeout=120)
                check(r.returncode == 0, f"molebench {protocol} exit {r.returncode}: "
                      f"{text(r.stderr)}")
                with open(out) as f:
                    reports[protocol] = json.load(f)
            for protocol, rep in reports.items():
                totals = rep["totals"]
                check(totals["completed"] == 12 and totals["failed"] == 0,
                      f"{protocol}: {totals}")
                check(rep["config"]["protocol"] == protocol, f"{protocol}: {rep['config']}")
                lat = rep["latency_ms"]
                check(0 < lat["ttft"]["max"] <= lat["e2e"]["max"], f"{protocol}: {lat}")
                # Tokens spread over the stream: some arrive after the first one.
                check(lat["tpot"]["count"] > 0, f"{protocol}: no TPOT: {lat}")
            g, h = reports["grpc"]["totals"], reports["http"]["totals"]
            check(g["output_tokens"] == h["output_tokens"] and
                  g["input_tokens"] == h["input_tokens"],
                  f"the same plan gave other token counts: grpc {g} http {h}")
            print("ok   both protocols ran the plan")
            # Chat mode: each turn repeats the conversation so far (the answers included).
            out = os.path.join(tmp, "chat.json")
            r = run([molebench, "--addr", f"127.0.0.1:{port}", "--mode", "chat",
                     "--num-requests", "3", "--turns", "3", "--concurrency", "2",
                     "--system-prompt-len", "40", "--prompt-len", "fixed:5",
                     "--output-len", "fixed:4", "--seed", "5", "--out", out], timeout=120)
            check(r.returncode == 0, f"molebench chat exit {r.returncode}: {text(r.stderr)}")
            with open(out) as f:
                chat = json.load(f)
            check(chat["totals"]["completed"] == 9, f"chat: {chat['totals']}")
            turns = chat["per_turn"]
            check([t["completed"] for t in turns] == [3, 3, 3], f"chat turns: {turns}")
            # 40 system + 5 per question + 4 per answer before it.
            check([t["mean_prompt_tokens"] for t in turns] == [45, 54, 63], f"chat: {turns}")
            check("Per turn" in text(r.stdout), f"chat report: {text(r.stdout)}")
            print("ok   chat mode ran 3 conversations of 3 turns")
            for args, what in [(["--protocol", "smoke"], "bad --protocol"),
                               (["--mode", "chat", "--turns", "0"], "chat without turns"),
                               (["--mode", "chat", "--protocol", "http", "--http-addr",
                                 f"127.0.0.1:{http_port}"], "chat over HTTP"),
                               (["--protocol", "http", "--http-addr", "127.0.0.1:1"],
                                "unreachable --http-addr")]:
                r = run([molebench, "--num-requests", "1"] + args)
                check(r.returncode == 2, f"{what}: exit {r.returncode}: {text(r.stderr)}")
                print(f"ok   {what}: setup error")
        except TestFailure as e:
            failures += 1
            print(f"FAIL {e}")
        except Exception:  # noqa: BLE001
            failures += 1
            traceback.print_exc()
        finally:
            server.kill()
    print("all passed" if failures == 0 else f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
