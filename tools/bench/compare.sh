#!/usr/bin/env bash
# Decode and prompt speed of 1-bit SmolLM2-135M in binllm against llama.cpp running the same
# model as F16, Q8_0 and Q4_0 GGUF, on this machine with the same thread count and lengths.
#
#   tools/bench/compare.sh [GGUF] [THREADS] [ROUNDS]
#
# GGUF (default models/SmolLM2-135M-Instruct.Q4_1.gguf) is requantized by llama.cpp's own
# llama-quantize (--allow-requantize) to F16, Q8_0 and Q4_0; binllm's model is a PTQ sign model
# made from the same GGUF (speed does not depend on the values) exported with an f16 head and
# with a q8_0 head. Each round runs every engine once (llama-bench -r 5; binllm bench --reps 5),
# rounds interleave the engines, and the table reports each one's median over rounds: on a
# shared machine, load from other processes moves all figures between runs.
# Prints one Markdown table (plus the raw per-round figures on stderr).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
GGUF=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
THREADS=${2:-$(nproc)}
ROUNDS=${3:-3}
PP=${PP:-128}
TG=${TG:-64}
WORK=target/bench
[[ -f "$GGUF" ]] || { echo "error: $GGUF not found" >&2; exit 1; }

bash tools/bench/setup_llama_cpp.sh "$WORK" >&2
cargo build -q --release -p binllm-cli --no-default-features >&2
BIN=$WORK/llama.cpp/build/bin
BINLLM=target/release/binllm
mkdir -p "$WORK/models" "$WORK/results"
for t in F16 Q8_0 Q4_0; do
  out="$WORK/models/smollm2-$t.gguf"
  [[ -f "$out" ]] || "$BIN/llama-quantize" --allow-requantize "$GGUF" "$out" "$t" >/dev/null 2>&1
done
for head in f16 q8; do
  "$BINLLM" export --ptq "$GGUF" --head "$head" --out "$WORK/models/smollm2-1bit-$head.b1" >/dev/null
done

rm -f "$WORK"/results/*.json
for round in $(seq 1 "$ROUNDS"); do
  for t in F16 Q8_0 Q4_0; do
    "$BIN/llama-bench" -m "$WORK/models/smollm2-$t.gguf" -t "$THREADS" -p "$PP" -n "$TG" -r 5 -o json \
      2>/dev/null > "$WORK/results/llama-$t-$round.json"
  done
  for head in f16 q8; do
    "$BINLLM" bench --model "$WORK/models/smollm2-1bit-$head.b1" --threads "$THREADS" \
      --prompt-tokens "$PP" --gen-tokens "$TG" --reps 5 --json > "$WORK/results/binllm-$head-$round.json"
  done
done

python3 - "$WORK" "$THREADS" "$PP" "$TG" "$ROUNDS" <<'PY'
import glob, json, os, statistics, sys, platform
work, threads, pp, tg, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rows = {}
def add(key, pp_ts, tg_ts, size, head):
    r = rows.setdefault(key, {"pp": [], "tg": [], "size": size, "head": head})
    r["pp"].append(pp_ts); r["tg"].append(tg_ts)
for t in ["F16", "Q8_0", "Q4_0"]:
    for f in sorted(glob.glob(f"{work}/results/llama-{t}-*.json")):
        entries = json.load(open(f))
        pp_ts = next(e["avg_ts"] for e in entries if e["n_prompt"] > 0)
        tg_ts = next(e["avg_ts"] for e in entries if e["n_gen"] > 0)
        size = os.path.getsize(f"{work}/models/smollm2-{t}.gguf")
        head = {"F16": "f16", "Q8_0": "q8_0", "Q4_0": "q6_K/q4_0 (llama-quantize's choice)"}[t]
        add(f"llama.cpp {t}", pp_ts, tg_ts, size, head)
        print(f"raw {f}: pp {pp_ts:.1f} tg {tg_ts:.1f}", file=sys.stderr)
bw = []
for h in ["f16", "q8"]:
    for f in sorted(glob.glob(f"{work}/results/binllm-{h}-*.json")):
        r = json.load(open(f))
        add(f"binllm 1-bit, {h} head", r["pp_tokens_per_second"], r["tg_tokens_per_second"], r["file_bytes"], r["head"])
        bw.append(r["read_gb_per_second"])
        print(f"raw {f}: pp {r['pp_tokens_per_second']:.1f} tg {r['tg_tokens_per_second']:.1f} "
              f"bits/weight {r['bits_per_weight']} decode threads {r['decode_threads']}", file=sys.stderr)
med = {k: (statistics.median(v["pp"]), statistics.median(v["tg"])) for k, v in rows.items()}
q4 = med["llama.cpp Q4_0"][1]; f16 = med["llama.cpp F16"][1]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"SmolLM2-135M-Instruct, {cpu}, {os.cpu_count()} logical CPUs, {threads} threads, pp{pp} / tg{tg}, "
      f"median of {rounds} rounds (each: mean of 5 reps); load average at end {os.getloadavg()[0]:.1f}; "
      f"single-thread read bandwidth {statistics.median(bw):.1f} GB/s")
print()
print(f"| engine | weights | head | file MiB | pp{pp} tok/s | tg{tg} tok/s | tg vs llama.cpp Q4_0 | tg vs llama.cpp F16 |")
print("|---|---|---|---:|---:|---:|---:|---:|")
for k, v in rows.items():
    p, t = med[k]
    weights = k.split(" ", 1)[1] if k.startswith("llama.cpp") else "1-bit (sign + f16 row scale)"
    print(f"| {k.split(',')[0].split(' ')[0]} | {weights} | {v['head']} | {v['size'] / 2**20:.1f} | {p:.1f} | {t:.1f} | {t / q4:.2f}x | {t / f16:.2f}x |")
PY
