"""QARepository on SQLite and PostgreSQL: answers, votes, comments, reviews, guild settings, outages."""

from __future__ import annotations

import threading

import pytest

from knowledge.store.db import DatabaseError, create_engine, create_session_factory
from knowledge.store.qa_repo import AnswerNotFound, GuildConfig, QARepository, VoteCounts
from knowledge.tutor import Answer, SourceRef

GUILD = 1_200_000_000_000_000_001  # snowflakes exceed 32 bits
CHANNEL = 1_200_000_000_000_000_002
ALICE = 1_200_000_000_000_000_003
BOB = 1_200_000_000_000_000_004


def make_answer(
    question: str = "What is LoRA?", *, answered: bool = True, latency_ms: float = 120.0
) -> Answer:
    return Answer(
        question=question,
        text="LoRA trains small low-rank matrices instead of all the weights.",
        answered=answered,
        confidence=0.82,
        sources=(
            SourceRef("lessons/02-lora.md", "LoRA", "How it works", 0.91, "Low-rank adaptation " * 60),
            SourceRef("lessons/01-basics.md", "Basics", "", 0.40, "Fine-tuning adapts"),
        ),
        mode="extractive",
        model=None,
        latency_ms=latency_ms,
    )


@pytest.fixture
def repo(session_factory):
    return QARepository(session_factory)


async def log(repo: QARepository, answer: Answer | None = None, **kw) -> int:
    args = {"course_id": "tiny", "guild_id": GUILD, "channel_id": CHANNEL, "user_id": ALICE, **kw}
    return await repo.log_answer(answer or make_answer(), **args)


async def test_log_answer_stores_question_answer_sources_and_latency(repo):
    answer_id = await log(repo, latency_ms=345.5)
    row = await repo.get_answer(answer_id)
    assert row is not None
    assert (row.guild_id, row.channel_id, row.user_id) == (GUILD, CHANNEL, ALICE)
    assert row.question == "What is LoRA?" and row.answered and row.mode == "extractive"
    assert row.latency_ms == pytest.approx(345.5)
    assert [s["title"] for s in row.sources] == ["LoRA", "Basics"]
    assert len(row.sources[0]["excerpt"]) == 500  # excerpts are capped
    assert row.created_at is not None
    assert await repo.get_answer(answer_id + 999) is None
    assert await repo.count_answers() == 1


async def test_dm_answers_have_no_guild(repo):
    answer_id = await log(repo, guild_id=None, channel_id=None)
    assert (await repo.get_answer(answer_id)).guild_id is None


async def test_one_vote_per_student_and_changing_it(repo):
    answer_id = await log(repo)
    await repo.record_vote(answer_id, ALICE, 1)
    await repo.record_vote(answer_id, ALICE, 1)  # same again: still one
    await repo.record_vote(answer_id, BOB, -1)
    assert await repo.votes(answer_id) == VoteCounts(1, 1)
    fb = await repo.record_vote(answer_id, ALICE, -1)
    assert fb.vote == -1 and fb.status == "pending"
    counts = await repo.votes(answer_id)
    assert (counts.up, counts.down) == (0, 2)


async def test_vote_on_unknown_answer(repo):
    with pytest.raises(AnswerNotFound):
        await repo.record_vote(424242, ALICE, 1)
    with pytest.raises(ValueError):
        await repo.record_vote(await log(repo), ALICE, 0)


async def test_comment_attaches_to_the_vote(repo):
    answer_id = await log(repo)
    await repo.record_vote(answer_id, BOB, -1)
    fb = await repo.add_comment(answer_id, BOB, "  It cited the wrong lesson.  ")
    assert fb.comment == "It cited the wrong lesson." and fb.vote == -1
    # a comment without a stored vote (the click's save failed) still records a down-vote
    fb2 = await repo.add_comment(answer_id, ALICE, "too vague")
    assert fb2.vote == -1
    with pytest.raises(AnswerNotFound):
        await repo.add_comment(999999, ALICE, "x")


async def test_review_and_listing_for_finetuning(repo):
    a1 = await log(repo, make_answer("q1"))
    a2 = await log(repo, make_answer("q2"))
    f1 = await repo.record_vote(a1, ALICE, -1)
    await repo.record_vote(a2, BOB, 1)
    pending = await repo.list_feedback(status="pending")
    assert {a.question for _, a in pending} == {"q1", "q2"}
    with pytest.raises(ValueError):
        await repo.review_feedback(f1.id, status="corrected", reviewed_by="mod")
    await repo.review_feedback(f1.id, status="corrected", reviewed_by="mod#1", corrected_answer="Better.")
    corrected = await repo.list_feedback(status="corrected")
    assert len(corrected) == 1
    fb, ans = corrected[0]
    assert (fb.corrected_answer, fb.reviewed_by, ans.question) == ("Better.", "mod#1", "q1")
    assert [a.question for _, a in await repo.list_feedback(vote=1)] == ["q2"]
    # a changed vote goes back to review
    assert (await repo.record_vote(a1, ALICE, 1)).status == "pending"


