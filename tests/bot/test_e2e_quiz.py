"""Quizzes end to end: the real TutorBot and QuizService against the fake Discord server.

The quiz clock is a manual one (``Clock``) shared by the engine and, through ``QuizService.now``,
the cog's loop, so a 30-second question takes no real time: a test moves the clock and the loop
(which looks at the clock every 20 ms here, ``QuizCog.max_sleep``) reveals, edits the countdown or
asks the next question. Scores are therefore exact. Assertions are on the REST payloads the bot
sent and on the database. The database is a migrated SQLite (one key test also on PostgreSQL).
"""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta

import pytest
from sqlalchemy import delete, select

from bot import render_quiz
from bot.client import TutorBot
from bot.cogs.quiz import QuizTiming, topic_choices
from bot.views.quiz import QUIZ_TEMPLATE, card_ref, find_card
from knowledge.course import Flashcard, load_course
from knowledge.quiz import LETTERS, LeaderboardRow, QuizEngine, ResultRow, Results, Reveal
from knowledge.quiz_service import QuizService
from knowledge.store.quiz_models import QuizAnswer, QuizScore, QuizSessionRow
from knowledge.store.quiz_repo import QuizRepo
from tests.conftest import TINY_COURSE, write_course
from tests.knowledge.test_quiz_engine import Clock

EPHEMERAL = 64
NO_MENTIONS = {"parse": []}
MESSAGES = r"^/channels/\d+/messages$"
EDITS = r"^/channels/\d+/messages/\d+$"

QUESTIONS = """questions:
  - id: q1
    question: What does pre-training learn?
    choices: [General patterns, One task only, Nothing, Random noise]
    answer: General patterns
    explanation: It learns general patterns from lots of data.
    common_mistakes: [Confusing it with fine-tuning]
    difficulty: easy
    tags: [pre-training]
  - id: q2
    question: Why use a low learning rate when fine-tuning?
    choices: [To keep pre-trained knowledge, To train faster, To use more memory]
    answer: To keep pre-trained knowledge
    explanation: Big steps would overwrite what was learned.
    difficulty: medium
    tags: [fine-tuning]
  - id: q3
    question: "@everyone what does LoRA train? <@&123456789012345678>"
    choices: ["@here small matrices", All the weights, Nothing]
    answer: "@here small matrices"
    explanation: "Small low-rank matrices, @everyone."
    common_mistakes: ["@everyone thinks it is all weights"]
    difficulty: hard
    tags: [lora]
"""
CARDS = """cards:
  - id: c1
    front: What is LoRA?
    back: Low-rank adaptation.
    tags: [lora]
  - id: c2
    front: "@everyone what is pre-training?"
    back: Learning general patterns first.
    tags: [pre-training]
"""


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def fast_loop(monkeypatch):
    """The loop looks at the (manual) quiz clock every 20 ms instead of sleeping until its deadline.
    (Set on the bot: ``load_extension`` imports the cog's module afresh, so its classes differ from
    the ones imported here.)"""
    monkeypatch.setattr(TutorBot, "quiz_timing", QuizTiming(max_sleep=0.02), raising=False)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def quiz_course(tmp_path):
    files = {k: v for k, v in TINY_COURSE.items() if not k.startswith(("quizzes/", "flashcards/"))}
    files["quizzes/bank.yaml"] = QUESTIONS
    files["flashcards/cards.yaml"] = CARDS
    return load_course(write_course(tmp_path / "quiz-course", files))


@pytest.fixture
def make_service(quiz_course, clock, bot_session_factory):
    """A QuizService as the composition root builds it (bot.client.build_quiz_service), on the test
    clock. Each call is a new "process": a new engine with nothing in memory."""

    def _make(session_factory=None, **engine_kw):
        engine_kw.setdefault("seed", 3)
        engine = QuizEngine(quiz_course, clock=clock, **engine_kw)
        return QuizService(engine, QuizRepo(session_factory or bot_session_factory))

    return _make


# ------------------------------------------------------------------------------------------ helpers
def buttons(payload: dict) -> list[dict]:
    return [c for row in payload.get("components", []) for c in row.get("components", [])]


def titles(payload: dict | None) -> list[str]:
    return [e.get("title") or "" for e in (payload or {}).get("embeds", [])]


def all_text(payload: dict) -> str:
    parts = [payload.get("content") or ""]
    for e in payload.get("embeds", []):
        parts += [e.get("title") or "", e.get("description") or "", (e.get("footer") or {}).get("text", "")]
        parts += [f"{f['name']} {f['value']}" for f in e.get("fields", [])]
    parts += [b.get("label") or "" for b in buttons(payload)]
    return "\n".join(parts)


def pings_nobody(allowed_mentions: dict | None) -> bool:
    am = allowed_mentions or {}
    return (
        am.get("parse") == [] and not am.get("users") and not am.get("roles") and not am.get("replied_user")
    )


