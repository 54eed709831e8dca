"""The `tutorbot` command. Settings are built inside each command, never at import."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(help="tutorbot: a course tutor for Discord and the terminal.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
index_app = typer.Typer(help="Build and inspect the course's search index.", no_args_is_help=True)
eval_app = typer.Typer(help="Measure retrieval and answers.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(eval_app, name="eval")
app.add_typer(db_app, name="db")


def _mount_optional() -> None:
    """Sub-apps that live in their own modules (quiz, fine-tuning, models, feedback)."""
    from bot.cli_finetune import feedback_app, finetune_app, models_app
    from bot.cli_quiz import quiz_app

    app.add_typer(quiz_app, name="quiz", help="Validate the question bank, leaderboards, a terminal quiz.")
    app.add_typer(finetune_app, name="finetune")
    app.add_typer(models_app, name="models")
    app.add_typer(feedback_app, name="feedback")


_mount_optional()

console = Console(stderr=True, soft_wrap=True)  # messages are never hard-wrapped mid-phrase
# Piped output (logs, CI) gets room for whole table rows instead of rich's default 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)

CourseOpt = Annotated[Path | None, typer.Option("--course", help="Course folder (default: the configured course).")]
IndexOpt = Annotated[Path | None, typer.Option("--index", help="Index folder (default: <data_dir>/index/<course id>).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def settings(**overrides):
    from bot.config import Settings

    s = Settings()
    for k, v in overrides.items():
        if v is not None:
            setattr(s, k, v)
    return s


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("sentence_transformers", "httpx", "transformers", "faiss", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def print_json_line(obj) -> None:
    """One JSON document on stdout, byte for byte: never through Rich, whose markup and emoji codes
    would rewrite text such as "[the paper](url)" or ":fire:" and crash on a stray "[/]"."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


# --- index --------------------------------------------------------------------------------------

@index_app.command("build")
def index_build(
    course: CourseOpt = None, index: IndexOpt = None,
    replace: Annotated[bool, typer.Option("--replace", help="Replace another course's index in the --index folder.")] = False,
) -> None:
    """Validate the course and (re)build its index, re-embedding only changed passages."""
    from knowledge.course import CourseError, load_course
    from knowledge.embedder import EmbedderError, shared_minilm
    from knowledge.index import IndexError_, build_index

    s = settings(course_dir=course, index_dir=index)
    setup_logging("WARNING")
    try:
        c = load_course(s.course_dir)
    except CourseError as exc:
        raise fail(f"{exc}\nThe index in service (if any) was left untouched.") from None
    for w in c.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")
    target = s.resolved_index_dir(c.id)
    console.print(f"Indexing [bold]{c.title}[/] ({len(c.documents)} lessons, {len(c.faq)} FAQ records) into {target}")
    try:
        idx = build_index(c, target, shared_minilm(), show_progress=sys.stderr.isatty(), replace=replace)
    except (EmbedderError, IndexError_) as exc:
        raise fail(f"{exc}\nThe index in service (if any) was left untouched.") from None
    m = idx.manifest
    if idx.up_to_date:
        console.print(f"[green]up to date:[/] the index in service already holds this course "
                      f"({m.chunk_count} passages, built {m.created_at}); nothing to do")
        return
    console.print(
        f"[green]done:[/] {m.chunk_count} passages from {m.source_count} sources "
        f"({m.embedded} embedded, {m.reused} reused) in {m.build_seconds:.1f}s; index {m.index_type}"
    )


@index_app.command("info")
def index_info(course: CourseOpt = None, index: IndexOpt = None, as_json: JsonOpt = False) -> None:
    """Show the manifest of the index in service."""
    from dataclasses import asdict

    from knowledge.course import CourseError, load_course
    from knowledge.embedder import MINILM_NAME
    from knowledge.index import IndexError_, KnowledgeIndex

    s = settings(course_dir=course, index_dir=index)
    try:
        cid = load_course(s.course_dir).id
        idx = KnowledgeIndex.load(s.resolved_index_dir(cid), course_id=cid, embedding_model=MINILM_NAME,
                                  course_dir=s.course_dir)
    except (CourseError, IndexError_) as exc:
        raise fail(str(exc)) from None
    data = asdict(idx.manifest)
    if as_json:
        out.print_json(json.dumps(data))
    else:
        t = Table(show_header=False)
        for k, v in data.items():
            t.add_row(k, str(v))
        out.print(t)


