#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a running server on the trained demo model
# (models/demo, tools/train_demo) with its three adapters loaded (code, mail, mixlora):
#   ./scripts/serve.sh [moleserve flags...]     e.g. ./scripts/serve.sh --port 50051
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh moleserve molectl moleserve-write-demo
demo=models/demo
exec ./build/dev/server/moleserve --model "$demo" \
  --adapter "code=$demo/adapters/code" --adapter "mail=$demo/adapters/mail" \
  --adapter "mixlora=$demo/adapters/mixlora" "$@"
