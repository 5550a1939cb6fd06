#!/usr/bin/env bash
# Fuzzes every reader of a stranger's file (cargo-fuzz + libFuzzer, on the stable compiler
# with `--sanitizer none`): SECONDS per target, then a table of executions and findings.
# A blow-up counts as a finding: libFuzzer's -rss_limit_mb / -malloc_limit_mb are set.
#
# Usage: tools/fuzz/run.sh [SECONDS_PER_TARGET (default 60)] [TARGET ...]
#   Corpora: fuzz/corpus/TARGET (seeded from ../shared and the test fixtures; not committed)
#   Findings: fuzz/artifacts/TARGET/; logs and summary.{tsv,json}: fuzz/logs/
# Exit status: 1 if any target found a crash, leak, timeout or memory blow-up.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=$PWD
seconds=${1:-60}
shift || true
all_targets=(gguf packed hf_dir llama2c llama2c_tokenizer hf_tokenizer chat_template serve_request)
targets=("${@:-${all_targets[@]}}")
[[ $# -gt 0 ]] || targets=("${all_targets[@]}")

export PATH="$root/.deps/cargo-fuzz/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "[fuzz] installing cargo-fuzz into .deps/cargo-fuzz (crates.io)" >&2
  cargo install --quiet --locked cargo-fuzz --version 0.13.2 --root "$root/.deps/cargo-fuzz"
fi
shared="$root/../shared"
[[ -d "$shared/models/stories260K" ]] || { echo "error: ../shared must sit beside the repository" >&2; exit 1; }

say() { printf '[fuzz] %s\n' "$*" >&2; }

# Seeds: real files, copied (not committed), and generated ones.
seed_dir="$root/fuzz/seeds"
mkdir -p "$seed_dir"/{gguf,packed,llama2c,llama2c_tokenizer}
fixtures="$root/crates/binllm-format/tests/fixtures/gguf"
cp -f "$fixtures"/*.gguf "$seed_dir/gguf/"
cp -f "$shared/models/stories260K/stories260K.bin" "$seed_dir/llama2c/"
cp -f "$shared/models/stories260K/tok512.bin" "$seed_dir/llama2c_tokenizer/"
say "building the seed makers"
cargo run --quiet -p binllm-testing --example fuzz_seeds -- "$seed_dir" >&2
if [[ ! -s "$seed_dir/packed/stories.b1" ]]; then
  cargo run --quiet -p binllm-cli --no-default-features -- export --ptq \
    "$shared/models/stories260K/stories260K.bin" --tokenizer "$shared/models/stories260K/tok512.bin" \
    --head q8 --out "$seed_dir/packed/stories.b1" >/dev/null
fi

# serve_request runs a server on this model inside the fuzzer.
export BINLLM_FUZZ_SERVE_MODEL="$seed_dir/packed/stories.b1"

say "building the fuzz targets (release, --sanitizer none)"
(cd fuzz && cargo fuzz build --sanitizer none --release >&2)

logs="$root/fuzz/logs"
mkdir -p "$logs"
summary="$logs/summary.tsv"
header=$'target\tseconds\texecutions\texec_per_s\tcorpus\tfindings'
failed=0
for target in "${targets[@]}"; do
  corpus="$root/fuzz/corpus/$target"
  artifacts="$root/fuzz/artifacts/$target"
  mkdir -p "$corpus" "$artifacts"
  cp -f "$seed_dir/$target"/* "$corpus/" 2>/dev/null || true
  before=$(find "$artifacts" -type f | wc -l)
  say "$target: ${seconds}s"
  set +e
  (cd fuzz && cargo fuzz run --sanitizer none --release "$target" "$corpus" -- \
    -max_total_time="$seconds" -rss_limit_mb=1024 -malloc_limit_mb=512 -timeout=10 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 -close_fd_mask=1) >"$logs/$target.log" 2>&1
  status=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logs/$target.log" | grep -o '[0-9]*$' | tail -1)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$logs/$target.log" | grep -o '[0-9]*$' | tail -1)
  found=$(( $(find "$artifacts" -type f | wc -l) - before ))
  size=$(find "$corpus" -type f | wc -l)
  # One row per target, so runs of different targets side by side share the summary.
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$seconds" "${execs:-0}" "${rate:-0}" "$size" "$found" >"$logs/$target.tsv"
  if [[ $status -ne 0 || $found -ne 0 ]]; then
    say "$target: FINDING (exit $status); see $logs/$target.log and $artifacts"
    tail -30 "$logs/$target.log" >&2
    failed=1
  fi
done
{ echo "$header"; for t in "${all_targets[@]}"; do if [[ -f "$logs/$t.tsv" ]]; then cat "$logs/$t.tsv"; fi; done; } >"$summary"
column -t -s $'\t' "$summary" 2>/dev/null || cat "$summary"
python3 - "$summary" >"$logs/summary.json" <<'PY'
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print(json.dumps(rows, indent=1))
PY
exit $failed
