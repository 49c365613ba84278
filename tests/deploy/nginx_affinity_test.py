#!/usr/bin/env python3
"""nginx with deploy/nginx/ in front of two moleserve replicas: adapter-affinity routing.

    nginx_affinity_test.py MOLESERVE MOLECTL WRITE_DEMO_ADAPTERS NGINX

deploy/nginx/moleserve.conf is used as it is; deploy/nginx/upstream.conf with its `server` lines
pointed at the two replicas on loopback; the listen port is the test's. Requests go through
nginx with molectl (which sends the adapter in the x-moleserve-adapter header too). Checked, from
each replica's own /metrics:
  - all requests for one adapter land on the same replica;
  - different adapters spread over both replicas;
  - when the replica serving an adapter is stopped, its requests go to the other one, and none
    fails.
"""

import os
import re
import signal
import sys
import tempfile

from harness import (REPO, Moleserve, Process, check, counter_sum, free_port,
                     molectl, run, run_tests, wait_until)

MOLESERVE, MOLECTL, WRITE_ADAPTERS, NGINX = sys.argv[1:5]
ADAPTERS = 16  # names; with two replicas, all on one side by chance has probability 2^-15
FINISHED = "moleserve_requests_finished_total"


def nginx_config(tmp, replicas, listen_port):
    with open(os.path.join(REPO, "deploy/nginx/moleserve.conf")) as f:
        server_conf = f.read()
    with open(os.path.join(REPO, "deploy/nginx/upstream.conf")) as f:
        upstream = f.read()
    check(len(re.findall(r"\blisten 8080 http2;", server_conf)) == 1,
          "moleserve.conf: expected one `listen 8080 http2;`")
    server_conf = server_conf.replace("listen 8080 http2;", f"listen 127.0.0.1:{listen_port} http2;")
    lines = re.findall(r"^\s*server \S+:50051 .*;$", upstream, re.M)
    check(len(lines) == 2, f"upstream.conf: expected two replica lines, found {lines}")
    for line, replica in zip(lines, replicas):
        upstream = upstream.replace(
            line, re.sub(r"server \S+:50051", f"server 127.0.0.1:{replica.port}", line))
    for name, text in (("moleserve.conf", server_conf), ("upstream.conf", upstream)):
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    # The top level: what a container's nginx.conf has, with paths a test may write to.
    top = os.path.join(tmp, "nginx.conf")
    with open(top, "w") as f:
        f.write(f"""daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx_error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/nginx_access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/upstream.conf;
    include {tmp}/moleserve.conf;
}}
""")
    return top


def finished(replicas):
    return [counter_sum(r.metrics(), FINISHED) for r in replicas]


def generate(port, adapter, i):
    r = molectl(MOLECTL, "generate", "--addr", f"127.0.0.1:{port}", "--adapter", adapter,
                "--text", f"hello {i}", "--max-new-tokens", "3", "--temperature", "0",
                "--timeout", "30s")
    check(r.returncode == 0, f"generate {adapter} #{i} through nginx: {r.stderr.strip()}")


def test_affinity_and_failover(tmp):
    adapters = os.path.join(tmp, "adapters")
    run([WRITE_ADAPTERS, "--dir", adapters, "--count", "1", "--experts", "4", "--rank", "4"])
    # Every replica serves the same adapters (names a0..a15, one directory: the routing is what
    # is tested here, not the adapters).
    flags = ["--admin-port", "-1", "--adapter",
             ",".join(f"a{i}={adapters}/a0" for i in range(ADAPTERS))]
    replicas = [Moleserve(MOLESERVE, flags, os.path.join(tmp, f"replica{i}.log"),
                          name=f"replica {i}") for i in range(2)]
    nginx = None
    try:
        for r in replicas:
            r.wait_ready()
        port = free_port()
        conf = nginx_config(tmp, replicas, port)
        t = run([NGINX, "-t", "-c", conf, "-p", tmp])
        check(t.returncode == 0, f"nginx -t refused the config:\n{t.stderr}")
        nginx = Process("nginx", [NGINX, "-c", conf, "-p", tmp], os.path.join(tmp, "nginx.log"))
        wait_until("nginx listening", lambda: health_ok(port), 20)

        # Each adapter's requests all land on one replica.
        home = {}
        for a in range(ADAPTERS):
            before = finished(replicas)
            for i in range(3):
                generate(port, f"a{a}", i)
            delta = [x - y for x, y in zip(finished(replicas), before)]
            check(sorted(delta) == [0, 3],
                  f"a{a}: its 3 requests were split over the replicas: {delta}")
            home[a] = delta.index(3)
        counts = [list(home.values()).count(i) for i in range(2)]
        check(min(counts) > 0, f"all {ADAPTERS} adapters went to one replica: {counts}")
        print(f"  adapters per replica: {counts}", flush=True)

        # Failover: stop the replica that serves a0; a0's requests go to the other one.
        dead = home[0]
        alive = 1 - dead
        replicas[dead].stop(signal.SIGKILL)
        before = counter_sum(replicas[alive].metrics(), FINISHED)
        for i in range(4):
            generate(port, "a0", 100 + i)
        after = counter_sum(replicas[alive].metrics(), FINISHED)
        check(after - before == 4, f"after the stop, replica {alive} finished {after - before} "
              "of a0's 4 requests")
        # Adapters that lived on the surviving replica stay there.
        stayed = [a for a in home if home[a] == alive][0]
        before = counter_sum(replicas[alive].metrics(), FINISHED)
        generate(port, f"a{stayed}", 200)
        check(counter_sum(replicas[alive].metrics(), FINISHED) - before == 1,
              f"a{stayed} moved away from its replica")
    finally:
        if nginx:
            nginx.stop(signal.SIGQUIT)
        for r in replicas:
            r.stop()


def health_ok(port):
    return molectl(MOLECTL, "health", "--addr", f"127.0.0.1:{port}", "--timeout",
                   "2s").returncode == 0


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="moleserve_nginx_") as tmp:
        sys.exit(run_tests([("affinity_and_failover", test_affinity_and_failover)], tmp,
                           logs=("replica0.log", "replica1.log", "nginx_error.log")))
