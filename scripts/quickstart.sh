#!/usr/bin/env bash
# The main job on the default model: set up, build, convert SmolLM2-135M-Instruct to a 1-bit
# model on the Wikipedia + Gutenberg corpus, export the packed file, score it, chat with it
# and benchmark it.
#
# On a machine whose Python has a CUDA build of torch, the conversion runs on that GPU with
# binllm's `quality` recipe (docs/RECIPE.md): the teacher first writes 3M tokens of chat
# transcripts, then 80M Stage-2 tokens of distillation on the corpus and those transcripts
# (17.5 minutes on one H200; WikiText-2 47.4 against the teacher's 21.6). Otherwise it runs
# on the CPU with the paper's settings and a small budget (STEPS, default 20 Stage-2 steps
# of 2048 tokens, one a phase, after 5 Stage-1 steps) that shows every step but not the
# method's quality. Run it again to resume an interrupted conversion; delete RUN to start
# over.
#
# Environment: DATA (corpus files or folders, space-separated; default ../shared/data/corpus's
# Wikipedia and Gutenberg), RUN (default runs/smollm2-binaryllm), STEPS (CPU Stage-2 steps, a
# multiple of the 20 phases).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '\033[1m[quickstart]\033[0m %s\n' "$*" >&2; }

# The CPU budget is checked before anything else runs: the conversion has 20 phases, and
# each needs at least one step.
if [[ -n "${STEPS:-}" ]] && ! [[ "$STEPS" =~ ^[0-9]+$ && $STEPS -ge 20 && $((STEPS % 20)) -eq 0 ]]; then
  say "STEPS=$STEPS: the CPU conversion has 20 phases of at least one step each; use STEPS=20, 40, 60, ..."
  exit 2
fi

bash scripts/setup.sh
cargo build --release -p binllm-cli
mkdir -p bin && ln -sfn ../target/release/binllm bin/binllm   # as scripts/install.sh does
binllm=./target/release/binllm
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
run=${RUN:-runs/smollm2-binaryllm}
data=${DATA:-"../shared/data/corpus/wikipedia_en.txt.gz ../shared/data/corpus/gutenberg_en.slice.txt.gz"}
data_args=()
for d in $data; do data_args+=(--data "$d"); done

# A CUDA libtorch from this machine's Python, if it has one (the one set-up installs is CPU-only).
cuda_lib=$(python3 - 2>/dev/null <<'PY' || true
import os, torch
if torch.cuda.is_available():
    print(os.path.join(os.path.dirname(torch.__file__), "lib"))
PY
)
if [[ -n "$cuda_lib" ]]; then
  say "CUDA: using libtorch from $cuda_lib"
  export LD_LIBRARY_PATH="$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # No preset: on CUDA that is the quality recipe, with its chat score at the end.
  budget=(--device cuda)
  scoring=(--tasks "all,chat:$run/chat-reference.json" --device cuda)
else
  say "no CUDA torch found: converting on the CPU with a small budget (STEPS=${STEPS:-20} Stage-2 steps)"
  budget=(--device cpu --preset paper --seq-len 256 --batch-tokens 2048 --stage1-steps 5
    --val-windows 8 --steps "${STEPS:-20}" --chat-eval-prompts 0)
  scoring=(--tasks arc_easy,piqa --limit 100)
fi

$binllm inspect "$model"
if [[ -f "$run/config.toml" ]]; then
  say "resuming $run"
  $binllm convert --out "$run" --resume
else
  $binllm convert --model "$model" "${data_args[@]}" --out "$run" "${budget[@]}"
fi
$binllm export "$run" --out "$run/model.b1"
$binllm inspect "$run/model.b1"
$binllm eval --model "$run/model.b1" "${scoring[@]}" --out "$run/eval.json"
$binllm run --model "$run/model.b1" --chat --stats --max-tokens 64 \
  --prompt "Explain in two sentences why the sky is blue." </dev/null
$binllm bench --model "$run/model.b1"
say "done: $run holds the run (summary.md, training.png), the 1-bit model (model.b1) and its scores"