async def posted(
    fake, title: str, *, after: int = 0, count: int = 1, path: str = MESSAGES, timeout: float = 5.0
):
    """The ``count``-th message the bot posted whose embed title contains ``title``."""
    return await fake.wait_for(
        "POST",
        path,
        after=after,
        ok=True,
        count=count,
        timeout=timeout,
        predicate=lambda r: any(title in t for t in titles(r.json)),
    )


async def edited(
    fake, message_id, *, after: int = 0, predicate=lambda payload: True, path_prefix="/channels/"
):
    return await fake.wait_for(
        "PATCH",
        rf"/messages/{message_id}$",
        after=after,
        ok=True,
        predicate=lambda r: r.path.startswith(path_prefix) and predicate(r.json or {}),
    )


def correct(service: QuizService, session_id: str, position: int) -> str:
    return service.engine.get(session_id).questions[position].correct_letter


def wrong(service: QuizService, session_id: str, position: int) -> str:
    q = service.engine.get(session_id).questions[position]
    return next(letter for letter in LETTERS[: len(q.order)] if letter != q.correct_letter)


def session_id_of(payload: dict) -> str:
    return buttons(payload)[0]["custom_id"].split(":")[1]


async def click(
    fake, message: dict, session_id: str, position: int, letter: str, user: str, *, race: bool = False
) -> dict:
    """A student clicks a letter; returns the (ephemeral) acknowledgment payload. ``race``: the click
    left the student's client before the bot greyed the buttons out (the fake refuses disabled ones)."""
    it = await fake.click(message, f"quiz:{session_id}:{position}:{letter}", user=user, check=not race)
    cb = await it.callback()
    assert cb.json["type"] == 4, cb.json
    data = cb.json["data"]
    assert data["flags"] & EPHEMERAL and data["allowed_mentions"] == NO_MENTIONS
    return data


def sent_payloads(fake) -> list[dict]:
    """Every message body the bot sent or edited (channel messages, interaction replies, follow-ups)."""
    out = []
    for r in fake.requests:
        if r.method not in ("POST", "PATCH") or not isinstance(r.json, dict):
            continue
        body = r.json.get("data") if r.path.endswith("/callback") else r.json
        if isinstance(body, dict) and ("content" in body or "embeds" in body or "components" in body):
            out.append(body)
    return out


async def rows(session_factory, model, *order):
    async with session_factory() as s:
        return list((await s.scalars(select(model).order_by(*order))).all())


def cog(bot):
    found = bot.get_cog("QuizCog")
    assert found is not None and type(found).__name__ == "QuizCog"
    return found