async def test_recent_turns_for_follow_up_questions(repo):
    from datetime import UTC, datetime, timedelta

    from knowledge.tutor import Turn

    start = datetime.now(UTC) - timedelta(seconds=5)
    for q in ("q1", "q2", "q3", "q4"):
        await log(repo, make_answer(q))
    await log(repo, make_answer("elsewhere"), channel_id=CHANNEL + 1)
    await log(repo, make_answer("someone else"), user_id=BOB)
    await log(repo, make_answer("in a DM"), guild_id=None, channel_id=None)
    turns = await repo.recent_turns(user_id=ALICE, channel_id=CHANNEL, since=start, limit=2)
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    assert [t.content for t in turns if t.role == "user"] == ["q3", "q4"]
    assert isinstance(turns[0], Turn) and turns[1].content.startswith("LoRA trains")
    dm = await repo.recent_turns(user_id=ALICE, channel_id=None, since=start)
    assert [t.content for t in dm if t.role == "user"] == ["in a DM"]
    assert (
        await repo.recent_turns(user_id=ALICE, channel_id=CHANNEL, since=datetime.now(UTC) + timedelta(1))
        == []
    )


async def test_latency_percentiles(repo):
    empty = await repo.latency_stats()
    assert empty.count == 0 and empty.p50_ms is None
    for ms in range(1, 101):
        await log(repo, make_answer(f"q{ms}"), latency_ms=float(ms))
    stats = await repo.latency_stats()
    assert (stats.count, stats.p50_ms, stats.p90_ms, stats.p99_ms) == (100, 50.0, 90.0, 99.0)
    last10 = await repo.latency_stats(last=10)
    assert last10.count == 10 and last10.p50_ms == 95.0
    assert [a.question for a in await repo.recent_answers(limit=2)] == ["q100", "q99"]


async def test_guild_settings_defaults_and_updates(repo):
    cfg = await repo.get_guild_config(GUILD, default_answer_on_mention=False)
    assert cfg == GuildConfig(GUILD, answer_on_mention=False) and not cfg.stored
    assert cfg.allows_channel(CHANNEL)  # empty list: every channel

    cfg = await repo.update_guild_config(
        GUILD, add_channels=[CHANNEL, CHANNEL + 1], default_answer_on_mention=False
    )
    assert cfg.answer_channels == (CHANNEL, CHANNEL + 1) and cfg.answer_on_mention is False and cfg.stored
    assert cfg.allows_channel(CHANNEL) and not cfg.allows_channel(CHANNEL + 5)

    cfg = await repo.update_guild_config(
        GUILD, remove_channels=[CHANNEL], answer_on_mention=True, quiz_seconds=20
    )
    assert cfg.answer_channels == (CHANNEL + 1,) and cfg.answer_on_mention and cfg.quiz_seconds == 20
    again = await repo.get_guild_config(GUILD)
    assert again == cfg

    cfg = await repo.update_guild_config(GUILD, answer_channels=[], quiz_seconds=None)
    assert cfg.answer_channels == () and cfg.quiz_seconds is None and cfg.quiz_questions is None


async def test_unreachable_database_raises_database_error(tmp_path):
    # a SQLite file in a folder that does not exist: every query fails to connect
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'x.db'}")
    (tmp_path / "missing").rmdir()  # create_engine made the folder; take it away again
    repo = QARepository(create_session_factory(engine))
    try:
        with pytest.raises(DatabaseError):
            await repo.ping()
        with pytest.raises(DatabaseError):
            await repo.log_answer(make_answer(), course_id="c", guild_id=None, channel_id=None, user_id=None)
        with pytest.raises(DatabaseError):
            await repo.get_guild_config(GUILD)
    finally:
        await engine.dispose()


def _aiosqlite_workers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name}


async def test_a_vanished_sqlite_folder_fails_before_aiosqlite_starts_a_thread(tmp_path):
    # aiosqlite queues a failed connection's thread stop without waiting for it; when the event loop
    # closes first, the thread dies with "Event loop is closed" (omnilib/aiosqlite#241): the engine
    # refuses a missing folder before any thread starts, and says which folder.
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'gone' / 'x.db'}")
    (tmp_path / "gone").rmdir()
    before = _aiosqlite_workers()
    try:
        with pytest.raises(DatabaseError) as caught:
            await QARepository(create_session_factory(engine)).ping()
        assert "gone does not exist" in str(caught.value.__cause__)
        assert _aiosqlite_workers() - before == set()
    finally:
        await engine.dispose()


async def test_missing_tables_raise_database_error(tmp_path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")  # never migrated
    try:
        with pytest.raises(DatabaseError):
            await QARepository(create_session_factory(engine)).record_vote(1, ALICE, 1)
    finally:
        await engine.dispose()
