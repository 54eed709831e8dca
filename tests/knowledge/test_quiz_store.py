"""Quiz storage on SQLite and PostgreSQL: answers, finishing, leaderboards, recovery, review, concurrency."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from knowledge.quiz import QuizEngine, QuizError, format_custom_id
from knowledge.quiz_service import QuizService
from knowledge.store.quiz_models import QuizAnswer, QuizScore, Student
from knowledge.store.quiz_repo import QuizRepo
from tests.knowledge.test_quiz_engine import Clock, make_course

GUILD = 1000


def counter():
    n = iter(range(1, 10**6))
    return lambda: f"s{next(n):04d}"


def make_service(session_factory, clock, course=None, seed=1, **kw):
    qe = QuizEngine(course or make_course(), clock=clock, seed=seed, id_factory=counter(), **kw)
    return QuizService(qe, QuizRepo(session_factory))


async def play_question(svc, clock, sid, answers, seconds_in=3.0):
    """Open the next question, have {user: 'right'|'wrong'|letter} answer, reach the deadline, reveal."""
    view = await svc.next_question(sid)
    q = svc.engine.get(sid).current_question
    clock.tick(seconds_in)
    acks = {}
    for uid, what in answers.items():
        letter = (q.correct_letter if what == "right" else
                  next(x for x, _ in q.choices if x != q.correct_letter) if what == "wrong" else what)
        acks[uid] = await svc.answer(format_custom_id(sid, view.position, letter), uid, f"user{uid}")
    clock.t = view.deadline
    return view, await svc.reveal(sid), acks


async def test_session_round_trip(session_factory):
    clock = Clock()
    svc = make_service(session_factory, clock)
    s = await svc.start(guild_id=GUILD, channel_id=1, starter_id=9, questions=4, seconds=20, tags=["lora"])
    await play_question(svc, clock, s.id, {1: "right"})
    await svc.next_question(s.id)
    loaded = await svc.repo.load_session(s.id)
    assert loaded.current == 1 and loaded.total == 4 and loaded.tags == ("lora",) and loaded.seconds == 20
    assert [q.order for q in loaded.questions] == [q.order for q in s.questions]
    assert [q.question for q in loaded.questions] == [q.question for q in s.questions]
    assert loaded.questions[0].closed_at is not None and loaded.questions[1].is_open
    assert loaded.questions[1].deadline == s.questions[1].deadline
    assert loaded.questions[0].answers[1].points == s.questions[0].answers[1].points
    assert await svc.repo.session_status(s.id) == "open"
    assert await svc.repo.session_status("nope") is None


async def test_a_full_quiz_records_scores_once(session_factory):
    clock = Clock()
    svc = make_service(session_factory, clock)
    s = await svc.start(guild_id=GUILD, channel_id=1, starter_id=9, questions=3, seconds=30)
    _, reveal, acks = await play_question(svc, clock, s.id, {1: "right", 2: "wrong"}, seconds_in=3)  # 145 / 0
    assert acks[1].ok and acks[1].kind == "recorded" and acks[1].message == f"Recorded {acks[1].letter}."
    assert [u[0] for u in reveal.correct_users] == [1]
    await play_question(svc, clock, s.id, {1: "right", 2: "right"}, seconds_in=15)  # 125 / 125
    _, reveal, _ = await play_question(svc, clock, s.id, {2: "right"}, seconds_in=30 - 0.001)  # 100 for 2
    assert reveal.session_over
    assert await svc.next_question(s.id) is None
    results = await svc.finish(s.id)
    assert [(r.user_id, r.points, r.correct) for r in results.rows] == [(1, 270, 2), (2, 225, 2)]
    assert [(r.user_id, r.total, r.quizzes, r.correct, r.answered) for r in results.leaderboard] == [
        (1, 270, 1, 2, 2), (2, 225, 1, 2, 3)]
    again = await svc.repo.finish_session(s.id, status="finished", end_reason="completed", now=clock.t)
    assert again.rows == results.rows
    board = await svc.leaderboard(GUILD)
    assert [(r.user_id, r.total, r.quizzes) for r in board] == [(1, 270, 1), (2, 225, 1)]
    assert board[1].current_streak == 2 and board[1].best_streak == 2 and board[1].display_name == "user2"
    assert await svc.repo.session_status(s.id) == "finished"
    ack = await svc.answer(format_custom_id(s.id, 2, "A"), 3, "late")
    assert not ack.ok and ack.kind == "ended" and ack.message == "This quiz has ended."


async def test_double_clicks_and_changes_keep_one_answer(session_factory):
    clock = Clock()
    svc = make_service(session_factory, clock)
    s = await svc.start(guild_id=GUILD, channel_id=1, starter_id=9, questions=2)
    view = await svc.next_question(s.id)
    cid = view.custom_ids
    acks = await asyncio.gather(*(svc.answer(cid[0], 5, "Ann") for _ in range(5)))
    assert sorted(a.kind for a in acks) == ["recorded"] + ["unchanged"] * 4
    assert all(a.ok and a.letter == "A" for a in acks)
    clock.tick(2)
    changed = await svc.answer(cid[2], 5, "Ann (new name)")
    assert changed.kind == "changed" and changed.message == "Changed to C (was A)."
    async with session_factory() as db:
        rows = (await db.scalars(select(QuizAnswer).where(QuizAnswer.session_id == s.id))).all()
        name = await db.scalar(select(Student.display_name).where(Student.id == 5))
    assert len(rows) == 1 and rows[0].letter == "C" and rows[0].changes == 1 and name == "Ann (new name)"
    clock.t = view.deadline
    late = await svc.answer(cid[1], 5, "Ann")
    assert not late.ok and late.kind == "closed" and late.message == "Time is up for this question."
    assert (await svc.repo.load_session(s.id)).questions[0].answers[5].letter == "C"
    missing = await svc.answer("quiz:zzzz:0:A", 5, "Ann")
    assert missing.kind == "missing" and missing.message == "This quiz no longer exists."
    assert (await svc.answer("poll:1", 5, "Ann")).kind == "invalid"


async def test_the_database_keeps_one_answer_per_student_and_question(session_factory):
    """Even without the service's per-student lock, concurrent writes of one key leave one row."""
    clock = Clock()
    svc = make_service(session_factory, clock)
    s = await svc.start(guild_id=GUILD, channel_id=1, starter_id=9, questions=1)
    await svc.next_question(s.id)
    outcomes = []
    for i, letter in enumerate("ABCDABCD"):
        clock.tick(0.5)
        outcomes.append(svc.engine.check_answer(s.id, 0, letter, 5, f"Ann{i}"))
    await asyncio.gather(*(svc.repo.record_answer(o, guild_id=GUILD) for o in outcomes))
    assert await svc.repo.answer_count(s.id) == 1
    stored = (await svc.repo.load_session(s.id)).questions[0].answers[5]
    assert (stored.letter, stored.display_name) in {(o.letter, o.display_name) for o in outcomes}