# ------------------------------------------------------------------------------------------ a whole quiz
async def test_a_quiz_with_several_students(
    fake_discord, run_bot, make_tutor_bot, make_service, clock, session_factory
):
    """Question with buttons -> clicks from three students (one answer each, a change, a repeat) ->
    countdown edited in place -> reveal -> next question -> results and leaderboard; scores exact in
    the database. Runs on SQLite and PostgreSQL (``session_factory`` is parametrized over both)."""
    service = make_service(session_factory)
    async with run_bot(make_tutor_bot(quiz_service=service, session_factory=session_factory)):
        # the course has one "easy" question, so this quiz has one question
        start = await fake_discord.slash(
            "quiz start", questions=2, seconds=30, difficulty="easy", user="alice"
        )
        announce = (await start.callback()).json
        assert announce["type"] == 4 and not (announce["data"].get("flags") or 0) & EPHEMERAL
        assert "1 question, 30 s each" in all_text(announce["data"]) and "alice" in all_text(announce["data"])

        q1 = await posted(fake_discord, "Question 1/1")
        refused = await fake_discord.slash("quiz start", user="bob")  # one quiz per channel
        second = (await refused.callback()).json["data"]
        assert second["flags"] & EPHEMERAL and "already running" in second["content"]
        sid = session_id_of(q1.json)
        view = service.current_question(sid)
        assert [b["custom_id"] for b in buttons(q1.json)] == list(view.custom_ids)
        assert [b["label"][0] for b in buttons(q1.json)] == list(LETTERS[: len(view.choices)])
        assert "What does pre-training learn?" in q1.json["embeds"][0]["description"]
        assert "30 s left" in all_text(q1.json) and "0 answers" in all_text(q1.json)
        msg = fake_discord.message(q1.response)

        right, bad = correct(service, sid, 0), wrong(service, sid, 0)
        assert (await click(fake_discord, msg, sid, 0, right, "alice"))["content"] == f"✅ Recorded {right}."
        assert (await click(fake_discord, msg, sid, 0, bad, "bob"))["content"] == f"✅ Recorded {bad}."
        assert "Already recorded" in (await click(fake_discord, msg, sid, 0, right, "alice"))["content"]

        mark = fake_discord.mark()
        clock.tick(10)  # the countdown is edited in place every 10 s
        tick = await edited(fake_discord, msg["id"], after=mark)
        assert "20 s left" in all_text(tick.json) and "2 answers" in all_text(tick.json)
        assert "components" not in tick.json or buttons(tick.json)[0]["disabled"] is False

        assert "Recorded" in (await click(fake_discord, msg, sid, 0, bad, "carol"))["content"]
        clock.tick(5)
        changed = await click(fake_discord, msg, sid, 0, right, "carol")  # changes are allowed by default
        assert changed["content"] == f"✅ Changed to {right} (was {bad})."

        mark = fake_discord.mark()
        clock.tick(15)  # the deadline
        reveal = await posted(fake_discord, "the answer is", after=mark)
        closed = await edited(fake_discord, msg["id"], after=mark, predicate=lambda p: "components" in p)
        styles = {b["custom_id"][-1]: (b["style"], b["disabled"]) for b in buttons(closed.json)}
        assert styles[right] == (3, True) and all(s == (2, True) for k, s in styles.items() if k != right)
        text = all_text(reveal.json)
        assert f"the answer is {right}" in text and "General patterns" in text
        assert "It learns general patterns" in text and "Confusing it with fine-tuning" in text
        assert "Got it right (fastest first) alice (+150), carol (+125)" in text
        assert "Answers (3)" in text

        results = await posted(fake_discord, "Quiz results", after=mark)
        table = results.json["embeds"][0]["description"]
        assert table.index("alice") < table.index("carol") < table.index("bob")
        assert "**150** pts · 1/1 right" in table and "**125** pts" in table and "**0** pts" in table
        assert titles(results.json)[1].startswith("🏆 Leaderboard")

        # a new quiz may start now, and /quiz leaderboard shows the same totals
        board = await fake_discord.slash("quiz leaderboard", user="bob")
        board_text = all_text(await board.reply())
        assert board_text.index("alice") < board_text.index("carol") < board_text.index("bob")

    scores = {
        s.student_id: (s.total, s.quizzes, s.correct, s.answered)
        for s in await rows(session_factory, QuizScore, QuizScore.student_id)
    }
    users = fake_discord.users
    assert scores == {
        users["alice"].id: (150, 1, 1, 1),
        users["carol"].id: (125, 1, 1, 1),
        users["bob"].id: (0, 1, 0, 1),
    }
    answers = await rows(session_factory, QuizAnswer, QuizAnswer.id)
    assert sorted((a.student_id, a.letter, a.points, a.changes) for a in answers) == sorted(
        [
            (users["alice"].id, right, 150, 0),
            (users["bob"].id, bad, 0, 0),
            (users["carol"].id, right, 125, 1),
        ]
    )
    (session,) = await rows(session_factory, QuizSessionRow, QuizSessionRow.id)
    assert (session.status, session.end_reason) == ("finished", "completed")
    assert all(pings_nobody(p.get("allowed_mentions")) for p in sent_payloads(fake_discord))


async def test_a_multi_question_quiz_runs_to_the_end(
    fake_discord, run_bot, make_tutor_bot, make_service, clock, bot_session_factory
):
    service = make_service()
    async with run_bot(make_tutor_bot(quiz_service=service)):
        await fake_discord.slash(
            "quiz start", questions=2, seconds=20, topic="pre-training, fine-tuning", user="alice"
        )
        q1 = await posted(fake_discord, "Question 1/2")
        sid = session_id_of(q1.json)
        await click(fake_discord, fake_discord.message(q1.response), sid, 0, correct(service, sid, 0), "bob")
        mark = fake_discord.mark()
        clock.tick(20)
        reveal = await posted(fake_discord, "Question 1/2: the answer is", after=mark)
        assert "Next question" in reveal.json["embeds"][0]["footer"]["text"]
        pause = fake_discord.mark()
        late = await click(
            fake_discord,
            fake_discord.message(q1.response),
            sid,
            0,
            correct(service, sid, 0),
            "carol",
            race=True,
        )
        assert late["content"] == "⏱️ Time is up for this question."
        await fake_discord.assert_no_request("POST", MESSAGES, after=pause, within=0.1)
        clock.tick(5)  # the pause between questions
        q2 = await posted(fake_discord, "Question 2/2", after=mark)
        clock.tick(6)
        await click(fake_discord, fake_discord.message(q2.response), sid, 1, correct(service, sid, 1), "bob")
        clock.tick(14)
        await posted(fake_discord, "Quiz results", after=mark)
    (score,) = await rows(bot_session_factory, QuizScore, QuizScore.student_id)
    # 150 (instant) + 100 + round(50 * 14 / 20)
    assert (score.total, score.correct, score.answered, score.best_streak) == (150 + 135, 2, 2, 2)
    assert (
        len(await rows(bot_session_factory, QuizAnswer, QuizAnswer.id)) == 2
    )  # the late click is not stored


