"""The quiz engine's rules, one by one, with an injected clock and a seeded RNG (no I/O)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from knowledge.course import Course, CourseMeta, Flashcard, QuizQuestion, load_course
from knowledge.quiz import (
    BASE_POINTS,
    LETTERS,
    REVIEW_INTERVALS,
    SPEED_BONUS,
    AlreadyRunning,
    ClickRef,
    InvalidOption,
    NoQuestions,
    NoSuchSession,
    NotAllowed,
    QuestionClosed,
    QuizEnded,
    QuizEngine,
    QuizError,
    ReviewState,
    compute_results,
    format_custom_id,
    parse_custom_id,
    schedule_review,
    score_answer,
    streak_summary,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, t: datetime = T0):
        self.t = t

    def __call__(self) -> datetime:
        return self.t

    def tick(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


def make_question(i: int, difficulty: str = "medium", tags=("general-topic",), n_choices: int = 4) -> QuizQuestion:
    choices = [f"q{i} choice {c}" for c in range(n_choices)]
    return QuizQuestion(
        id=f"q{i:02d}", question=f"Question number {i}?", choices=choices, answer=choices[i % n_choices],
        explanation=f"Because {i}.", common_mistakes=[f"mistake {i}"], difficulty=difficulty, tags=list(tags),
    )


def make_course(n: int = 30, course_id: str = "test") -> Course:
    qs = []
    for i in range(n):
        difficulty = ("easy", "medium", "hard")[i % 3]
        tags = ("lora",) if i % 5 == 0 else ("fine-tuning", "basics") if i % 2 else ("pre-training",)
        qs.append(make_question(i, difficulty, tags))
    cards = (
        Flashcard(id="c1", front="What is LoRA?", back="Low-rank adaptation.", tags=["lora"]),
        Flashcard(id="c2", front="What is pre-training?", back="Learning general patterns.", tags=["pre-training"]),
        Flashcard(id="c3", front="What is fine-tuning?", back="Adapting to a task.", tags=["fine-tuning"]),
    )
    return Course(root=Path("."), meta=CourseMeta(id=course_id, title="Test"), quizzes=tuple(qs), flashcards=cards)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def engine(clock):
    return QuizEngine(make_course(), clock=clock, seed=7)


def start(engine, channel=10, starter=1, **kw):
    return engine.start(guild_id=100, channel_id=channel, starter_id=starter, **kw)


def right_letter(engine, sid):
    return engine.get(sid).current_question.correct_letter


def wrong_letter(engine, sid):
    q = engine.get(sid).current_question
    return next(letter for letter, _ in q.choices if letter != q.correct_letter)


# --- starting ------------------------------------------------------------------------------------


def test_draws_the_requested_number_without_repeats_and_is_deterministic(clock):
    a = start(QuizEngine(make_course(), clock=clock, seed=1), questions=25)
    b = start(QuizEngine(make_course(), clock=clock, seed=1), questions=25)
    ids = [q.question.id for q in a.questions]
    assert len(ids) == 25 and len(set(ids)) == 25
    assert ids == [q.question.id for q in b.questions]
    assert [q.order for q in a.questions] == [q.order for q in b.questions]
    c = start(QuizEngine(make_course(), clock=clock, seed=2), questions=25)
    assert ids != [q.question.id for q in c.questions]


def test_defaults_and_fewer_questions_than_requested(clock):
    eng = QuizEngine(make_course(3), clock=clock, seed=1, default_questions=5, default_seconds=30)
    s = start(eng)
    assert s.total == 3 and s.seconds == 30 and s.status == "open" and s.current == -1


@pytest.mark.parametrize(
    "kw", [{"questions": 0}, {"questions": 26}, {"seconds": 9}, {"seconds": 121}, {"difficulty": "expert"}]
)
def test_out_of_range_options_are_refused(engine, kw):
    with pytest.raises(InvalidOption) as err:
        start(engine, **kw)
    assert "InvalidOption" not in str(err.value) and len(str(err.value)) < 120


def test_difficulty_and_topic_filters(engine):
    s = start(engine, questions=25, difficulty="hard")
    assert s.total == 10 and all(q.question.difficulty == "hard" for q in s.questions)
    s2 = start(engine, channel=11, questions=25, tags=["LoRA"])
    assert s2.total == 6 and all("lora" in q.question.tags for q in s2.questions)
    s3 = start(engine, channel=12, questions=25, tags=["lora", "pre-training"], difficulty="easy")
    assert all(q.question.difficulty == "easy" and set(q.question.tags) & {"lora", "pre-training"}
               for q in s3.questions)


def test_no_matching_questions_names_the_topics(engine):
    with pytest.raises(NoQuestions) as err:
        start(engine, tags=["quantum"])
    assert "quantum" in str(err.value) and "lora" in str(err.value)


def test_no_course_means_no_questions(clock):
    with pytest.raises(NoQuestions):
        start(QuizEngine(None, clock=clock))


def test_one_quiz_per_channel(engine):
    s = start(engine)
    with pytest.raises(AlreadyRunning):
        start(engine)
    start(engine, channel=11)  # another channel is fine
    engine.stop(s.id, 1)
    start(engine)  # the channel is free again


def test_clock_must_be_aware():
    eng = QuizEngine(make_course(), clock=lambda: datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        start(eng)


# --- choices and letters -------------------------------------------------------------------------


def test_choices_are_shuffled_and_letters_kept_through_the_reveal(engine, clock):
    s = start(engine, questions=25)
    assert any(q.order != tuple(range(len(q.order))) for q in s.questions)
    view = engine.open_next(s.id)
    q = s.questions[0]
    assert [letter for letter, _ in view.choices] == list(LETTERS[: len(q.question.choices)])
    shown = dict(view.choices)
    assert shown[q.correct_letter] == q.question.answer
    engine.answer(s.id, 0, q.correct_letter, 5, "Ann")
    clock.tick(30)
    reveal = engine.reveal(s.id)
    assert reveal.correct_letter == q.correct_letter and reveal.correct_text == q.question.answer
    assert dict(reveal.choices) == shown
    assert reveal.correct_users == ((5, "Ann", 150),)


def test_question_view_has_deadline_and_button_ids(engine, clock):
    s = start(engine, questions=2, seconds=20)
    view = engine.open_next(s.id)
    assert view.number == 1 and view.total == 2 and view.deadline == clock.t + timedelta(seconds=20)
    assert view.custom_ids[0] == f"quiz:{s.id}:0:A"
    assert all(parse_custom_id(c) == ClickRef(s.id, 0, c[-1]) for c in view.custom_ids)


# --- answering and scoring -----------------------------------------------------------------------


def test_scoring_correct_plus_speed_bonus(engine, clock):
    assert score_answer(True, T0, T0, T0 + timedelta(seconds=30)) == BASE_POINTS + SPEED_BONUS
    assert score_answer(True, T0 + timedelta(seconds=15), T0, T0 + timedelta(seconds=30)) == 125
    assert score_answer(True, T0 + timedelta(seconds=30), T0, T0 + timedelta(seconds=30)) == BASE_POINTS
    assert score_answer(False, T0, T0, T0 + timedelta(seconds=30)) == 0
    s = start(engine, seconds=30)
    engine.open_next(s.id)
    clock.tick(6)
    out = engine.answer(s.id, 0, right_letter(engine, s.id), 5, "Ann")
    assert out.kind == "recorded" and out.correct and out.points == 140 and out.elapsed == 6
    assert out.message == f"Recorded {out.letter}."
    wrong = engine.answer(s.id, 0, wrong_letter(engine, s.id), 6, "Bob")
    assert not wrong.correct and wrong.points == 0


def test_deadline_is_exclusive(engine, clock):
    s = start(engine, seconds=10)
    engine.open_next(s.id)
    clock.tick(9.999)
    engine.answer(s.id, 0, "A", 5, "Ann")
    clock.tick(0.001)
    with pytest.raises(QuestionClosed) as err:
        engine.answer(s.id, 0, "B", 6, "Bob")
    assert str(err.value) == "Time is up for this question."


def test_changing_an_answer_replaces_it_and_rescores(engine, clock):
    s = start(engine, seconds=30)
    engine.open_next(s.id)
    first = engine.answer(s.id, 0, wrong_letter(engine, s.id), 5, "Ann")
    clock.tick(15)
    second = engine.answer(s.id, 0, right_letter(engine, s.id), 5, "Ann")
    assert second.kind == "changed" and second.previous_letter == first.letter and second.points == 125
    assert second.changes == 1 and second.message.startswith(f"Changed to {second.letter}")
    q = s.questions[0]
    assert len(q.answers) == 1 and q.answers[5].letter == second.letter and q.answers[5].points == 125


def test_same_letter_twice_is_unchanged(engine, clock):
    s = start(engine)
    engine.open_next(s.id)
    a = engine.answer(s.id, 0, "A", 5, "Ann")
    clock.tick(5)
    b = engine.answer(s.id, 0, "A", 5, "Ann")
    assert b.kind == "unchanged" and b.answered_at == a.answered_at and b.points == a.points
    assert b.message == "Already recorded A."


def test_changes_can_be_disallowed(clock):
    eng = QuizEngine(make_course(), clock=clock, seed=1, allow_change=False)
    s = start(eng)
    eng.open_next(s.id)
    eng.answer(s.id, 0, "A", 5, "Ann")
    with pytest.raises(NotAllowed) as err:
        eng.answer(s.id, 0, "B", 5, "Ann")
    assert "already answered A" in str(err.value)
    assert eng.answer(s.id, 0, "A", 5, "Ann").kind == "unchanged"


def test_clicks_on_old_future_and_unknown_questions(engine, clock):
    s = start(engine, questions=3)
    engine.open_next(s.id)
    with pytest.raises(NotAllowed):
        engine.answer(s.id, 1, "A", 5, "Ann")  # not asked yet
    with pytest.raises(NotAllowed):
        engine.answer(s.id, 7, "A", 5, "Ann")  # not in this quiz
    with pytest.raises(NotAllowed):
        engine.answer(s.id, 0, "F", 5, "Ann")  # only 4 choices
    clock.tick(30)
    engine.reveal(s.id)
    engine.open_next(s.id)
    with pytest.raises(QuestionClosed):
        engine.answer(s.id, 0, "A", 5, "Ann")  # the previous question
    with pytest.raises(NoSuchSession) as err:
        engine.answer("deadbeef", 0, "A", 5, "Ann")
    assert str(err.value) == "This quiz no longer exists."


def test_closed_question_refuses_before_its_deadline(engine, clock):
    s = start(engine)
    engine.open_next(s.id)
    engine.close(s.id)
    with pytest.raises(QuestionClosed):
        engine.answer(s.id, 0, "A", 5, "Ann")


def test_check_answer_does_not_change_state(engine):
    s = start(engine)
    engine.open_next(s.id)
    out = engine.check_answer(s.id, 0, "A", 5, "Ann")
    assert s.questions[0].answers == {}
    engine.apply(out)
    assert s.questions[0].answers[5].letter == "A"


# --- reveal, results -----------------------------------------------------------------------------


def test_reveal_lists_who_got_it_right_fastest_first(engine, clock):
    s = start(engine, questions=2)
    engine.open_next(s.id)
    right, wrong = right_letter(engine, s.id), wrong_letter(engine, s.id)
    clock.tick(2)
    engine.answer(s.id, 0, right, 7, "Cat")
    clock.tick(1)
    engine.answer(s.id, 0, right, 5, "Ann")
    engine.answer(s.id, 0, wrong, 6, "Bob")
    with pytest.raises(QuizError):
        engine.open_next(s.id)  # still open
    clock.tick(30)
    r = engine.reveal(s.id)
    assert [u[0] for u in r.correct_users] == [7, 5]
    assert r.answered == 3 and r.counts[right] == 2 and r.counts[wrong] == 1
    assert r.explanation == s.questions[0].question.explanation
    assert r.common_mistakes == tuple(s.questions[0].question.common_mistakes)
    assert not r.session_over and r.number == 1 and r.total == 2
    engine.open_next(s.id)
    clock.tick(30)
    assert engine.reveal(s.id).session_over
    assert engine.open_next(s.id) is None and s.status == "finished" and s.end_reason == "completed"


def test_results_rank_points_then_correct_then_time_and_unanswered_counts_full_time(engine, clock):
    s = start(engine, questions=2, seconds=20)
    engine.open_next(s.id)
    clock.tick(4)
    engine.answer(s.id, 0, right_letter(engine, s.id), 1, "Ann")  # 100 + 40
    engine.answer(s.id, 0, right_letter(engine, s.id), 2, "Bob")  # 140
    engine.answer(s.id, 0, wrong_letter(engine, s.id), 3, "Cat")  # 0
    clock.tick(16)
    engine.reveal(s.id)
    engine.open_next(s.id)
    clock.tick(10)
    engine.answer(s.id, 1, right_letter(engine, s.id), 2, "Bob")  # 125
    engine.answer(s.id, 1, wrong_letter(engine, s.id), 3, "Cat")
    clock.tick(10)
    engine.reveal(s.id)
    res = engine.results(s.id)
    rows = {r.user_id: r for r in res.rows}
    assert [r.user_id for r in res.rows] == [2, 1, 3]
    assert rows[2].points == 265 and rows[2].correct == 2 and rows[2].rank == 1
    assert rows[1].points == 140 and rows[1].answered == 1
    assert rows[1].avg_seconds == (4 + 20) / 2  # the unanswered second question counts 20 s
    assert rows[3].accuracy == 0 and rows[3].rank == 3 and res.asked == 2


def test_ties_share_a_rank(engine, clock):
    s = start(engine, questions=1)
    engine.open_next(s.id)
    for uid in (1, 2):
        engine.answer(s.id, 0, right_letter(engine, s.id), uid, f"u{uid}")
    res = compute_results(s)
    assert [r.rank for r in res.rows] == [1, 1]


# --- stop rules ----------------------------------------------------------------------------------


def test_only_starter_or_moderator_can_stop(engine, clock):
    s = start(engine, starter=1)
    engine.open_next(s.id)
    engine.answer(s.id, 0, "A", 5, "Ann")
    with pytest.raises(NotAllowed) as err:
        engine.stop(s.id, 2)
    assert "started this quiz or a moderator" in str(err.value)
    engine.stop(s.id, 2, can_moderate=True)
    assert s.status == "stopped" and s.questions[0].closed_at == clock.t
    assert engine.results(s.id).rows[0].answered == 1  # answers given before the stop count
    with pytest.raises(QuizEnded):
        engine.answer(s.id, 0, "B", 5, "Ann")
    with pytest.raises(QuizEnded):
        engine.stop(s.id, 1)
    s2 = start(engine, starter=1)
    engine.stop(s2.id, 1)
    assert s2.status == "stopped"


def test_idle_quiz_ends_itself(clock):
    eng = QuizEngine(make_course(), clock=clock, seed=3, idle_limit=2)
    s = start(eng, questions=10)
    eng.open_next(s.id)
    clock.tick(30)
    eng.reveal(s.id)  # idle 1
    eng.open_next(s.id)
    eng.answer(s.id, 1, "A", 5, "Ann")
    clock.tick(30)
    eng.reveal(s.id)  # an answer resets the count
    assert s.idle_streak == 0
    eng.open_next(s.id)
    clock.tick(30)
    assert not eng.reveal(s.id).session_over
    eng.open_next(s.id)
    clock.tick(30)
    r = eng.reveal(s.id)
    assert r.session_over and r.end_reason == "idle" and s.status == "stopped"
    with pytest.raises(QuizEnded):
        eng.open_next(s.id)


def test_finish_and_expire_close_the_open_question(engine, clock):
    s = start(engine, questions=3)
    engine.open_next(s.id)
    engine.finish(s.id)
    assert s.status == "finished" and not s.questions[0].is_open
    s2 = start(engine, questions=3)
    engine.open_next(s2.id)
    engine.expire(s2.id)
    assert s2.status == "expired" and s2.end_reason == "restart"


# --- course reloads ------------------------------------------------------------------------------


def test_a_reload_does_not_touch_a_running_quiz(engine, clock):
    s = start(engine, questions=3)
    before = [q.question for q in s.questions]
    engine.set_course(make_course(3, course_id="other"))
    view = engine.open_next(s.id)
    assert [q.question for q in s.questions] == before and view.text == before[0].question
    assert start(engine, channel=99).course_id == "other"


# --- review --------------------------------------------------------------------------------------


def test_leitner_schedule():
    assert REVIEW_INTERVALS[1] == timedelta(days=1) and REVIEW_INTERVALS[5] == timedelta(days=30)
    s = schedule_review(None, False, T0)
    assert s == ReviewState(1, T0 + timedelta(days=1), 1)
    assert schedule_review(None, True, T0) is None
    not_due = ReviewState(2, T0 + timedelta(days=1))
    assert schedule_review(not_due, True, T0) == not_due
    expected = {1: 3, 2: 7, 3: 14, 4: 30, 5: 30}
    for box, days in expected.items():
        nxt = schedule_review(ReviewState(box, T0, 0), True, T0)
        assert nxt == ReviewState(min(box + 1, 5), T0 + timedelta(days=days), 0)
    assert schedule_review(ReviewState(4, T0, 2), False, T0) == ReviewState(1, T0 + timedelta(days=1), 3)


def test_review_quiz_is_personal(engine, clock):
    s = engine.start_review(guild_id=100, channel_id=10, student_id=5, question_ids=["q03", "nope", "q01", "q03"])
    assert [q.question.id for q in s.questions] == ["q03", "q01"] and s.kind == "review"
    assert start(engine, channel=10).kind == "channel"  # a review does not occupy the channel
    engine.open_next(s.id)
    with pytest.raises(NotAllowed):
        engine.answer(s.id, 0, "A", 6, "Bob")
    engine.answer(s.id, 0, "A", 5, "Ann")
    with pytest.raises(AlreadyRunning):
        engine.start_review(guild_id=100, channel_id=11, student_id=5, question_ids=["q02"])
    with pytest.raises(NoQuestions):
        engine.start_review(guild_id=100, channel_id=11, student_id=6, question_ids=["gone"])
    s3 = engine.start_review(guild_id=None, channel_id=12, student_id=7, question_ids=["q01", "q02", "q03"], limit=2)
    assert s3.total == 2


def test_streak_summary():
    assert streak_summary([True, True, False, True, True, True, False, True]) == (False, 2, 1, 3)
    assert streak_summary([True, True]) == (True, 2, 2, 2)
    assert streak_summary([False]) == (False, 0, 0, 0)
    assert streak_summary([]) == (True, 0, 0, 0)


# --- button ids ----------------------------------------------------------------------------------


def test_custom_id_round_trip_and_rejects():
    cid = format_custom_id("0123456789abcdef", 24, "F")
    assert cid == "quiz:0123456789abcdef:24:F" and len(cid) <= 100
    assert parse_custom_id(cid) == ClickRef("0123456789abcdef", 24, "F")
    assert ClickRef("abc", 3, "B").custom_id == "quiz:abc:3:B"
    for bad in ("", "quiz:abc:1", "quiz:abc:25:A", "quiz:ABC:1:A", "quiz:abc:1:G", "poll:abc:1:A",
                "quiz:abc:-1:A", "quiz:abc:1:A:extra", "quiz:" + "a" * 33 + ":1:A"):
        assert parse_custom_id(bad) is None, bad
    with pytest.raises(ValueError):
        format_custom_id("abc", 25, "A")
    with pytest.raises(ValueError):
        format_custom_id("a:b", 1, "A")


# --- flashcards ----------------------------------------------------------------------------------


def test_flashcards_draw_flip_and_tag(engine):
    seen = [engine.draw_card().id for _ in range(20)]
    assert all(a != b for a, b in itertools.pairwise(seen))  # never the same card twice in a row
    assert engine.draw_card("LoRA").id == "c1"
    assert engine.flip("c2").back == "Learning general patterns."
    with pytest.raises(NoQuestions):
        engine.draw_card("quantum")
    with pytest.raises(NoQuestions):
        engine.flip("missing")


def test_the_tiny_course_plays_end_to_end(tiny_course, clock):
    eng = QuizEngine(load_course(tiny_course), clock=clock, seed=0)
    s = eng.start(guild_id=1, channel_id=2, starter_id=3, questions=5)
    assert s.total == 2
    while (view := eng.open_next(s.id)) is not None:
        eng.answer(s.id, view.position, eng.get(s.id).current_question.correct_letter, 3, "Me")
        clock.tick(s.seconds)
        eng.reveal(s.id)
    assert s.status == "finished" and eng.results(s.id).rows[0].correct == 2
