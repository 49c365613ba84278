#!/usr/bin/env bash
# Installs a built tree into PREFIX as a self-contained bundle, the way the Docker images ship it:
#   PREFIX/bin/{moleserve,molectl}, PREFIX/lib/libmoleserve_cuda.so (CUDA builds), and in PREFIX/lib
#   every shared library they load except glibc's, the C++ runtime's and CUDA's (the CUDA runtime
#   image and the NVIDIA driver provide those). Run it with LD_LIBRARY_PATH=PREFIX/lib.
#
#   ./scripts/install.sh PREFIX [BUILD_DIR]      # BUILD_DIR defaults to build/image
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:?usage: $0 PREFIX [BUILD_DIR]}
build=${2:-build/image}
cmake --install "$build" --prefix "$prefix" --strip > /dev/null
mkdir -p "$prefix/lib"
# Provided by every base image (glibc, libstdc++, libgcc) or by the CUDA image and driver.
system='^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libresolv|libutil|libstdc\+\+|libgcc_s|libcuda|libcudart|libcublas|libcublasLt|libnvidia)\.so'
for object in "$prefix"/bin/* "$prefix"/lib/libmoleserve_cuda.so; do
  [ -e "$object" ] || continue
  # ldd lists every library the object loads, transitively, with its resolved path.
  ldd "$object" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r name path; do
    if [[ "$name" =~ $system ]] || [ -e "$prefix/lib/$name" ]; then continue; fi
    cp -L "$path" "$prefix/lib/$name"
  done
done
echo "installed into $prefix: $(ls "$prefix/bin" | tr '\n' ' ')+ $(ls "$prefix/lib" | wc -l) libraries"