async def test_answers_are_final_when_changes_are_off(
    fake_discord, run_bot, make_tutor_bot, make_service, clock
):
    service = make_service(allow_change=False)
    async with run_bot(make_tutor_bot(quiz_service=service)):
        await fake_discord.slash("quiz start", questions=1, user="alice")
        q = await posted(fake_discord, "Question 1/1")
        sid, msg = session_id_of(q.json), fake_discord.message(q.response)
        assert "one answer each, final" in q.json["embeds"][0]["footer"]["text"]
        first, other = correct(service, sid, 0), wrong(service, sid, 0)
        await click(fake_discord, msg, sid, 0, other, "bob")
        refused = await click(fake_discord, msg, sid, 0, first, "bob")
        assert f"You already answered {other}; answers can't be changed" in refused["content"]
        clock.tick(30)
        reveal = await posted(fake_discord, "the answer is")
        assert "Nobody this time." in all_text(reveal.json)


async def test_an_idle_quiz_ends_itself(
    fake_discord, run_bot, make_tutor_bot, make_service, clock, bot_session_factory
):
    service = make_service(idle_limit=1)
    async with run_bot(make_tutor_bot(quiz_service=service)):
        await fake_discord.slash("quiz start", questions=3, user="alice")
        await posted(fake_discord, "Question 1/3")
        clock.tick(30)
        reveal = await posted(fake_discord, "the answer is")
        assert "No answers for 1 questions in a row" in reveal.json["embeds"][0]["footer"]["text"]
        results = await posted(fake_discord, "Quiz results")
        assert "1 of 3 questions asked" in all_text(results.json) and "Nobody answered." in all_text(
            results.json
        )
    (session,) = await rows(bot_session_factory, QuizSessionRow, QuizSessionRow.id)
    assert (session.status, session.end_reason) == ("stopped", "idle")


# ------------------------------------------------------------------------------------------ stop
async def test_stop_is_for_the_starter_or_a_moderator(
    fake_discord, run_bot, make_tutor_bot, make_service, clock, bot_session_factory
):
    service = make_service()
    async with run_bot(make_tutor_bot(quiz_service=service)) as bot:
        await fake_discord.slash("quiz start", questions=2, user="alice")
        q = await posted(fake_discord, "Question 1/2")
        sid, msg = session_id_of(q.json), fake_discord.message(q.response)
        await click(fake_discord, msg, sid, 0, correct(service, sid, 0), "carol")

        for who in ("bob", "mod"):  # mod has Manage Server, not Manage Messages
            refused = await fake_discord.slash("quiz stop", user=who)
            cb = (await refused.callback()).json
            assert cb["type"] == 4 and cb["data"]["flags"] & EPHEMERAL
            assert "Only the person who started this quiz or a moderator" in cb["data"]["content"]
        assert service.running(fake_discord.guild.channel("general").id) is not None

        mark = fake_discord.mark()
        stop = await fake_discord.slash("quiz stop", user="owner")  # Manage Messages (owner: everything)
        reply = await stop.reply()
        assert "Quiz stopped by owner" in reply["content"] and not (reply.get("flags") or 0) & EPHEMERAL
        assert "carol" in all_text(reply) and "Stopped before the end" in all_text(reply)
        disabled = await edited(fake_discord, msg["id"], after=mark, predicate=lambda p: "components" in p)
        assert all(b["disabled"] for b in buttons(disabled.json))
        assert cog(bot).runs == {}
        clock.tick(60)
        await fake_discord.assert_no_request("POST", MESSAGES, after=mark, within=0.2)  # the loop is gone

        ended = await click(fake_discord, msg, sid, 0, "A", "bob", race=True)
        assert ended["content"] == "⚠️ This quiz has ended."
        again = await fake_discord.slash("quiz stop", user="alice")
        assert "No quiz is running in this channel." in (await again.reply())["content"]
        # and the starter may stop her own quiz
        await fake_discord.slash("quiz start", questions=1, user="alice")
        await posted(fake_discord, "Question 1/1", after=mark)
        own = await fake_discord.slash("quiz stop", user="alice")
        assert "Quiz stopped by alice" in (await own.reply())["content"]
    sessions = await rows(bot_session_factory, QuizSessionRow, QuizSessionRow.created_at)
    assert [(s.status, s.end_reason) for s in sessions] == [("stopped", "stopped")] * 2
    (score,) = await rows(bot_session_factory, QuizScore, QuizScore.student_id)
    assert (score.student_id, score.total) == (fake_discord.users["carol"].id, 150)


