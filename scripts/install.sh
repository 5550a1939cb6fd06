#!/usr/bin/env bash
# Builds the release binary (with the libtorch engine) and links it as bin/binllm, so that
# `export PATH="$PWD/bin:$PATH"` puts `binllm` on the PATH, as the README's commands expect.
# Runs set-up first when libtorch or the default model is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo build --release -p binllm-cli
mkdir -p bin
ln -sfn ../target/release/binllm bin/binllm
echo "binllm is bin/binllm; put it on your PATH with:  export PATH=\"$PWD/bin:\$PATH\"" >&2
