#!/usr/bin/env python3
"""A real Prometheus scrapes a running moleserve with deploy/prometheus/prometheus.yml, and every
query of the Grafana dashboard (deploy/grafana/dashboards/moleserve.json) is valid PromQL that
finds data and names only metrics the server exports.

    prometheus_test.py MOLESERVE MOLECTL WRITE_DEMO_ADAPTERS PROMETHEUS

The scrape config is the deploy file with only the target rewritten to the test's port and the
scrape interval shortened to 1s (so the test takes seconds). The traffic makes every family the
dashboard plots appear: hot loads (one good, one corrupt), requests for two adapters through an
expert cache half their size (hits, misses, evictions), and a request for an unknown adapter
(a rejection).
"""

import json
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request

import yaml

from harness import (REPO, Moleserve, Process, check, counter_sum, free_port,
                     molectl, parse_samples, run, run_tests, wait_until)

MOLESERVE, MOLECTL, WRITE_ADAPTERS, PROMETHEUS = sys.argv[1:5]
DASHBOARD = os.path.join(REPO, "deploy/grafana/dashboards/moleserve.json")
SCRAPE_CONFIG = os.path.join(REPO, "deploy/prometheus/prometheus.yml")
REQUESTS = 6
# Grafana's variables, as a panel showing the last few minutes of every replica expands them.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "5s",
                "$instance": ".*", "${datasource}": "prometheus"}


def dashboard_queries():
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            queries.append((f"variable {var['name']}", var["query"]["query"]))
    return queries


def expand(expr):
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    check("$" not in expr, f"unexpanded Grafana variable in: {expr}")
    return expr


def prom_query(port, expr):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:  # 400 carries the PromQL error
        return json.load(e)


def test_scrape_and_dashboard(tmp):
    # Two adapters for the demo model, one corrupt copy, and an expert cache half their size.
    adapters = os.path.join(tmp, "adapters")
    info = json.loads(run([WRITE_ADAPTERS, "--dir", adapters, "--count", "2", "--experts", "4",
                           "--rank", "4"]).stdout)
    shutil.copytree(os.path.join(adapters, "a0"), os.path.join(adapters, "broken"))
    with open(os.path.join(adapters, "broken", "model.safetensors"), "r+b") as f:
        f.truncate(1000)
    token = os.path.join(tmp, "token")
    with open(token, "w") as f:
        f.write("test-token-0123456789\n")
    server = Moleserve(MOLESERVE, [
        "--adapter", f"a0={adapters}/a0", "--adapter-root", adapters,
        "--expert-cache-bytes", str(info["working_set_bytes"]),  # a0 + a1 need twice this
        "--admin-port", "0", "--admin-token-file", token],
        os.path.join(tmp, "moleserve.log")).wait_ready()
    try:
        # Prometheus with the deploy scrape config, the target pointed at this server.
        with open(SCRAPE_CONFIG) as f:
            config = yaml.safe_load(f)
        jobs = [j for j in config["scrape_configs"] if j["job_name"] == "moleserve"]
        check(len(jobs) == 1, "deploy/prometheus/prometheus.yml has no job 'moleserve'")
        check(jobs[0].get("metrics_path", "/metrics") == "/metrics", "metrics_path is not /metrics")
        jobs[0]["static_configs"] = [{"targets": [f"127.0.0.1:{server.metrics_port}"]}]
        config["global"]["scrape_interval"] = "1s"
        config_path = os.path.join(tmp, "prometheus.yml")
        with open(config_path, "w") as f:
            yaml.safe_dump(config, f)
        prom_port = free_port()
        prom = Process("prometheus", [
            PROMETHEUS, f"--config.file={config_path}",
            f"--storage.tsdb.path={os.path.join(tmp, 'tsdb')}",
            f"--web.listen-address=127.0.0.1:{prom_port}"],
            os.path.join(tmp, "prometheus.log"))
        try:
            admin = ["--admin-addr", f"127.0.0.1:{server.admin_port}", "--admin-token-file", token]
            r = molectl(MOLECTL, "admin", "load", "a1", "a1", *admin)
            check(r.returncode == 0, f"admin load a1: {r.stderr}")
            r = molectl(MOLECTL, "admin", "load", "bad", "broken", *admin)
            check(r.returncode != 0, "a corrupt adapter loaded")
            addr = ["--addr", f"127.0.0.1:{server.port}"]
            for i in range(REQUESTS):
                r = molectl(MOLECTL, "generate", *addr, "--adapter", f"a{i % 2}", "--text",
                            f"request {i}", "--max-new-tokens", "6", "--temperature", "0")
                check(r.returncode == 0, f"generate {i}: {r.stderr}")
            r = molectl(MOLECTL, "generate", *addr, "--adapter", "nope", "--text", "x")
            check(r.returncode != 0 and r.stderr.startswith("error: 5 "),  # NOT_FOUND
                  f"unknown adapter: {r.stderr}")

            # Prometheus sees the target up and the finished requests.
            def up():
                res = prom_query(prom_port, 'up{job="moleserve"}')["data"]["result"]
                return res and res[0]["value"][1] == "1"
            wait_until("Prometheus up{job=\"moleserve\"} == 1", up, 60)

            def finished():
                res = prom_query(prom_port, "sum(moleserve_requests_finished_total)")
                res = res["data"]["result"]
                return res and float(res[0]["value"][1]) == REQUESTS
            wait_until(f"sum(moleserve_requests_finished_total) == {REQUESTS} in Prometheus",
                       finished, 30)
            # Two more scrapes, so that rate() over the window has the traffic in it.
            wait_until("a few more scrapes", lambda: wait_scrapes(prom_port, 3), 30)

            # Every dashboard query: valid PromQL (Prometheus parses it), with data, naming
            # only series the server exports.
            scrape = server.metrics()
            exported = {name for name, _ in parse_samples(scrape)}
            problems = []
            for title, expr in dashboard_queries():
                for name in set(re.findall(r"\bmoleserve_[a-z0-9_]+", expr)):
                    if name not in exported:
                        problems.append(f"{title}: {name} is not in the server's /metrics")
                if expr.startswith("label_values("):
                    metric = re.match(r"label_values\((\w+)", expr).group(1)
                    expr = metric
                res = prom_query(prom_port, expand(expr))
                if res.get("status") != "success":
                    problems.append(f"{title}: Prometheus refused `{expr}`: {res.get('error')}")
                elif not res["data"]["result"]:
                    problems.append(f"{title}: `{expr}` returned no data")
            check(not problems, "dashboard:\n  " + "\n  ".join(problems))
            check(counter_sum(scrape, "moleserve_adapter_load_failures_total") >= 1,
                  "the corrupt load was not counted")
        finally:
            prom.stop()
    finally:
        server.stop()


def wait_scrapes(port, n):
    res = prom_query(port, 'count_over_time(up{job="moleserve"}[1m])')["data"]["result"]
    return res and float(res[0]["value"][1]) >= n


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="moleserve_prometheus_") as tmp:
        sys.exit(run_tests([("scrape_and_dashboard", test_scrape_and_dashboard)], tmp,
                           logs=("moleserve.log", "prometheus.log")))