def open_retriever(s):
    """Load course, index (building or updating it as needed) and retriever for the configured course."""
    from knowledge.course import load_course
    from knowledge.embedder import shared_minilm
    from knowledge.index import open_index
    from knowledge.retriever import Retriever

    course = load_course(s.course_dir)
    emb = shared_minilm()
    idx = open_index(course, s.resolved_index_dir(course.id), emb, progress=lambda m: console.print(f"[dim]{m}[/]"),
                     show_progress=sys.stderr.isatty())
    return course, Retriever(idx, emb, dense_weight=s.dense_weight, bm25_weight=s.bm25_weight)


# --- search -------------------------------------------------------------------------------------

@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("--k", min=1, max=50, help="Number of hits.")] = 5,
    section: Annotated[str | None, typer.Option(help="Only passages in this section (prefix).")] = None,
    course: CourseOpt = None,
    index: IndexOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search the course: hybrid dense + keyword retrieval, reading the course's aliases as the tutor does."""
    from knowledge.course import CourseError
    from knowledge.index import IndexError_
    from knowledge.text import course_reading

    if not query.strip():
        raise fail('give something to search for, e.g. tutorbot search "learning rate"', code=2)
    s = settings(course_dir=course, index_dir=index)
    setup_logging("WARNING")
    try:
        loaded, retriever = open_retriever(s)
    except (CourseError, IndexError_) as exc:
        raise fail(str(exc)) from None
    expanded = course_reading(query, loaded.meta.aliases)
    hits = retriever.search(expanded, k, section=section)
    if as_json:
        print_json_line([
            {"source": h.source, "title": h.chunk.title, "section": h.chunk.section, "score": round(h.score, 5),
             "dense_score": round(h.dense_score, 4), "bm25_score": round(h.bm25_score, 4), "excerpt": h.excerpt()}
            for h in hits
        ])
        return
    if expanded != query:
        out.print(f"[dim]searching for: {escape(expanded)} (the course's aliases)[/]", highlight=False)
    if not hits:
        out.print("No passages matched.")
    for n, h in enumerate(hits, 1):
        where = f"{h.chunk.title} > {h.chunk.section}" if h.chunk.section else h.chunk.title
        out.print(f"[bold]{n}. {escape(where)}[/]  [dim]{escape(h.source)}  score {h.score:.4f} "
                  f"(cos {h.dense_score:.2f}, bm25 {h.bm25_score:.1f})[/]")
        out.print(f"   {h.excerpt()}\n", highlight=False, markup=False, emoji=False)


# --- eval ---------------------------------------------------------------------------------------

@eval_app.command("retrieval")
def eval_retrieval(
    corpus: Annotated[Path, typer.Option("--corpus", help="A course folder or a FAQ JSON file.")],
    ground_truth: Annotated[Path, typer.Option("--ground-truth", help="CSV: question, document|filename[, course].")],
    k: Annotated[int, typer.Option("--k", min=1, max=50)] = 5,
    as_json: JsonOpt = False,
) -> None:
    """hit@1/3/5, MRR@k and query latency of the hybrid retriever on a labelled question set."""
    from knowledge.course import CourseError, faq_course_from_json, load_course
    from knowledge.embedder import shared_minilm
    from knowledge.evaluation import GroundTruthError, check_ground_truth, evaluate, load_ground_truth
    from knowledge.index import KnowledgeIndex
    from knowledge.retriever import Retriever

    s = settings()
    setup_logging("WARNING")
    if not corpus.exists():
        raise fail(f"{corpus}: no such file or folder (give a course folder or a FAQ JSON file)")
    try:
        c = load_course(corpus) if corpus.is_dir() else faq_course_from_json(corpus)
        queries = load_ground_truth(ground_truth)
    except (CourseError, GroundTruthError) as exc:
        raise fail(str(exc)) from None
    emb = shared_minilm()
    console.print(f"Indexing {corpus} ({len(c.documents)} lessons, {len(c.faq)} FAQ records)…")
    idx = KnowledgeIndex.build(c, emb, show_progress=sys.stderr.isatty())
    r = Retriever(idx, emb, dense_weight=s.dense_weight, bm25_weight=s.bm25_weight)
    known = {ch.course_id for ch in idx.chunks}
    for w in [*c.warnings, *check_ground_truth(queries, {ch.source for ch in idx.chunks}, known)]:
        console.print(f"[yellow]warning:[/] {escape(w)}")

    def run(q):
        course_filter = q.course if q.course in known else None
        return [h.source for h in r.search(q.question, max(k, 5) * 4, course=course_filter)]

    console.print(f"Evaluating {len(queries)} questions…")
    res = evaluate(run, queries, k)
    if as_json:
        print_json_line(res)
        return
    t = Table(title=f"Retrieval on {corpus.name}")
    for key in res:
        t.add_column(key)
    t.add_row(*[str(v) for v in res.values()])
    out.print(t)


