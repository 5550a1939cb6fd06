#!/usr/bin/env bash
# One device session for the GPU acceptance runs, in stages sent back to back (each stage is
# one `run` call; /tmp survives between calls while the machine stays warm).
#
# Here (the build machine), once:  bash tools/gpu/session.sh pack
# On the device, in order:          bash tools/gpu/session.sh a|b|c|d|e
#
#   a  unpack the binary, stories260K, eval data and GGUF part 1; CUDA smoke checks
#      (generate + a tiny conversion on stories260K); the PyTorch training-speed reference
#   b  join the GGUF (sha256 checked); generate on CUDA and CPU with tok/s; the full eval
#      panel of the FP model on CUDA, compared with the transformers reference
#   c  the corpus; binllm convert (binaryllm) on SmolLM2-135M-Instruct, Wikipedia + Gutenberg
#   d  the STE baseline at the same Stage-2 budget; eval of the binaryllm sign model
#   e  eval of the STE sign model and of PTQ; the comparison table
#
# A shorter session that only makes the trained 1-bit model for the CPU engine
# (`bash tools/gpu/session.sh pack-packed` here, then f, g, h, i there):
#   f  the binary and GGUF part 1
#   g  the rest of the GGUF, joined and checked; eval data
#   h  the corpus; binllm convert (binaryllm) as in c; export the packed file (f16 and q8_0
#      head); eval of the exported file on CUDA; the q8_0-head file back in 15 MB parts
#   i  eval of the exported file on the pure-Rust packed engine (16 CPU threads); run; bench
set -euo pipefail
stage=${1:?stage}
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
pack="$repo/.gpu"
work=/tmp/binllm-gpu

