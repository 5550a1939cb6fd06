#!/usr/bin/env bash
# The main job on the default model: set up, build the release binary, and run binllm on
# SmolLM2-135M-Instruct (on CUDA when libtorch sees a GPU, else on CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo build --release -p binllm-cli
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
./target/release/binllm inspect "$model"
./target/release/binllm generate "$model" --chat --stats --max-tokens 96 \
  --prompt "Explain in two sentences why the sky is blue."
