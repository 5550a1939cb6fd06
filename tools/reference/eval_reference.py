#!/usr/bin/env python3
"""Independent reference for binllm-eval: perplexity and zero-shot multiple choice with
transformers, prompts built by lm-evaluation-harness's own task code.

Two stages, so that the scoring can run on a machine that has torch and transformers but
neither lm-eval nor the data sets (a GPU box):

  prepare  (needs lm-eval 0.4.x, datasets, transformers, gguf)
           reads the shared data, builds every request with lm-eval's task configs and
           HFLM's `_encode_pair`, tokenizes the perplexity texts, writes requests.json
  score    (needs torch, transformers, gguf)
           loads the model, scores requests.json, writes the reference JSON
  all      both, in one process

The reference JSON holds numbers and hashes only (no data-set text), so it can be committed.

Protocols (the same as crates/binllm-eval; see tools/reference/README.md):
  wikitext2  wiki.test.raw read as the HF `wikitext` script does (one row per line, blank
             lines -> ""), rows joined with "\\n\\n" (GPTQ get_wikitext2)
  ptb        ptb.test.txt, rows = line.strip(), joined with " " (GPTQ get_ptb_new: test split)
  ptb-valid  ptb.valid.txt, rows = line.strip(), joined with "\\n\\n" (GPTQ get_ptb: GPTQ's
             default 'ptb' evaluates the validation split)
  c4         first 1100 documents of c4_validation_2k.jsonl.gz joined with " ", first
             256*ctx tokens (GPTQ get_c4_new; not GPTQ's document set)
  All: tokenizer(text) with the tokenizer's special tokens, non-overlapping windows of ctx
  tokens, a final partial window dropped, mean NLL over positions 1..ctx of every window.

Usage:
  eval_reference.py all --model-dir models --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \\
      --data ../shared/data/eval --out reference.json [--device cuda] [--limit 200] [--ctx 2048]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
PPL_SETS = ["wikitext2", "ptb", "ptb-valid", "c4"]
C4_DOCS = 1100
C4_WINDOWS = 256


def sha16(text: str) -> str:
    """Short content hash: the fixture carries no data-set text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    with open_text(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- documents
# Each loader turns the shared file into rows of the Hugging Face data set that lm-eval's
# task yaml names, so lm-eval's own doc_to_text / doc_to_choice / process_docs run on them.


def docs_boolq(data: Path) -> list[dict]:
    # lm-eval reads aps/super_glue boolq, whose passage is "<title> -- <passage>".
    rows = read_jsonl(data / "boolq/dev.jsonl.gz")
    return [
        {"question": r["question"], "passage": f'{r["title"]} -- {r["passage"]}',
         "idx": i, "label": int(bool(r["answer"]))}
        for i, r in enumerate(rows)
    ]


def docs_piqa(data: Path) -> list[dict]:
    rows = read_jsonl(data / "piqa/valid.jsonl")
    labels = [int(l) for l in (data / "piqa/valid-labels.lst").read_text().split()]
    assert len(rows) == len(labels)
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": l}
            for r, l in zip(rows, labels)]


def docs_hellaswag(data: Path) -> list[dict]:
    # The shared file is llama.cpp's text extraction: line 1 = activity_label + ": " + ctx,
    # already stripped of [header]/[title]/[step]. lm-eval builds
    # preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()); the file has
    # lost the ctx_a/ctx_b split, so ctx_b's capitalisation cannot be applied: we pass the
    # whole ctx as ctx_a and an empty ctx_b (lm-eval's strip() removes the extra space).
    with open_text(data / "hellaswag/hellaswag_val_full.txt.gz") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    assert len(lines) % 6 == 0
    docs = []
    for b in range(0, len(lines), 6):
        head = lines[b]
        label, _, ctx = head.partition(": ")
        docs.append({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                     "endings": lines[b + 2:b + 6], "label": lines[b + 1].strip()})
    return docs


