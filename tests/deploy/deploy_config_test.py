#!/usr/bin/env python3
"""The deploy files hold together: docker-compose.yml, docker/Dockerfile{,.cpu} and
deploy/kubernetes reference only files, ports and flags that exist, and agree with each other.

    deploy_config_test.py MOLESERVE MOLECTL

No container engine or cluster runs here, so this reads the files: every moleserve/molectl flag
they pass is one the binaries accept (from --helpfull), every host path and build file exists,
the ports published and probed are the ones the flags set, the admin API stays off public
networks, the image build steps are the README's scripts, and the Kubernetes router's nginx
config is deploy/nginx's. Where kubectl exists, `kubectl kustomize` must render the manifests.
"""

import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import urllib.request

import yaml

from harness import REPO, Moleserve, check, parse_samples, run, run_tests

MOLESERVE, MOLECTL = sys.argv[1:3]


def flags_of(binary):
    out = run([binary, "--helpfull"]).stdout
    return set(re.findall(r"^\s+--([a-z0-9_]+) \(", out, re.M))


MOLESERVE_FLAGS = flags_of(MOLESERVE)
MOLECTL_FLAGS = flags_of(MOLECTL)


def parse_flags(args, known, where):
    """['--a=1', '--b', '2'] -> {'a': '1', 'b': '2'}; every flag must be one the binary has."""
    values = {}
    i = 0
    while i < len(args):
        arg = args[i]
        check(arg.startswith("--"), f"{where}: '{arg}' is not a flag")
        name, eq, value = arg[2:].partition("=")
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 1
        key = name.replace("-", "_")
        check(key in known, f"{where}: --{name} is not a flag of the binary")
        values[key] = value
        i += 1
    return values


def repo_path(path):
    return os.path.normpath(os.path.join(REPO, path))


def host_path(spec, where):
    """A compose bind source: a path, or ${VAR:-default} whose default must exist."""
    m = re.fullmatch(r"\$\{[A-Z_]+:-([^}]+)\}", spec)
    path = m.group(1) if m else spec
    check("$" not in path, f"{where}: {spec} has no default")
    check(os.path.exists(repo_path(path)), f"{where}: {path} does not exist")
    return path


def volume_source(spec):
    """'SOURCE:TARGET[:ro]' -> SOURCE, where SOURCE may be ${VAR:-default}."""
    m = re.match(r"(\$\{[^}]*\}|[^:]+)", spec)
    return m.group(1)


def volume_target(spec):
    return spec[len(volume_source(spec)) + 1:].split(":")[0]


