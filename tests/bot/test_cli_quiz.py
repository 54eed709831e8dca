"""`tutorbot quiz validate|leaderboard`, run through typer's CliRunner on the sub-app alone."""

from __future__ import annotations

import asyncio
import importlib
import json

import pytest
from typer.testing import CliRunner

from bot.cli_quiz import quiz_app
from tests.conftest import TINY_COURSE, write_course

runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no stray .env
    for var in ("TUTORBOT_DATABASE_URL", "DATABASE_URL", "TUTORBOT_COURSE_DIR", "TUTORBOT_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)


def test_import_builds_no_settings(monkeypatch):
    import bot.cli_quiz
    import bot.config

    def boom(*a, **k):
        raise AssertionError("Settings() built at import")

    monkeypatch.setattr(bot.config, "Settings", boom)
    importlib.reload(bot.cli_quiz)


def test_validate_a_good_bank(tiny_course):
    result = runner.invoke(quiz_app, ["validate", "--course", str(tiny_course)])
    assert result.exit_code == 0, result.output
    assert "ok: 2 valid question(s) in 1 file(s)" in result.output


def test_validate_uses_the_configured_course(tiny_course, monkeypatch):
    monkeypatch.setenv("TUTORBOT_COURSE_DIR", str(tiny_course))
    result = runner.invoke(quiz_app, ["validate", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "questions": 2,
        "errors": [],
        "warnings": ["only 2 valid question(s); a default quiz asks 5"],
    }


def test_validate_json_reports_errors_and_exits_non_zero(tmp_path):
    files = dict(TINY_COURSE)
    files["quizzes/more.yaml"] = (
        "questions:\n"
        "  - id: q1\n    question: Duplicate id?\n    choices: [One, Two]\n    answer: One\n    explanation: x\n"
        "  - id: q9\n    question: Bad answer?\n    choices: [One, Two]\n    answer: Three\n    explanation: x\n"
        "  - id: q10\n    question: Pick one\n    choices: [Left, Right, None of the above]\n"
        "    answer: Left\n    explanation: x\n    tags: [t]\n"
    )
    course = write_course(tmp_path / "c", files)
    result = runner.invoke(quiz_app, ["validate", "--course", str(course), "--json"])
    assert result.exit_code == 1
    out = json.loads(result.output)
    assert set(out) == {"questions", "errors", "warnings"} and out["questions"] == 3
    assert any(e.startswith("quizzes/more.yaml: entry 2 (id q9)") for e in out["errors"])
    assert any("question q1: duplicate question id (also in quizzes/basics.yaml)" in e for e in out["errors"])
    assert any("None of the above" in w for w in out["warnings"])
    text = runner.invoke(quiz_app, ["validate", "--course", str(course)])
    assert text.exit_code == 1 and "error" in text.output and "refused" in text.output


def test_validate_missing_folder(tmp_path):
    result = runner.invoke(quiz_app, ["validate", "--course", str(tmp_path / "nope"), "--json"])
    assert result.exit_code == 1 and "no such course folder" in json.loads(result.output)["errors"][0]


def _seed_db(url: str, course_dir) -> None:
    from knowledge.course import load_course
    from knowledge.quiz import QuizEngine, format_custom_id
    from knowledge.quiz_service import QuizService
    from knowledge.store import migrate
    from knowledge.store.db import create_engine, create_session_factory
    from knowledge.store.quiz_repo import QuizRepo
    from tests.knowledge.test_quiz_engine import Clock

    async def go():
        eng = create_engine(url)
        await migrate.upgrade(eng)
        clock = Clock()
        svc = QuizService(
            QuizEngine(load_course(course_dir), clock=clock, seed=1), QuizRepo(create_session_factory(eng))
        )
        s = await svc.start(guild_id=42, channel_id=1, starter_id=1, questions=2)
        while (view := await svc.next_question(s.id)) is not None:
            q = svc.engine.get(s.id).current_question
            wrong = next(x for x, _ in q.choices if x != q.correct_letter)
            await svc.answer(format_custom_id(s.id, view.position, q.correct_letter), 7, "Ada")
            await svc.answer(format_custom_id(s.id, view.position, wrong), 8, "Bo [bold]")
            clock.t = view.deadline
            await svc.reveal(s.id)
        await svc.finish(s.id)
        await eng.dispose()

    asyncio.run(go())


def test_leaderboard(tmp_path, tiny_course, monkeypatch):
    url = f"sqlite+aiosqlite:///{tmp_path / 'lb.db'}"
    _seed_db(url, tiny_course)
    monkeypatch.setenv("TUTORBOT_DATABASE_URL", url)
    result = runner.invoke(quiz_app, ["leaderboard", "--guild", "42", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [
        (r["rank"], r["user_id"], r["display_name"], r["quizzes"], r["correct"], r["answered"]) for r in rows
    ] == [(1, 7, "Ada", 1, 2, 2), (2, 8, "Bo [bold]", 1, 0, 2)]
    assert rows[0]["total"] == 300 and rows[0]["accuracy"] == 1.0 and rows[0]["best_streak"] == 2
    limited = json.loads(
        runner.invoke(quiz_app, ["leaderboard", "--guild", "42", "--json", "--limit", "1"]).output
    )
    assert len(limited) == 1
    table = runner.invoke(quiz_app, ["leaderboard", "--guild", "42"])
    assert (
        table.exit_code == 0
        and "Ada" in table.output
        and "Bo [bold]" in table.output
        and "300" in table.output
    )
    empty = runner.invoke(quiz_app, ["leaderboard", "--guild", "43"])
    assert empty.exit_code == 0 and "No quiz scores yet" in empty.output
    assert runner.invoke(quiz_app, ["leaderboard", "--guild", "42", "--limit", "0"]).exit_code == 2


def test_leaderboard_on_an_unmigrated_database(tmp_path, monkeypatch):
    monkeypatch.setenv("TUTORBOT_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    result = runner.invoke(quiz_app, ["leaderboard", "--guild", "42"])
    assert result.exit_code == 2
    assert "tutorbot db upgrade" in result.output


def test_play_in_the_terminal(tiny_course):
    from knowledge.course import load_course
    from knowledge.quiz import QuizEngine

    # the same seed draws the same order: find the right letters first
    eng = QuizEngine(load_course(tiny_course), seed=3)
    s = eng.start(guild_id=None, channel_id=0, starter_id=0, questions=2, seconds=60)
    letters = [q.correct_letter for q in s.questions]
    wrong = next(x for x in "ABC" if x != letters[1])
    result = runner.invoke(
        quiz_app,
        ["play", "--course", str(tiny_course), "-n", "2", "--seconds", "60", "--seed", "3"],
        input=f"{letters[0].lower()}\n{wrong}\n",
    )
    assert result.exit_code == 0, result.output
    assert "Question 1/2" in result.output and "Question 2/2" in result.output
    assert "Correct!" in result.output and "Not quite." in result.output
    assert "1/2 correct" in result.output


def test_piped_answers_are_echoed_so_the_transcript_reads(tiny_course):
    result = runner.invoke(quiz_app, ["play", "--course", str(tiny_course), "-n", "1", "--seed", "3"],
                           input="maybe\n7\nb\n")
    assert result.exit_code == 0, result.output
    out = result.output
    # each reply shows after its prompt; the hint says which letters, once per bad reply
    assert "Your answer: maybe\nPlease answer with a letter from A to C." in out
    assert "Your answer: 7\nPlease answer with a letter from A to C." in out
    assert "Your answer: b\n" in out and out.count("Please answer") == 2


def test_play_refuses_bad_options(tiny_course):
    result = runner.invoke(quiz_app, ["play", "--course", str(tiny_course), "--topic", "quantum"])
    assert result.exit_code == 1 and "No quiz questions match topic quantum" in result.output
