#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a running server on the built-in demo model:
#   ./scripts/serve.sh [moleserve flags...]     e.g. ./scripts/serve.sh --port 50051
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh moleserve molectl moleserve-write-demo
exec ./build/dev/server/moleserve "$@"