# ------------------------------------------------------------------------------------------ stale clicks
async def test_clicks_on_other_sessions_get_a_clear_reply(
    fake_discord, run_bot, make_tutor_bot, make_service, clock, bot_session_factory
):
    service = make_service()
    async with run_bot(make_tutor_bot(quiz_service=service)):
        await fake_discord.slash("quiz start", questions=1, difficulty="easy", user="alice")
        old = await posted(fake_discord, "Question 1/1")
        old_sid, old_msg = session_id_of(old.json), fake_discord.message(old.response)
        clock.tick(30)
        await posted(fake_discord, "Quiz results")

        mark = fake_discord.mark()
        await fake_discord.slash("quiz start", questions=2, topic="fine-tuning", user="bob", channel="quiz")
        new = await posted(fake_discord, "Question 1/1", after=mark)
        new_sid = session_id_of(new.json)
        assert new_sid != old_sid

        # clicks that reach the bot on the finished session's (greyed out) message: a clear reply
        ended = await click(fake_discord, old_msg, old_sid, 0, "A", "carol", race=True)
        assert ended["content"] == "⚠️ This quiz has ended."
        # a session that no longer exists at all (purged from the database)
        async with bot_session_factory() as s:
            await s.execute(delete(QuizSessionRow).where(QuizSessionRow.id == old_sid))
            await s.commit()
        gone = await click(fake_discord, old_msg, old_sid, 0, "B", "carol", race=True)
        assert gone["content"] == "⚠️ This quiz no longer exists."
        # the running quiz in the other channel is unaffected
        it = await fake_discord.click(fake_discord.message(new.response), f"quiz:{new_sid}:0:A", user="carol")
        assert "Recorded A." in (await it.reply())["content"]
    assert len(await rows(bot_session_factory, QuizAnswer, QuizAnswer.id)) == 1


# ------------------------------------------------------------------------------------------ restarts
async def test_a_restarted_bot_resumes_the_quiz_and_loses_nothing(
    fake_discord, run_bot, make_tutor_bot, make_service, clock, bot_session_factory
):
    users = fake_discord.users
    first = make_service()
    async with run_bot(make_tutor_bot(quiz_service=first)):
        await fake_discord.slash("quiz start", questions=2, topic="pre-training, fine-tuning", user="alice")
        q1 = await posted(fake_discord, "Question 1/2")
        sid, msg1 = session_id_of(q1.json), fake_discord.message(q1.response)
        await click(fake_discord, msg1, sid, 0, correct(first, sid, 0), "alice")  # 150
        clock.tick(30)
        await posted(fake_discord, "Question 1/2: the answer is")
        clock.tick(5)
        q2 = await posted(fake_discord, "Question 2/2")
        msg2 = fake_discord.message(q2.response)
        right2 = correct(first, sid, 1)
        clock.tick(3)
        await click(fake_discord, msg2, sid, 1, right2, "bob")  # 100 + round(50 * 27/30) = 145
    # the first process is gone mid-question; the quiz is still open in the database

    second = make_service()  # a new process: nothing in memory
    mark = fake_discord.mark()
    async with run_bot(make_tutor_bot(quiz_service=second)) as bot:
        assert second.engine.find(sid) is not None  # recovered before the gateway delivered anything
        reposted = await posted(fake_discord, "Question 2/2", after=mark)
        assert "Resumed after a bot restart" in all_text(reposted.json)
        assert [b["custom_id"] for b in buttons(reposted.json)] == [b["custom_id"] for b in buttons(q2.json)]
        # a button of the message the first process posted still works
        clock.tick(3)
        assert "Recorded" in (await click(fake_discord, msg2, sid, 1, right2, "carol"))["content"]  # 140
        assert "Already recorded" in (await click(fake_discord, msg2, sid, 1, right2, "bob"))["content"]
        assert cog(bot).run_in(fake_discord.guild.channel("general").id) is not None
        clock.tick(24)
        reveal = await posted(fake_discord, "Question 2/2: the answer is", after=mark)
        assert "bob (+145), carol (+140)" in all_text(reveal.json)
        results = await posted(fake_discord, "Quiz results", after=mark)
        table = all_text(results.json)
        assert table.index("alice") < table.index("bob") < table.index("carol")
        # the message of the first process could not be edited at the reveal: a click greys it out
        stale = fake_discord.mark()
        assert (await click(fake_discord, msg2, sid, 1, right2, "alice"))[
            "content"
        ] == "⚠️ This quiz has ended."
        greyed = await edited(fake_discord, msg2["id"], after=stale)
        assert all(b["disabled"] for b in buttons(greyed.json))

    totals = {s.student_id: s.total for s in await rows(bot_session_factory, QuizScore, QuizScore.student_id)}
    assert totals == {users["alice"].id: 150, users["bob"].id: 145, users["carol"].id: 140}
    assert len(await rows(bot_session_factory, QuizAnswer, QuizAnswer.id)) == 3


async def test_a_quiz_that_cannot_resume_is_closed_with_its_results(
    fake_discord, run_bot, make_tutor_bot, make_service, clock, bot_session_factory
):
    first = make_service()
    async with run_bot(make_tutor_bot(quiz_service=first)):
        await fake_discord.slash("quiz start", questions=2, user="alice", channel="quiz")
        q1 = await posted(fake_discord, "Question 1/2")
        sid = session_id_of(q1.json)
        await click(fake_discord, fake_discord.message(q1.response), sid, 0, correct(first, sid, 0), "bob")
    clock.tick(600)  # the bot was down for ten minutes
    mark = fake_discord.mark()
    async with run_bot(make_tutor_bot(quiz_service=make_service())):
        results = await posted(fake_discord, "closed after a restart", after=mark)
        assert results.path == f"/channels/{fake_discord.guild.channel('quiz').id}/messages"
        assert "bob" in all_text(results.json) and "Interrupted by a bot restart" in all_text(results.json)
        late = await click(fake_discord, fake_discord.message(q1.response), sid, 0, "A", "carol")
        assert late["content"] == "⚠️ This quiz has ended."
    (session,) = await rows(bot_session_factory, QuizSessionRow, QuizSessionRow.id)
    assert (session.status, session.end_reason) == ("expired", "restart")
    (score,) = await rows(bot_session_factory, QuizScore, QuizScore.student_id)
    assert score.total == 150


