#!/usr/bin/env bash
# Builds llama.cpp's llama-bench, llama-quantize, llama-perplexity and the non-interactive
# greedy-completion tool (llama-completion; in older trees llama-cli, which newer trees build
# only with the server) from the llama.cpp source tree
# that the llama-cpp-python sdist on PyPI vendors (a registry download; nothing is vendored here).
# The default, 0.3.36, vendors a llama.cpp with the Q1_0, Q2_0, TQ1_0 and TQ2_0 types that
# `binllm export --format gguf` writes.
# Usage: tools/bench/setup_llama_cpp.sh [WORK_DIR]   (default: target/bench)
# Prints nothing but progress; leaves the tools in WORK_DIR/llama.cpp/build/bin/ (and
# llama-server with WITH_SERVER=1, for tools/bench/serve_bench.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
WORK=${1:-target/bench}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SRC="$WORK/llama.cpp"
BIN="$SRC/build/bin"
TOOLS=(llama-bench llama-quantize llama-perplexity)
# Newer trees split non-interactive completion out of llama-cli into llama-completion (and
# build llama-cli, now a chat client of the server, only with LLAMA_BUILD_SERVER).
completion_tool() {
  if [[ ! -d "$SRC" || -d "$SRC/tools/completion" ]]; then echo llama-completion; else echo llama-cli; fi
}
all_built() {
  local tool
  for tool in "${TOOLS[@]}"; do [[ -x "$BIN/$tool" ]] || return 1; done
}
# A tree of another version (e.g. the 0.3.16 this script used to fetch) is replaced.
if [[ -d "$SRC" && "$(cat "$SRC/.llama-cpp-python-version" 2>/dev/null)" != "$VERSION" ]]; then
  echo "replacing the llama.cpp tree in $SRC with the one of llama-cpp-python $VERSION"
  rm -rf "$SRC"
fi
TOOLS+=("$(completion_tool)")
SERVER=OFF
if [[ "${WITH_SERVER:-0}" == 1 ]]; then
  TOOLS+=(llama-server)
  SERVER=ON
fi
if all_built; then
  echo "llama.cpp tools already built in $BIN"
  exit 0
fi
if [[ ! -x "$WORK/venv/bin/cmake" ]]; then
  python3 -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q cmake ninja scikit-build-core
fi
if [[ ! -d "$SRC" ]]; then
  # Only the source distribution is wanted: no build isolation, so pip does not build cmake
  # from source to prepare its metadata.
  "$WORK/venv/bin/pip" install -q scikit-build-core
  "$WORK/venv/bin/pip" download -q --no-deps --no-build-isolation --no-binary llama-cpp-python \
    -d "$WORK/sdist" "llama-cpp-python==$VERSION"
  tar -xzf "$WORK"/sdist/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
  mv "$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp" "$SRC"
  rm -rf "$WORK/llama_cpp_python-$VERSION"
  echo "$VERSION" > "$SRC/.llama-cpp-python-version"
fi
TOOLS[3]=$(completion_tool)
# Native CPU build (AVX-512 where the CPU has it), no GPU backends, no curl.
"$WORK/venv/bin/cmake" -S "$SRC" -B "$SRC/build" -G Ninja \
  -DCMAKE_MAKE_PROGRAM="$WORK/venv/bin/ninja" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=$SERVER -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF >/dev/null
"$WORK/venv/bin/cmake" --build "$SRC/build" --target "${TOOLS[@]}" -j "$(nproc)"
echo "built: ${TOOLS[*]/#/$BIN/}"
