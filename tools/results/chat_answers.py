#!/usr/bin/env python3
"""Writes the held-out chat prompts with the teacher's and the converted model's greedy
answers, side by side, as Markdown.

    python3 tools/results/chat_answers.py RUN_DIR > chat-answers.md

RUN_DIR is a `binllm convert` run directory: its chat-reference.json holds the prompts and
the teacher's answers, its summary.json the student's answers (`chat.student.answers`).
"""
import json
import sys
from pathlib import Path


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    run = Path(sys.argv[1])
    reference = json.loads((run / "chat-reference.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    chat = summary.get("chat")
    if not chat or "student" not in chat:
        print(f"{run / 'summary.json'}: no chat score (was --chat-eval-prompts 0?)", file=sys.stderr)
        return 1
    student = chat["student"]
    teacher = reference["teacher"]
    items = reference["items"]
    if len(student["answers"]) != len(items):
        print(f"{run}: {len(items)} prompts but {len(student['answers'])} student answers", file=sys.stderr)
        return 1
    print("# Held-out chat prompts: the teacher's and the converted model's greedy answers\n")
    print(
        f"From the end of `binllm convert` ({run.name}/chat-reference.json and summary.json; batched "
        f"greedy decoding, at most {reference['max_new_tokens']} new tokens). The first five are "
        "the README's plain questions.\n"
    )
    print("| model | answer ppl | ended | loops | clean | mean answer tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, score in (("teacher (FP)", teacher), ("1-bit (sign form)", student)):
        print(
            f"| {name} | {score['answer_perplexity']:.2f} | {score['ended_share']:.0%} | "
            f"{score['loop_share']:.0%} | {score['clean_share']:.0%} | {score['mean_answer_tokens']:.0f} |"
        )
    for i, (item, answer) in enumerate(zip(items, student["answers"]), start=1):
        print(f"\n### {i}. {item['prompt']}\n")
        print(f"**Teacher (FP, greedy):** {item['answer']}\n")
        print(f"**1-bit (sign form, greedy, libtorch):** {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