async def test_concurrent_finishes_count_once(session_factory):
    clock = Clock()
    svc = make_service(session_factory, clock)
    s = await svc.start(guild_id=GUILD, channel_id=1, starter_id=9, questions=1)
    await play_question(svc, clock, s.id, {1: "right"})
    res = await asyncio.gather(
        *(svc.repo.finish_session(s.id, status="finished", end_reason="completed", now=clock.t) for _ in range(4))
    )
    assert all(r.rows == res[0].rows for r in res)
    board = await svc.leaderboard(GUILD)
    assert [(r.total, r.quizzes) for r in board] == [(res[0].rows[0].points, 1)]


async def test_stop_rules_and_leaderboard_streaks_across_quizzes(session_factory):
    clock = Clock()
    svc = make_service(session_factory, clock)
    s = await svc.start(guild_id=GUILD, channel_id=1, starter_id=9, questions=5)
    await play_question(svc, clock, s.id, {1: "right"})
    await play_question(svc, clock, s.id, {1: "right"})
    with pytest.raises(QuizError):
        await svc.stop(channel_id=1, user_id=2)
    res = await svc.stop(channel_id=1, user_id=2, can_moderate=True)
    assert res.status == "stopped" and res.asked == 2
    assert svc.running(1) is None
    s2 = await svc.start(guild_id=GUILD, channel_id=1, starter_id=9, questions=4)
    for what in ("right", "wrong", "right", "right"):
        await play_question(svc, clock, s2.id, {1: what})
    await svc.finish(s2.id)
    [row] = await svc.leaderboard(GUILD)
    # quiz 1: R R (streak 2); quiz 2: R W R R -> best max(2 + 1, 2) = 3, current 2
    assert (row.quizzes, row.correct, row.answered, row.best_streak, row.current_streak) == (2, 5, 6, 3, 2)
    assert await svc.leaderboard(GUILD + 1) == []


