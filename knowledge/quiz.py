"""The quiz engine: sessions, grading, scoring, spaced review and flashcards. Pure state, no I/O.

The engine never touches the network, the database or discord. Time comes from an injected clock
(a callable returning aware UTC datetimes) and randomness from a seeded RNG, so every rule can be
tested exactly. The caller (``knowledge.quiz_service``) persists what the engine decides.

Rules (also in docs/QUIZZES.md):

- One running quiz per channel; a personal review quiz runs per student and does not occupy the channel.
- 1 to 25 questions, 10 to 120 seconds per question (default 30), optional difficulty and topic (tag)
  filters. Questions are drawn without repeats; each question's choices are shuffled once per session
  and shown as letters A-F; the letters stay the same through the reveal and the results.
- A student has one answer per question. Clicking another letter before the deadline replaces the
  answer when the session allows changes (the newest click counts, with its own time); otherwise it
  is refused. A click at or after the deadline is refused ("Time is up for this question").
- Scoring: a correct answer earns ``BASE_POINTS`` (100) plus a speed bonus of up to ``SPEED_BONUS``
  (50) points, proportional to the time left: ``round(50 * time_left / time_limit)``. A wrong answer
  or no answer earns 0. For time statistics an unanswered question counts as the full time limit.
- Stop rules: the starter, or a member the caller says may moderate (Manage Messages), can stop a
  quiz. A quiz with no answers for ``idle_limit`` questions in a row stops itself (reason "idle").
- Spaced review (Leitner boxes): a wrong answer puts the question in box 1 for that student; a
  correct answer to a question that is due moves it up one box. Box n comes back after
  ``REVIEW_INTERVALS[n]``: 1 day, 3 days, 7 days, 14 days, 30 days (box 5 repeats every 30 days).
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ValidationError

from knowledge.course import (
    BUTTON_LABEL_MAX,
    YAML_SUFFIXES,
    Course,
    CourseError,
    Flashcard,
    QuizQuestion,
    course_files,
    load_course,
    load_quiz_file,
    read_text_file,
)
from knowledge.course import _fmt_validation as format_validation_error

Clock = Callable[[], datetime]

LETTERS = "ABCDEF"
BASE_POINTS = 100
SPEED_BONUS = 50
MIN_QUESTIONS, MAX_QUESTIONS = 1, 25
MIN_SECONDS, MAX_SECONDS = 10, 120
DEFAULT_QUESTIONS = 5
DEFAULT_SECONDS = 30
DEFAULT_IDLE_LIMIT = 3
DIFFICULTIES = ("easy", "medium", "hard")
DEFAULT_TOPIC = "general"  # the topic of a question without tags

MAX_BOX = 5
REVIEW_INTERVALS: dict[int, timedelta] = {
    1: timedelta(days=1),
    2: timedelta(days=3),
    3: timedelta(days=7),
    4: timedelta(days=14),
    5: timedelta(days=30),
}

EMBED_TITLE_MAX = 256
EMBED_DESCRIPTION_MAX = 4096
EMBED_FIELD_MAX = 1024

SessionKind = Literal["channel", "review"]
SessionStatus = Literal["open", "finished", "stopped", "expired"]


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- errors ------------------------------------------------------------------------------------


class QuizError(Exception):
    """A quiz rule was broken. ``str(error)`` is a short message fit to show the student."""

    kind = "error"


class AlreadyRunning(QuizError):
    kind = "already_running"


class NoSuchSession(QuizError):
    kind = "missing"

    def __init__(self, message: str = "This quiz no longer exists."):
        super().__init__(message)


class QuizEnded(QuizError):
    kind = "ended"

    def __init__(self, message: str = "This quiz has ended."):
        super().__init__(message)


class QuestionClosed(QuizError):
    kind = "closed"

    def __init__(self, message: str = "Time is up for this question."):
        super().__init__(message)


class NotAllowed(QuizError):
    kind = "not_allowed"


class NoQuestions(QuizError):
    kind = "no_questions"


class InvalidOption(QuizError):
    kind = "invalid"


# --- button ids --------------------------------------------------------------------------------

SESSION_ID_RE = re.compile(r"^[0-9a-z]{1,32}$")
CUSTOM_ID_RE = re.compile(r"^quiz:([0-9a-z]{1,32}):(\d{1,2}):([A-F])$")


@dataclass(frozen=True)
class ClickRef:
    """What a quiz button encodes: ``quiz:<session_id>:<question position, from 0>:<letter>``."""

    session_id: str
    position: int
    letter: str

    @property
    def custom_id(self) -> str:
        return format_custom_id(self.session_id, self.position, self.letter)


def format_custom_id(session_id: str, position: int, letter: str) -> str:
    """The stable custom_id of a quiz button; at most 41 characters (Discord allows 100)."""
    if not SESSION_ID_RE.match(session_id):
        raise ValueError(f"bad session id {session_id!r}")
    if not 0 <= position < MAX_QUESTIONS or letter not in LETTERS:
        raise ValueError(f"bad position/letter {position!r}/{letter!r}")
    return f"quiz:{session_id}:{position}:{letter}"


def parse_custom_id(custom_id: str) -> ClickRef | None:
    """The ClickRef of a quiz button's custom_id, or None when it is not a (well-formed) quiz button."""
    m = CUSTOM_ID_RE.match(custom_id or "")
    if not m or int(m.group(2)) >= MAX_QUESTIONS:
        return None
    return ClickRef(m.group(1), int(m.group(2)), m.group(3))


