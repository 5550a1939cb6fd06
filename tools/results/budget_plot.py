#!/usr/bin/env python3
"""Plots perplexity against Stage-2 tokens for one recipe, from a TSV with the columns
`stage2_tokens`, `wikitext2`, `c4`, `ptb` (and any others, ignored), beside the teacher's
figures given on the command line.

    python3 tools/results/budget_plot.py budget.tsv budget.png --teacher 21.63,28.11,46.70

Needs matplotlib (e.g. `python3 -m venv .deps/plot-venv && .deps/plot-venv/bin/pip install
matplotlib==3.10.7`).
"""
import argparse
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SETS = ("wikitext2", "c4", "ptb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table")
    parser.add_argument("png")
    parser.add_argument("--teacher", help="the FP teacher's wikitext2,c4,ptb perplexities")
    parser.add_argument("--title", default="1-bit SmolLM2-135M-Instruct, quality recipe: perplexity against tokens")
    args = parser.parse_args()
    with open(args.table) as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if not r["stage2_tokens"].startswith("#")]
    rows.sort(key=lambda r: float(r["stage2_tokens"]))
    tokens = [float(r["stage2_tokens"]) / 1e6 for r in rows]
    teacher = [float(v) for v in args.teacher.split(",")] if args.teacher else None
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, name in enumerate(SETS):
        values = [float(r[name]) for r in rows]
        line = ax.plot(tokens, values, marker="o", label=f"{name} (1-bit)")[0]
        for x, y in zip(tokens, values):
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if teacher:
            ax.axhline(teacher[i], color=line.get_color(), linestyle=":", linewidth=1,
                       label=f"{name} (FP teacher {teacher[i]:.1f})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(tokens, [f"{t:g}M" for t in tokens])
    ax.set_xlabel("Stage-2 tokens")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(args.title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
