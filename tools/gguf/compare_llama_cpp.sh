#!/usr/bin/env bash
# binllm's packed engine against llama.cpp on the same 1-bit GGUF (`binllm export --format
# gguf`): WikiText-2 perplexity under llama-perplexity's protocol on both sides (binllm eval
# --llama-cpp-perplexity on the raw file), and greedy completions of three prompts.
#
#   tools/gguf/compare_llama_cpp.sh MODEL.gguf [CHUNKS] [CTX]      (defaults: 8 chunks of 512)
#
# Environment: LLAMA_CPP_BIN (llama.cpp's bin folder; default: built by
# tools/bench/setup_llama_cpp.sh), BINLLM (a binllm binary; default: the pure-Rust build in
# target/pure-rust), TOKENS (greedy tokens, 32), THREADS (2).
#
# MODEL.gguf is read by both engines as is (binllm reads Q1_0 / Q2_0 block linears straight
# into its sign bits). llama.cpp runs with an f32 KV cache (-ctk f32 -ctv f32), as binllm
# keeps its cache; its Q1_0 / Q2_0 products still quantize activations to q8_0, binllm's do
# not. Prints Markdown; the logs go to target/gguf-compare/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
MODEL=${1:?usage: compare_llama_cpp.sh MODEL.gguf [CHUNKS] [CTX]}
CHUNKS=${2:-8}
CTX=${3:-512}
TOKENS=${TOKENS:-32}
THREADS=${THREADS:-2}
WIKI=$(realpath "${WIKI:-../shared/data/eval/wikitext-2-raw/wiki.test.raw}")
BIN=${LLAMA_CPP_BIN:-target/bench/llama.cpp/build/bin}
BINLLM_GIVEN=${BINLLM:-}
BINLLM=${BINLLM:-target/pure-rust/release/binllm}
OUT=target/gguf-compare
mkdir -p "$OUT"
name=$(basename "$MODEL" .gguf)

# LLAMA_CPP_BIN and BINLLM name tools built elsewhere; otherwise they are built here.
[[ -n "${LLAMA_CPP_BIN:-}" ]] || bash tools/bench/setup_llama_cpp.sh >&2
# The pure-Rust build has its own target directory: it must not replace the libtorch build.
[[ -n "$BINLLM_GIVEN" ]] || \
  cargo build -q --release -p binllm-cli --no-default-features --target-dir target/pure-rust >&2

# llama-perplexity logs from a thread and now and then exits (status 0) before its last lines
# are out; such a run is repeated.
llama_ppl=
for _ in 1 2 3; do
  "$BIN/llama-perplexity" -m "$MODEL" -f "$WIKI" -c "$CTX" --chunks "$CHUNKS" -t "$THREADS" \
    -b "$CTX" -ctk f32 -ctv f32 > "$OUT/$name-llama-perplexity.log" 2>&1
  llama_ppl=$(grep -ao 'Final estimate: PPL = [0-9.]*' "$OUT/$name-llama-perplexity.log" | awk '{print $NF}' || true)
  [[ -n "$llama_ppl" ]] && break
done
[[ -n "$llama_ppl" ]] || { echo "error: llama-perplexity printed no final estimate (see $OUT)" >&2; exit 1; }
"$BINLLM" eval --model "$MODEL" --tasks "file:$WIKI" --ctx "$CTX" --limit "$CHUNKS" \
  --llama-cpp-perplexity --threads "$THREADS" --out "$OUT/$name-binllm-eval.json" > /dev/null 2>&1
binllm_ppl=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["perplexity"][0]["ppl"])' \
  "$OUT/$name-binllm-eval.json")
echo "| model | chunks x ctx | llama-perplexity | binllm eval | difference |"
echo "|---|---|---:|---:|---:|"
python3 -c 'import sys; l, b = float(sys.argv[2]), float(sys.argv[3]); print(f"| {sys.argv[1]} | {sys.argv[4]} | {l:.4f} | {b:.4f} | {100 * (b - l) / l:+.3f}% |")' \
  "$name" "$llama_ppl" "$binllm_ppl" "$CHUNKS x $CTX"

echo
echo "| prompt | identical greedy text | llama.cpp | binllm |"
echo "|---|---|---|---|"
while IFS= read -r prompt; do
  llama=$("$BIN/llama-completion" -m "$MODEL" -p "$prompt" -n "$TOKENS" --temp 0 -t "$THREADS" \
    -ctk f32 -ctv f32 -no-cnv --no-warmup 2>/dev/null < /dev/null)
  ours=$("$BINLLM" run --model "$MODEL" --prompt "$prompt" --max-tokens "$TOKENS" \
    --temperature 0 --threads "$THREADS" 2>/dev/null)
  python3 - "$prompt" "$llama" "$ours" <<'PY'
import sys
prompt, llama, ours = sys.argv[1], sys.argv[2].strip(), sys.argv[3].strip()
# Both print the prompt, then the completion. The text is compared with whitespace
# removed: the two detokenizers place a leading space differently (llama.cpp keeps
# SentencePiece's, binllm's stream decoder strips it), which is not a different token.
a = "".join(llama[len(prompt):].split())
b = "".join(ours[len(prompt):].split())
same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
# llama-completion now and then exits before its last tokens reach stdout (the race that
# also drops llama-perplexity's last lines): a prefix is reported as such.
if a == b:
    verdict = "yes"
elif b.startswith(a):
    verdict = f"llama.cpp's text ({len(a)} chars) is a prefix of binllm's ({len(b)})"
else:
    verdict = f"no: the first {same} of {len(a)} / {len(b)} characters agree"
show = lambda s: s.replace("|", "\\|").replace("\n", " ")
print(f"| {show(prompt)} | {verdict} | {show(llama[len(prompt):])} | {show(ours[len(prompt):])} |")
PY
done <<'PROMPTS'
The capital of France is
Once upon a time, there was a little girl named
The meaning of life is
PROMPTS
