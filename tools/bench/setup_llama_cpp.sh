#!/usr/bin/env bash
# Builds llama.cpp's llama-bench and llama-quantize from the llama.cpp source tree that the
# llama-cpp-python sdist on PyPI vendors (a registry download; nothing is vendored here).
# Usage: tools/bench/setup_llama_cpp.sh [WORK_DIR]   (default: target/bench)
# Prints nothing but progress; leaves WORK_DIR/llama.cpp/build/bin/{llama-bench,llama-quantize}
# (and llama-server with WITH_SERVER=1, for tools/bench/serve_bench.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
WORK=${1:-target/bench}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.16}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
BIN="$WORK/llama.cpp/build/bin"
TARGETS=(llama-bench llama-quantize)
SERVER=OFF
if [[ "${WITH_SERVER:-0}" == 1 ]]; then
  TARGETS+=(llama-server)
  SERVER=ON
fi
missing=0
for t in "${TARGETS[@]}"; do [[ -x "$BIN/$t" ]] || missing=1; done
if [[ $missing == 0 ]]; then
  echo "llama.cpp tools already built in $BIN"
  exit 0
fi
if [[ ! -x "$WORK/venv/bin/cmake" ]]; then
  python3 -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q cmake ninja scikit-build-core
fi
if [[ ! -d "$WORK/llama.cpp" ]]; then
  # Only the source distribution is wanted: no build isolation, so pip does not build cmake
  # from source to prepare its metadata.
  "$WORK/venv/bin/pip" install -q scikit-build-core
  "$WORK/venv/bin/pip" download -q --no-deps --no-build-isolation --no-binary llama-cpp-python \
    -d "$WORK/sdist" "llama-cpp-python==$VERSION"
  tar -xzf "$WORK"/sdist/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
  mv "$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp" "$WORK/llama.cpp"
  rm -rf "$WORK/llama_cpp_python-$VERSION"
fi
# Native CPU build (AVX-512 where the CPU has it), no GPU backends, no curl.
"$WORK/venv/bin/cmake" -S "$WORK/llama.cpp" -B "$WORK/llama.cpp/build" -G Ninja \
  -DCMAKE_MAKE_PROGRAM="$WORK/venv/bin/ninja" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=$SERVER -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF >/dev/null
"$WORK/venv/bin/cmake" --build "$WORK/llama.cpp/build" --target "${TARGETS[@]}" -j "$(nproc)"
echo "built: ${TARGETS[*]/#/$BIN/}"
