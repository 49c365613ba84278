#!/usr/bin/env bash
# Installs the Debian 12 packages moleserve builds and tests with, and the npm packages of
# tests/tokenizer_compat, tests/chat_template and tests/openai_client (idempotent: skips apt and npm
# when everything is already installed).
# The CUDA toolkit is not a Debian package here: when /usr/local/cuda/bin/nvcc exists the CUDA
# backend is compiled too, otherwise it is left out.
#   ./scripts/setup.sh                # build + test dependencies (the README's test command)
#   ./scripts/setup.sh --build-only   # what `build.sh --release` needs (the Docker images)
set -euo pipefail
build_only=0
case "${1:-}" in
  "") ;;
  --build-only) build_only=1 ;;
  *) echo "usage: $0 [--build-only]" >&2; exit 2 ;;
esac
packages=(
  build-essential cmake ninja-build pkg-config ccache git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  prometheus-cpp-dev libopenblas-dev nlohmann-json3-dev libspdlog-dev
  libpcre2-dev libicu-dev libssl-dev libboost-dev python3
)
if [ $build_only -eq 0 ]; then
  # Tests: GoogleTest, torch (the model reference), clang-format (the format check), the real
  # Prometheus and nginx that tests/deploy runs the deploy/ configs with, and clang 14 with its
  # sanitizer/libFuzzer runtimes for the fuzz targets (scripts/fuzz.sh), and the openssl command
  # that makes the TLS tests' certificates; dnspython for the DNS test double that molectl's
  # --all-replicas resolves against.
  packages+=(curl clang-format libgtest-dev libgmock-dev python3-numpy python3-torch python3-yaml
             python3-dnspython prometheus nginx-light clang libclang-rt-14-dev openssl)
  # Node.js runs Hugging Face's tokenizers for tests/tokenizer_compat. Debian's nodejs/npm only
  # when no node is installed (a machine may already have a newer one).
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    packages+=(nodejs npm)
  fi
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
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

[ $build_only -eq 1 ] && exit 0

# The npm packages of tests/tokenizer_compat (HF tokenizers' node binding and real tokenizer.json
# files), tests/chat_template (HF's template engine and real chat templates) and tests/openai_client
# (the openai SDK), exactly as their package-lock.json pins them; skipped when that lock is already
# installed.
root="$(cd "$(dirname "$0")/.." && pwd)"
for dir in tests/tokenizer_compat tests/chat_template tests/openai_client; do
  stamp="$root/$dir/node_modules/.moleserve-lock"
  if cmp -s "$root/$dir/package-lock.json" "$stamp"; then
    echo "setup: $dir node_modules up to date"
  else
    echo "setup: npm ci in $dir"
    (cd "$root/$dir" && npm ci --no-audit --no-fund --loglevel=error)
    cp "$root/$dir/package-lock.json" "$stamp"
  fi
done