# --- scoring and review schedule (pure functions) ---------------------------------------------


def score_answer(correct: bool, answered_at: datetime, opened_at: datetime, deadline: datetime) -> int:
    """Points for one answer: 0 if wrong; else BASE_POINTS + SPEED_BONUS * (time left / time limit)."""
    if not correct:
        return 0
    window = (deadline - opened_at).total_seconds()
    left = (deadline - answered_at).total_seconds()
    frac = min(1.0, max(0.0, left / window)) if window > 0 else 0.0
    return BASE_POINTS + round(SPEED_BONUS * frac)


@dataclass(frozen=True)
class ReviewState:
    """One student's Leitner state for one question."""

    box: int
    due_at: datetime
    lapses: int = 0


def schedule_review(state: ReviewState | None, correct: bool, now: datetime) -> ReviewState | None:
    """The next Leitner state after an answer (None: the question is not under review).

    Wrong: box 1, due in 1 day (a lapse is counted). Correct and due: up one box (max 5), due after
    that box's interval. Correct but not yet due (or not under review): unchanged.
    """
    if not correct:
        return ReviewState(1, now + REVIEW_INTERVALS[1], (state.lapses + 1) if state else 1)
    if state is None or state.due_at > now:
        return state
    box = min(MAX_BOX, state.box + 1)
    return ReviewState(box, now + REVIEW_INTERVALS[box], state.lapses)


def streak_summary(outcomes: Sequence[bool]) -> tuple[bool, int, int, int]:
    """(all correct, leading correct run, trailing correct run, longest run) of answers in order.

    A streak is a run of correct answers; a wrong answer ends it; questions left unanswered neither
    extend nor break it. Across quizzes: new current = old current + n if all correct, else trailing;
    new best = max(old best, old current + leading, longest).
    """
    longest = run = 0
    for ok in outcomes:
        run = run + 1 if ok else 0
        longest = max(longest, run)
    leading = next((i for i, ok in enumerate(outcomes) if not ok), len(outcomes))
    trailing = next((i for i, ok in enumerate(reversed(outcomes)) if not ok), len(outcomes))
    return all(outcomes), leading, trailing, longest


# --- session state -----------------------------------------------------------------------------


def topic_of(question: QuizQuestion) -> str:
    return question.tags[0] if question.tags else DEFAULT_TOPIC


@dataclass
class Answer:
    """A student's current answer to one question. ``choice`` is the index in the file's order."""

    user_id: int
    display_name: str
    letter: str
    choice: int
    correct: bool
    points: int
    answered_at: datetime
    elapsed: float  # seconds from the question opening to this answer
    changes: int = 0


@dataclass
class SessionQuestion:
    """One question of a session. ``order[i]`` is the file index of the choice shown as LETTERS[i]."""

    position: int
    question: QuizQuestion
    order: tuple[int, ...]
    opened_at: datetime | None = None
    deadline: datetime | None = None
    closed_at: datetime | None = None
    answers: dict[int, Answer] = field(default_factory=dict)

    @property
    def topic(self) -> str:
        return topic_of(self.question)

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None and self.closed_at is None

    @property
    def choices(self) -> tuple[tuple[str, str], ...]:
        return tuple((LETTERS[i], self.question.choices[j]) for i, j in enumerate(self.order))

    @property
    def correct_letter(self) -> str:
        return LETTERS[self.order.index(self.question.answer_index)]

    def choice_of(self, letter: str) -> int:
        """The file index of the choice shown as ``letter``."""
        return self.order[LETTERS.index(letter)]


