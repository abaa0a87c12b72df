#!/usr/bin/env bash
# Builds llama.cpp, the peer that `specdec bench --llama-cpp DIR` races against, from the copy
# vendored in the llama-cpp-python sdist on PyPI (no git clone, no network beyond the registry).
# Only the three programs the benchmark runs are built: llama-bench, llama-lookup and
# llama-speculative-simple (about 18 minutes on 2 cores for the whole tree, less for these three).
# Usage: scripts/build_llama_cpp.sh [OUT_DIR]   (default ~/.cache/specdec/llama.cpp)
#   JOBS=2 parallel compile jobs; VERSION=0.3.16 pins the sdist (default: the newest).
# The binaries land in OUT_DIR/build/bin; pass OUT_DIR/build/bin to `specdec bench --llama-cpp`.
set -euo pipefail
OUT=${1:-$HOME/.cache/specdec/llama.cpp}
JOBS=${JOBS:-2}
PIP=${PIP:-pip}
SPEC=llama-cpp-python${VERSION:+==$VERSION}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [ ! -f "$OUT/src/CMakeLists.txt" ]; then
  echo "downloading the $SPEC sdist into $OUT/sdist" >&2
  "$PIP" download --no-deps --no-binary :all: --dest "$OUT/sdist" "$SPEC"
  SDIST=$(ls -t "$OUT"/sdist/llama_cpp_python-*.tar.gz | head -n 1)
  rm -rf "$OUT/unpacked" && mkdir -p "$OUT/unpacked"
  tar -xzf "$SDIST" -C "$OUT/unpacked"
  rm -rf "$OUT/src"
  mv "$OUT"/unpacked/llama_cpp_python-*/vendor/llama.cpp "$OUT/src"
  rm -rf "$OUT/unpacked"
fi

cmake -S "$OUT/src" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF
cmake --build "$OUT/build" --config Release -j "$JOBS" \
  --target llama-bench llama-lookup llama-speculative-simple
for exe in llama-bench llama-lookup llama-speculative-simple; do
  test -x "$OUT/build/bin/$exe" || { echo "build_llama_cpp: $exe was not built" >&2; exit 1; }
done
echo "$OUT/build/bin"
