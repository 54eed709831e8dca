"""`tutorbot finetune`, `tutorbot models ...`, `tutorbot feedback review`.

Three typer sub-apps, mounted on the main CLI::

    app.add_typer(finetune_app, name="finetune")
    app.add_typer(models_app, name="models")
    app.add_typer(feedback_app, name="feedback")

``finetune`` is a single command (the sub-app's callback): data -> train -> evaluate against the
model in service on the same held-out split -> register -> promote only if better (``--promote``).
Settings are built inside each command, never at import. Failures print one clear line and exit
non-zero; the model in service is never touched by a failed run.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

finetune_app = typer.Typer(help="Fine-tune the answer model on the course's Q&A and reviewed feedback.",
                           invoke_without_command=True, add_completion=False)
models_app = typer.Typer(help="The answer model registry: list, current, promote, rollback.", no_args_is_help=True)
feedback_app = typer.Typer(help="Review students' votes on answers (approved answers become training data).",
                           no_args_is_help=True)

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(soft_wrap=True, highlight=False, width=None if sys.stdout.isatty() else 160)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _settings(**overrides):
    from bot.config import Settings

    s = Settings()
    for k, v in overrides.items():
        if v is not None:
            setattr(s, k, v)
    return s


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)


def _emit_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


# --- finetune ----------------------------------------------------------------------------------


def _sqlite_missing(url: str) -> bool:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return u.get_backend_name() == "sqlite" and bool(u.database) and u.database != ":memory:" \
        and not Path(u.database).exists()


def reviewed_feedback(settings, say) -> list:
    """Approved/corrected feedback from the database; an unreachable database means none (warned)."""
    from finetune.data import load_feedback

    url = settings.resolved_database_url
    if _sqlite_missing(url):
        return []
    try:
        items = load_feedback(url)
    except Exception as exc:  # DatabaseError, a database without tables...
        say(f"[yellow]warning:[/] reviewed feedback not used: the database is unavailable "
            f"({escape(type(exc).__name__)}: {escape(str(exc).splitlines()[0] if str(exc) else '')})")
        return []
    return items


@finetune_app.callback(invoke_without_command=True)
def finetune(
    ctx: typer.Context,
    method: Annotated[str | None, typer.Option("--method", help="full | freeze | lora (default: the preset's).")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Passes over the training split.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after N optimizer steps.")] = None,
    freeze_layers: Annotated[int | None, typer.Option("--freeze-layers", help="Bottom layers kept frozen.")] = None,
    dropout: Annotated[float | None, typer.Option("--dropout", help="Dropout in the trained layers/adapters.")] = None,
    patience: Annotated[int | None, typer.Option("--patience", help="Validations without improvement before stopping.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Examples per micro-batch.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for the split, data order and initialisation.")] = None,
    output: Annotated[Path | None, typer.Option("--output", help="Run folder (default: <data_dir>/runs/<time>-<method>).")] = None,
    preset: Annotated[str, typer.Option("--preset", help="Preset in finetune/presets/ (or a YAML path).")] = "sample-course",
    course: Annotated[Path | None, typer.Option("--course", help="Course folder (default: the configured course).")] = None,
    promote: Annotated[bool, typer.Option("--promote", help="Promote the new model if it beats the one in service.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its last checkpoint.")] = False,
    feedback: Annotated[bool, typer.Option("--feedback/--no-feedback", help="Include approved/corrected feedback.")] = True,
    evaluate: Annotated[bool, typer.Option("--evaluate/--no-evaluate", help="Evaluate before/after (needed to promote).")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune: data -> train -> evaluate vs the current model -> register -> promote if better."""
    if ctx.invoked_subcommand is not None:
        return
    from finetune.base_model import BaseModelError, ensure_base_model
    from finetune.data import Dataset, DatasetError, build_dataset
    from finetune.registry import Registry, RegistryError
    from finetune.train import TrainConfig, TrainError
    from finetune.train import main as train_main
    from knowledge.course import CourseError

    if resume and output is None:
        raise _fail("--resume needs --output RUN_DIR (the folder of the interrupted run)")
    s = _settings(course_dir=course)
    say = err.print
    started = time.monotonic()
    reg = Registry(s.resolved_models_dir)
    run_dir = output or s.data_dir / "runs" / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{method or preset}"
    try:
        cfg = TrainConfig.from_preset(
            preset, method=method, epochs=epochs, lr=lr, max_steps=max_steps, freeze_layers=freeze_layers,
            dropout=dropout, patience=patience, batch_size=batch_size, seed=seed,
        )
        cfg.show_progress = sys.stderr.isatty()
        cfg.validate()
        base_dir = ensure_base_model(s.data_dir, progress=lambda m: say(escape(m)))
        data_dir = run_dir / "data"
        if resume:
            ds = Dataset.load(data_dir)
            from bot.cli import open_retriever

            crs, retriever = open_retriever(s)
            say(f"resuming {run_dir} (dataset {ds.sha256[:12]})")
        else:
            from bot.cli import open_retriever

            crs, retriever = open_retriever(s)
            items = reviewed_feedback(s, say) if feedback else []
            say(f"building the dataset for [bold]{escape(crs.title)}[/] ({len(crs.quizzes)} quiz questions, "
                f"{len(crs.flashcards)} flashcards, {len(crs.faq)} FAQ records, {len(items)} reviewed answers)")
            ds = build_dataset(crs, retriever, feedback=items, seed=cfg.seed, lessons=cfg.data_lessons, out_dir=data_dir,
                               progress=lambda m: say(escape(m)))
        counts = ds.manifest["counts"]
        say(f"dataset: {counts['train']['total']} train / {counts['val']['total']} validation / "
            f"{counts['test']['total']} test examples in {data_dir}")
        cfg.data_dir, cfg.output_dir, cfg.base_model_dir, cfg.resume = str(data_dir), str(run_dir), str(base_dir), resume
        run = train_main(cfg, progress=lambda m: say(escape(m)))
    except (CourseError, DatasetError, TrainError, BaseModelError) as exc:
        raise _fail(f"{exc}\nThe model in service was not changed.") from None

    summary: dict = {"run_dir": str(run_dir), "train_seconds": run.seconds, "steps": run.steps,
                     "initial_val_loss": run.initial_val_loss, "best_val_loss": run.best_val_loss,
                     "version": None, "promoted": False}
    before = after = None
    metrics: dict = {}
    if evaluate:
        from bot.runtime import current_model_dir
        from finetune.evaluate import evaluate_model

        current_dir = current_model_dir(s)
        say(f"evaluating the model in service ({escape(str(current_dir))}) and the new one on the same test split")
        before = evaluate_model(current_dir, ds, course=crs, retriever=retriever, progress=lambda m: say(escape(m)),
                                cache_dir=s.data_dir / "runs" / ".eval-cache")
        after = evaluate_model(run.model_dir, ds, course=crs, retriever=retriever, progress=lambda m: say(escape(m)))
        slim = {k: v for k, v in after.items() if k not in ("examples", "samples")}
        metrics = {
            **slim,
            "baseline": {"model": before["model"], "primary": before["primary"],
                         **{k: v for k, v in before.items() if k not in ("examples", "samples")}},
        }
        summary.update(before=slim_metrics(before), after=slim_metrics(after))
    try:
        version = reg.register(run_dir, metrics)
    except RegistryError as exc:
        raise _fail(f"{exc}\nThe model in service was not changed.") from None
    summary["version"] = version
    if before is not None and after is not None:
        from finetune.evaluate import is_better

        floor = before
        if reg.current_version() is None:  # `auto` answers by extraction until a model is promoted
            from finetune.evaluate import extractive_question_set, with_extractive_floor

            extractive = extractive_question_set(crs, retriever)
            if extractive:
                summary["extractive"] = extractive
                floor = with_extractive_floor(before, extractive)
        better, why = is_better(floor, after)
        decision = f"{why}: " + ("better" if better else "not better")
        if promote and better:
            try:
                reg.promote(version)
                summary["promoted"] = True
                decision += f"; promoted {version}"
            except RegistryError as exc:
                decision += f"; promotion refused ({exc})"
        elif promote:
            decision += f"; {version} registered but NOT promoted"
        else:
            decision += f"; registered as {version} (promote with `tutorbot models promote {version}`)"
        summary["decision"] = decision
        from finetune.evaluate import model_card

        run_json = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        card = model_card(run_json, ds.manifest, before, after, version=version, decision=decision)
        (run_dir / "MODEL_CARD.md").write_text(card, encoding="utf-8")
        _copy_quietly(run_dir / "MODEL_CARD.md", reg.root / version / "MODEL_CARD.md")
        _copy_quietly(run_dir / "curves.png", reg.root / version / "curves.png")
        (run_dir / "evaluation.json").write_text(json.dumps({"before": before, "after": after}, indent=2,
                                                            default=str) + "\n", encoding="utf-8")
    summary["seconds"] = round(time.monotonic() - started, 1)
    if as_json:
        _emit_json(summary)
        return
    out.print(f"[green]done[/] in {summary['seconds']:.0f} s (training {run.seconds:.0f} s, {run.steps} steps): "
              f"validation loss {run.initial_val_loss:.3f} -> {run.best_val_loss:.3f}")
    if before is not None:
        from finetune.evaluate import metrics_table

        out.print(metrics_table(before, after))
        out.print(escape(summary["decision"]))
    else:
        out.print(f"registered as {version} (not evaluated, so not promoted)")
    out.print(f"run folder: {escape(str(run_dir))} (model/, run.json, curves.png, MODEL_CARD.md)")