async def test_leaderboard_ranks_guilds_and_periods(session_factory):
    clock = Clock()
    svc = make_service(session_factory, clock)
    for guild, channel, players in ((GUILD, 1, {1: "right", 2: "right", 3: "wrong"}),
                                    (GUILD, 2, {2: "right", 4: "right"}),
                                    (GUILD + 1, 3, {1: "right"})):
        s = await svc.start(guild_id=guild, channel_id=channel, starter_id=9, questions=1)
        await play_question(svc, clock, s.id, players)
        await svc.finish(s.id)
    board = await svc.leaderboard(GUILD, 10)
    assert [(r.rank, r.user_id, r.quizzes) for r in board] == [(1, 2, 2), (2, 1, 1), (2, 4, 1), (4, 3, 1)]
    assert board[-1].total == 0 and board[-1].accuracy == 0.0
    assert [r.user_id for r in await svc.leaderboard(GUILD, 1)] == [2]
    since = await svc.leaderboard(GUILD, 10, since=clock.t - timedelta(hours=1))
    assert [(r.user_id, r.total, r.quizzes) for r in since] == [(r.user_id, r.total, r.quizzes) for r in board]
    assert await svc.leaderboard(GUILD, 10, since=clock.t + timedelta(hours=1)) == []
    assert [r.user_id for r in await svc.leaderboard(GUILD + 1)] == [1]


async def test_restart_resumes_or_closes_without_losing_answers(session_factory):
    clock = Clock()
    old = make_service(session_factory, clock)
    # A: question open with time left -> resumed
    a = await old.start(guild_id=GUILD, channel_id=1, starter_id=9, questions=3, seconds=60)
    va = await old.next_question(a.id)
    await old.answer(va.custom_ids[0], 1, "Ann")
    # B: question open whose deadline will have passed -> closed, answer kept, leaderboard updated
    b = await old.start(guild_id=GUILD, channel_id=2, starter_id=9, questions=3, seconds=10)
    vb = await old.next_question(b.id)
    right_b = old.engine.get(b.id).current_question.correct_letter
    await old.answer(format_custom_id(b.id, 0, right_b), 2, "Bob")
    # C: between questions, recent -> resumed; D: between questions, long idle -> closed
    c = await old.start(guild_id=GUILD, channel_id=3, starter_id=9, questions=3, seconds=10)
    d = await old.start(guild_id=GUILD, channel_id=4, starter_id=9, questions=3, seconds=10)
    # E: every question asked but never finished -> finished
    e = await old.start(guild_id=GUILD, channel_id=5, starter_id=9, questions=1, seconds=10)
    await play_question(old, clock, e.id, {3: "right"})
    clock.t = vb.opened_at + timedelta(seconds=20)
    c.updated_at = clock.t
    await old.repo.save_progress(c)
    d.updated_at = clock.t - timedelta(minutes=10)
    await old.repo.save_progress(d)

    new = make_service(session_factory, clock, seed=99)  # a fresh process
    recovered = {r.session.id: r for r in await new.recover()}
    assert {k: r.action for k, r in recovered.items()} == {
        a.id: "resumed", b.id: "closed", c.id: "resumed", d.id: "closed", e.id: "closed"}
    ra = recovered[a.id]
    assert ra.question.position == 0 and ra.question.deadline == va.deadline
    assert new.engine.get(a.id).questions[0].answers[1].letter == "A"
    changed = await new.answer(va.custom_ids[1], 1, "Ann")
    assert changed.kind == "changed"
    assert (await new.answer(va.custom_ids[2], 7, "Cat")).kind == "recorded"
    assert recovered[c.id].question is None and (await new.next_question(c.id)).position == 0
    rb = recovered[b.id]
    assert rb.results.status == "expired" and rb.results.end_reason == "restart"
    assert [(r.user_id, r.correct) for r in rb.results.rows] == [(2, 1)]
    assert recovered[d.id].results.status == "expired" and recovered[d.id].results.rows == ()
    assert recovered[e.id].results.status == "finished"
    assert (await new.answer(format_custom_id(b.id, 0, "A"), 2, "Bob")).kind == "ended"
    board = {r.user_id: r for r in await new.leaderboard(GUILD)}
    assert board[2].correct == 1 and board[3].correct == 1
    assert await new.recover() == []  # nothing left to recover twice
    clock.t = ra.question.deadline
    await new.reveal(a.id)
    res = await new.finish(a.id)
    assert {r.user_id for r in res.rows} == {1, 7}