# --- answering ----------------------------------------------------------------------------------

ModeOpt = Annotated[str | None, typer.Option("--mode", help="auto, generative or extractive (default: the setting).")]


def _runtime(course: Path | None, mode: str | None, quiet: bool = False, index: Path | None = None):
    from bot.runtime import TutorRuntime
    from knowledge.course import CourseError
    from knowledge.embedder import EmbedderError
    from knowledge.index import IndexError_

    if mode not in (None, "auto", "generative", "extractive"):
        raise fail(f"--mode must be auto, generative or extractive, not {mode!r}")
    s = settings(course_dir=course, answer_mode=mode, index_dir=index)
    setup_logging("ERROR" if quiet else "WARNING")
    try:
        return TutorRuntime(s, progress=lambda m: console.print(f"[dim]{m}[/]"))
    except (CourseError, IndexError_, EmbedderError) as exc:
        raise fail(str(exc)) from None


def answer_json(a) -> dict:
    return {
        "question": a.question, "answer": a.text, "answered": a.answered, "confidence": a.confidence,
        "sources": [{"source": r.source, "title": r.title, "section": r.section, "score": r.score, "excerpt": r.excerpt}
                    for r in a.sources],
        "latency_ms": a.latency_ms, "mode": a.mode, "model": a.model, "notices": list(a.notices),
    }


_BOLD = re.compile(r"\*\*(.+?)\*\*")


def print_answer(a) -> None:
    for n in a.notices:
        out.print(f"[yellow]{escape(n)}[/]", highlight=False)
    # The tutor writes Discord's **bold**; the terminal shows it as bold, never as asterisks.
    out.print(_BOLD.sub(r"[bold]\1[/bold]", escape(a.text)), highlight=False, emoji=False)
    if a.sources:
        out.print("[dim]Sources:[/]")
        for r in a.sources:
            out.print(f"[dim]  - {escape(r.label)}  ({escape(r.source)})[/]", highlight=False)
    if a.mode != "smalltalk":
        out.print(f"[dim]{a.mode}, passage match {a.confidence:.2f}, {a.latency_ms:.0f} ms[/]")


def read_batch(batch: Path) -> list[str]:
    """The lines of a batch file ('-' = stdin), one question each. Blank lines are kept, so the n-th
    answer is always the n-th line's (a blank line gets the tutor's "ask me a question" reply); a
    line that is not UTF-8 is read with its bad bytes replaced and named in a warning."""
    name = "standard input" if str(batch) == "-" else str(batch)
    try:
        raw = sys.stdin.buffer.read() if str(batch) == "-" else batch.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {name}: {exc.strerror or exc}") from None
    if b"\0" in raw[:8192]:
        raise fail(f"{name} has NUL bytes (a binary or UTF-16 file?); expected UTF-8 text, one question per line", code=2)
    lines = raw.removeprefix(b"\xef\xbb\xbf").splitlines()
    if not any(line.strip() for line in lines):
        raise fail(f"{name} holds no questions; expected one question per line", code=2)
    from bot.terminal import decode_line

    decoded = [decode_line(line) for line in lines]
    questions = [text for text, _ in decoded]
    bad = [n for n, (_, valid) in enumerate(decoded, 1) if not valid]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        console.print(f"[yellow]warning:[/] {escape(name)}: line(s) {shown} are not valid UTF-8; "
                      "the bytes that are not were replaced with \ufffd", highlight=False)
    return questions