def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def test_compose(tmp):
    compose = load_yaml_docs(os.path.join(REPO, "docker-compose.yml"))[0]
    services = compose["services"]
    networks = compose["networks"]
    check(networks["admin"].get("internal") is True, "the admin network must be internal")
    moleserves = {n: s for n, s in services.items() if n.startswith("moleserve")}
    check(set(moleserves) == {"moleserve-gpu", "moleserve-cpu"}, f"services: {list(services)}")
    for name, svc in services.items():
        if "build" in svc:
            check(os.path.isdir(repo_path(svc["build"]["context"])), f"{name}: build context")
            check(os.path.isfile(repo_path(svc["build"]["dockerfile"])), f"{name}: dockerfile")
        for vol in svc.get("volumes", []):
            source = volume_source(vol)
            if source.startswith((".", "$", "/")):
                host_path(source, f"{name} volume")
    for name, svc in moleserves.items():
        flags = parse_flags(svc["command"], MOLESERVE_FLAGS, name)
        published = {p.split(":")[-1] for p in svc["ports"]}
        check(published == {flags.get("port", "50051"), flags.get("http_port", "8000")},
              f"{name}: publishes {published}")
        admin_ip = svc["networks"]["admin"]["ipv4_address"]
        check(flags["admin_host"] == admin_ip,
              f"{name}: the admin API must listen on its admin-network address {admin_ip}")
        check(flags["admin_port"] not in published, f"{name}: the admin port is published")
        check("admin_token" in svc["secrets"] and
              flags["admin_token_file"] == "/run/secrets/admin_token",
              f"{name}: the admin token must come from the admin_token secret")
        check("moleserve" in svc["networks"]["serving"]["aliases"],
              f"{name}: Prometheus scrapes it as `moleserve`")
        check(flags.get("adapter_root") == "/adapters" and
              any(volume_target(v) == "/adapters" for v in svc["volumes"]),
              f"{name}: the adapter root is not mounted")
    gpu, cpu = moleserves["moleserve-gpu"], moleserves["moleserve-cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    check(devices and "gpu" in devices[0]["capabilities"], "moleserve-gpu reserves no GPU")
    check(gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"], "profiles")
    check(gpu["build"]["dockerfile"] == "docker/Dockerfile" and
          cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu", "images")
    cpu_flags = parse_flags(cpu["command"], MOLESERVE_FLAGS, "moleserve-cpu")
    check(cpu_flags["backend"] == "cpu" and "model" not in cpu_flags,
          "the cpu profile serves the built-in demo model on the CPU backend")
    check(parse_flags(gpu["command"], MOLESERVE_FLAGS, "gpu")["backend"] == "cuda", "gpu backend")
    # The admin tool joins only the internal network and reaches the admin address.
    tool = services["molectl"]
    check(tool["networks"] == ["admin"], "molectl must be on the admin network only")
    tool_flags = parse_flags(tool["entrypoint"][1:], MOLECTL_FLAGS, "molectl")
    check(tool_flags["admin_addr"] == f"172.30.250.10:{cpu_flags['admin_port']}", "admin addr")
    check(compose["secrets"]["admin_token"] == {"environment": "MOLESERVE_ADMIN_TOKEN"},
          "the admin token secret comes from $MOLESERVE_ADMIN_TOKEN")
    # Prometheus scrapes moleserve's metrics port; Grafana reads that Prometheus and loads the
    # dashboard from where the provider looks.
    prom_cfg = load_yaml_docs(os.path.join(REPO, "deploy/prometheus/prometheus.yml"))[0]
    targets = prom_cfg["scrape_configs"][0]["static_configs"][0]["targets"]
    check(targets == [f"moleserve:{cpu_flags.get('metrics_port', '9090')}"], f"targets {targets}")
    prom = services["prometheus"]
    check("./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in
          prom["volumes"], "Prometheus config mount")
    datasource = load_yaml_docs(os.path.join(
        REPO, "deploy/grafana/provisioning/datasources/prometheus.yml"))[0]["datasources"][0]
    check(datasource["url"] == "http://prometheus:9090" and datasource["uid"] == "prometheus",
          "Grafana's datasource")
    provider = load_yaml_docs(os.path.join(
        REPO, "deploy/grafana/provisioning/dashboards/moleserve.yml"))[0]["providers"][0]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    check(mounts.get("./deploy/grafana/dashboards") == provider["options"]["path"],
          "the dashboards are not mounted where the provider reads them")
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    check(os.path.isfile(repo_path("deploy/grafana/dashboards/" + os.path.basename(home))),
          "home dashboard")


def dockerfile_instructions(path):
    with open(path) as f:
        text = re.sub(r"\\\n", " ", f.read())
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_dockerfiles(tmp):
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    for name in ("docker/Dockerfile", "docker/Dockerfile.cpu"):
        ins = dockerfile_instructions(os.path.join(REPO, name))
        froms = [arg for op, arg in ins if op == "FROM"]
        check(len(froms) >= 2, f"{name}: not multi-stage")
        runs = " && ".join(arg for op, arg in ins if op == "RUN")
        steps = [shlex.split(s) for s in runs.split("&&") if "scripts/" in s]
        check([s[0] for s in steps] == ["./scripts/setup.sh", "./scripts/build.sh",
                                        "./scripts/install.sh"], f"{name}: build steps {steps}")
        for step in steps:
            check(os.access(repo_path(step[0]), os.X_OK), f"{name}: {step[0]} is not there")
            check(os.path.basename(step[0]) in readme, f"{name}: {step[0]} is not in the README")
        check(steps[0][1:] == ["--build-only"], f"{name}: setup flags {steps[0]}")
        check(steps[1][1] == "--release" and set(steps[1][2:]) == {"moleserve", "molectl"},
              f"{name}: build step {steps[1]}")
        check(steps[2][1:] == ["/opt/moleserve", "build/image"], f"{name}: install {steps[2]}")
        users = [arg for op, arg in ins if op == "USER"]
        check(users and users[-1].split(":")[0] not in ("0", "root"), f"{name}: runs as root")
        health = [arg for op, arg in ins if op == "HEALTHCHECK"]
        check(health and '"molectl", "health"' in health[-1], f"{name}: no gRPC health probe")
        probe = re.search(r"CMD (\[.*\])", health[-1]).group(1)
        parse_flags(yaml.safe_load(probe)[2:], MOLECTL_FLAGS, f"{name} HEALTHCHECK")
        cmd = yaml.safe_load([arg for op, arg in ins if op == "CMD"][-1])
        flags = parse_flags(cmd, MOLESERVE_FLAGS, f"{name} CMD")
        exposed = set(" ".join(arg for op, arg in ins if op == "EXPOSE").split())
        check(exposed == {"50051", "8000", "9090"}, f"{name}: exposes {exposed}")
        check(flags["backend"] == ("cuda" if name.endswith("Dockerfile") else "cpu"), name)
    # The scripts accept what the images pass them.
    setup = open(repo_path("scripts/setup.sh")).read()
    check("--build-only)" in setup, "setup.sh has no --build-only")
    check('"--release"' in open(repo_path("scripts/build.sh")).read() or
          "= --release" in open(repo_path("scripts/build.sh")).read(), "build.sh --release")
    presets = open(repo_path("CMakePresets.json")).read()
    check('"name": "image"' in presets, "no `image` CMake preset")
    ignore = open(repo_path(".dockerignore")).read().split()
    check("build" in ignore and ".git" in ignore, ".dockerignore")


def test_kubernetes(tmp):
    root = os.path.join(REPO, "deploy/kubernetes")
    kust = load_yaml_docs(os.path.join(root, "kustomization.yaml"))[0]
    docs = []
    for res in kust["resources"]:
        check(os.path.isfile(os.path.join(root, res)), f"kustomization: {res} is missing")
        docs += load_yaml_docs(os.path.join(root, res))
    check("servicemonitor.yaml" not in kust["resources"],
          "the ServiceMonitor needs the operator's CRDs: apply it on its own")
    docs += load_yaml_docs(os.path.join(root, "servicemonitor.yaml"))
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    dep = by[("Deployment", "moleserve")]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    flags = parse_flags(c["args"], MOLESERVE_FLAGS, "Deployment moleserve")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check(str(ports["grpc"]) == flags.get("port", "50051"), "grpc containerPort vs --port")
    check(str(ports["metrics"]) == flags.get("metrics_port", "9090"), "metrics port")
    check(str(ports["http"]) == flags.get("http_port", "8000"), "http containerPort vs --http-port")
    service = by[("Service", "moleserve")]
    check({p["targetPort"] for p in service["spec"]["ports"]} >= {"grpc", "http", "metrics"},
          "the Service exposes gRPC, HTTP and metrics")
    # The admin API listens on the pod's address with TLS, and only the headless Service
    # publishes it (molectl --all-replicas resolves its SRV records).
    check(flags["admin_host"] == "0.0.0.0" and str(ports["admin"]) == flags["admin_port"],
          "the admin containerPort is --admin-port on the pod's address")
    check(not any(p["targetPort"] == "admin" for p in service["spec"]["ports"]),
          "the round-robin Service must not publish the admin API")
    check(c["resources"]["limits"].get("nvidia.com/gpu") == 1, "no GPU limit")
    liveness = open(repo_path("server/grpc/server.h")).read()
    live_name = re.search(r'kLivenessService\[\] = "([^"]+)"', liveness).group(1)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check(c[probe]["grpc"]["port"] == ports["grpc"], f"{probe} port")
    check("service" not in c["readinessProbe"]["grpc"], "readiness asks the whole server ('')")
    check(c["livenessProbe"]["grpc"]["service"] == live_name,
          f"liveness must ask {live_name}, which stays SERVING during a drain")
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    drain = int(flags["drain_timeout"].rstrip("s"))
    check(pod["terminationGracePeriodSeconds"] > drain + int(pre_stop[-1]),
          "terminationGracePeriodSeconds does not cover preStop + the drain")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    check(os.path.dirname(flags["admin_token_file"]) == mounts["admin-token"], "token mount")
    check(pod["securityContext"].get("fsGroup") == pod["securityContext"]["runAsUser"] and
          volumes["admin-token"]["secret"]["defaultMode"] & 0o040,
          "the non-root user cannot read the admin token Secret (fsGroup / defaultMode)")
    check(volumes["admin-token"]["secret"]["secretName"] == "moleserve-admin-token", "secret")
    for flag in ("admin_tls_cert_file", "admin_tls_key_file"):
        check(os.path.dirname(flags.get(flag, "")) == mounts["admin-tls"],
              f"--{flag} must come from the admin-tls mount: a reachable admin API needs TLS")
    check(volumes["admin-tls"]["secret"]["secretName"] == "moleserve-admin-tls" and
          volumes["admin-tls"]["secret"]["defaultMode"] & 0o040, "admin TLS secret")
    check(flags["model"].startswith(mounts["models"]) and
          flags["adapter_root"].startswith(mounts["adapters"]), "model / adapter mounts")
    for v in ("models", "adapters"):
        claim = volumes[v]["persistentVolumeClaim"]["claimName"]
        check(("PersistentVolumeClaim", claim) in by, f"no PersistentVolumeClaim {claim}")
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    check(ann["prometheus.io/port"] == str(ports["metrics"]), "scrape annotation port")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for svc_name in ("moleserve", "moleserve-replicas"):
        svc = by[("Service", svc_name)]
        check(all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()),
              f"Service {svc_name} selects no moleserve pod")
        for p in svc["spec"]["ports"]:
            check(p["targetPort"] in ports, f"Service {svc_name}: no container port {p}")
    check(by[("Service", "moleserve-replicas")]["spec"]["clusterIP"] == "None", "headless")
    mon = by[("ServiceMonitor", "moleserve")]
    check(mon["spec"]["endpoints"][0]["port"] in
          [p["name"] for p in by[("Service", "moleserve")]["spec"]["ports"]], "ServiceMonitor")
    # The router: deploy/nginx's moleserve.conf, hashing on the same key over the headless
    # Service of this namespace.
    cm = by[("ConfigMap", "moleserve-router")]["data"]
    with open(repo_path("deploy/nginx/moleserve.conf")) as f:
        check(cm["moleserve.conf"] == f.read(), "router ConfigMap: moleserve.conf differs from "
              "deploy/nginx/moleserve.conf")
    with open(repo_path("deploy/nginx/upstream.conf")) as f:
        hash_line = re.search(r"^\s*(hash .*;)", f.read(), re.M).group(1)
    check(hash_line in cm["upstream.conf"], "router: not the same hash as deploy/nginx")
    # One peer per pod (SRV records of the headless Service's grpc port), so each has its own
    # points on the hash ring.
    replicas_svc = by[("Service", "moleserve-replicas")]["spec"]["ports"]
    check(any(p["name"] == "grpc" for p in replicas_svc), "headless Service has no grpc port")
    check(any(p["name"] == "admin" and p["targetPort"] == "admin" for p in replicas_svc),
          "the headless Service publishes no admin port (SRV _admin._tcp for --all-replicas)")
    readme = open(repo_path("README.md")).read()
    check(f"srv:_admin._tcp.moleserve-replicas.{kust['namespace']}.svc.cluster.local" in readme,
          "the README's --all-replicas command does not name this namespace's SRV records")
    check(re.search(rf"server moleserve-replicas\.{kust['namespace']}\.svc\.cluster\.local "
                    r"service=grpc resolve ", cm["upstream.conf"]),
          "router upstream: not the SRV records of the headless Service")
    router = by[("Deployment", "moleserve-router")]["spec"]["template"]["spec"]
    router_ports = {p["name"] for p in router["containers"][0]["ports"]}
    check("listen 8080 http2;" in cm["moleserve.conf"] and
          router["containers"][0]["ports"][0]["containerPort"] == 8080, "router port")
    for p in by[("Service", "moleserve-router")]["spec"]["ports"]:
        check(p["targetPort"] in router_ports, "router Service targetPort")
    kubectl = shutil.which("kubectl")
    if kubectl:
        r = run([kubectl, "kustomize", root])
        check(r.returncode == 0, f"kubectl kustomize: {r.stderr}")
        check(len(list(yaml.safe_load_all(r.stdout))) == len(docs) - 1, "kustomize output")


def test_inference_gateway(tmp):
    """deploy/kubernetes/inference-gateway: the InferencePool selects the moleserve pods and
    targets their HTTP port, the EPP is wired to it, and every metric its flags name is one a
    running moleserve serves on that port, in the shape the EPP reads."""
    base = os.path.join(REPO, "deploy/kubernetes")
    root = os.path.join(base, "inference-gateway")
    kust = load_yaml_docs(os.path.join(root, "kustomization.yaml"))[0]
    check(kust["namespace"] == load_yaml_docs(os.path.join(base, "kustomization.yaml"))[0][
        "namespace"], "the pool lives in moleserve's namespace")
    docs = []
    for res in kust["resources"]:
        check(os.path.isfile(os.path.join(root, res)), f"kustomization: {res} is missing")
        docs += load_yaml_docs(os.path.join(root, res))
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    server = {(d["kind"], d["metadata"]["name"]): d
              for d in load_yaml_docs(os.path.join(base, "deployment.yaml"))}
    pod = server[("Deployment", "moleserve")]["spec"]["template"]
    c = pod["spec"]["containers"][0]
    http_port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    pool = by[("InferencePool", "moleserve")]
    check(pool["apiVersion"] == "inference.networking.k8s.io/v1", "InferencePool v1")
    check(all(pod["metadata"]["labels"].get(k) == v
              for k, v in pool["spec"]["selector"]["matchLabels"].items()),
          "the InferencePool selects no moleserve pod")
    check(pool["spec"]["targetPorts"][0]["number"] == http_port,
          "the pool targets the OpenAI-compatible HTTP port")
    ref = pool["spec"]["endpointPickerRef"]
    epp_svc = by[("Service", ref["name"])]
    epp = by[("Deployment", ref["name"])]["spec"]["template"]["spec"]
    epp_ports = {p["name"]: p["containerPort"] for p in epp["containers"][0]["ports"]}
    svc_port = next(p for p in epp_svc["spec"]["ports"] if p["port"] == ref["port"]["number"])
    check(epp_ports[svc_port["targetPort"]] == 9002, "endpointPickerRef reaches the ext-proc port")
    check(all(by[("Deployment", ref["name"])]["spec"]["template"]["metadata"]["labels"].get(k) == v
              for k, v in epp_svc["spec"]["selector"].items()), "the EPP Service selects no pod")
    binding = by[("RoleBinding", "moleserve-epp")]
    check(binding["subjects"][0]["name"] == epp["serviceAccountName"], "RBAC subject")
    args = epp["containers"][0]["args"]
    flags = dict(zip(args[0::2], args[1::2]))
    check(flags["--pool-name"] == pool["metadata"]["name"] and
          flags["--pool-namespace"] == kust["namespace"], "EPP --pool-name / --pool-namespace")
    route = by[("HTTPRoute", "moleserve")]
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    check(backend["kind"] == "InferencePool" and backend["name"] == pool["metadata"]["name"] and
          backend["group"] == "inference.networking.k8s.io", "HTTPRoute backendRef")
    # The metrics, from a running server's HTTP port after one request.
    server_proc = Moleserve(MOLESERVE, [], os.path.join(tmp, "gie.log")).wait_ready()
    try:
        m = re.search(r"serving the OpenAI-compatible HTTP API on [^\s:]+:(\d+)",
                      server_proc.output())
        check(m is not None, "no HTTP port in the log")
        port = int(m.group(1))
        body = json.dumps({"model": "moleserve-demo", "prompt": "x", "max_tokens": 2}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            check(r.status == 200, "completion")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            samples = parse_samples(r.read().decode())
    finally:
        server_proc.stop()
    names = {name for name, _ in samples}
    for flag in ("--total-queued-requests-metric", "--total-running-requests-metric",
                 "--kv-cache-usage-percentage-metric", "--lora-info-metric"):
        check(flags[flag] in names, f"EPP {flag} {flags[flag]}: not served on the HTTP port")
    kv = [v for (n, _), v in samples.items() if n == flags["--kv-cache-usage-percentage-metric"]]
    check(kv and all(0 <= v <= 1 for v in kv), "KV cache usage is a fraction")
    lora = [dict(labels) for n, labels in samples if n == flags["--lora-info-metric"]]
    check(len(lora) == 1 and {"running_lora_adapters", "waiting_lora_adapters",
                              "max_lora"} <= set(lora[0]), f"LoRA info labels: {lora}")
    kubectl = shutil.which("kubectl")
    if kubectl:
        r = run([kubectl, "kustomize", root])
        check(r.returncode == 0, f"kubectl kustomize: {r.stderr}")


def test_nginx_syntax(tmp):
    """deploy/nginx/nginx.conf with its includes passes `nginx -t` (paths moved into tmp)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        check(False, "nginx is not installed (scripts/setup.sh installs nginx-light)")
    top = open(repo_path("deploy/nginx/nginx.conf")).read()
    top = top.replace("/etc/nginx/moleserve/", os.path.join(REPO, "deploy/nginx") + "/")
    top = f"pid {tmp}/nginx.pid;\n" + top
    upstream = open(repo_path("deploy/nginx/upstream.conf")).read()
    # The example replica names do not resolve here; nginx -t resolves them.
    upstream = re.sub(r"server moleserve-\d+:", "server 127.0.0.1:", upstream)
    with open(os.path.join(tmp, "upstream.conf"), "w") as f:
        f.write(upstream)
    top = top.replace(os.path.join(REPO, "deploy/nginx/upstream.conf"),
                      os.path.join(tmp, "upstream.conf"))
    path = os.path.join(tmp, "nginx.conf")
    with open(path, "w") as f:
        f.write(top)
    r = run([nginx, "-t", "-c", path, "-p", tmp + "/"])
    check(r.returncode == 0, f"nginx -t: {r.stderr}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="moleserve_deploy_") as tmp:
        sys.exit(run_tests([("compose", test_compose), ("dockerfiles", test_dockerfiles),
                            ("kubernetes", test_kubernetes),
                            ("inference_gateway", test_inference_gateway),
                            ("nginx_syntax", test_nginx_syntax)],
                           tmp))
