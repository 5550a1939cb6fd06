#!/usr/bin/env bash
# One device lease for the quality issue: the default GPU conversion (`binllm convert` with
# no preset on CUDA = the `quality` recipe) of SmolLM2-135M-Instruct, its export, the eval
# panel of the exported file, a chat transcript, and short comparison runs if time is left.
#
# Here (the build machine), once:   bash tools/gpu/quality.sh pack
# Then `run` calls, back to back (the machine keeps /tmp while warm):
#   bash tools/gpu/quality.sh a      binary + GGUF part 1
#   bash tools/gpu/quality.sh b      GGUF part 2 (joined, sha256 checked)
#   bash tools/gpu/quality.sh c      corpus and eval data; starts the pipeline in the background
#                                    (PIPELINE=screen: the screening runs of tools/gpu/screen.tsv)
#   bash tools/gpu/quality.sh poll   waits (up to POLL_S seconds) and returns what is done
#   bash tools/gpu/quality.sh collect   returns what is done now
#
# The pipeline (background, logs in /tmp/q/pipeline.log):
#   1. binllm convert (defaults on CUDA) -> runs/quality, wall-clock timed
#   2. export with q8_0 and f16 heads; eval --tasks all of the f16-head file on CUDA
#   3. binllm run --chat on the q8_0-head file (packed engine, CPU) for five plain questions
#   0. (PROBE=1) two short runs timing a step with whole and chunked logits (--profile);
#      the main run takes the faster
#   4. (BUDGETS="12M ...") the recipe at other budgets, with WikiText-2/C4/PTB of each
set -euo pipefail
stage=${1:?stage}
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
pack="$repo/.gpu"
work=/tmp/q

