#!/usr/bin/env bash
# Decode and prompt speed of 1-bit SmolLM2-135M in binllm against llama.cpp running the same
# model as F16, Q8_0 and Q4_0 GGUF (Q4_0 twice: with llama-quantize's default q8_0 head, and
# with a q4_0 head), on this machine with the same thread count and lengths.
#
#   tools/bench/compare.sh [GGUF] [THREAD_COUNTS] [ROUNDS]      e.g. compare.sh "" "1 2" 3
#
# GGUF (default models/SmolLM2-135M-Instruct.Q4_1.gguf) is requantized by llama.cpp's own
# llama-quantize (--allow-requantize) to F16, Q8_0, Q4_0 and Q4_0 with the tied embedding/head
# in q4_0 (--token-embedding-type q4_0 --output-tensor-type q4_0); binllm's model is a PTQ sign
# model made from the same GGUF (speed does not depend on the values) exported with an f16, a
# q8_0 and a q4_0 head. Each binllm row is compared with the llama.cpp row of the same head. Every engine runs with the same thread count, prompt and generation
# lengths (llama-bench -r 5; binllm bench --reps 5, each after a warm-up). Rounds interleave
# the engines; the table gives each one's median over every rep of every round and its best rep,
# and ratios of medians and of bests:
# on a shared machine, load from other processes moves every figure between runs, and
# spinning thread pools (llama.cpp's and binllm's) suffer most when another process holds a
# core. Prints one Markdown table (raw per-round figures on stderr).
#
#   tools/bench/compare.sh --q1_0 FLOAT.gguf [THREADS] [ROUNDS]
#
# Q1_0 mode (issue 13): llama.cpp's own llama-quantize writes FLOAT.gguf (an F32/F16 model
# whose rows are multiples of 128, e.g. tools/gguf/float_gguf.py's) as Q1_0, once with its
# default embedding/head types and once with both f16; binllm's `export --ptq --format gguf`
# writes the same model as its own Q1_0 file (f16 head). Both engines bench every file
# (llama-bench -r 5, binllm bench --reps 5, same threads and lengths); a file an engine
# refuses is listed with its error. llama-quantize gives each block of 128 its own scale;
# binllm's packed engine runs those blocks on its block-scaled 1-bit kernels, and the table
# says how many block linears of each file have them (`binllm inspect --json`). Ratios:
# binllm on a file against llama.cpp on the same file, in the same run. LLAMA_CPP_BIN and
# BINLLM name prebuilt tools (else built here).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [[ "${1:-}" == --q1_0 ]]; then
  FLOAT=${2:?usage: compare.sh --q1_0 FLOAT.gguf [THREADS] [ROUNDS]}
  THREADS=${3:-$(nproc)}
  ROUNDS=${4:-1}
  PP=${PP:-128}
  TG=${TG:-64}
  WORK=target/bench/q1_0
  BIN=${LLAMA_CPP_BIN:-target/bench/llama.cpp/build/bin}
  BINLLM=${BINLLM:-target/pure-rust/release/binllm}
  [[ -n "${LLAMA_CPP_BIN:-}" ]] || bash tools/bench/setup_llama_cpp.sh >&2
  [[ -f "$BINLLM" ]] || cargo build -q --release -p binllm-cli --no-default-features --target-dir target/pure-rust >&2
  mkdir -p "$WORK"
  rm -f "$WORK"/*.json "$WORK"/*.err
  "$BIN/llama-quantize" "$FLOAT" "$WORK/llama-q1_0.gguf" Q1_0 > "$WORK/quantize.log" 2>&1
  "$BIN/llama-quantize" --token-embedding-type f16 --output-tensor-type f16 "$FLOAT" \
    "$WORK/llama-q1_0-f16head.gguf" Q1_0 >> "$WORK/quantize.log" 2>&1
  "$BINLLM" export --ptq "$FLOAT" --format gguf --out "$WORK/binllm-q1_0.gguf" > /dev/null
  for f in llama-q1_0 llama-q1_0-f16head binllm-q1_0; do
    "$BINLLM" inspect --json "$WORK/$f.gguf" > "$WORK/$f-inspect.json" 2> /dev/null || true
  done
  for round in $(seq 1 "$ROUNDS"); do
    for f in llama-q1_0 llama-q1_0-f16head binllm-q1_0; do
      "$BIN/llama-bench" -m "$WORK/$f.gguf" -t "$THREADS" -p "$PP" -n "$TG" -r 5 -o json \
        > "$WORK/$f-llama-$round.json" 2> "$WORK/$f-llama.err" || true
      "$BINLLM" bench --model "$WORK/$f.gguf" --threads "$THREADS" --prompt-tokens "$PP" \
        --gen-tokens "$TG" --reps 5 --json > "$WORK/$f-binllm-$round.json" 2> "$WORK/$f-binllm.err" || true
    done
  done
  python3 - "$WORK" "$THREADS" "$PP" "$TG" <<'PY'
import glob, json, statistics, sys
work, threads, pp, tg = sys.argv[1:]
def samples(f, engine):
    tg_ts, pp_ts = [], []
    for p in sorted(glob.glob(f"{work}/{f}-{engine}-*.json")):
        try:
            d = json.load(open(p))
        except ValueError:
            continue
        if engine == "llama":
            pp_ts += next(e["samples_ts"] for e in d if e["n_prompt"] > 0)
            tg_ts += next(e["samples_ts"] for e in d if e["n_gen"] > 0)
        else:
            pp_ts += d["pp_samples"]; tg_ts += d["tg_samples"]
    return pp_ts, tg_ts
def show(v):
    return f"{statistics.median(v):.1f} ({max(v):.1f})" if v else "-"
def block_scaled(f):
    try:
        d = json.load(open(f"{work}/{f}-inspect.json"))
    except (OSError, ValueError):
        return "-"
    return f"{d.get('block_scaled_linears', 0)} of {d['block_linears']}"
def kernel(f):
    for p in sorted(glob.glob(f"{work}/{f}-binllm-*.json")):
        try:
            return json.load(open(p))["kernel"]
        except (ValueError, KeyError):
            continue
    return "-"
def error(f, engine):
    lines = [l.strip() for l in open(f"{work}/{f}-{engine}.err", errors="replace") if l.strip()]
    # "error: PATH: what" -> "what", cut at the first ';'.
    return "refused: " + lines[-1].split(": ", 2)[-1].split(";")[0].replace("|", "/") if lines else "no result"
print(f"threads {threads}, pp{pp} / tg{tg}; median (best) tok/s over every rep; ratio of medians (of bests)")
print()
print(f"| file | linears with block scales | binllm kernel | llama.cpp pp{pp} | llama.cpp tg{tg} | binllm pp{pp} | binllm tg{tg} | tg binllm / llama.cpp |")
print("|---|---:|---|---:|---:|---:|---:|---:|")
for f in ["llama-q1_0", "llama-q1_0-f16head", "binllm-q1_0"]:
    (lp, lt), (bp, bt) = samples(f, "llama"), samples(f, "binllm")
    ratio = (f"{statistics.median(bt) / statistics.median(lt):.2f}x ({max(bt) / max(lt):.2f}x)"
             if bt and lt else "-")
    cells = [block_scaled(f), kernel(f), show(lp) if lp else error(f, "llama"), show(lt),
             show(bp) if bp else error(f, "binllm"), show(bt)]
    print(f"| {f}.gguf | " + " | ".join(cells) + f" | {ratio} |")
PY
  exit 0
fi
GGUF=${1:-}
THREADS=${2:-"1 $(nproc)"}
[[ -n "$GGUF" ]] || GGUF=models/SmolLM2-135M-Instruct.Q4_1.gguf
ROUNDS=${3:-3}
PP=${PP:-128}
TG=${TG:-64}
WORK=target/bench
[[ -f "$GGUF" ]] || { echo "error: $GGUF not found" >&2; exit 1; }

bash tools/bench/setup_llama_cpp.sh "$WORK" >&2
# The pure-Rust build has its own target directory: it must not replace the libtorch build.
cargo build -q --release -p binllm-cli --no-default-features --target-dir target/pure-rust >&2
BIN=$WORK/llama.cpp/build/bin
BINLLM=target/pure-rust/release/binllm
mkdir -p "$WORK/models" "$WORK/results"
for t in F16 Q8_0 Q4_0; do
  out="$WORK/models/smollm2-$t.gguf"
  [[ -f "$out" ]] || "$BIN/llama-quantize" --allow-requantize "$GGUF" "$out" "$t" >/dev/null 2>&1
done
out="$WORK/models/smollm2-Q4_0-q4head.gguf"
[[ -f "$out" ]] || "$BIN/llama-quantize" --allow-requantize --token-embedding-type q4_0 \
  --output-tensor-type q4_0 "$GGUF" "$out" Q4_0 >/dev/null 2>&1
for head in f16 q8 q4; do
  "$BINLLM" export --ptq "$GGUF" --head "$head" --out "$WORK/models/smollm2-1bit-$head.b1" >/dev/null
done

rm -f "$WORK"/results/*.json
for round in $(seq 1 "$ROUNDS"); do
  for threads in $THREADS; do
    for t in F16 Q8_0 Q4_0 Q4_0-q4head; do
      "$BIN/llama-bench" -m "$WORK/models/smollm2-$t.gguf" -t "$threads" -p "$PP" -n "$TG" -r 5 -o json \
        2>/dev/null > "$WORK/results/llama-$t-t$threads-$round.json"
    done
    for head in f16 q8 q4; do
      "$BINLLM" bench --model "$WORK/models/smollm2-1bit-$head.b1" --threads "$threads" \
        --prompt-tokens "$PP" --gen-tokens "$TG" --reps 5 --json > "$WORK/results/binllm-$head-t$threads-$round.json"
    done
  done
done

python3 - "$WORK" "$THREADS" "$PP" "$TG" "$ROUNDS" <<'PY'
import glob, json, os, statistics, sys
work, thread_counts, pp, tg, rounds = sys.argv[1], [int(t) for t in sys.argv[2].split()], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rows = {}
def add(key, pp_ts, tg_ts, size, head, weights):
    r = rows.setdefault(key, {"pp": [], "tg": [], "size": size, "head": head, "weights": weights})
    r["pp"].extend(pp_ts); r["tg"].extend(tg_ts)
bandwidth = []
for threads in thread_counts:
    for t in ["F16", "Q8_0", "Q4_0", "Q4_0-q4head"]:
        for f in sorted(glob.glob(f"{work}/results/llama-{t}-t{threads}-*.json")):
            entries = json.load(open(f))
            pp_ts = next(e["samples_ts"] for e in entries if e["n_prompt"] > 0)
            tg_ts = next(e["samples_ts"] for e in entries if e["n_gen"] > 0)
            size = os.path.getsize(f"{work}/models/smollm2-{t}.gguf")
            # The tied embedding/head as llama-quantize writes it: Q4_0 files keep it Q8_0
            # (`binllm inspect` lists 210 Q4_0 + 1 Q8_0; 576 columns rule out Q6_K).
            # The -q4head file has it in q4_0 (--token-embedding-type / --output-tensor-type).
            head = {"F16": "f16", "Q8_0": "q8_0", "Q4_0": "q8_0", "Q4_0-q4head": "q4_0"}[t]
            add(("llama.cpp", t, threads), pp_ts, tg_ts, size, head, "Q4_0" if t == "Q4_0-q4head" else t)
            print(f"raw {f}: pp {statistics.median(pp_ts):.1f} tg {statistics.median(tg_ts):.1f} "
                  f"(tg reps {' '.join(f'{v:.1f}' for v in tg_ts)})", file=sys.stderr)
    for h in ["f16", "q8", "q4"]:
        for f in sorted(glob.glob(f"{work}/results/binllm-{h}-t{threads}-*.json")):
            r = json.load(open(f))
            add(("binllm", h, threads), r["pp_samples"], r["tg_samples"], r["file_bytes"], r["head"],
                f"1-bit, {r['bits_per_weight']['whole_model']:.2f} bits/weight overall")
            bandwidth.append(r["read_gb_per_second"])
            print(f"raw {f}: pp {statistics.median(r['pp_samples']):.1f} tg {statistics.median(r['tg_samples']):.1f} "
                  f"(tg reps {' '.join(f'{v:.1f}' for v in r['tg_samples'])}; head kernel {r['head_kernel']})", file=sys.stderr)
# Every rep of every round counts: the median is the typical figure on this shared machine, the
# best the least disturbed one (load from other tenants only ever slows a rep down).
med = {k: (statistics.median(v["pp"]), statistics.median(v["tg"])) for k, v in rows.items()}
best = {k: (max(v["pp"]), max(v["tg"])) for k, v in rows.items()}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
reps = len(next(iter(rows.values()))["tg"])
print(f"SmolLM2-135M-Instruct on {cpu} ({os.cpu_count()} logical CPUs, shared); pp{pp} / tg{tg}; "
      f"median (best) of {reps} reps over {rounds} interleaved rounds; ratios: of medians (of bests); "
      f"load average at the end {os.getloadavg()[0]:.1f}; "
      f"single-thread read bandwidth {statistics.median(bandwidth):.1f} GB/s")
print()
print(f"| engine | weights | head | file MiB | threads | pp{pp} tok/s | tg{tg} tok/s | tg vs llama.cpp Q4_0 (q8_0 head) "
      f"| tg vs llama.cpp Q4_0, same head | tg vs llama.cpp F16 |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
def ratio(k, ref):
    return f"{med[k][1] / med[ref][1]:.2f}x ({best[k][1] / best[ref][1]:.2f}x)"
for threads in thread_counts:
    q4 = ("llama.cpp", "Q4_0", threads)
    f16 = ("llama.cpp", "F16", threads)
    # llama.cpp Q4_0 by head format (there is no Q4_0 file with an f16 head).
    q4_by_head = {"q8_0": q4, "q4_0": ("llama.cpp", "Q4_0-q4head", threads)}
    for k, v in rows.items():
        if k[2] != threads:
            continue
        same = ratio(k, q4_by_head[v["head"]]) if v["head"] in q4_by_head else "-"
        print(f"| {k[0]} | {v['weights']} | {v['head']} | {v['size'] / 2**20:.1f} | {threads} "
              f"| {med[k][0]:.1f} ({best[k][0]:.1f}) | {med[k][1]:.1f} ({best[k][1]:.1f}) "
              f"| {ratio(k, q4)} | {same} | {ratio(k, f16)} |")
PY