def docs_winogrande(data: Path) -> list[dict]:
    rows = read_jsonl(data / "winogrande/dev.jsonl")
    return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"],
             "answer": r["answer"]} for r in rows]


def _ai2_choices(r: dict) -> dict:
    return {"text": [c["text"] for c in r["question"]["choices"]],
            "label": [c["label"] for c in r["question"]["choices"]]}


def docs_arc(data: Path, which: str) -> list[dict]:
    rows = read_jsonl(data / f"arc/{which}/{which}-Test.jsonl.gz")
    return [{"id": r["id"], "question": r["question"]["stem"], "choices": _ai2_choices(r),
             "answerKey": r["answerKey"]} for r in rows]


def docs_openbookqa(data: Path) -> list[dict]:
    rows = read_jsonl(data / "openbookqa/test.jsonl")
    return [{"id": r["id"], "question_stem": r["question"]["stem"], "choices": _ai2_choices(r),
             "answerKey": r["answerKey"]} for r in rows]


DOC_LOADERS = {
    "boolq": docs_boolq,
    "piqa": docs_piqa,
    "hellaswag": docs_hellaswag,
    "winogrande": docs_winogrande,
    "arc_easy": lambda d: docs_arc(d, "ARC-Easy"),
    "arc_challenge": lambda d: docs_arc(d, "ARC-Challenge"),
    "openbookqa": docs_openbookqa,
}


def lm_eval_task(name: str, docs: list[dict]):
    """lm-eval's ConfigurableTask for `name`, from its registered yaml, reading `docs`."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    entry = manager._entry(name)
    if entry is None:
        raise SystemExit(f"lm-eval has no task {name!r}")

    def custom_dataset(**_kwargs):
        return datasets.DatasetDict({"eval": datasets.Dataset.from_list(docs)})

    cfg = manager._factory._load_full_config(entry, None)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    cfg.update({"custom_dataset": custom_dataset, "training_split": None,
                "validation_split": "eval", "test_split": None, "fewshot_split": None})
    return ConfigurableTask(config=cfg)


class _EncodeShim:
    """Just enough of an HFLM for lm-eval's own `TemplateLM._encode_pair` to run."""

    backend = "causal"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def tok_encode(self, text: str, **_kwargs) -> list[int]:
        # HFLM with add_bos_token=False (lm-eval <= 0.4.2's default for causal models):
        # no special tokens around prompts.
        return self.tokenizer.encode(text, add_special_tokens=False)


def build_task_requests(task_name: str, data: Path, tokenizer, limit: int) -> dict:
    from lm_eval.api.model import TemplateLM

    docs = DOC_LOADERS[task_name](data)
    task = lm_eval_task(task_name, docs)
    eval_docs = list(task.eval_docs)[:limit]
    shim = _EncodeShim(tokenizer)
    metrics = list(task._metric_fn_list.keys())
    examples = []
    for doc_id, doc in enumerate(eval_docs):
        ctx = task.fewshot_context(doc, 0)
        instances = task.construct_requests(doc, ctx, metadata=(task_name, doc_id, 1))
        if not isinstance(instances, list):
            instances = [instances]
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        choices = task.doc_to_choice(doc)
        requests = []
        for inst in instances:
            context, continuation = inst.args
            ctx_enc, cont_enc = TemplateLM._encode_pair(shim, context, continuation)
            requests.append({"context": context, "continuation": continuation,
                             "context_tokens": ctx_enc, "continuation_tokens": cont_enc})
        examples.append({
            "doc_id": doc_id,
            "gold": int(gold),
            # lm-eval's acc_norm divides by len(choice) in characters (code points)
            "choice_chars": [len(c) for c in choices],
            "choice_bytes": [len(c.encode("utf-8")) for c in choices],
            "requests": requests,
        })
    return {"task": task_name, "metrics": metrics, "num_docs": len(docs), "examples": examples}


# ----------------------------------------------------------------------------- perplexity


