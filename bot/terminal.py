"""The terminal tutor (`tutorbot chat`, and `make run` without a Discord token)."""

from __future__ import annotations

import random
import sys

from rich.console import Console

from knowledge.tutor import Turn

HELP = """Ask any question about the course and press Enter.
  /quiz [N]   a short quiz from the course's question bank (default 5 questions)
  /help       this help
  /quit       leave (Ctrl-D works too)"""
LETTERS = "ABCDEF"


def _read(prompt: str, interactive: bool, out: Console) -> str | None:
    try:
        if interactive:
            return out.input(prompt)
        line = sys.stdin.readline()
        return None if line == "" else line.rstrip("\n")
    except (EOFError, KeyboardInterrupt):
        return None


def run_quiz(course, out: Console, interactive: bool, n: int = 5, rng: random.Random | None = None) -> None:
    rng = rng or random.Random()
    bank = list(course.quizzes)
    if not bank:
        out.print("This course has no quiz questions.")
        return
    qs = rng.sample(bank, min(n, len(bank)))
    score = 0
    for i, q in enumerate(qs, 1):
        order = list(range(len(q.choices)))
        rng.shuffle(order)
        out.print(f"\n[bold]Question {i}/{len(qs)}[/] ({q.difficulty})  {q.question}", highlight=False)
        for letter, ci in zip(LETTERS, order, strict=False):
            out.print(f"  {letter}) {q.choices[ci]}", highlight=False)
        right = LETTERS[order.index(q.answer_index)]
        while True:
            reply = _read("Your answer (letter, or q to stop): ", interactive, out)
            if reply is None or reply.strip().lower() == "q":
                out.print(f"Quiz stopped. Score: {score}/{i - 1}")
                return
            pick = reply.strip().upper()[:1]
            if pick and pick in LETTERS[: len(q.choices)]:
                break
            out.print(f"Please answer with a letter from A to {LETTERS[len(q.choices) - 1]}.")
        if pick == right:
            score += 1
            out.print("[green]Correct![/]")
        else:
            out.print(f"[red]Not quite.[/] The answer is {right}) {q.answer}", highlight=False)
        out.print(f"[dim]{q.explanation}[/]", highlight=False)
        if pick != right and q.common_mistakes:
            out.print(f"[dim]Common mistake: {q.common_mistakes[0]}[/]", highlight=False)
    out.print(f"\n[bold]Score: {score}/{len(qs)}[/]")


def run_chat(rt, out: Console) -> None:
    from bot.cli import print_answer

    interactive = sys.stdin.isatty()
    tutor = rt.tutor
    if interactive:
        out.print(f"[bold]{tutor.course.title}[/] tutor ({rt.status().model}). Type /help for commands.")
    history: list[Turn] = []
    while True:
        line = _read("\n[bold cyan]you>[/] " if interactive else "", interactive, out)
        if line is None:
            break
        q = line.strip()
        if not q:
            continue
        cmd = q.lower().split()
        if cmd[0] in ("/quit", "/exit", "/q"):
            break
        if cmd[0] == "/help":
            out.print(HELP, highlight=False)
            continue
        if cmd[0] == "/quiz":
            n = int(cmd[1]) if len(cmd) > 1 and cmd[1].isdigit() else 5
            run_quiz(tutor.course, out, interactive, max(1, min(n, 25)))
            continue
        a = tutor.answer(q, history=history[-4:])
        if not interactive:
            out.print(f"> {a.question}", highlight=False, markup=False)
        print_answer(a)
        history += [Turn("user", a.question), Turn("assistant", a.text)]