# ------------------------------------------------------------------------------------------ mentions
async def test_everyone_in_a_question_or_a_name_never_pings(
    fake_discord, run_bot, make_tutor_bot, make_service, clock
):
    service = make_service()
    fake_discord.guild.member(fake_discord.users["alice"]).nick = "@everyone <@&223456789012345678>"
    async with run_bot(make_tutor_bot(quiz_service=service)):
        await fake_discord.slash("quiz start", questions=1, topic="lora", user="alice")
        q = await posted(fake_discord, "Question 1/1")
        sid, msg = session_id_of(q.json), fake_discord.message(q.response)
        await click(fake_discord, msg, sid, 0, correct(service, sid, 0), "alice")
        clock.tick(30)
        reveal = await posted(fake_discord, "the answer is")
        await posted(fake_discord, "Quiz results")
        assert "@\u200beveryone" in all_text(reveal.json)  # shown, defused
        card = await fake_discord.slash("flashcard", topic="pre-training", share=True, user="alice")
        assert "what is pre-training" in all_text(await card.reply())
    payloads = sent_payloads(fake_discord)
    assert len(payloads) >= 6
    for p in payloads:
        assert pings_nobody(p.get("allowed_mentions")), p
        text = all_text(p)
        assert "@everyone" not in text and "@here" not in text, text
        assert "<@&123456789012345678>" not in text and "<@&223456789012345678>" not in text


# ------------------------------------------------------------------------------------------ flashcards
async def test_flashcard_and_flip(fake_discord, run_bot, make_tutor_bot, make_service):
    async with run_bot(make_tutor_bot(quiz_service=make_service())):
        it = await fake_discord.slash("flashcard", topic="lora", user="bob")
        cb = (await it.callback()).json
        assert cb["type"] == 4 and cb["data"]["flags"] & EPHEMERAL
        assert cb["data"]["embeds"][0]["description"] == "What is LoRA?"
        assert "Low-rank" not in all_text(cb["data"])
        (flip,) = buttons(cb["data"])
        assert flip["custom_id"] == "card:flip:c1" and flip["label"] == "Flip"

        flipped = await fake_discord.click(it.original, label="Flip", user="bob")
        update = (await flipped.callback()).json
        assert update["type"] == 7  # the card's message is updated in place
        assert (
            "Answer Low-rank adaptation." in all_text(update["data"]) and update["data"]["components"] == []
        )

        public = await fake_discord.slash("flashcard", share=True, user="carol")
        assert not ((await public.callback()).json["data"].get("flags") or 0) & EPHEMERAL
        none = await fake_discord.slash("flashcard", topic="nope", user="carol")
        assert "No flashcards tagged 'nope'" in (await none.reply())["content"]

    # the Flip button works in a new process too (DynamicItem: nothing kept in memory)
    async with run_bot(make_tutor_bot(quiz_service=make_service())):
        again = await fake_discord.click(public.original, label="Flip", user="alice")
        assert (await again.callback()).json["type"] == 7