if [[ $stage == pack ]]; then
  rm -rf "$pack" && mkdir -p "$pack/a" "$pack/b" "$pack/c"
  cargo build --release -p binllm-cli
  strip -o "$pack/a/binllm" target/release/binllm
  cp -r ../shared/models/stories260K "$pack/a/"
  tar -C ../shared/data -czf "$pack/a/eval.tar.gz" eval
  split -b 43M models/SmolLM2-135M-Instruct.Q4_1.gguf "$pack/gguf.part-"
  mv "$pack/gguf.part-aa" "$pack/a/" && mv "$pack"/gguf.part-a[b-z] "$pack/b/"
  sha256sum models/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1 > "$pack/b/gguf.sha256"
  cp ../shared/data/corpus/wikipedia_en.txt.gz ../shared/data/corpus/gutenberg_en.slice.txt.gz "$pack/c/"
  du -sh "$pack"/*
  exit 0
fi

if [[ $stage == pack-packed ]]; then
  rm -rf "$pack" && mkdir -p "$pack/f" "$pack/g" "$pack/h"
  cargo build --release -p binllm-cli
  strip -o "$pack/f/binllm" target/release/binllm
  tar -C ../shared/data -czf "$pack/g/eval.tar.gz" eval
  split -b 43M models/SmolLM2-135M-Instruct.Q4_1.gguf "$pack/gguf.part-"
  mv "$pack/gguf.part-aa" "$pack/f/" && mv "$pack"/gguf.part-a[b-z] "$pack/g/"
  sha256sum models/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1 > "$pack/g/gguf.sha256"
  cp ../shared/data/corpus/wikipedia_en.txt.gz ../shared/data/corpus/gutenberg_en.slice.txt.gz "$pack/h/"
  du -sh "$pack"/*
  exit 0
fi

: "${OUT:?run on the device, where OUT is set}"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
mkdir -p "$work" "$OUT"
bin="$work/binllm"
model="$work/SmolLM2-135M-Instruct.Q4_1.gguf"
log="$OUT/stage-$stage.log"
exec > >(tee -a "$log") 2>&1
say() { echo "== [$(date +%T)] $*"; }
timed() { local t0=$SECONDS; "$@"; say "($(( SECONDS - t0 )) s) $*"; }
common_convert=(--model "$model" --data "$work/wikipedia_en.txt.gz" --data "$work/gutenberg_en.slice.txt.gz"
  --device cuda --seq-len 2048 --batch-tokens 64k --micro-batch 16 --val-windows 32 --cache-dir "$work/cache")

case $stage in
a)
  cp "$pack/a/binllm" "$pack/a/gguf.part-aa" "$work/" && cp -r "$pack/a/stories260K" "$work/"
  tar -C "$work" -xzf "$pack/a/eval.tar.gz"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  say "CUDA smoke: stories260K generate and a tiny conversion"
  timed "$bin" generate "$work/stories260K/stories260K.bin" --prompt "Once upon a time" --max-tokens 40 --device cuda --dtype f32 --stats
  timed "$bin" convert --model "$work/stories260K/stories260K.bin" --data "$work/eval/hellaswag" --out "$work/runs/smoke-cuda" \
    --preset smoke --device cuda --steps 40 --stage1-steps 5 --val-windows 4 || true
  say "PyTorch training-speed reference (same shape as SmolLM2-135M, seq 2048, micro-batch 16)"
  timed python3 "$repo/tools/reference/train_speed.py" --steps 15 --warmup 3 --compile --out "$OUT/speed-pytorch.json"
  ;;
b)
  cat "$work/gguf.part-aa" "$pack"/b/gguf.part-a[b-z] > "$model"
  echo "$(cat "$pack/b/gguf.sha256")  $model" | sha256sum -c
  "$bin" inspect "$model"
  for dtype in bf16 f32; do
    timed "$bin" generate "$model" --chat --prompt "Explain in two sentences why the sky is blue." --max-tokens 96 --device cuda --dtype $dtype --stats
  done
  OMP_NUM_THREADS=16 timed "$bin" generate "$model" --chat --prompt "Explain in two sentences why the sky is blue." --max-tokens 96 --device cpu --stats
  say "full eval panel, FP model, CUDA f32"
  timed "$bin" eval --model "$model" --tasks all --device cuda --data-dir "$work/eval" --out "$OUT/eval-fp.json" \
    --reference "$repo/crates/binllm-eval/tests/fixtures/smollm2-135m-instruct-q4_1.reference.json"
  ;;
c)
  cp "$pack/c/"*.gz "$work/"
  say "binllm convert: binaryllm"
  timed "$bin" convert "${common_convert[@]}" --out "$work/runs/binaryllm" --method binaryllm
  tar -C "$work/runs/binaryllm" -czf "$OUT/run-binaryllm.tar.gz" --exclude checkpoints --exclude sign-model.safetensors .
  cp "$work/runs/binaryllm/training.png" "$OUT/binaryllm-training.png" || true
  ;;
d)
  steps=$(python3 -c "import json;print(json.load(open('$work/runs/binaryllm/plan.json'))['stage2_steps'])")
  say "binllm convert: ste with the same $steps Stage-2 steps"
  timed "$bin" convert "${common_convert[@]}" --out "$work/runs/ste" --method ste --steps "$steps"
  tar -C "$work/runs/ste" -czf "$OUT/run-ste.tar.gz" --exclude checkpoints --exclude sign-model.safetensors .
  say "eval: binaryllm sign model"
  timed "$bin" eval --model "$work/runs/binaryllm/sign-model.safetensors" --tasks all --device cuda --data-dir "$work/eval" --out "$OUT/eval-binaryllm.json"
  ;;
e)
  say "eval: ste sign model"
  timed "$bin" eval --model "$work/runs/ste/sign-model.safetensors" --tasks all --device cuda --data-dir "$work/eval" --out "$OUT/eval-ste.json"
  timed "$bin" convert "${common_convert[@]}" --out "$work/runs/ptq" --method ptq
  timed "$bin" eval --model "$work/runs/ptq/sign-model.safetensors" --tasks all --device cuda --data-dir "$work/eval" --out "$OUT/eval-ptq.json"
  ;;
f)
  cp "$pack/f/binllm" "$pack/f/gguf.part-aa" "$work/"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  ;;
g)
  cat "$work/gguf.part-aa" "$pack"/g/gguf.part-a[b-z] > "$model"
  echo "$(cat "$pack/g/gguf.sha256")  $model" | sha256sum -c
  tar -C "$work" -xzf "$pack/g/eval.tar.gz"
  ;;
h)
  cp "$pack/h/"*.gz "$work/"
  say "binllm convert: binaryllm"
  timed "$bin" convert "${common_convert[@]}" --out "$work/runs/binaryllm" --method binaryllm
  tar -C "$work/runs/binaryllm" -czf "$OUT/run-binaryllm.tar.gz" --exclude checkpoints --exclude sign-model.safetensors .
  for head in f16 q8; do
    timed "$bin" export "$work/runs/binaryllm" --head $head --out "$work/smollm2-binaryllm-$head.b1"
  done
  "$bin" inspect "$work/smollm2-binaryllm-q8.b1"
  say "eval of the exported file (f16 head) on CUDA, libtorch engine"
  timed "$bin" eval --engine torch --model "$work/smollm2-binaryllm-f16.b1" --tasks wikitext2,c4,ptb --device cuda \
    --data-dir "$work/eval" --out "$OUT/eval-exported-torch.json"
  (cd "$work" && sha256sum smollm2-binaryllm-q8.b1 > "$OUT/smollm2-binaryllm-q8.b1.sha256" \
    && split -b 15M smollm2-binaryllm-q8.b1 "$OUT/smollm2-binaryllm-q8.b1.part-")
  ;;
i)
  say "eval of the exported file on the pure-Rust packed engine, 16 threads"
  for head in f16 q8; do
    timed "$bin" eval --engine packed --threads 16 --model "$work/smollm2-binaryllm-$head.b1" --tasks wikitext2 \
      --data-dir "$work/eval" --out "$OUT/eval-exported-packed-$head.json"
  done
  timed "$bin" run --model "$work/smollm2-binaryllm-q8.b1" --chat --stats --max-tokens 64 \
    --prompt "What is the capital of France?" </dev/null
  timed "$bin" bench --model "$work/smollm2-binaryllm-q8.b1" --threads 16
  ;;
esac
say "stage $stage done"
