#!/usr/bin/env bash
# Aggregate decode tokens/s of `binllm serve` with 1, 4 and 16 concurrent streams on the default
# model (SmolLM2-135M-Instruct, binarized by PTQ: the size and speed of a converted model), and
# of llama.cpp's llama-server on the same model in Q4_0 when LLAMA_SERVER names its binary.
# Usage: tools/bench/serve_bench.sh   (env: THREADS=2 TOKENS=128 REPS=3 STREAMS=1,4,16
#        LLAMA_SERVER=path/to/llama-server LLAMA_GGUF=path/to/model.Q4_0.gguf)
# Prints markdown tables (crates/binllm-serve/examples/serve_bench.rs says what is measured).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
THREADS=${THREADS:-2} TOKENS=${TOKENS:-128} REPS=${REPS:-3} STREAMS=${STREAMS:-1,4,16}
target=target/pure-rust
cargo build --quiet --release -p binllm-cli --no-default-features --target-dir "$target"
cargo build --quiet --release -p binllm-serve --example serve_bench --target-dir "$target"
binllm="$target/release/binllm"
bench="$target/release/examples/serve_bench"
model=${MODEL:-smollm2-ptq.b1}
if [[ ! -f "$model" ]]; then
  "$binllm" export --ptq models/SmolLM2-135M-Instruct.Q4_1.gguf --head q8 --out "$model" >/dev/null
fi
log=$(mktemp)
"$binllm" serve --model "$model" --port 0 --threads "$THREADS" --max-sequences 16 >"$log" &
server=$!
trap 'kill -INT $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do grep -q "http://" "$log" && break; sleep 0.1; done
addr=$(grep -o 'http://[0-9.:]*' "$log" | head -1 | sed 's|http://||')
name=$(basename "$model" .b1)
echo "## binllm serve, $model (q8_0 head), --threads $THREADS, $(date -u +%FT%TZ)"
"$bench" --addr "$addr" --model "$name" --streams "$STREAMS" --tokens "$TOKENS" --reps "$REPS"
kill -INT $server; wait $server || true
trap - EXIT; rm -f "$log"

if [[ -n "${LLAMA_SERVER:-}" ]]; then
  gguf=${LLAMA_GGUF:?LLAMA_GGUF: the model in Q4_0}
  port=18089
  "$LLAMA_SERVER" -m "$gguf" --host 127.0.0.1 --port $port -t "$THREADS" -np 16 -c $((16 * 512)) \
    --cont-batching >/dev/null 2>&1 &
  llama=$!
  trap 'kill $llama 2>/dev/null || true' EXIT
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
  echo
  echo "## llama-server, $(basename "$gguf"), -t $THREADS -np 16"
  "$bench" --addr "127.0.0.1:$port" --model "$(basename "$gguf")" --streams "$STREAMS" --tokens "$TOKENS" --reps "$REPS"
fi
