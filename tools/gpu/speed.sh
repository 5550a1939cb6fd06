#!/usr/bin/env bash
# One device lease for the training-speed issue (11): a Stage-2 step of SmolLM2-135M-Instruct
# timed section by section (`--profile`) with two binaries carried side by side, the base
# branch's (`binllm-before`) and this checkout's (`binllm`), for the default KD loss and for
# plain cross-entropy; then the PyTorch reference (tools/reference/train_speed.py) in eager
# mode and with torch.compile on the same shapes.
#
# Here (the build machine), once, with everything committed:
#   bash tools/gpu/speed.sh pack         (BASE=<commit>, default main: what binllm-before is)
# Then `run` calls, back to back (the machine keeps /tmp while warm):
#   bash tools/gpu/speed.sh a      carry .gpu/a: both binaries and the corpus
#   bash tools/gpu/speed.sh b      carry .gpu/b: GGUF part 1
#   bash tools/gpu/speed.sh c      carry .gpu/c: GGUF part 2 (joined, sha256 checked); starts
#                                  the pipeline in the background
#   bash tools/gpu/speed.sh poll   waits (up to POLL_S seconds) and returns what is done
#
# The pipeline (logs in /tmp/speed/logs/pipeline.log; results in $OUT/speed.md and
# $OUT/speed-results.tar.gz):
#   1. for each loss (kd, ce), `binllm-before` then `binllm`: the PROBE run of quality.sh
#      (--tokens 1M --stage1-steps 2, no chat data, --val-windows 4, --profile 10;
#      PROFILE=N for another count, PROFILE=0 for none: the profile synchronises the device
#      at every section boundary, which the tokens/s then includes);
#   2. the table: Stage-2 step tokens/s, peak memory, held-out losses and each profiled
#      section's ms per step, before against after;
#   3. train_speed.py --compile: PyTorch eager (plain and progressive weights) and
#      torch.compile (progressive), 15 steps after 3 warm-up steps.
set -euo pipefail
stage=${1:?stage}
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
pack="$repo/.gpu"
work=/tmp/speed