async def test_an_idle_stop_survives_a_restart_before_finish(session_factory):
    clock = Clock()
    old = make_service(session_factory, clock, idle_limit=1)
    s = await old.start(guild_id=GUILD, channel_id=1, starter_id=9, questions=5)
    await old.next_question(s.id)
    clock.tick(30)
    reveal = await old.reveal(s.id)
    assert reveal.session_over and reveal.end_reason == "idle"
    new = make_service(session_factory, clock)  # crashed before finish()
    [r] = await new.recover()
    assert r.action == "closed" and (r.results.status, r.results.end_reason) == ("stopped", "idle")


async def test_wrong_answers_come_back_for_review(session_factory):
    clock = Clock()
    svc = make_service(session_factory, clock)
    s = await svc.start(guild_id=GUILD, channel_id=1, starter_id=9, questions=3)
    missed = []
    for what in ("wrong", "right", "wrong"):
        await play_question(svc, clock, s.id, {5: what})
        if what == "wrong":
            missed.append(svc.engine.get(s.id).current_question.question.id)
    await svc.finish(s.id)
    finished_at = clock.t
    items = await svc.repo.review_items(5, "test")
    assert sorted(i.question_id for i in items) == sorted(missed)
    assert all(i.box == 1 and i.due_at == finished_at + timedelta(days=1) and i.lapses == 1 for i in items)
    with pytest.raises(QuizError) as err:
        await svc.start_review(guild_id=GUILD, channel_id=1, student_id=5)
    assert "Nothing is due" in str(err.value)
    stats = await svc.stats(5)
    assert stats.answered == 3 and stats.correct == 1 and stats.review_total == 2 and stats.review_due == 0

    clock.t = finished_at + timedelta(days=1, minutes=1)
    assert (await svc.stats(5)).review_due == 2
    r = await svc.start_review(guild_id=GUILD, channel_id=1, student_id=5)
    assert r.kind == "review" and sorted(q.question.id for q in r.questions) == sorted(missed)
    await play_question(svc, clock, r.id, {5: "right"})
    await play_question(svc, clock, r.id, {5: "wrong"})
    promoted = r.questions[0].question.id
    demoted = r.questions[1].question.id
    await svc.finish(r.id)
    now = clock.t
    items = {i.question_id: i for i in await svc.repo.review_items(5, "test")}
    assert items[promoted].box == 2 and items[promoted].due_at == now + timedelta(days=3)
    assert items[demoted].box == 1 and items[demoted].lapses == 2 and items[demoted].due_at == now + timedelta(days=1)
    board = await svc.leaderboard(GUILD)
    assert [(x.quizzes, x.answered) for x in board] == [(1, 3)]  # review quizzes stay off the leaderboard
    # a correct answer to an item that is not due yet does not promote it
    s2 = await svc.start(guild_id=GUILD, channel_id=1, starter_id=9, questions=25)
    while (v := await svc.next_question(s2.id)) is not None:
        clock.tick(1)
        q = svc.engine.get(s2.id).current_question
        await svc.answer(format_custom_id(s2.id, v.position, q.correct_letter), 5, "Ann")
        clock.t = v.deadline
        await svc.reveal(s2.id)
    await svc.finish(s2.id)
    assert {i.question_id: i.box for i in await svc.repo.review_items(5, "test")} == {promoted: 2, demoted: 1}


