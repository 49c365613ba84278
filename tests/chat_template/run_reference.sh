#!/usr/bin/env bash
# ctest fixture (chat_template_reference): regenerates Hugging Face's chat template renderings
# into OUT_DIR with reference.js. Without node or node_modules it exits 77 (ctest: skipped), or 1
# when CI=true, where scripts/setup.sh must have run `npm ci`.
#   run_reference.sh OUT_DIR
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$1"
rm -rf "$out"
missing=""
if ! command -v node >/dev/null 2>&1; then
  missing="node is not installed"
elif [ ! -d "$here/node_modules/@huggingface/jinja" ]; then
  missing="$here/node_modules is missing (run: npm ci --prefix $here, as scripts/setup.sh does)"
fi
if [ -n "$missing" ]; then
  if [ "${CI:-}" = "true" ]; then
    echo "chat_template: FAILED: $missing" >&2
    exit 1
  fi
  echo "chat_template: skipped: $missing"
  exit 77
fi
exec node "$here/reference.js" "$out"