if [[ $stage == pack ]]; then
  base=${BASE:-main}
  cd "$repo"
  # binllm-before is built from a checkout of BASE in this tree: nothing may be left
  # uncommitted, or it would go into one binary and not the other.
  git diff --quiet HEAD || { echo "speed.sh pack: commit or stash your changes first" >&2; exit 1; }
  here=$(git symbolic-ref -q --short HEAD || git rev-parse HEAD)
  rm -rf "$pack" && mkdir -p "$pack/a" "$pack/b" "$pack/c"
  cargo build --release -p binllm-cli
  strip -o "$pack/a/binllm" target/release/binllm
  git checkout -q --detach "$base"
  build_base() { cargo build --release -p binllm-cli && strip -o "$pack/a/binllm-before" target/release/binllm; }
  build_base || { git checkout -q "$here"; echo "speed.sh pack: building $base failed" >&2; exit 1; }
  git checkout -q "$here"
  git rev-parse "$base" > "$pack/a/before.commit" && git rev-parse HEAD > "$pack/a/after.commit"
  # Each call carries at most 64 MiB, the tree included: the GGUF goes in two parts.
  cp ../shared/data/corpus/wikipedia_en.txt.gz "$pack/a/"
  split -b 47M models/SmolLM2-135M-Instruct.Q4_1.gguf "$pack/gguf.part-"
  mv "$pack/gguf.part-aa" "$pack/b/" && mv "$pack"/gguf.part-a[b-z] "$pack/c/"
  sha256sum models/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1 > "$pack/c/gguf.sha256"
  du -sh "$pack"/*
  exit 0
fi

: "${OUT:?run on the device, where OUT is set}"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
mkdir -p "$work/logs" "$OUT"
model="$work/SmolLM2-135M-Instruct.Q4_1.gguf"
say() { echo "== [$(date +%T)] $*"; }

collect() {
  (cd "$work" && tar -czf "$OUT/speed-results.tar.gz" --exclude checkpoints --exclude '*.safetensors' \
    --exclude '*.tok' runs logs speed-pytorch.json 2>/dev/null || true)
  cp "$work/speed.md" "$OUT/" 2>/dev/null || true
  cat "$work/speed.md" 2>/dev/null || grep -E "^== |error" "$work/logs/pipeline.log" | tail -20 || true
}

case $stage in
a)
  cp "$pack/a/"* "$work/"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$work/binllm-before" --version && "$work/binllm" --version
  echo "before $(cat "$work/before.commit"), after $(cat "$work/after.commit")"
  ;;
b)
  cp "$pack/b/gguf.part-aa" "$work/"
  ;;
c)
  cat "$work/gguf.part-aa" "$pack"/c/gguf.part-a[b-z] > "$model"
  echo "$(cat "$pack/c/gguf.sha256")  $model" | sha256sum -c
  # The pipeline runs from copies: a later call may lay the working tree down again.
  cp "$repo/tools/gpu/speed.sh" "$repo/tools/reference/train_speed.py" "$work/"
  setsid nohup env PROFILE="${PROFILE:-10}" bash "$work/speed.sh" pipeline > "$work/logs/pipeline.log" 2>&1 \
    < /dev/null &
  sleep 20
  tail -5 "$work/logs/pipeline.log"
  ;;
pipeline)
  cd "$work"
  mkdir -p runs
  profile=(--profile "$PROFILE")
  [[ $PROFILE == 0 ]] && profile=()
  # One run at a time: runs side by side would share the GPU's throughput.
  for loss in kd ce; do
    for bin in binllm-before binllm; do
      name="$bin-$loss"
      say "$name"
      "$work/$bin" convert --model "$model" --data "$work/wikipedia_en.txt.gz" --out "runs/$name" \
        --device cuda --cache-dir "$work/cache" --distill "$loss" \
        --tokens 1M --stage1-steps 2 --chat-tokens 0 --chat-share 0 --chat-eval-prompts 0 --val-windows 4 \
        "${profile[@]}" > "logs/$name.log" 2>&1 || say "$name failed (logs/$name.log)"
    done
  done
  python3 - > speed.md <<'PY' || say "the table failed"
import json

def load(name):
    try:
        return json.load(open(f"runs/{name}/summary.json"))
    except (OSError, ValueError) as e:
        return {"error": str(e)}

print(f"before {open('before.commit').read().strip()}, after {open('after.commit').read().strip()}\n")
for loss in ("kd", "ce"):
    before, after = load(f"binllm-before-{loss}"), load(f"binllm-{loss}")
    print(f"## {loss}\n\n| | before | after | after/before |\n|---|---:|---:|---:|")
    def row(label, a, b, fmt="{:.1f}"):
        ratio = f"{b / a:.3f}" if a and b else ""
        show = lambda v: fmt.format(v) if v is not None else "-"
        print(f"| {label} | {show(a)} | {show(b)} | {ratio} |")
    key = "stage2_step_tokens_per_second"
    row("Stage-2 step tokens/s", before.get(key), after.get(key), "{:,.0f}")
    mem = lambda s: (s.get("peak_gpu_memory_bytes") or 0) / 2**30 or None
    row("peak GPU memory (GiB)", mem(before), mem(after), "{:.2f}")
    for field in ("final_training_form", "final_sign_form"):
        val = lambda s: s.get("validation", {}).get(field)
        row(f"held-out loss, {field.replace('_', ' ')}", val(before), val(after), "{:.4f}")
    sections = lambda s: dict(s.get("profile") or [])
    b, a = sections(before), sections(after)
    for name in list(b) + [n for n in a if n not in b]:
        row(f"{name} (ms per step)", b.get(name), a.get(name), "{:.1f}")
    row("**step (ms)**", sum(b.values()) or None, sum(a.values()) or None, "{:.1f}")
    for label, s in (("before", before), ("after", after)):
        if "error" in s:
            print(f"\n{label}: {s['error']}")
    print()
PY
  cat speed.md
  say "PyTorch reference: eager (plain, progressive) and torch.compile (progressive)"
  python3 "$work/train_speed.py" --steps 15 --warmup 3 --compile --out speed-pytorch.json \
    || say "train_speed.py failed"
  python3 - >> speed.md <<'PY' || true
import json
r = json.load(open("speed-pytorch.json"))
print(f"## PyTorch reference ({r['meta']['torch']}, {r['meta']['device']})\n")
print("| weights | engine | tokens/s | peak memory (GiB) |\n|---|---|---:|---:|")
for x in r["results"]:
    print(f"| {x['weights']} | {x['engine']} | {x['tokens_per_second']:,.0f} | {(x['peak_memory_bytes'] or 0) / 2**30:.2f} |")
PY
  say "pipeline done"
  ;;
poll)
  deadline=$(( SECONDS + ${POLL_S:-540} ))
  while (( SECONDS < deadline )) && ! grep -q "pipeline done" "$work/logs/pipeline.log"; do
    sleep 15
  done
  grep -E "^== " "$work/logs/pipeline.log" | tail -12
  collect
  ;;
collect)
  collect
  ;;
esac