@dataclass
class QuizSession:
    """A quiz in one channel (or a student's review quiz). All of it is persisted by the caller."""

    id: str
    guild_id: int | None
    channel_id: int
    starter_id: int
    course_id: str
    seconds: int
    questions: list[SessionQuestion]
    created_at: datetime
    kind: SessionKind = "channel"
    allow_change: bool = True
    idle_limit: int = DEFAULT_IDLE_LIMIT
    difficulty: str | None = None
    tags: tuple[str, ...] = ()
    seed: int = 0
    current: int = -1  # position of the question shown last; -1 before the first
    status: SessionStatus = "open"
    end_reason: str | None = None
    idle_streak: int = 0
    updated_at: datetime | None = None
    ended_at: datetime | None = None

    @property
    def total(self) -> int:
        return len(self.questions)

    @property
    def is_open(self) -> bool:
        return self.status == "open"

    @property
    def current_question(self) -> SessionQuestion | None:
        return self.questions[self.current] if 0 <= self.current < self.total else None

    @property
    def asked(self) -> int:
        return sum(1 for q in self.questions if q.opened_at is not None)

    @property
    def has_more(self) -> bool:
        return self.current + 1 < self.total


# --- what the engine hands back ----------------------------------------------------------------


@dataclass(frozen=True)
class QuestionView:
    """Everything needed to post question N: text, lettered choices, deadline and button ids."""

    session_id: str
    position: int
    number: int  # 1-based
    total: int
    text: str
    choices: tuple[tuple[str, str], ...]
    opened_at: datetime
    deadline: datetime
    seconds: int
    difficulty: str
    topic: str

    @property
    def custom_ids(self) -> tuple[str, ...]:
        return tuple(format_custom_id(self.session_id, self.position, letter) for letter, _ in self.choices)


@dataclass(frozen=True)
class AnswerOutcome:
    """A graded click, before it is applied. ``kind``: recorded, changed or unchanged."""

    session_id: str
    position: int
    question_id: str
    topic: str
    user_id: int
    display_name: str
    letter: str
    choice: int
    correct: bool
    points: int
    answered_at: datetime
    elapsed: float
    kind: Literal["recorded", "changed", "unchanged"]
    previous_letter: str | None = None
    changes: int = 0

    @property
    def message(self) -> str:
        if self.kind == "changed":
            return f"Changed to {self.letter} (was {self.previous_letter})."
        if self.kind == "unchanged":
            return f"Already recorded {self.letter}."
        return f"Recorded {self.letter}."


@dataclass(frozen=True)
class Reveal:
    """The answer to question N: right letter and text, explanation, mistakes, who got it right."""

    session_id: str
    position: int
    number: int
    total: int
    question: str
    choices: tuple[tuple[str, str], ...]
    correct_letter: str
    correct_text: str
    explanation: str
    common_mistakes: tuple[str, ...]
    correct_users: tuple[tuple[int, str, int], ...]  # (user id, display name, points), fastest first
    answered: int
    counts: dict[str, int]  # letter -> how many chose it
    session_over: bool
    end_reason: str | None = None


@dataclass(frozen=True)
class ResultRow:
    rank: int
    user_id: int
    display_name: str
    points: int
    correct: int
    answered: int
    asked: int
    avg_seconds: float  # unanswered questions count as the full time limit

    @property
    def accuracy(self) -> float:
        return self.correct / self.answered if self.answered else 0.0


@dataclass(frozen=True)
class Results:
    session_id: str
    kind: SessionKind
    guild_id: int | None
    channel_id: int
    course_id: str
    status: SessionStatus
    end_reason: str | None
    asked: int
    total: int
    rows: tuple[ResultRow, ...]
    leaderboard: tuple[LeaderboardRow, ...] = ()


@dataclass(frozen=True)
class LeaderboardRow:
    rank: int
    user_id: int
    display_name: str
    total: int
    quizzes: int
    correct: int
    answered: int
    current_streak: int = 0
    best_streak: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.answered if self.answered else 0.0


@dataclass(frozen=True)
class TopicStat:
    topic: str
    answered: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.answered if self.answered else 0.0


@dataclass(frozen=True)
class StudentStats:
    user_id: int
    answered: int
    correct: int
    by_topic: tuple[TopicStat, ...]
    review_due: int = 0
    review_total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.answered if self.answered else 0.0

    def weakest(self, n: int = 3) -> list[TopicStat]:
        return sorted(self.by_topic, key=lambda t: (t.accuracy, -t.answered, t.topic))[:n]


@dataclass(frozen=True)
class ReviewEntry:
    """One question under spaced review for a student."""

    student_id: int
    course_id: str
    question_id: str
    box: int
    due_at: datetime
    lapses: int = 0


def rank_rows(rows: Iterable, key: Callable) -> list[tuple[int, object]]:
    """Competition ranking (1, 2, 2, 4) of rows already sorted best first; ``key`` gives the tie value."""
    out: list[tuple[int, object]] = []
    prev = None
    for i, row in enumerate(rows, 1):
        k = key(row)
        rank = out[-1][0] if out and k == prev else i
        out.append((rank, row))
        prev = k
    return out


