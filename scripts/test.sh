#!/usr/bin/env bash
# The test command (README, .ci/run): sets up what is missing, then runs every test on CPU,
# for the default build (with the libtorch engine) and the pure-Rust build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
[[ -d ../shared/models/stories260K ]] || { echo "error: ../shared (models and data) must sit beside the repository" >&2; exit 1; }
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)
cargo test --workspace --all-targets
# The pure-Rust binary: no libtorch at build or run time.
cargo test -p binllm-cli --no-default-features
# A short fuzz pass (30 s per target, from the seed corpus) so a reader regression shows;
# the long runs are tools/fuzz/run.sh with a longer time (docs/results/*-fuzz.md).
bash tools/fuzz/run.sh "${BINLLM_FUZZ_SECONDS:-30}"