# ------------------------------------------------------------------------------------------ review, stats
async def test_review_stats_and_leaderboard(fake_discord, run_bot, make_tutor_bot, make_service, clock):
    service = make_service()
    async with run_bot(make_tutor_bot(quiz_service=service)):
        nothing = await fake_discord.slash("quiz review", user="bob")
        assert "Nothing is due for review" in (await nothing.reply())["content"]

        await fake_discord.slash("quiz start", questions=1, difficulty="medium", user="alice")
        q = await posted(fake_discord, "Question 1/1")
        sid, msg = session_id_of(q.json), fake_discord.message(q.response)
        await click(fake_discord, msg, sid, 0, wrong(service, sid, 0), "bob")
        await click(fake_discord, msg, sid, 0, correct(service, sid, 0), "alice")
        clock.tick(30)
        await posted(fake_discord, "Quiz results")

        stats = await fake_discord.slash("quiz stats", user="bob")
        cb = (await stats.callback()).json
        assert cb["data"]["flags"] & EPHEMERAL
        text = all_text(cb["data"])
        assert "0/1" in text and "`fine-tuning`: 0/1 (0%)" in text and "None due right now" in text

        clock.tick(timedelta(days=1, seconds=1).total_seconds())
        review = await fake_discord.slash("quiz review", user="bob")
        announce = (await review.callback()).json
        assert announce["data"]["flags"] & EPHEMERAL and "Review quiz starting" in all_text(announce["data"])
        rq = await posted(
            fake_discord, "Review question 1/1", path=rf"^/webhooks/\d+/{re.escape(review.token)}$"
        )
        assert rq.json["flags"] & EPHEMERAL
        rsid = session_id_of(rq.json)
        rmsg = fake_discord.message(rq.response)
        assert rmsg["flags"] & EPHEMERAL
        other = await click(fake_discord, rmsg, rsid, 0, "A", "alice")
        assert "someone else's review quiz" in other["content"]
        await click(fake_discord, rmsg, rsid, 0, correct(service, rsid, 0), "bob")
        clock.tick(30)
        reveal = await posted(
            fake_discord, "the answer is", path=rf"^/webhooks/\d+/{re.escape(review.token)}$"
        )
        assert reveal.json["flags"] & EPHEMERAL
        done = await posted(
            fake_discord, "Review results", path=rf"^/webhooks/\d+/{re.escape(review.token)}$"
        )
        assert done.json["flags"] & EPHEMERAL and len(done.json["embeds"]) == 1  # no leaderboard
        # the countdown and the reveal edit the ephemeral message through the interaction's webhook
        await fake_discord.wait_for(
            "PATCH", rf"^/webhooks/\d+/{re.escape(review.token)}/messages/{rmsg['id']}$"
        )

        stats = await fake_discord.slash("quiz stats", user="bob")
        text = all_text(await stats.reply())
        assert "1/2" in text and "Spaced review (1 questions)" in text

        board = await fake_discord.slash("quiz leaderboard", period="week", user="carol")
        text = all_text(await board.reply())
        assert "Leaderboard (last 7 days)" in text
        assert text.index("alice") < text.index("bob")  # review answers do not count for the leaderboard


# ------------------------------------------------------------------------------------------ options
async def test_guild_defaults_topic_autocomplete_and_permissions(
    fake_discord, run_bot, make_tutor_bot, make_service
):
    async with run_bot(make_tutor_bot(quiz_service=make_service())):
        cfg = await fake_discord.slash("tutor config", quiz_questions=2, quiz_seconds=45, user="owner")
        await cfg.reply()
        start = await fake_discord.slash("quiz start", user="alice")  # no options: the guild's defaults
        assert "2 questions, 45 s each" in all_text(await start.reply())
        q = await posted(fake_discord, "Question 1/2")
        assert "45 s" in q.json["embeds"][0]["footer"]["text"]

        # topic autocomplete from the course's tags
        cmd = next(c for c in fake_discord.commands[None] if c["name"] == "quiz")
        payload = fake_discord._interaction_payload(
            4,
            {
                "id": cmd["id"],
                "name": "quiz",
                "type": 1,
                "options": [
                    {
                        "name": "start",
                        "type": 1,
                        "options": [
                            {"name": "topic", "type": 3, "value": "pre-training, l", "focused": True}
                        ],
                    }
                ],
            },
            fake_discord.users["bob"],
            fake_discord.guild.channel("quiz"),
        )
        await fake_discord.dispatch("INTERACTION_CREATE", payload.payload, guild_id=fake_discord.guild.id)
        auto = await fake_discord.wait_for("POST", rf"^/interactions/{payload.id}/")
        assert auto.json["type"] == 8
        assert [c["value"] for c in auto.json["data"]["choices"]] == ["pre-training, lora"]

        # a channel where the bot may not post: refused before anything starts
        muted = await fake_discord.slash("quiz start", user="alice", channel="announcements")
        reply = await muted.reply()
        assert reply["flags"] & EPHEMERAL and "Send Messages" in reply["content"]
        bad = await fake_discord.slash("quiz start", topic="astrology", user="bob", channel="questions")
        assert "No quiz questions match topic astrology" in (await bad.reply())["content"]


async def test_a_channel_that_refuses_the_quiz_closes_it_cleanly(
    fake_discord, run_bot, make_tutor_bot, make_service, clock, bot_session_factory, caplog
):
    service = make_service()
    async with run_bot(make_tutor_bot(quiz_service=service)) as bot:
        fake_discord.fail("POST", MESSAGES, 403, code=50013, message="Missing Permissions")
        await fake_discord.slash("quiz start", questions=2, user="alice")
        await fake_discord.wait_for("POST", MESSAGES, status=403)
        for _ in range(100):
            if not cog(bot).runs:
                break
            await asyncio.sleep(0.02)
        assert cog(bot).runs == {}
        # the quiz was closed, so the channel is free again
        again = await fake_discord.slash("quiz start", questions=1, user="alice")
        assert "Quiz starting" in all_text(await again.reply())
        await posted(fake_discord, "Question 1/1")
    assert any("cannot post any more" in r.getMessage() and "50013" in r.getMessage() for r in caplog.records)
    sessions = await rows(bot_session_factory, QuizSessionRow, QuizSessionRow.created_at)
    assert sessions[0].status == "finished"


