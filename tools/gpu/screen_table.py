"""The screening table of tools/gpu/quality.sh's `screen` stage: one row per run directory
(recipe flags, tokens, wall-clock, held-out F-form and sign form, WikiText-2, chat score,
Stage-2 speed, and the profile when there is one). Usage: screen_table.py WORK_DIR"""
import json
import math
import pathlib
import sys

work = pathlib.Path(sys.argv[1])
rows = []
for run in sorted((work / "runs").iterdir()):
    summary = run / "summary.json"
    if not summary.exists():
        continue
    s = json.loads(summary.read_text())
    v = s["validation"]
    wiki = "-"
    report = work / "evals" / f"{run.name}.json"
    if report.exists():
        for p in json.loads(report.read_text()).get("perplexity", []):
            if p["dataset"] == "wikitext2":
                wiki = f"{p['ppl']:.1f}"
    chat = s.get("chat") or {}
    student = chat.get("student") or {}
    clean = f"{100 * student['clean_share']:.0f}%" if student else "-"
    answer_ppl = f"{student['answer_perplexity']:.2f}" if student else "-"
    rows.append(
        f"| {run.name} | {s['method']} | {s['tokens_trained'] / 1e6:.1f}M | {s['wall_seconds']:.0f} s "
        f"| {math.exp(v['final_training_form']):.1f} | {math.exp(v['final_sign_form']):.1f} | {wiki} "
        f"| {answer_ppl} | {clean} | {s['stage2_step_tokens_per_second'] / 1e3:.1f}k |"
    )
print("| run | method | tokens | wall | held-out ppl, last training form | held-out ppl, sign form "
      "| WikiText-2 | chat answer ppl | chat clean | Stage-2 tok/s (steps) |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
print("\n".join(rows))
for run in sorted((work / "runs").iterdir()):
    summary = run / "summary.json"
    if summary.exists():
        profile = json.loads(summary.read_text()).get("profile")
        if profile:
            total = sum(ms for _, ms in profile)
            print(f"\n{run.name}: " + ", ".join(f"{name} {ms:.1f} ms ({100 * ms / total:.0f}%)" for name, ms in profile))