if [[ $stage == pack ]]; then
  rm -rf "$pack" && mkdir -p "$pack/a" "$pack/b" "$pack/c"
  cargo build --release -p binllm-cli
  strip -o "$pack/a/binllm" target/release/binllm
  split -b 40M models/SmolLM2-135M-Instruct.Q4_1.gguf "$pack/gguf.part-"
  mv "$pack/gguf.part-aa" "$pack/a/" && mv "$pack"/gguf.part-a[b-z] "$pack/b/"
  sha256sum models/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1 > "$pack/b/gguf.sha256"
  # The eval data rides with the corpus: each call carries at most 64 MiB, the tree included.
  tar -C ../shared/data -czf "$pack/c/eval.tar.gz" eval
  cp ../shared/data/corpus/wikipedia_en.txt.gz ../shared/data/corpus/gutenberg_en.slice.txt.gz "$pack/c/"
  du -sh "$pack"/*
  exit 0
fi

: "${OUT:?run on the device, where OUT is set}"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
mkdir -p "$work" "$OUT"
bin="$work/binllm"
model="$work/SmolLM2-135M-Instruct.Q4_1.gguf"
say() { echo "== [$(date +%T)] $*"; }

# Everything worth keeping, small enough to come back: run directories without checkpoints,
# weights or token files, eval reports, logs, transcripts.
collect() {
  (cd "$work" && tar -czf "$OUT/results.tar.gz" --exclude checkpoints --exclude '*.safetensors' \
    --exclude '*.tok' --exclude '*.b1' runs evals logs 2>/dev/null || true)
  cp "$work/logs/pipeline.log" "$OUT/" 2>/dev/null || true
  if [[ -f "$work/quality-q8.b1" && ! -f "$work/q8-returned" ]]; then
    (cd "$work" && sha256sum quality-q8.b1 > "$OUT/quality-q8.b1.sha256" \
      && split -b 15M quality-q8.b1 "$OUT/quality-q8.b1.part-") && touch "$work/q8-returned"
  fi
  ls -la "$OUT"
  grep -E "^== |held-out loss after|chat score|tokens trained|teacher chat data|wikitext2|error" \
    "$work/logs/pipeline.log" 2>/dev/null | tail -40 || true
}

case $stage in
a)
  cp "$pack/a/binllm" "$pack/a/gguf.part-aa" "$work/"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$bin" --version
  ;;
b)
  cat "$work/gguf.part-aa" "$pack"/b/gguf.part-a[b-z] > "$model"
  echo "$(cat "$pack/b/gguf.sha256")  $model" | sha256sum -c
  "$bin" inspect "$model" | head -12
  ;;
c)
  cp "$pack/c/"*.gz "$work/"
  tar -C "$work" -xzf "$pack/c/eval.tar.gz"
  mkdir -p "$work/logs"
  setsid nohup env QUALITY_ARGS="${QUALITY_ARGS:-}" PROBE="${PROBE:-}" BUDGETS="${BUDGETS:-}" \
    bash "$repo/tools/gpu/quality.sh" "${PIPELINE:-pipeline}" > "$work/logs/pipeline.log" 2>&1 < /dev/null &
  sleep 20
  tail -5 "$work/logs/pipeline.log"
  ;;
pipeline)
  cd "$work"
  mkdir -p runs evals
  data=(--data "$work/wikipedia_en.txt.gz" --data "$work/gutenberg_en.slice.txt.gz")
  timed() { local t0=$SECONDS; "$@"; say "($(( SECONDS - t0 )) s) ${*:0:3}"; }
  main_args=(${QUALITY_ARGS:-})
  loss_args=()
  if [[ -n "${PROBE:-}" ]]; then
    # Where a Stage-2 step's time goes, with whole and with chunked logits; the main run
    # takes the faster.
    say "0. speed probe: whole and chunked logits, --profile"
    for name in speed-whole speed-chunked; do
      extra=()
      [[ $name == speed-chunked ]] && extra=(--loss-chunk-tokens 4096)
      "$bin" convert --model "$model" "${data[@]}" --out "runs/$name" --device cuda --cache-dir "$work/cache" \
        --tokens 1M --stage1-steps 2 --chat-tokens 0 --chat-share 0 --chat-eval-prompts 0 --val-windows 4 \
        --profile 10 "${extra[@]}" > "logs/$name.log" 2>&1 || say "$name failed"
      grep -A40 "Where a Stage-2" "runs/$name/summary.md" 2>/dev/null | head -40 || true
    done
    faster=$(python3 - <<'PY'
import json
speed = {}
for name in ("speed-whole", "speed-chunked"):
    try:
        speed[name] = json.load(open(f"runs/{name}/summary.json"))["stage2_step_tokens_per_second"]
    except Exception:
        speed[name] = 0
print(speed, flush=True, file=__import__("sys").stderr)
print("chunked" if speed["speed-chunked"] > 1.02 * speed["speed-whole"] else "whole")
PY
)
    say "faster loss: $faster"
    [[ $faster == chunked ]] && loss_args=(--loss-chunk-tokens 4096)
  fi
  main_args+=("${loss_args[@]}")
  say "1. the default GPU conversion (no preset given: quality on CUDA) ${main_args[*]}"
  t0=$SECONDS
  "$bin" convert --model "$model" "${data[@]}" --out runs/quality --device cuda --cache-dir "$work/cache" \
    "${main_args[@]}"
  say "convert wall-clock $(( SECONDS - t0 )) s"
  say "2. export and the eval panel of the exported file"
  timed "$bin" export runs/quality --head q8 --out quality-q8.b1
  timed "$bin" export runs/quality --head f16 --out quality-f16.b1
  "$bin" inspect quality-q8.b1 | head -20
  timed "$bin" eval --engine torch --model quality-f16.b1 --tasks all --device cuda --data-dir "$work/eval" \
    --out evals/quality-f16.json
  say "3. run --chat on the packed q8_0-head file (CPU, 16 threads)"
  for q in "What is the capital of France?" "Why is the sky blue?" "How many legs does a spider have?" \
    "Give me three tips for sleeping better." "What is photosynthesis?"; do
    echo ">>> $q"
    "$bin" run --model quality-q8.b1 --chat --max-tokens 160 --threads 16 --prompt "$q" </dev/null || true
  done 2>&1 | tee evals/chat-transcript.txt
  # 4. The default recipe at other budgets (BUDGETS, e.g. "12M 24M"; QUALITY_ARGS are the main
  # run's alone), with the main run's chat transcripts: what more tokens buy. A 12M run takes
  # about 6 minutes all in (loading, Stage 1, validation and the chat score included).
  for budget in ${BUDGETS:-}; do
    name="budget-$budget"
    mkdir -p "runs/$name"
    cp runs/quality/teacher-chat.tok runs/quality/teacher-chat.json "runs/$name/"
    say "4. the recipe at $budget tokens"
    t0=$SECONDS
    "$bin" convert --model "$model" "${data[@]}" --out "runs/$name" --device cuda --cache-dir "$work/cache" \
      "${loss_args[@]}" --tokens "$budget" || { say "$name failed"; continue; }
    say "$name convert wall-clock $(( SECONDS - t0 )) s"
    timed "$bin" eval --engine torch --model "runs/$name/sign-model.safetensors" --tasks wikitext2,c4,ptb \
      --device cuda --data-dir "$work/eval" --out "evals/$name.json"
  done
  say "pipeline done"
  ;;
screen)
  # Short runs one after another (never side by side: they share the GPU's throughput),
  # each a line of tools/gpu/screen.tsv: name, then convert flags. They share one set of
  # teacher chat transcripts, generated by the first run that asks for them.
  cd "$work"
  mkdir -p runs evals
  data=(--data "$work/wikipedia_en.txt.gz" --data "$work/gutenberg_en.slice.txt.gz")
  while IFS=$'\t' read -r name flags; do
    [[ -z "$name" || "$name" == \#* ]] && continue
    mkdir -p "runs/$name"
    if [[ -f runs/chat-cache/teacher-chat.tok ]]; then
      cp runs/chat-cache/teacher-chat.tok runs/chat-cache/teacher-chat.json "runs/$name/"
    fi
    say "screen $name: $flags"
    t0=$SECONDS
    # shellcheck disable=SC2086
    "$bin" convert --model "$model" "${data[@]}" --out "runs/$name" --device cuda \
      --cache-dir "$work/cache" $flags || { say "$name failed"; continue; }
    say "$name convert wall-clock $(( SECONDS - t0 )) s"
    if [[ ! -f runs/chat-cache/teacher-chat.tok && -f "runs/$name/teacher-chat.tok" ]]; then
      mkdir -p runs/chat-cache && cp "runs/$name"/teacher-chat.{tok,json} runs/chat-cache/
    fi
    "$bin" eval --engine torch --model "runs/$name/sign-model.safetensors" --tasks wikitext2 \
      --device cuda --data-dir "$work/eval" --out "evals/$name.json" | grep wikitext2 || true
  done < "$repo/tools/gpu/screen.tsv"
  python3 "$repo/tools/gpu/screen_table.py" "$work" > "$work/logs/screen.md" || true
  cat "$work/logs/screen.md"
  say "pipeline done"
  ;;
poll)
  deadline=$(( SECONDS + ${POLL_S:-540} ))
  while (( SECONDS < deadline )) && ! grep -q "pipeline done" "$work/logs/pipeline.log"; do
    sleep 15
  done
  collect
  ;;
collect)
  collect
  ;;
esac
