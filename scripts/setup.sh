#!/usr/bin/env bash
# Installs the Debian 12 packages moleserve builds and tests with (idempotent: skips apt when
# everything is already installed). The CUDA toolkit is not a Debian package here: when
# /usr/local/cuda/bin/nvcc exists the CUDA backend is compiled too, otherwise it is left out.
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config ccache git curl clang-format
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  prometheus-cpp-dev libopenblas-dev nlohmann-json3-dev libspdlog-dev
  libgtest-dev libgmock-dev
  python3 python3-numpy python3-torch
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi
echo "setup: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