def compute_results(session: QuizSession) -> Results:
    """The results table: points, then correct answers, then average time (faster first)."""
    asked_qs = [q for q in session.questions if q.opened_at is not None]
    stats: dict[int, dict] = {}
    for q in asked_qs:
        for a in q.answers.values():
            s = stats.setdefault(a.user_id, {"name": a.display_name, "points": 0, "correct": 0,
                                             "answered": 0, "time": 0.0})
            s["name"] = a.display_name
            s["points"] += a.points
            s["correct"] += int(a.correct)
            s["answered"] += 1
            s["time"] += min(a.elapsed, float(session.seconds))
    asked = len(asked_qs)
    rows = []
    for uid, s in stats.items():
        unanswered = asked - s["answered"]
        avg = (s["time"] + unanswered * session.seconds) / asked if asked else 0.0
        rows.append((uid, s, round(avg, 2)))
    rows.sort(key=lambda r: (-r[1]["points"], -r[1]["correct"], r[2], r[1]["name"].casefold(), r[0]))
    ranked = rank_rows(rows, key=lambda r: (r[1]["points"], r[1]["correct"], r[2]))
    return Results(
        session_id=session.id,
        kind=session.kind,
        guild_id=session.guild_id,
        channel_id=session.channel_id,
        course_id=session.course_id,
        status=session.status,
        end_reason=session.end_reason,
        asked=asked,
        total=session.total,
        rows=tuple(
            ResultRow(rank, uid, s["name"], s["points"], s["correct"], s["answered"], asked, avg)
            for rank, (uid, s, avg) in ranked
        ),
    )


def reveal_of(session: QuizSession, q: SessionQuestion) -> Reveal:
    counts = {letter: 0 for letter, _ in q.choices}
    for a in q.answers.values():
        counts[a.letter] = counts.get(a.letter, 0) + 1
    right = sorted((a for a in q.answers.values() if a.correct), key=lambda a: (a.answered_at, a.user_id))
    return Reveal(
        session_id=session.id,
        position=q.position,
        number=q.position + 1,
        total=session.total,
        question=q.question.question,
        choices=q.choices,
        correct_letter=q.correct_letter,
        correct_text=q.question.answer,
        explanation=q.question.explanation,
        common_mistakes=tuple(q.question.common_mistakes),
        correct_users=tuple((a.user_id, a.display_name, a.points) for a in right),
        answered=len(q.answers),
        counts=counts,
        session_over=not session.is_open or q.position + 1 >= session.total,
        end_reason=session.end_reason,
    )


# --- the engine --------------------------------------------------------------------------------


def _new_id() -> str:
    return uuid.uuid4().hex[:16]