def hf_text_rows(path: Path) -> list[str]:
    """Rows as the HF `wikitext` script yields them: every line (with its newline) of the
    file read in text mode; a blank line becomes ""."""
    with open(path, encoding="utf-8") as f:
        return [row if row.strip() else "" for row in f]


def ptb_rows(path: Path) -> list[str]:
    """Rows as the HF `ptb_text_only` script yields them: every line, stripped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f]


def ppl_text(name: str, data: Path) -> tuple[str, int | None]:
    """(joined text, maximum number of windows or None)."""
    if name == "wikitext2":
        return "\n\n".join(hf_text_rows(data / "wikitext-2-raw/wiki.test.raw")), None
    if name == "ptb":
        return " ".join(ptb_rows(data / "ptb/ptb.test.txt")), None
    if name == "ptb-valid":
        return "\n\n".join(ptb_rows(data / "ptb/ptb.valid.txt")), None
    if name == "c4":
        docs = read_jsonl(data / "c4/c4_validation_2k.jsonl.gz")[:C4_DOCS]
        return " ".join(d["text"] for d in docs), C4_WINDOWS
    raise SystemExit(f"unknown perplexity set {name}")


def load_tokenizer(model_dir: str, gguf_file: str | None, llama_cpp_pre: bool = False):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    if llama_cpp_pre:
        # transformers builds a GGUF's byte-level BPE with plain GPT-2 pre-tokenization and
        # ignores `tokenizer.ggml.pre`; llama.cpp's `smollm` (like starcoder, refact) first
        # isolates every digit. With this flag the reference tokenizes as llama.cpp does.
        from tokenizers import Regex, pre_tokenizers
        from gguf import GGUFReader
        field = GGUFReader(str(Path(model_dir) / gguf_file)).fields["tokenizer.ggml.pre"]
        pre = bytes(field.parts[field.data[0]]).decode()
        if pre not in ("smollm", "starcoder", "refact"):
            raise SystemExit(f"--llama-cpp-pre: no rule for tokenizer.ggml.pre = {pre!r}")
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    return tokenizer


def prepare(args) -> dict:
    import lm_eval
    data = Path(args.data)
    t0 = time.time()
    tokenizer = load_tokenizer(args.model_dir, args.gguf_file, args.llama_cpp_pre)
    out = {
        "model": {"dir": args.model_dir, "gguf_file": args.gguf_file,
                  "pre_tokenizer": "llama.cpp" if args.llama_cpp_pre else "transformers"},
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "?",
        "ctx": args.ctx,
        "limit": args.limit,
        "perplexity": {},
        "tasks": {},
    }
    for name in args.ppl:
        text, max_windows = ppl_text(name, data)
        ids = tokenizer(text).input_ids  # with special tokens, as GPTQ's tokenizer(text)
        out["perplexity"][name] = {"tokens": ids, "max_windows": max_windows,
                                   "text_sha16": sha16(text), "text_chars": len(text)}
        print(f"[prepare] {name}: {len(ids)} tokens", file=sys.stderr)
    for name in args.tasks:
        out["tasks"][name] = build_task_requests(name, data, tokenizer, args.limit)
        n = sum(len(e["requests"]) for e in out["tasks"][name]["examples"])
        print(f"[prepare] {name}: {len(out['tasks'][name]['examples'])} examples, {n} requests",
              file=sys.stderr)
    out["prepare_seconds"] = time.time() - t0
    return out


# ----------------------------------------------------------------------------- scoring


def load_model(args):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file=args.gguf_file,
                                                 dtype=torch.float32)
    return model.to(args.device).eval()


def score_perplexity(model, tokens: list[int], ctx: int, max_windows: int | None,
                     device: str, batch: int, only_windows: int = 0) -> dict:
    import torch
    n_windows = len(tokens) // ctx
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if only_windows:
        # A spot check (slow CPUs): the first windows only; not the data set's perplexity.
        n_windows = min(n_windows, only_windows)
    ids = torch.tensor(tokens[: n_windows * ctx], dtype=torch.long).view(n_windows, ctx)
    nll = 0.0
    window_nll = []
    with torch.no_grad():
        for b in range(0, n_windows, batch):
            x = ids[b:b + batch].to(device)
            logp = torch.log_softmax(model(x).logits.float(), dim=-1)
            picked = logp[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1).double()
            for row in picked:
                s = -row.sum().item()
                window_nll.append(s)
                nll += s
    predicted = n_windows * (ctx - 1)
    return {
        "tokens": len(tokens),
        "windows": n_windows,
        "dropped_tail_tokens": len(tokens) - n_windows * ctx if max_windows is None else None,
        "predicted_tokens": predicted,
        "nll_sum": nll,
        "mean_nll": nll / predicted if predicted else float("nan"),
        "ppl": math.exp(nll / predicted) if predicted else float("nan"),
        "window_mean_nll": [w / (ctx - 1) for w in window_nll],
    }


def score_requests(model, requests: list[dict], device: str, batch: int,
                   max_length: int) -> list[tuple[float, bool]]:
    """lm-eval HFLM `_loglikelihood_tokens`: longest first, right padding, left truncation
    to max_length + 1 tokens, log-softmax in float32, greedy = every continuation token is
    the argmax."""
    import torch
    order = sorted(range(len(requests)),
                   key=lambda i: -(len(requests[i]["context_tokens"])
                                   + len(requests[i]["continuation_tokens"])))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    with torch.no_grad():
        for b in range(0, len(order), batch):
            chunk = order[b:b + batch]
            inps, conts = [], []
            for i in chunk:
                whole = requests[i]["context_tokens"] + requests[i]["continuation_tokens"]
                inps.append(whole[-(max_length + 1):][:-1])
                conts.append(requests[i]["continuation_tokens"])
            width = max(len(x) for x in inps)
            x = torch.zeros((len(inps), width), dtype=torch.long)
            for r, inp in enumerate(inps):
                x[r, :len(inp)] = torch.tensor(inp)
            logp = torch.log_softmax(model(x.to(device)).logits.float(), dim=-1).cpu()
            for r, i in enumerate(chunk):
                n_in, cont = len(inps[r]), conts[r]
                rows = logp[r, n_in - len(cont):n_in]
                target = torch.tensor(cont)
                greedy = bool((rows.argmax(-1) == target).all())
                ll = float(rows.gather(-1, target[:, None]).sum())
                results[i] = (ll, greedy)
    return results  # type: ignore[return-value]


def mean_stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def score(args, prepared: dict) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load_model(args)
    load_s = time.time() - t0
    max_length = args.max_length or getattr(model.config, "max_position_embeddings", 2048)
    ctx = prepared["ctx"]
    out = {
        "kind": "binllm-eval reference",
        "generator": "tools/reference/eval_reference.py",
        "model": prepared["model"],
        "engine": f"transformers {__import__('transformers').__version__}, torch "
                  f"{torch.__version__}, float32, device {args.device}",
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
        else "cpu",
        "lm_eval_version": prepared.get("lm_eval_version"),
        "ctx": ctx,
        "limit": prepared["limit"],
        "max_length": max_length,
        "perplexity": {},
        "tasks": {},
        "seconds": {"model_load": load_s},
    }
    for name, item in prepared["perplexity"].items():
        t = time.time()
        res = score_perplexity(model, item["tokens"], ctx, item["max_windows"], args.device,
                               args.ppl_batch, args.only_windows)
        res["partial"] = bool(args.only_windows)
        res["text_sha16"] = item["text_sha16"]
        res["text_chars"] = item["text_chars"]
        res["seconds"] = time.time() - t
        out["perplexity"][name] = res
        print(f"[score] {name}: ppl {res['ppl']:.4f} over {res['windows']} windows "
              f"({res['tokens']} tokens) in {res['seconds']:.0f}s", file=sys.stderr)
    for name, task in prepared["tasks"].items():
        t = time.time()
        flat = [r for e in task["examples"] for r in e["requests"]]
        scored = score_requests(model, flat, args.device, args.batch, max_length)
        k = 0
        examples = []
        acc, acc_norm = [], []
        for e in task["examples"]:
            lls, greedy, reqs = [], [], []
            for r in e["requests"]:
                ll, g = scored[k]
                k += 1
                lls.append(ll)
                greedy.append(g)
                reqs.append({
                    "context_sha16": sha16(r["context"]),
                    "continuation_sha16": sha16(r["continuation"]),
                    "context_tokens": len(r["context_tokens"]),
                    "continuation_tokens": len(r["continuation_tokens"]),
                    "tokens_sha16": sha16(json.dumps(
                        [r["context_tokens"], r["continuation_tokens"]])),
                })
            pred = argmax(lls)
            pred_norm = argmax([ll / c for ll, c in zip(lls, e["choice_chars"])])
            acc.append(1.0 if pred == e["gold"] else 0.0)
            acc_norm.append(1.0 if pred_norm == e["gold"] else 0.0)
            examples.append({"doc_id": e["doc_id"], "gold": e["gold"],
                             "choice_chars": e["choice_chars"], "loglikelihoods": lls,
                             "is_greedy": greedy, "pred": pred, "pred_norm": pred_norm,
                             "requests": reqs})
        metrics = {"acc": sum(acc) / len(acc), "acc_stderr": mean_stderr(acc)}
        if "acc_norm" in task["metrics"]:
            metrics["acc_norm"] = sum(acc_norm) / len(acc_norm)
            metrics["acc_norm_stderr"] = mean_stderr(acc_norm)
        out["tasks"][name] = {"n": len(examples), "num_docs": task["num_docs"],
                              "lm_eval_metrics": task["metrics"], "metrics": metrics,
                              "seconds": time.time() - t, "examples": examples}
        print(f"[score] {name}: {metrics} ({len(flat)} requests, "
              f"{time.time() - t:.0f}s)", file=sys.stderr)
    out["seconds"]["total"] = time.time() - t0
    return out


def dump_reference(out: dict) -> str:
    """Pretty JSON with one line per task example (reviewable, about 1 MB)."""
    head = {k: v for k, v in out.items() if k != "tasks"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "tasks": {\n'
    tasks = []
    for name, task in out["tasks"].items():
        meta = json.dumps({k: v for k, v in task.items() if k != "examples"})[:-1]
        examples = ",\n".join(json.dumps(e, separators=(",", ":")) for e in task["examples"])
        tasks.append(f'  {json.dumps(name)}: {meta}, "examples": [\n{examples}\n  ]}}')
    return text + ",\n".join(tasks) + "\n }\n}\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["prepare", "score", "all"])
    p.add_argument("--model-dir", default="models")
    p.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--data", default="../shared/data/eval")
    p.add_argument("--requests", help="prepare: where to write; score: what to read")
    p.add_argument("--out", help="reference JSON (score, all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--max-length", type=int, default=0,
                   help="lm-eval's max_length for truncation (default: the model's context)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ppl-batch", type=int, default=1)
    p.add_argument("--only-windows", type=int, default=0,
                   help="score only the first N perplexity windows (a spot check on slow CPUs)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--llama-cpp-pre", action="store_true",
                   help="tokenize with llama.cpp's pre-tokenizer for the GGUF's tokenizer.ggml.pre "
                        "(digits isolated for smollm) instead of transformers' GPT-2 default")
    p.add_argument("--ppl", default=",".join(PPL_SETS))
    args = p.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.ppl = [t for t in args.ppl.split(",") if t]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    if args.stage in ("prepare", "all"):
        prepared = prepare(args)
        if args.requests:
            Path(args.requests).write_text(json.dumps(prepared))
    else:
        prepared = json.loads(Path(args.requests).read_text())
    if args.stage in ("score", "all"):
        result = score(args, prepared)
        Path(args.out).write_text(dump_reference(result))


if __name__ == "__main__":
    main()