# ------------------------------------------------------------------------------------------ rendering
def test_the_button_template_matches_every_engine_custom_id():
    from knowledge.quiz import format_custom_id

    for sid in ("0123456789abcdef", "s0001", "z" * 32):
        for pos in (0, 24):
            assert re.fullmatch(QUIZ_TEMPLATE, format_custom_id(sid, pos, "F"))
    assert not re.fullmatch(QUIZ_TEMPLATE, "quiz:abc:1:G")


def test_rendering_stays_within_discord_limits():
    long = "word " * 2000
    reveal = Reveal(
        session_id="s1",
        position=0,
        number=1,
        total=1,
        question=long,
        choices=(("A", long[:80]), ("B", "x")),
        correct_letter="A",
        correct_text=long,
        explanation=long,
        common_mistakes=(long, long),
        correct_users=tuple((i, f"@everyone student {i}", 150) for i in range(300)),
        answered=300,
        counts={"A": 300, "B": 0},
        session_over=True,
        end_reason="idle",
    )
    embed = render_quiz.reveal_embed(reveal, idle_limit=3)
    assert len(embed) <= 6000 and len(embed.description) <= 4096
    assert all(len(f.value) <= 1024 for f in embed.fields)
    assert "…and" in embed.fields[-1].value and "@everyone" not in str(embed.to_dict())

    rows_ = tuple(ResultRow(i + 1, i, "*" * 200, 100, 1, 1, 1, 1.0) for i in range(500))
    res = Results(
        "s1",
        "channel",
        1,
        2,
        "c",
        "finished",
        "completed",
        1,
        1,
        rows_,
        leaderboard=tuple(LeaderboardRow(i + 1, i, "<@1> x", 10, 1, 1, 1) for i in range(100)),
    )
    embeds = render_quiz.results_embeds(res)
    assert sum(len(e) for e in embeds) <= 6000
    assert "\\*" in embeds[0].description and "<@1>" not in embeds[1].description

    card = Flashcard(id="a card/with spaces and a very long id " * 3, front=long[:1000], back=long[:2000])
    assert len(render_quiz.card_embed(card, flipped=True)) <= 6000
    ref = card_ref(card)
    assert ref.startswith("#") and find_card([card], ref) is card
    assert render_quiz.name("@here **bold**") == "@\u200bhere \\*\\*bold\\*\\*"
    assert (
        render_quiz.button_label("B", long).startswith("B · ")
        and len(render_quiz.button_label("B", long)) <= 80
    )
    assert render_quiz.join_inline(["a", "b", "c"], 10) == "a, b, c"
    assert render_quiz.join_inline(["aaaa", "bbbb", "cccc"], 16) == "aaaa, bbbb, cccc"
    assert render_quiz.join_inline(["aaaa", "bbbb", "cccc"], 15) == "…and 3 more"
    assert render_quiz.join_inline(["aaaa", "bbbb", "cccc", "dddd", "eeee"], 20) == "aaaa, …and 4 more"


def test_topic_choices():
    tags = ["fine-tuning", "lora", "pre-training", "transfer-learning"]
    assert [c.value for c in topic_choices(tags, "")] == tags
    assert [c.value for c in topic_choices(tags, "tr")] == ["transfer-learning", "pre-training"]
    assert [c.value for c in topic_choices(tags, "lora, f")] == [
        "lora, fine-tuning",
        "lora, transfer-learning",
    ]


async def test_a_review_interrupted_by_a_restart_is_scored(
    fake_discord, run_bot, make_tutor_bot, make_service, clock, bot_session_factory
):
    """A review lives in ephemeral messages that a new process cannot reach: recovery finishes it,
    so its answers count and the question moves up a Leitner box."""
    first = make_service()
    async with run_bot(make_tutor_bot(quiz_service=first)):
        await fake_discord.slash("quiz start", questions=1, difficulty="medium", user="alice")
        q = await posted(fake_discord, "Question 1/1")
        sid = session_id_of(q.json)
        await click(fake_discord, fake_discord.message(q.response), sid, 0, wrong(first, sid, 0), "bob")
        clock.tick(30)
        await posted(fake_discord, "Quiz results")
        clock.tick(timedelta(days=2).total_seconds())
        review = await fake_discord.slash("quiz review", user="bob")
        rq = await posted(
            fake_discord, "Review question 1/1", path=rf"^/webhooks/\d+/{re.escape(review.token)}$"
        )
        rsid = session_id_of(rq.json)
        await click(fake_discord, fake_discord.message(rq.response), rsid, 0, correct(first, rsid, 0), "bob")
    second = make_service()
    async with run_bot(make_tutor_bot(quiz_service=second)):
        for _ in range(100):
            async with bot_session_factory() as s:
                status = await s.scalar(select(QuizSessionRow.status).where(QuizSessionRow.id == rsid))
            if status != "open":
                break
            await asyncio.sleep(0.02)
        assert status == "finished"
        stats = await fake_discord.slash("quiz stats", user="bob")
        text = all_text(await stats.reply())
        assert "1/2" in text and "None due right now" in text  # box 2: due again in 3 days
    (item,) = await second.repo.review_items(fake_discord.users["bob"].id)
    assert item.box == 2