@app.command()
def ask(
    question: Annotated[str | None, typer.Argument(help="The question.")] = None,
    batch: Annotated[Path | None, typer.Option("--batch", help="File with one question per line ('-' = stdin).")] = None,
    as_json: JsonOpt = False,
    course: CourseOpt = None,
    index: IndexOpt = None,
    mode: ModeOpt = None,
) -> None:
    """Answer one question, or a file of questions (models loaded once; JSON lines out with --json)."""
    if (question is None) == (batch is None):
        raise fail("give a QUESTION or --batch FILE (not both)")
    qs = None if batch is None else read_batch(batch)  # a bad file fails before the models load
    rt = _runtime(course, mode, quiet=as_json, index=index)
    try:
        if qs is None:
            a = rt.tutor.answer(question)
            print_json_line(answer_json(a)) if as_json else print_answer(a)
            return
        from concurrent.futures import ThreadPoolExecutor

        # Concurrent callers let the batching generator answer several questions per model call.
        with ThreadPoolExecutor(max_workers=rt.settings.max_concurrent_generations) as pool:
            for a in pool.map(rt.tutor.answer, qs):
                if as_json:
                    print_json_line(answer_json(a))
                else:
                    out.rule(escape(a.question[:80]), characters="─")  # a question is never markup
                    print_answer(a)
    finally:
        rt.close()


@app.command()
def chat(course: CourseOpt = None, index: IndexOpt = None, mode: ModeOpt = None) -> None:
    """The terminal tutor: ask questions; /quiz, /help, /quit. Works with piped input too."""
    from bot.terminal import run_chat

    rt = _runtime(course, mode, index=index)
    try:
        run_chat(rt, out)
    finally:
        rt.close()


@app.command()
def run() -> None:
    """Run the Discord bot (needs DISCORD_TOKEN). `make run` starts the terminal tutor without one."""
    s = settings()
    if s.discord_token is None or not s.discord_token.get_secret_value().strip():
        raise fail("DISCORD_TOKEN is not set. Create a bot at https://discord.com/developers/applications, "
                   "put its token in DISCORD_TOKEN (or .env), then run again. See README: "
                   "'Run it on your Discord server'.", code=2)
    from bot.__main__ import run_discord

    setup_logging(s.log_level)
    raise typer.Exit(run_discord(s))


# --- db -----------------------------------------------------------------------------------------

@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations (the Procfile's release step)."""
    _db(lambda m, e: m.upgrade(e, revision), f"upgraded to {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision, e.g. -1 or base.")]) -> None:
    """Revert migrations."""
    _db(lambda m, e: m.downgrade(e, revision), f"downgraded to {revision}")


@db_app.command("current")
def db_current() -> None:
    """Show the database's revision and the newest one."""
    async def show(m, e):
        cur = await m.current_revision(e)
        out.print(f"database: {cur or '(empty)'}  newest: {m.head_revision()}")

    _db(show, None)


def _db(action, done: str | None) -> None:
    import asyncio

    from knowledge.store import migrate
    from knowledge.store.db import DatabaseError, create_engine, redact_url

    s = settings()
    url = s.resolved_database_url

    async def go():
        engine = create_engine(url)
        try:
            await action(migrate, engine)
        finally:
            await engine.dispose()

    try:
        asyncio.run(go())
    except DatabaseError as exc:
        raise fail(str(exc)) from None
    except (OSError, ConnectionError) as exc:
        raise fail(f"cannot reach the database at {redact_url(url)}: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith(("sqlalchemy", "asyncpg")):
            raise fail(f"database error at {redact_url(url)}: {exc}") from None
        raise
    if done:
        console.print(f"[green]{done}[/] ({redact_url(url)})")


if __name__ == "__main__":
    app()