class QuizEngine:
    """Running quizzes, in memory. Every method is synchronous and does no I/O.

    ``course`` can be swapped with ``set_course`` (a reload); running sessions keep the questions
    they drew, so a reload never interrupts a quiz.
    """

    def __init__(
        self,
        course: Course | None = None,
        *,
        clock: Clock = utcnow,
        seed: int | None = None,
        id_factory: Callable[[], str] = _new_id,
        default_questions: int = DEFAULT_QUESTIONS,
        default_seconds: int = DEFAULT_SECONDS,
        allow_change: bool = True,
        idle_limit: int = DEFAULT_IDLE_LIMIT,
    ):
        self._course = course
        self._clock = clock
        self._rng = random.Random(seed)
        self._new_id = id_factory
        self.default_questions = default_questions
        self.default_seconds = default_seconds
        self.allow_change = allow_change
        self.idle_limit = idle_limit
        self._sessions: dict[str, QuizSession] = {}
        self._last_card: str | None = None

    # -- course and clock --

    @property
    def course(self) -> Course | None:
        return self._course

    def set_course(self, course: Course) -> None:
        """Use a newly loaded course for new quizzes; running quizzes keep their questions."""
        self._course = course

    def now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the quiz clock must return aware datetimes (UTC)")
        return now

    def _require_course(self) -> Course:
        if self._course is None:
            raise NoQuestions("No course is loaded, so there are no quiz questions.")
        return self._course

    # -- sessions --

    def get(self, session_id: str) -> QuizSession:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise NoSuchSession() from None

    def find(self, session_id: str) -> QuizSession | None:
        return self._sessions.get(session_id)

    def in_channel(self, channel_id: int) -> QuizSession | None:
        """The running channel quiz in this channel, if any."""
        for s in self._sessions.values():
            if s.kind == "channel" and s.channel_id == channel_id and s.is_open:
                return s
        return None

    def review_of(self, user_id: int) -> QuizSession | None:
        for s in self._sessions.values():
            if s.kind == "review" and s.starter_id == user_id and s.is_open:
                return s
        return None

    def sessions(self) -> list[QuizSession]:
        return list(self._sessions.values())

    def adopt(self, session: QuizSession) -> None:
        """Take over a session loaded from storage (restart recovery)."""
        self._sessions[session.id] = session

    def drop(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def _check_options(self, questions: int, seconds: int, difficulty: str | None) -> None:
        if not MIN_QUESTIONS <= questions <= MAX_QUESTIONS:
            raise InvalidOption(f"A quiz has {MIN_QUESTIONS} to {MAX_QUESTIONS} questions (got {questions}).")
        if not MIN_SECONDS <= seconds <= MAX_SECONDS:
            raise InvalidOption(f"Each question lasts {MIN_SECONDS} to {MAX_SECONDS} seconds (got {seconds}).")
        if difficulty is not None and difficulty not in DIFFICULTIES:
            raise InvalidOption(f"Difficulty is one of {', '.join(DIFFICULTIES)} (got {difficulty!r}).")

    def _build(self, picked: list[QuizQuestion], rng: random.Random) -> list[SessionQuestion]:
        out = []
        for pos, q in enumerate(picked):
            order = list(range(len(q.choices)))
            rng.shuffle(order)
            out.append(SessionQuestion(pos, q, tuple(order)))
        return out

    def start(
        self,
        *,
        guild_id: int | None,
        channel_id: int,
        starter_id: int,
        questions: int | None = None,
        seconds: int | None = None,
        difficulty: str | None = None,
        tags: Iterable[str] = (),
        allow_change: bool | None = None,
        idle_limit: int | None = None,
    ) -> QuizSession:
        """Start a quiz in a channel: draw the questions (no repeats) and shuffle their choices."""
        questions = self.default_questions if questions is None else questions
        seconds = self.default_seconds if seconds is None else seconds
        difficulty = difficulty.strip().lower() if difficulty else None
        self._check_options(questions, seconds, difficulty)
        running = self.in_channel(channel_id)
        if running is not None:
            raise AlreadyRunning(
                f"A quiz is already running in this channel (question {max(running.current, 0) + 1} "
                f"of {running.total}). Wait for it to end or stop it first."
            )
        course = self._require_course()
        wanted = tuple(sorted({t.strip().lower() for t in tags if t and t.strip()}))
        pool = [
            q for q in course.quizzes
            if (difficulty is None or q.difficulty == difficulty) and (not wanted or set(q.tags) & set(wanted))
        ]
        if not pool:
            what = " and ".join(
                x for x in (f"difficulty {difficulty}" if difficulty else "",
                            f"topic {', '.join(wanted)}" if wanted else "") if x
            ) or "this course"
            topics = ", ".join(course.quiz_tags()) or "none"
            raise NoQuestions(f"No quiz questions match {what}. Topics available: {topics}.")
        seed = self._rng.getrandbits(32)
        rng = random.Random(seed)
        picked = rng.sample(pool, min(questions, len(pool)))
        now = self.now()
        session = QuizSession(
            id=self._new_id(),
            guild_id=guild_id,
            channel_id=channel_id,
            starter_id=starter_id,
            course_id=course.id,
            seconds=seconds,
            questions=self._build(picked, rng),
            created_at=now,
            updated_at=now,
            kind="channel",
            allow_change=self.allow_change if allow_change is None else allow_change,
            idle_limit=self.idle_limit if idle_limit is None else max(1, idle_limit),
            difficulty=difficulty,
            tags=wanted,
            seed=seed,
        )
        self._sessions[session.id] = session
        return session

    def start_review(
        self,
        *,
        guild_id: int | None,
        channel_id: int,
        student_id: int,
        question_ids: Sequence[str],
        limit: int = MAX_QUESTIONS,
        seconds: int | None = None,
    ) -> QuizSession:
        """A personal review quiz from the student's due question ids (in the order given, at most ``limit``).

        Ids no longer in the course are skipped. Only the student can answer it.
        """
        seconds = self.default_seconds if seconds is None else seconds
        self._check_options(1, seconds, None)
        if self.review_of(student_id) is not None:
            raise AlreadyRunning("You already have a review quiz running. Finish it first.")
        course = self._require_course()
        by_id = {q.id: q for q in course.quizzes}
        picked, seen = [], set()
        for qid in question_ids:
            if qid in by_id and qid not in seen:
                picked.append(by_id[qid])
                seen.add(qid)
        picked = picked[: max(MIN_QUESTIONS, min(limit, MAX_QUESTIONS))]
        if not picked:
            raise NoQuestions("Nothing is due for review right now. Questions you miss come back on a schedule.")
        seed = self._rng.getrandbits(32)
        now = self.now()
        session = QuizSession(
            id=self._new_id(),
            guild_id=guild_id,
            channel_id=channel_id,
            starter_id=student_id,
            course_id=course.id,
            seconds=seconds,
            questions=self._build(picked, random.Random(seed)),
            created_at=now,
            updated_at=now,
            kind="review",
            allow_change=self.allow_change,
            idle_limit=max(1, self.idle_limit),
            seed=seed,
        )
        self._sessions[session.id] = session
        return session

    def _open(self, session_id: str) -> QuizSession:
        session = self.get(session_id)
        if not session.is_open:
            raise QuizEnded()
        return session

    def view(self, session_id: str, position: int | None = None) -> QuestionView:
        """The view of an opened question (default: the current one)."""
        session = self.get(session_id)
        pos = session.current if position is None else position
        if not 0 <= pos < session.total or session.questions[pos].opened_at is None:
            raise QuizError("That question has not been asked yet.")
        q = session.questions[pos]
        assert q.opened_at is not None and q.deadline is not None
        return QuestionView(
            session_id=session.id, position=pos, number=pos + 1, total=session.total,
            text=q.question.question, choices=q.choices, opened_at=q.opened_at, deadline=q.deadline,
            seconds=session.seconds, difficulty=q.question.difficulty, topic=q.topic,
        )

    def open_next(self, session_id: str) -> QuestionView | None:
        """Open the next question (its deadline starts now). None when every question was asked:
        the session is then finished."""
        session = self._open(session_id)
        cur = session.current_question
        if cur is not None and cur.is_open:
            raise QuizError(f"Question {cur.position + 1} is still open.")
        now = self.now()
        session.updated_at = now
        if not session.has_more:
            self._end(session, "finished", "completed", now)
            return None
        session.current += 1
        q = session.questions[session.current]
        q.opened_at = now
        q.deadline = now + timedelta(seconds=session.seconds)
        return self.view(session_id)

    def check_answer(
        self, session_id: str, position: int, letter: str, user_id: int, display_name: str
    ) -> AnswerOutcome:
        """Grade a click without changing anything; ``apply`` it once it is stored.

        Raises NoSuchSession, QuizEnded, QuestionClosed or NotAllowed with a message for the student.
        """
        session = self.get(session_id)
        if not session.is_open:
            raise QuizEnded()
        if session.kind == "review" and user_id != session.starter_id:
            raise NotAllowed("This is someone else's review quiz; only they can answer it.")
        if not 0 <= position < session.total:
            raise NotAllowed("That question is not part of this quiz.")
        q = session.questions[position]
        now = self.now()
        if position < session.current or q.closed_at is not None:
            raise QuestionClosed()
        if position > session.current or q.opened_at is None or q.deadline is None:
            raise NotAllowed("That question has not been asked yet.")
        if now >= q.deadline:
            raise QuestionClosed()
        if letter not in LETTERS[: len(q.order)]:
            raise NotAllowed(f"There is no choice {letter} for this question.")
        existing = q.answers.get(user_id)
        choice = q.choice_of(letter)
        correct = choice == q.question.answer_index
        common = dict(
            session_id=session.id, position=position, question_id=q.question.id, topic=q.topic,
            user_id=user_id, display_name=(display_name or str(user_id))[:100],
        )
        if existing is not None and existing.letter == letter:
            return AnswerOutcome(
                **common, letter=letter, choice=existing.choice, correct=existing.correct,
                points=existing.points, answered_at=existing.answered_at, elapsed=existing.elapsed,
                kind="unchanged", previous_letter=letter, changes=existing.changes,
            )
        if existing is not None and not session.allow_change:
            raise NotAllowed(f"You already answered {existing.letter}; answers can't be changed in this quiz.")
        return AnswerOutcome(
            **common, letter=letter, choice=choice, correct=correct,
            points=score_answer(correct, now, q.opened_at, q.deadline), answered_at=now,
            elapsed=round((now - q.opened_at).total_seconds(), 3),
            kind="changed" if existing is not None else "recorded",
            previous_letter=existing.letter if existing is not None else None,
            changes=(existing.changes + 1) if existing is not None else 0,
        )

    def apply(self, outcome: AnswerOutcome) -> None:
        """Make a graded (and stored) answer the student's current answer."""
        if outcome.kind == "unchanged":
            return
        q = self.get(outcome.session_id).questions[outcome.position]
        q.answers[outcome.user_id] = Answer(
            user_id=outcome.user_id, display_name=outcome.display_name, letter=outcome.letter,
            choice=outcome.choice, correct=outcome.correct, points=outcome.points,
            answered_at=outcome.answered_at, elapsed=outcome.elapsed, changes=outcome.changes,
        )

    def answer(self, session_id: str, position: int, letter: str, user_id: int, display_name: str) -> AnswerOutcome:
        """check_answer + apply, for callers that store nothing."""
        outcome = self.check_answer(session_id, position, letter, user_id, display_name)
        self.apply(outcome)
        return outcome

    def close(self, session_id: str) -> SessionQuestion | None:
        """Close the current question (at its deadline). Counts idle questions; a quiz with no answers
        for ``idle_limit`` questions in a row stops (reason "idle"). Idempotent."""
        session = self.get(session_id)
        q = session.current_question
        if q is None or not q.is_open:
            return q
        now = self.now()
        q.closed_at = now
        session.updated_at = now
        if session.is_open:
            session.idle_streak = 0 if q.answers else session.idle_streak + 1
            if session.idle_streak >= session.idle_limit:
                self._end(session, "stopped", "idle", now)
        return q

    def reveal(self, session_id: str, position: int | None = None) -> Reveal:
        """The reveal of a closed question (default: the current one, closing it if still open)."""
        session = self.get(session_id)
        pos = session.current if position is None else position
        if not 0 <= pos < session.total:
            raise QuizError("No question has been asked yet.")
        q = session.questions[pos]
        if q.opened_at is None:
            raise QuizError("That question has not been asked yet.")
        if q.is_open:
            if pos != session.current:
                raise QuizError("That question is still open.")
            self.close(session_id)
        return reveal_of(session, q)

    def stop(self, session_id: str, user_id: int, *, can_moderate: bool = False) -> QuizSession:
        """Stop a quiz. Allowed for its starter and for members the caller says may moderate."""
        session = self.get(session_id)
        if not session.is_open:
            raise QuizEnded()
        if user_id != session.starter_id and not can_moderate:
            raise NotAllowed("Only the person who started this quiz or a moderator can stop it.")
        now = self.now()
        q = session.current_question
        if q is not None and q.is_open:
            q.closed_at = now
        self._end(session, "stopped", "stopped", now)
        return session

    def finish(self, session_id: str) -> QuizSession:
        """End a quiz normally (closing an open question). Idempotent on ended quizzes."""
        session = self.get(session_id)
        if session.is_open:
            now = self.now()
            q = session.current_question
            if q is not None and q.is_open:
                q.closed_at = now
            self._end(session, "finished", "completed", now)
        return session

    def expire(self, session_id: str, reason: str = "restart") -> QuizSession:
        session = self.get(session_id)
        if session.is_open:
            now = self.now()
            q = session.current_question
            if q is not None and q.is_open:
                q.closed_at = now
            self._end(session, "expired", reason, now)
        return session

    def _end(self, session: QuizSession, status: SessionStatus, reason: str, now: datetime) -> None:
        session.status = status
        session.end_reason = reason
        session.ended_at = now
        session.updated_at = now

    def results(self, session_id: str) -> Results:
        return compute_results(self.get(session_id))

    # -- flashcards --

    def draw_card(self, tag: str | None = None) -> Flashcard:
        """A random flashcard (by tag if given), avoiding the card drawn just before."""
        course = self._require_course()
        cards = list(course.flashcards)
        if tag:
            t = tag.strip().lower()
            cards = [c for c in cards if t in {x.strip().lower() for x in c.tags}]
        if not cards:
            raise NoQuestions(f"No flashcards{f' tagged {tag!r}' if tag else ''} in this course.")
        pool = [c for c in cards if c.id != self._last_card] or cards
        card = self._rng.choice(pool)
        self._last_card = card.id
        return card

    def flip(self, card_id: str) -> Flashcard:
        """The card with this id (its ``back`` is the answer side)."""
        course = self._require_course()
        for c in course.flashcards:
            if c.id == card_id:
                return c
        raise NoQuestions("That flashcard is no longer in the course.")


# --- question bank lint ------------------------------------------------------------------------

_POSITIONAL_CHOICE_RE = re.compile(
    r"\b(all|none|both|neither) of (the )?(above|these|them)\b|\b(answers?|options?|choices?) [A-F]\b|^[A-F] and [A-F]$",
    re.IGNORECASE,
)


@dataclass
class BankReport:
    """The lint of a course's question bank. ``errors`` make the bank unusable; warnings do not."""

    course_dir: Path
    questions: int = 0
    files: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    question_list: list[QuizQuestion] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict:
        return {"questions": self.questions, "errors": list(self.errors), "warnings": list(self.warnings)}


def quiz_files(course_dir: Path) -> list[Path]:
    return course_files(course_dir / "quizzes", YAML_SUFFIXES)


def _entries_one_by_one(path: Path, rel: str, problems: list[str]) -> list[QuizQuestion]:
    """When the loader refuses a whole file for one malformed entry (e.g. a bare string in the list),
    validate the entries one by one with the same schema, so each bad entry is named."""
    text = read_text_file(path, rel, [])
    try:
        data = yaml.safe_load(text) if text is not None else None
    except yaml.YAMLError:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list) or not data["questions"]:
        return []
    problems[:] = [p for p in problems if not p.startswith(f"{rel}: expected a mapping")]
    extra = sorted(str(k) for k in data if k != "questions")
    if extra:
        problems.append(f"{rel}: unexpected top-level key(s) {extra}; only 'questions:' is allowed")
    out = []
    for n, item in enumerate(data["questions"], 1):
        if not isinstance(item, dict):
            problems.append(
                f"{rel}: entry {n}: expected a mapping with id, question, choices, answer, explanation "
                f"(got {type(item).__name__})"
            )
            continue
        label = f"entry {n}" + (f" (id {item['id']})" if item.get("id") else "")
        try:
            out.append(QuizQuestion.model_validate(item))
        except ValidationError as exc:
            problems.append(f"{rel}: {label}: {format_validation_error(exc)}")
    return out


