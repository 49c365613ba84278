#!/usr/bin/env bash
# Installs the Debian 12 packages moleserve builds and tests with, and the npm packages of
# tests/tokenizer_compat (idempotent: skips apt and npm when everything is already installed).
# The CUDA toolkit is not a Debian package here: when /usr/local/cuda/bin/nvcc exists the CUDA
# backend is compiled too, otherwise it is left out.
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config ccache git curl clang-format
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  prometheus-cpp-dev libopenblas-dev nlohmann-json3-dev libspdlog-dev
  libgtest-dev libgmock-dev libpcre2-dev libicu-dev libssl-dev
  python3 python3-numpy python3-torch
)
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
# Node.js runs Hugging Face's tokenizers for tests/tokenizer_compat. Debian's nodejs/npm only when
# no node is installed (a machine may already have a newer one).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  packages+=(nodejs npm)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
else
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The npm packages of tests/tokenizer_compat (HF tokenizers' node binding and real tokenizer.json
# files), exactly as package-lock.json pins them; skipped when that lock is already installed.
compat="$(cd "$(dirname "$0")/.." && pwd)/tests/tokenizer_compat"
stamp="$compat/node_modules/.moleserve-lock"
if cmp -s "$compat/package-lock.json" "$stamp"; then
  echo "setup: tests/tokenizer_compat node_modules up to date"
else
  echo "setup: npm ci in tests/tokenizer_compat"
  (cd "$compat" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$compat/package-lock.json" "$stamp"
fi
