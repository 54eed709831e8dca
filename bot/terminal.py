"""The terminal tutor (`tutorbot chat`, and `make run` without a Discord token)."""

from __future__ import annotations

import re
import sys

from rich.console import Console

from knowledge.tutor import Turn

HELP = """Ask any question about the course and press Enter.
  /quiz [N]   a short quiz from the course's question bank (default 5 questions)
  /help       this help
  /quit       leave (Ctrl-D works too)"""


def decode_line(raw: bytes) -> tuple[str, bool]:
    """A line of input as text, and whether it was valid UTF-8 (if not, bad bytes become U+FFFD)."""
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), False


def _read(prompt: str, interactive: bool, out: Console) -> str | None:
    """The next line, or None at the end of input (Ctrl-D, Ctrl-C or the end of a pipe). Piped
    input is echoed after the prompt so the transcript reads like a session; a piped line that is
    not UTF-8 is read with its bad bytes replaced, with a notice, instead of ending the chat."""
    try:
        if interactive:
            return out.input(prompt)
        stream = getattr(sys.stdin, "buffer", None)
        raw = stream.readline() if stream is not None else sys.stdin.readline()
    except (EOFError, KeyboardInterrupt):
        if interactive:
            out.print()  # the shell's prompt starts on a line of its own
        return None
    if not raw:
        return None
    if isinstance(raw, bytes):
        raw, valid = decode_line(raw)
        if not valid:
            out.print("(that line was not valid UTF-8: its unreadable bytes were replaced)", style="yellow")
    line = raw.rstrip("\r\n")
    if prompt:
        out.print(prompt, end="", highlight=False)
        out.print(line, highlight=False, markup=False)
    return line


def run_quiz(
    course, out: Console, interactive: bool, n: int | None = None, *, seconds: int | None = None,
    difficulty: str | None = None, topics: tuple[str, ...] = (), seed: int | None = None, settings=None,
) -> bool:
    """A quiz in the terminal on the same engine and rules as on Discord (nothing is stored).
    Returns False when no quiz could start (e.g. no question matches the filters)."""
    from knowledge.quiz import QuizEngine, QuizError

    opts = {}
    if settings is not None:
        opts = dict(default_questions=settings.quiz_questions, default_seconds=settings.quiz_seconds,
                    allow_change=settings.quiz_allow_change, idle_limit=settings.quiz_idle_questions)
    engine = QuizEngine(course, seed=seed, **opts)
    try:
        session = engine.start(guild_id=None, channel_id=0, starter_id=0, questions=n, seconds=seconds,
                               difficulty=difficulty, tags=topics)
    except QuizError as exc:
        out.print(str(exc), highlight=False)
        return False
    out.print(f"{course.title}: {session.total} question(s). Answer with a letter; Enter skips, q stops.")
    while (view := engine.open_next(session.id)) is not None:
        out.print(f"\n[bold]Question {view.number}/{view.total}[/] ({view.difficulty}, {view.topic})", highlight=False)
        out.print(view.text, highlight=False, markup=False)
        for letter, text in view.choices:
            out.print(f"  {letter}) {text}", highlight=False, markup=False)
        letters = [letter for letter, _ in view.choices]
        while True:
            reply = _read("Your answer: ", interactive, out)
            pick = (reply or "").strip().upper()[:1]
            if reply is None or pick == "Q":
                engine.stop(session.id, 0)
                break
            if not pick or pick in letters:
                break
            out.print(f"Please answer with a letter from {letters[0]} to {letters[-1]}.")
        if reply is None or pick == "Q":
            break
        if pick:
            try:
                engine.answer(session.id, view.position, pick, 0, "you")
            except QuizError as exc:
                out.print(str(exc), highlight=False)
        reveal = engine.reveal(session.id)
        mine = session.questions[view.position].answers.get(0)
        verdict = "[green]Correct![/]" if mine and mine.correct else "[red]Not quite.[/]" if mine else "Skipped."
        out.print(f"{verdict} The answer is {reveal.correct_letter}) ", end="")
        out.print(reveal.correct_text, highlight=False, markup=False)
        out.print(reveal.explanation, style="dim", highlight=False, markup=False)
        if mine and not mine.correct:
            for m in reveal.common_mistakes[:2]:
                out.print(f"Common mistake: {m}", style="dim", highlight=False, markup=False)
        if reveal.end_reason == "idle":
            out.print("No answers for a while: the quiz stopped.")
            break
    if engine.get(session.id).status == "open":
        engine.finish(session.id)
    row = next(iter(engine.results(session.id).rows), None)
    if row is None:
        out.print("\nNo answers given.")
    else:
        out.print(f"\n[bold]Score: {row.correct}/{row.asked} correct, {row.points} points[/]")
    return True


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
            n = int(cmd[1]) if len(cmd) > 1 and cmd[1].isdigit() else None
            run_quiz(tutor.course, out, interactive, max(1, min(n, 25)) if n else None, settings=rt.settings)
            continue
        if re.fullmatch(r"/[a-z]+", cmd[0]):  # "/foo": a mistyped command, not a question about the course
            out.print(f"Unknown command {cmd[0]}: the commands are /quiz [N], /help and /quit.", highlight=False, markup=False)
            continue
        a = tutor.answer(q, history=history[-4:])
        if not interactive:
            out.print(f"> {a.question}", highlight=False, markup=False)
        print_answer(a)
        history += [Turn("user", a.question), Turn("assistant", a.text)]