def lint_quiz_bank(course_dir: Path | str) -> BankReport:
    """Check every question file of a course, file by file and entry by entry.

    Works even when the course as a whole would be refused: each file goes through the same loader
    as ``load_course`` (``knowledge.course.load_quiz_file``), then the checks the schema cannot make
    (Discord limits, duplicate ids across files, choices that shuffling breaks).
    """
    root = Path(course_dir).expanduser()
    report = BankReport(course_dir=root)
    if not root.is_dir():
        report.errors.append(f"{root}: no such course folder")
        return report
    root = root.resolve()
    files = quiz_files(root)
    report.files = len(files)
    if not files:
        report.errors.append("quizzes/: no question files (quizzes/*.yaml)")
    seen_ids: dict[str, str] = {}
    seen_text: dict[str, tuple[str, str]] = {}
    for path in files:
        rel = path.relative_to(root).as_posix()
        problems: list[str] = []
        questions = load_quiz_file(root, path, problems)
        if not questions and any(p.startswith(f"{rel}: expected a mapping") for p in problems):
            questions = _entries_one_by_one(path, rel, problems)
        report.errors.extend(problems)
        for q in questions:
            where = f"{rel}: question {q.id}"
            if q.id in seen_ids:
                report.errors.append(f"{where}: duplicate question id (also in {seen_ids[q.id]})")
                continue
            seen_ids[q.id] = rel
            report.question_list.append(q)
            for i, choice in enumerate(q.choices):
                if len(choice) > BUTTON_LABEL_MAX:
                    report.errors.append(
                        f"{where}: choice {i + 1} is {len(choice)} characters; a Discord button label "
                        f"holds {BUTTON_LABEL_MAX}"
                    )
                if _POSITIONAL_CHOICE_RE.search(choice):
                    report.warnings.append(
                        f"{where}: choice {choice!r} depends on the order of the choices, which are shuffled"
                    )
            body = len(q.question) + sum(len(c) + 6 for c in q.choices)
            if body > EMBED_DESCRIPTION_MAX:
                report.errors.append(
                    f"{where}: question and choices are {body} characters; an embed holds {EMBED_DESCRIPTION_MAX}"
                )
            elif len(q.question) > EMBED_TITLE_MAX:
                report.warnings.append(
                    f"{where}: question is {len(q.question)} characters, longer than an embed title "
                    f"({EMBED_TITLE_MAX}); it will be shown in the description"
                )
            reveal_len = len(q.explanation) + sum(len(m) + 4 for m in q.common_mistakes)
            if reveal_len > EMBED_DESCRIPTION_MAX:
                report.errors.append(
                    f"{where}: explanation and common mistakes are {reveal_len} characters; "
                    f"an embed holds {EMBED_DESCRIPTION_MAX}"
                )
            elif len(q.explanation) > EMBED_FIELD_MAX:
                report.warnings.append(
                    f"{where}: explanation is {len(q.explanation)} characters (over {EMBED_FIELD_MAX}); "
                    "it will be shortened in the reveal"
                )
            if not q.tags:
                report.warnings.append(f"{where}: no tags, so it counts under topic '{DEFAULT_TOPIC}' in stats")
            key = " ".join(q.question.casefold().split())
            if key in seen_text:
                other_rel, other_id = seen_text[key]
                report.warnings.append(f"{where}: same question text as {other_id} in {other_rel}")
            else:
                seen_text[key] = (rel, q.id)
    report.questions = len(report.question_list)
    if files and 0 < report.questions < DEFAULT_QUESTIONS:
        report.warnings.append(
            f"only {report.questions} valid question(s); a default quiz asks {DEFAULT_QUESTIONS}"
        )
    try:
        load_course(root)
    except CourseError as exc:
        for p in exc.problems:
            if not p.startswith("quizzes/"):
                report.warnings.append(f"course: {p}")
    return report

