"""`tutorbot finetune`, `tutorbot models ...`, `tutorbot feedback review` through typer's CliRunner.

Training and evaluation are replaced by fakes here (tests/finetune covers them for real); the
registry, the dataset and the database are real.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.cli_finetune import feedback_app, finetune_app, models_app
from tests.finetune.test_registry import fake_model, metrics, run_dir

runner = CliRunner()


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("TUTORBOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("TUTORBOT_MODELS_DIR", raising=False)
    monkeypatch.delenv("TUTORBOT_DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    return tmp_path


def registry(env):
    from finetune.registry import Registry

    return Registry(env / "data" / "models")


def invoke(app, args):
    return runner.invoke(app, args, catch_exceptions=False)


# --- models -------------------------------------------------------------------------------------


def test_models_list_current_promote_rollback(env):
    reg = registry(env)
    res = invoke(models_app, ["list"])
    assert res.exit_code == 0 and "base model is in service" in res.output
    reg.register(run_dir(env, "a"), metrics(0.6, baseline=0.5))
    reg.register(run_dir(env, "b"), metrics(0.55, baseline=0.6, baseline_model="v1"))

    res = invoke(models_app, ["promote", "v1", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["current"] == "v1"
    res = invoke(models_app, ["current", "--json"])
    assert json.loads(res.output)["current"] == "v1"

    res = invoke(models_app, ["promote", "v2"])  # below v1 on the same split
    assert res.exit_code == 1 and "refused" in res.output and "stays in service" in res.output
    assert reg.current_version() == "v1"
    res = invoke(models_app, ["promote", "v2", "--json"])
    assert res.exit_code == 1 and json.loads(res.output) == {"ok": False, "error": json.loads(res.output)["error"],
                                                               "current": "v1"}
    res = invoke(models_app, ["promote", "v2", "--force"])
    assert res.exit_code == 0 and reg.current_version() == "v2"

    data = json.loads(invoke(models_app, ["list", "--json"]).output)
    assert data["current"] == "v2" and [v["version"] for v in data["versions"]] == ["v1", "v2"]
    assert data["versions"][0]["primary"] == 0.6
    table = invoke(models_app, ["list"]).output
    assert "v1" in table and "v2" in table

    res = invoke(models_app, ["rollback", "--json"])
    assert json.loads(res.output)["current"] == "v1"
    assert "base model" in invoke(models_app, ["rollback"]).output
    res = invoke(models_app, ["rollback"])
    assert res.exit_code == 1 and "nothing to roll back" in res.output


def test_models_promote_unknown_and_damaged(env):
    reg = registry(env)
    reg.register(run_dir(env, "a"), metrics(0.6))
    (reg.root / "v1" / "config.json").unlink()
    res = invoke(models_app, ["promote", "v1", "--force"])
    assert res.exit_code == 1 and "damaged or incomplete" in res.output
    assert invoke(models_app, ["promote", "v9"]).exit_code == 1
    assert "damaged" in invoke(models_app, ["list"]).output


# --- feedback -----------------------------------------------------------------------------------


@pytest.fixture
def db(env, monkeypatch):
    """A migrated SQLite database with three voted answers; returns {name: feedback id}."""
    from knowledge.store import migrate
    from knowledge.store.db import create_engine, create_session_factory
    from knowledge.store.qa_repo import QARepository
    from knowledge.tutor import Answer

    url = f"sqlite+aiosqlite:///{env / 'fb.db'}"
    monkeypatch.setenv("TUTORBOT_DATABASE_URL", url)

    async def seed():
        engine = create_engine(url)
        await migrate.upgrade(engine)
        repo = QARepository(create_session_factory(engine))
        ids = {}
        for name, q, a, vote in (("good", "what is fine-tuning?", "Adapting a pre-trained model.", 1),
                                 ("bad", "what is lora?", "A kind of radio.", -1),
                                 ("meh", "what is dropout?", "Switching units off.", 1)):
            aid = await repo.log_answer(Answer(question=q, text=a, answered=True, confidence=0.5),
                                        course_id="c", guild_id=1, channel_id=2, user_id=3)
            ids[name] = (await repo.record_vote(aid, 7, vote)).id
        await engine.dispose()
        return ids

    return asyncio.run(seed())


def test_feedback_review_lists_and_reviews(db):
    res = invoke(feedback_app, ["review", "--json"])
    items = json.loads(res.output)["feedback"]
    assert {i["id"] for i in items} == set(db.values()) and all(i["status"] == "pending" for i in items)
    res = invoke(feedback_app, ["review", "--no-interactive"])
    assert "what is lora?" in res.output and "--approve ID" in res.output

    res = invoke(feedback_app, ["review", "--approve", str(db["good"]), "--reject", str(db["meh"]),
                                "--correct", str(db["bad"]), "--answer", "Low-rank adapters.", "--json"])
    assert res.exit_code == 0
    reviewed = {r["id"]: r["status"] for r in json.loads(res.output)["reviewed"]}
    assert reviewed == {db["good"]: "approved", db["meh"]: "rejected", db["bad"]: "corrected"}
    assert json.loads(invoke(feedback_app, ["review", "--json"]).output)["feedback"] == []
    done = json.loads(invoke(feedback_app, ["review", "--status", "all", "--json"]).output)["feedback"]
    assert {i["id"]: i["corrected_answer"] for i in done}[db["bad"]] == "Low-rank adapters."

    from bot.config import Settings
    from finetune.data import load_feedback

    items = load_feedback(Settings().resolved_database_url)  # what the next fine-tuning run will use
    assert sorted((i.question, i.answer) for i in items) == [("what is fine-tuning?", "Adapting a pre-trained model."),
                                                             ("what is lora?", "Low-rank adapters.")]


def test_feedback_review_interactive(db):
    res = runner.invoke(feedback_app, ["review", "--interactive"], input="a\nc\nBetter answer.\ns\n")
    assert res.exit_code == 0, res.output
    assert "2 reviewed" in res.output
    statuses = {i["status"] for i in json.loads(invoke(feedback_app, ["review", "--status", "all", "--json"]).output)["feedback"]}
    assert statuses == {"approved", "corrected", "pending"}


def test_feedback_review_bad_input(db):
    res = invoke(feedback_app, ["review", "--correct", str(db["bad"])])
    assert res.exit_code == 1 and "--answer" in res.output
    res = invoke(feedback_app, ["review", "--approve", "99999", "--json"])
    assert res.exit_code == 1 and "no feedback 99999" in res.output


def test_feedback_review_without_database(env, monkeypatch):
    monkeypatch.setenv("TUTORBOT_DATABASE_URL", f"sqlite+aiosqlite:///{env / 'missing' / 'no.db'}")
    res = invoke(feedback_app, ["review", "--json"])
    assert res.exit_code == 1 and "database" in res.output.lower()


# --- finetune -----------------------------------------------------------------------------------


@pytest.fixture
def fake_pipeline(env, monkeypatch):
    """Fake retriever, base model, training and evaluation; the dataset and registry stay real."""
    import finetune.base_model as base_model
    import finetune.evaluate as evaluate_mod
    import finetune.train as train_mod
    from finetune.train import RunResult
    from tests.finetune.test_data import FakeRetriever

    base = fake_model(env / "data" / "models" / "base" / "SmolLM2-135M-Instruct")
    monkeypatch.setattr(base_model, "ensure_base_model", lambda data_dir, progress=None: base)

    def open_retriever(s):
        from knowledge.course import load_course

        c = load_course(s.course_dir)
        return c, FakeRetriever(c)

    monkeypatch.setattr("bot.cli.open_retriever", open_retriever)
    calls = {}

    def fake_train(cfg, progress=None):
        calls["cfg"] = cfg
        out = Path(cfg.output_dir)
        fake_model(out / "model")
        run = {"config": {"method": cfg.method, "lr": cfg.lr}, "seconds": 1.0, "steps": 2, "base_model": "SmolLM2-135M-Instruct",
               "initial_val_loss": 2.0, "best_val_loss": 1.5, "best_step": 2, "final_train_loss": 1.4,
               "train_curve": [[1, 2.1], [2, 1.4]], "val_curve": [[0, 2.0], [2, 1.5]], "epochs_done": 1.0}
        (out / "run.json").write_text(json.dumps(run))
        return RunResult(out, out / "model", 2, 1.0, 2, 1.5, 2.0, 1.4, [(1, 2.1), (2, 1.4)], [(0, 2.0), (2, 1.5)],
                         1.0, False, None, 10, 100, "abc", "SmolLM2-135M-Instruct", run["config"])

    scores = {"new": 0.7, "old": 0.6}

    def fake_eval(model_dir, ds, **kw):
        new = "runs" in Path(model_dir).parts
        s = scores["new"] if new else scores["old"]
        return {"model": "finetuned:x" if new else "base:SmolLM2-135M-Instruct", "n": len(ds.test),
                "answer_cosine": s, "primary": s, "primary_metric": "answer_cosine", "loss": 1.0}

    monkeypatch.setattr(train_mod, "main", fake_train)
    monkeypatch.setattr(evaluate_mod, "evaluate_model", fake_eval)
    # The real extractor needs a real embedder (the fake retriever has none); the extractive floor
    # itself is tested in tests/finetune/test_evaluate.py.
    monkeypatch.setattr(evaluate_mod, "extractive_question_set",
                        lambda course, retriever, questions=None: {"fact_coverage": 0.7, "abstention_recall": 1.0})
    return {"calls": calls, "scores": scores}


def test_finetune_registers_and_promotes_only_if_better(env, fake_pipeline):
    out = env / "runs" / "one"
    res = invoke(finetune_app, ["--method", "lora", "--lr", "3e-5", "--output", str(out), "--promote", "--json",
                                "--no-feedback"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["version"] == "v1" and summary["promoted"] is True
    cfg = fake_pipeline["calls"]["cfg"]
    assert cfg.method == "lora" and cfg.lr == 3e-5 and Path(cfg.data_dir) == out / "data"
    assert (out / "data" / "manifest.json").is_file() and (out / "MODEL_CARD.md").is_file()
    reg = registry(env)
    assert reg.current_version() == "v1"
    m = reg.get("v1").manifest
    assert m["metrics"]["primary"] == 0.7 and m["metrics"]["baseline"]["primary"] == 0.6
    assert (reg.root / "v1" / "MODEL_CARD.md").is_file()

    fake_pipeline["scores"]["new"] = 0.5  # a worse model: registered, not promoted
    res = invoke(finetune_app, ["--output", str(env / "runs" / "two"), "--promote", "--json", "--no-feedback"])
    summary = json.loads(res.stdout)
    assert summary["version"] == "v2" and summary["promoted"] is False and "NOT promoted" in summary["decision"]
    assert reg.current_version() == "v1"


def test_finetune_on_a_tiny_course_fails_clearly(env, fake_pipeline, tiny_course):
    res = invoke(finetune_app, ["--course", str(tiny_course), "--output", str(env / "runs" / "t"), "--no-feedback"])
    assert res.exit_code == 1
    assert "at least 10" in res.output and "model in service was not changed" in res.output
    assert registry(env).list() == []


def test_finetune_refuses_a_model_from_another_base(env, fake_pipeline, monkeypatch):
    import finetune.train as train_mod

    real = train_mod.main

    def other_base(cfg, progress=None):
        r = real(cfg, progress)
        manifest = r.model_dir / "tutorbot_model.json"
        manifest.write_text(json.dumps({"base_model": "gpt2"}))
        return r

    monkeypatch.setattr(train_mod, "main", other_base)
    res = invoke(finetune_app, ["--output", str(env / "runs" / "x"), "--promote", "--no-feedback"])
    assert res.exit_code == 1 and "gpt2" in res.output and "not changed" in res.output
    assert registry(env).current_version() is None
