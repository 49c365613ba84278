#!/usr/bin/env bash
# Formatting check (STYLE.md section 8): every tracked C++, CUDA and proto file is as
# clang-format (.clang-format: Google, 100 columns) would write it.
set -euo pipefail
cd "$1"
mapfile -t files < <(git ls-files '*.h' '*.cc' '*.cu' '*.cuh' '*.proto')
if [ ${#files[@]} -eq 0 ]; then
  echo "format: no files found (not a git checkout?)"
  exit 1
fi
clang-format --dry-run --Werror "${files[@]}"
echo "format: ${#files[@]} files clean"
