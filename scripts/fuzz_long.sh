#!/usr/bin/env bash
# The long fuzzing run behind bench/results/fuzz.json: every target (or the ones named), one
# after the other in one process each, until RUNS executions or SECONDS, whichever comes first,
# then the report: executions, exec/s, coverage (cov/ft of libFuzzer's last stats line), corpus
# size, crashes found (new files in build/fuzz/runs/TARGET/artifacts), the fixed crashes listed in
# tests/fuzz/crashes_fixed.json, date, commit and machine.
#   ./scripts/fuzz_long.sh                       # 1000000 runs or 1800 s per target, all targets
#   RUNS=200000 SECONDS_CAP=600 ./scripts/fuzz_long.sh safetensors_fuzz tokenizer_fuzz
#   ./scripts/fuzz_long.sh --report-only         # rewrite the JSON from the last logs
# FUZZ_REPORT_NOTE, when set, is stored as the report's "note".
# Targets not run this time keep their previous entry in the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-1000000}
cap=${SECONDS_CAP:-1800}
out=bench/results/fuzz.json
report_only=0
if [ "${1:-}" = --report-only ]; then
  report_only=1
  shift
fi
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(./scripts/fuzz.sh list)
fi

if [ $report_only -eq 0 ]; then
  for t in "${targets[@]}"; do
    t=${t%_fuzz}_fuzz
    start=$(date +%s)
    set +e
    ./scripts/fuzz.sh "$t" "$cap" -runs="$runs"
    rc=$?
    set -e
    echo "$rc $(( $(date +%s) - start )) $(git rev-parse HEAD) $(date -u +%Y-%m-%dT%H:%M:%SZ)" \
      > "build/fuzz/runs/$t/long_run_status"
  done
fi

mkdir -p "$(dirname "$out")"
python3 - "$out" "${targets[@]}" <<'EOF'
import datetime, json, os, re, subprocess, sys

out, targets = sys.argv[1], [t if t.endswith("_fuzz") else t + "_fuzz" for t in sys.argv[2:]]
report = {}
if os.path.exists(out):
    with open(out) as f:
        report = json.load(f)
fixed = []
if os.path.exists("tests/fuzz/crashes_fixed.json"):
    with open("tests/fuzz/crashes_fixed.json") as f:
        fixed = json.load(f)
cpu = "unknown"
with open("/proc/cpuinfo") as f:
    for line in f:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
report["machine"] = {"nproc": os.cpu_count(), "cpu": cpu,
                     "note": "one libFuzzer process per target, run one after the other"}
report["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                      text=True).stdout.strip()
report["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                          capture_output=True, text=True).stdout.strip())
report["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
if os.environ.get("FUZZ_REPORT_NOTE"):
    report["note"] = os.environ["FUZZ_REPORT_NOTE"]
report["command"] = "scripts/fuzz_long.sh (RUNS=%s SECONDS_CAP=%s)" % (
    os.environ.get("RUNS", "1000000"), os.environ.get("SECONDS_CAP", "1800"))
entries = report.setdefault("targets", {})
for t in targets:
    d = os.path.join("build/fuzz/runs", t)
    log = os.path.join(d, "log.txt")
    if not os.path.exists(log):
        continue
    text = open(log, errors="replace").read()
    stats = dict(re.findall(r"^stat::(\w+):\s+(\d+)", text, re.M))
    last = [l for l in text.splitlines() if re.match(r"^#\d+\s+(DONE|pulse|NEW|REDUCE)", l)]
    m = re.search(r"cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)", last[-1]) if last else None
    rc, wall, commit, finished = None, None, None, None
    status = os.path.join(d, "long_run_status")
    if os.path.exists(status):
        fields = open(status).read().split()
        rc, wall = int(fields[0]), int(fields[1])
        if len(fields) >= 4:
            commit, finished = fields[2], fields[3]
    crashes = re.findall(r"Test unit written to (\S+)", text)
    entries[t] = {
        "executions": int(stats.get("number_of_executed_units", 0)),
        "exec_per_sec": int(stats.get("average_exec_per_sec", 0)),
        "wall_seconds": wall,
        "cov": int(m.group(1)) if m else None,
        "ft": int(m.group(2)) if m else None,
        "corpus_units": int(m.group(3)) if m else None,
        "corpus_size": m.group(4) if m else None,
        "peak_rss_mb": int(stats.get("peak_rss_mb", 0)),
        "exit_status": rc,
        "git_commit": commit,
        "finished": finished,
        "crashes_found": [os.path.basename(c) for c in crashes],
        "crashes_fixed": [x for x in fixed if x["target"] == t],
        "last_stats_line": last[-1] if last else None,
    }
with open(out, "w") as f:
    json.dump(report, f, indent=2, ensure_ascii=False)
    f.write("\n")
print("wrote", out)
EOF
