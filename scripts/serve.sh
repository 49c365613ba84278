#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a running server on the trained demo model
# (models/demo, tools/train_demo) with its three adapters loaded (code, mail, mixlora):
#   ./scripts/serve.sh [moleserve flags...]     e.g. ./scripts/serve.sh --port 50051
# With --model among the flags, that model is served instead, without the demo adapters.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh moleserve molectl moleserve-write-demo
demo=(--model models/demo --adapter code=models/demo/adapters/code
      --adapter mail=models/demo/adapters/mail --adapter mixlora=models/demo/adapters/mixlora)
for arg in "$@"; do
  case "$arg" in --model | --model=*) demo=() ;; esac
done
exec ./build/dev/server/moleserve "${demo[@]}" "$@"