async def test_stats_by_topic(session_factory):
    clock = Clock()
    svc = make_service(session_factory, clock)
    s = await svc.start(guild_id=GUILD, channel_id=1, starter_id=9, questions=6)
    expected: dict[str, list[int]] = {}
    for i in range(6):
        what = "right" if i % 2 else "wrong"
        await play_question(svc, clock, s.id, {5: what})
        topic = svc.engine.get(s.id).current_question.topic
        expected.setdefault(topic, [0, 0])
        expected[topic][0] += 1
        expected[topic][1] += what == "right"
    await svc.finish(s.id)
    stats = await svc.stats(5)
    assert {t.topic: [t.answered, t.correct] for t in stats.by_topic} == expected
    assert stats.accuracy == 0.5
    assert (await svc.stats(5, guild_id=GUILD + 1)).answered == 0
    assert stats.weakest(1)[0].accuracy == min(t.accuracy for t in stats.by_topic)


async def test_twenty_channels_thirty_students_in_the_same_second(session_factory):
    """600 students' answers (each clicked twice) land at once: each stored exactly once, scores exact."""
    clock = Clock()
    svc = make_service(session_factory, clock)
    sessions = [
        await svc.start(guild_id=GUILD + (ch % 2), channel_id=ch, starter_id=9, questions=2, seconds=30)
        for ch in range(20)
    ]
    views = [await svc.next_question(s.id) for s in sessions]
    clock.tick(3)  # everyone answers 3 s in: 100 + round(50 * 27 / 30) = 145 points when right
    expected: dict[tuple[int, int], int] = {}
    clicks = []
    for s, v in zip(sessions, views, strict=True):
        q = svc.engine.get(s.id).current_question
        wrong = next(x for x, _ in q.choices if x != q.correct_letter)
        for student in range(1, 31):
            right = (student + s.channel_id) % 3 != 0
            letter = q.correct_letter if right else wrong
            key = (s.guild_id, student)
            expected[key] = expected.get(key, 0) + (145 if right else 0)
            cid = format_custom_id(s.id, v.position, letter)
            clicks += [svc.answer(cid, student, f"student{student}"), svc.answer(cid, student, f"student{student}")]
    acks = await asyncio.gather(*clicks)
    assert all(a.ok for a in acks), {a.message for a in acks if not a.ok}
    assert sum(a.kind == "recorded" for a in acks) == 600 and sum(a.kind == "unchanged" for a in acks) == 600
    assert await svc.repo.answer_count() == 600
    clock.tick(27)
    await asyncio.gather(*(svc.reveal(s.id) for s in sessions))
    results = await asyncio.gather(*(svc.finish(s.id) for s in sessions))
    assert all(len(r.rows) == 30 for r in results)
    async with session_factory() as db:
        rows = (await db.execute(select(QuizScore.guild_id, QuizScore.student_id, QuizScore.total,
                                        QuizScore.quizzes, QuizScore.answered))).all()
        dupes = (await db.execute(
            select(QuizAnswer.session_id, QuizAnswer.student_id, func.count())
            .group_by(QuizAnswer.session_id, QuizAnswer.position, QuizAnswer.student_id)
            .having(func.count() > 1))).all()
    assert dupes == []
    assert {(g, st): t for g, st, t, _, _ in rows} == expected
    assert all(q == 10 and a == 10 for _, _, _, q, a in rows)


async def test_recovery_takes_only_the_sessions_this_process_owns(session_factory):
    """With shards split across processes, each process recovers only its own guilds' quizzes."""
    clock = Clock()
    old = make_service(session_factory, clock)
    mine = await old.start(guild_id=GUILD, channel_id=1, starter_id=9, questions=2, seconds=60)
    theirs = await old.start(guild_id=GUILD + 1, channel_id=2, starter_id=9, questions=2, seconds=60)
    await old.next_question(mine.id)
    await old.next_question(theirs.id)

    first = make_service(session_factory, clock, seed=5)
    got = await first.recover(owns=lambda gid: gid == GUILD)
    assert [r.session.id for r in got] == [mine.id]
    second = make_service(session_factory, clock, seed=6)
    got = await second.recover(owns=lambda gid: gid == GUILD + 1)
    assert [r.session.id for r in got] == [theirs.id]
    assert (await second.repo.session_status(mine.id)) == "open"  # untouched by the other process
