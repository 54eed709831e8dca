"""`tutorbot quiz ...`: lint a question bank, show a guild's leaderboard.

A typer sub-app, mounted on the main CLI as ``app.add_typer(quiz_app, name="quiz")``; importable and
testable on its own. Settings are built inside each command, never at import.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer

quiz_app = typer.Typer(
    name="quiz", help="Quizzes: lint the question bank, show leaderboards.", no_args_is_help=True
)


@quiz_app.command("validate")
def validate(
    course: Path | None = typer.Option(
        None, "--course", help="Course folder (default: the configured course, TUTORBOT_COURSE_DIR)."
    ),
    as_json: bool = typer.Option(False, "--json", help='Print {"questions": N, "errors": [...], "warnings": [...]}.'),
) -> None:
    """Lint the question bank: schema, duplicate ids, Discord limits, order-dependent choices.

    Exits 1 if there is any error (warnings alone exit 0).
    """
    from knowledge.quiz import lint_quiz_bank

    if course is None:
        from bot.config import Settings

        course = Settings().course_dir
    report = lint_quiz_bank(course)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
    else:
        from rich.console import Console
        from rich.markup import escape

        console = Console(highlight=False, soft_wrap=True)
        for e in report.errors:
            console.print(f"[red]error[/red]   {escape(e)}")
        for w in report.warnings:
            console.print(f"[yellow]warning[/yellow] {escape(w)}")
        verdict = "[red]refused[/red]" if report.errors else "[green]ok[/green]"
        console.print(
            f"{verdict}: {report.questions} valid question(s) in {report.files} file(s) under "
            f"{escape(str(report.course_dir))}; {len(report.errors)} error(s), {len(report.warnings)} warning(s)"
        )
    raise typer.Exit(1 if report.errors else 0)


async def _leaderboard(url: str, guild: int, limit: int):
    from knowledge.store.db import create_engine, create_session_factory
    from knowledge.store.quiz_repo import QuizRepo

    engine = create_engine(url)
    try:
        return await QuizRepo(create_session_factory(engine)).leaderboard(guild, limit)
    finally:
        await engine.dispose()


@quiz_app.command("leaderboard")
def leaderboard(
    guild: int = typer.Option(..., "--guild", help="Discord guild (server) id."),
    limit: int = typer.Option(10, "--limit", min=1, max=100, help="How many students to show."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """Show a guild's quiz leaderboard: points, quizzes, accuracy, streaks."""
    from sqlalchemy.exc import DBAPIError

    from bot.config import Settings
    from knowledge.store.db import DatabaseError, redact_url

    url = Settings().resolved_database_url
    try:
        rows = asyncio.run(_leaderboard(url, guild, limit))
    except (DBAPIError, OSError, DatabaseError) as exc:
        cause = exc.__cause__ if isinstance(exc, DatabaseError) and exc.__cause__ else exc
        typer.echo(
            f"Cannot read the leaderboard from {redact_url(url)}: {getattr(cause, 'orig', cause)}\n"
            "Is the database reachable and migrated? Run `tutorbot db upgrade`.",
            err=True,
        )
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps([
            {"rank": r.rank, "user_id": r.user_id, "display_name": r.display_name, "total": r.total,
             "quizzes": r.quizzes, "correct": r.correct, "answered": r.answered,
             "accuracy": round(r.accuracy, 4), "current_streak": r.current_streak, "best_streak": r.best_streak}
            for r in rows
        ], indent=2, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    if not rows:
        console.print(f"No quiz scores yet in guild {guild}.")
        return
    table = Table(title=f"Quiz leaderboard, guild {guild}")
    for col, justify in (("#", "right"), ("Student", "left"), ("Points", "right"), ("Quizzes", "right"),
                         ("Accuracy", "right"), ("Streak", "right"), ("Best", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(str(r.rank), escape(r.display_name), str(r.total), str(r.quizzes),
                      f"{r.accuracy:.0%} ({r.correct}/{r.answered})", str(r.current_streak), str(r.best_streak))
    console.print(table)


@quiz_app.command("play")
def play(
    course: Path | None = typer.Option(None, "--course", help="Course folder (default: the configured course)."),
    questions: int | None = typer.Option(None, "--questions", "-n", help="1-25 (default TUTORBOT_QUIZ_QUESTIONS)."),
    seconds: int | None = typer.Option(None, "--seconds", help="10-120 per question (default TUTORBOT_QUIZ_SECONDS)."),
    difficulty: str | None = typer.Option(None, "--difficulty", help="easy, medium or hard."),
    topic: list[str] = typer.Option([], "--topic", help="Only questions with this tag (repeatable)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for a reproducible draw."),
) -> None:
    """Play a quiz in the terminal (same engine and rules as on Discord; nothing is stored)."""
    import sys

    from rich.console import Console

    from bot.config import Settings
    from bot.terminal import run_quiz
    from knowledge.course import CourseError, load_course

    settings = Settings()
    try:
        loaded = load_course(course or settings.course_dir)
    except CourseError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    if difficulty is not None and difficulty not in ("easy", "medium", "hard"):
        typer.echo(f"--difficulty must be easy, medium or hard, not {difficulty!r}", err=True)
        raise typer.Exit(2)
    if not run_quiz(loaded, Console(highlight=False), sys.stdin.isatty(), questions, seconds=seconds,
                    difficulty=difficulty, topics=tuple(topic), seed=seed, settings=settings):
        raise typer.Exit(1)