def slim_metrics(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("examples", "samples", "model_dir")}


def _copy_quietly(src: Path, dst: Path) -> None:
    import shutil

    try:
        if src.exists() and dst.parent.is_dir():
            shutil.copy2(src, dst)
    except OSError:
        pass


# --- models ------------------------------------------------------------------------------------


def _registry():
    from finetune.registry import Registry

    return Registry(_settings().resolved_models_dir)


def _fmt_primary(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


@models_app.command("list")
def models_list(as_json: JsonOpt = False) -> None:
    """All registered versions, oldest first; the current one is marked."""
    reg = _registry()
    versions = reg.list()
    if as_json:
        _emit_json({"current": reg.current_version(), "versions": [v.as_dict() for v in versions]})
        return
    if not versions:
        out.print(f"no fine-tuned models in {escape(str(reg.root))} yet; the base model is in service "
                  "(train one with `tutorbot finetune`)")
        return
    t = Table()
    for col in ("", "version", "created", "method", "primary metric", "score", "data", "status"):
        t.add_column(col)
    for v in versions:
        t.add_row("*" if v.current else "", v.version, str(v.manifest.get("created_at", "-")),
                  str(v.manifest.get("method", "-")), v.primary_metric, _fmt_primary(v.primary),
                  str(v.manifest.get("data_sha256") or "-")[:10],
                  "ok" if v.valid else f"[red]damaged[/]: {escape(v.problem)}")
    out.print(t)
    if reg.current_version() is None:
        out.print("current: the base model")


@models_app.command("current")
def models_current(as_json: JsonOpt = False) -> None:
    """The model in service."""
    reg = _registry()
    cur = reg.current()
    if as_json:
        _emit_json({"current": cur.version if cur else None, "base": cur is None,
                    "model": cur.as_dict() if cur else None, "token": reg.state_token()})
        return
    if cur is None:
        out.print("the base model (no fine-tuned version promoted)")
    else:
        out.print(f"{cur.version}: {cur.primary_metric} {_fmt_primary(cur.primary)}, "
                  f"created {cur.manifest.get('created_at', '-')}, {escape(str(cur.path))}"
                  + ("" if cur.valid else f" [red](damaged: {escape(cur.problem)}; the base model serves)[/]"))


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="Version to put in service, e.g. v3.")],
    force: Annotated[bool, typer.Option("--force", help="Promote even if it scores below the current model.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Put a version in service (refused if it scores below the current one, unless --force)."""
    from finetune.registry import RegistryError

    reg = _registry()
    try:
        v = reg.promote(version, force=force)
    except RegistryError as exc:
        if as_json:
            _emit_json({"ok": False, "error": str(exc), "current": reg.current_version()})
            raise typer.Exit(1) from None
        raise _fail(f"{exc} The current model ({reg.current_version() or 'base'}) stays in service.") from None
    if as_json:
        _emit_json({"ok": True, "current": v.version, "token": reg.state_token()})
    else:
        out.print(f"[green]{v.version} is now in service[/]; running bots pick it up within their polling interval "
                  "(or use the admin reload command).")


@models_app.command("rollback")
def models_rollback(as_json: JsonOpt = False) -> None:
    """Go back to the previously promoted model (or the base model)."""
    from finetune.registry import RegistryError

    reg = _registry()
    try:
        v = reg.rollback()
    except RegistryError as exc:
        if as_json:
            _emit_json({"ok": False, "error": str(exc), "current": reg.current_version()})
            raise typer.Exit(1) from None
        raise _fail(str(exc)) from None
    if as_json:
        _emit_json({"ok": True, "current": v.version if v else None, "token": reg.state_token()})
    else:
        out.print(f"rolled back: {v.version if v else 'the base model'} is now in service")


@models_app.command("init")
def models_init() -> None:
    """Convert the packaged base model once (otherwise done on first use)."""
    from finetune.base_model import BaseModelError, ensure_base_model

    try:
        path = ensure_base_model(_settings().data_dir, progress=lambda m: err.print(escape(m)))
    except BaseModelError as exc:
        raise _fail(str(exc)) from None
    out.print(f"base model ready at {escape(str(path))}")


# --- feedback ----------------------------------------------------------------------------------


async def _with_repo(url: str, fn):
    from knowledge.store.db import create_engine, create_session_factory
    from knowledge.store.qa_repo import QARepository

    engine = create_engine(url)
    try:
        return await fn(QARepository(create_session_factory(engine)))
    finally:
        await engine.dispose()


def _row(fb, ans) -> dict:
    return {
        "id": fb.id, "answer_id": ans.id, "vote": fb.vote, "status": fb.status, "comment": fb.comment,
        "question": ans.question, "answer": ans.answer, "corrected_answer": fb.corrected_answer,
        "answered": ans.answered, "mode": ans.mode, "model": ans.model_version,
        "reviewed_by": fb.reviewed_by, "created_at": fb.created_at.isoformat() if fb.created_at else None,
    }


def _reviewer() -> str:
    return f"cli:{os.environ.get('USER') or os.environ.get('USERNAME') or 'maintainer'}"


@feedback_app.callback()
def _feedback_group() -> None:
    """Review students' votes on answers (approved and corrected answers become training data)."""


@feedback_app.command("review")
def feedback_review(
    approve: Annotated[list[int] | None, typer.Option("--approve", help="Approve feedback ID (repeatable).")] = None,
    correct: Annotated[int | None, typer.Option("--correct", help="Correct feedback ID (with --answer).")] = None,
    answer: Annotated[str | None, typer.Option("--answer", help="The corrected answer for --correct.")] = None,
    reject: Annotated[list[int] | None, typer.Option("--reject", help="Reject feedback ID (repeatable).")] = None,
    status: Annotated[str, typer.Option("--status", help="Which feedback to list: pending|approved|corrected|rejected|all.")] = "pending",
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="How many to list.")] = 50,
    interactive: Annotated[bool | None, typer.Option("--interactive/--no-interactive",
                                                     help="Review one by one (default: when run in a terminal).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List voted answers and approve, correct or reject them (approved and corrected answers train the model)."""
    from knowledge.store.db import DatabaseError

    url = _settings().resolved_database_url
    if correct is not None and not (answer and answer.strip()):
        raise _fail("--correct needs --answer \"the corrected answer\"")
    if answer is not None and correct is None:
        raise _fail("--answer goes with --correct ID")
    if status not in ("pending", "approved", "corrected", "rejected", "all"):
        raise _fail("--status must be pending, approved, corrected, rejected or all")
    actions: list[tuple[int, str, str | None]] = [(i, "approved", None) for i in approve or []]
    actions += [(i, "rejected", None) for i in reject or []]
    if correct is not None:
        actions.append((correct, "corrected", answer.strip()))
    try:
        if actions:
            results = asyncio.run(_with_repo(url, lambda repo: _apply(repo, actions)))
            if as_json:
                _emit_json({"reviewed": results})
            else:
                for r in results:
                    if r.get("error"):
                        err.print(f"[red]feedback {r['id']}:[/] {escape(r['error'])}")
                    else:
                        out.print(f"feedback {r['id']}: {r['status']}")
            if any(r.get("error") for r in results):
                raise typer.Exit(1)
            return
        rows = asyncio.run(_with_repo(url, lambda repo: repo.list_feedback(
            status=None if status == "all" else status, limit=limit)))
    except DatabaseError as exc:
        raise _fail(f"{exc} (database {url.split('://')[0]}); run `tutorbot db upgrade` or check TUTORBOT_DATABASE_URL") from None
    items = [_row(fb, ans) for fb, ans in rows]
    if interactive is None:
        interactive = sys.stdin.isatty() and sys.stdout.isatty() and not as_json
    if as_json:
        _emit_json({"feedback": items})
        return
    if not items:
        out.print(f"no {status if status != 'all' else ''} feedback to review".replace("  ", " "))
        return
    if not interactive:
        _print_feedback(items)
        return
    _interactive(url, items)


async def _apply(repo, actions) -> list[dict]:
    results = []
    for fid, new_status, text in actions:
        try:
            fb = await repo.review_feedback(fid, status=new_status, reviewed_by=_reviewer(), corrected_answer=text)
            results.append({"id": fid, "status": fb.status, "corrected_answer": fb.corrected_answer})
        except (LookupError, ValueError) as exc:
            results.append({"id": fid, "error": str(exc)})
    return results


def _print_feedback(items: list[dict]) -> None:
    t = Table(show_lines=True)
    for col in ("id", "vote", "status", "question", "answer", "comment"):
        t.add_column(col, overflow="fold")
    for it in items:
        shown = it["corrected_answer"] or it["answer"]
        t.add_row(str(it["id"]), "+1" if it["vote"] > 0 else "-1", it["status"], escape(it["question"][:200]),
                  escape(shown[:300]), escape(it["comment"] or ""))
    out.print(t)
    out.print("approve: --approve ID   correct: --correct ID --answer TEXT   reject: --reject ID")


def _interactive(url: str, items: list[dict]) -> None:
    from rich.panel import Panel
    from rich.prompt import Prompt

    done = 0
    for n, it in enumerate(items, 1):
        vote = "[green]helpful[/]" if it["vote"] > 0 else "[red]not helpful[/]"
        body = (f"[bold]Question:[/] {escape(it['question'])}\n\n[bold]Answer:[/] {escape(it['answer'])}\n\n"
                f"vote: {vote}" + (f"   comment: {escape(it['comment'])}" if it["comment"] else ""))
        out.print(Panel(body, title=f"feedback {it['id']} ({n}/{len(items)}) - {it['status']}"))
        choice = Prompt.ask("[a]pprove, [c]orrect, [r]eject, [s]kip, [q]uit", choices=["a", "c", "r", "s", "q"],
                            default="s", console=out)
        if choice == "q":
            break
        if choice == "s":
            continue
        text = None
        if choice == "c":
            text = Prompt.ask("corrected answer", console=out).strip()
            if not text:
                out.print("empty correction: skipped")
                continue
        new_status = {"a": "approved", "c": "corrected", "r": "rejected"}[choice]
        res = asyncio.run(_with_repo(url, lambda repo, i=it, st=new_status, t=text: _apply(repo, [(i["id"], st, t)])))
        if res[0].get("error"):
            err.print(f"[red]{escape(res[0]['error'])}[/]")
        else:
            done += 1
            out.print(f"-> {new_status}")
    out.print(f"{done} reviewed")
