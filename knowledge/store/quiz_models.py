"""Tables for quizzes: students, sessions and their questions, answers, per-guild scores, review items.

The state of a running quiz is stored as it changes (question order, choice permutations, current
question, deadlines), so a restarted bot can resume it or close it with its results. Each answer is a
row, unique per (session, question, student); leaderboard totals live in ``quiz_scores`` and are
updated once, when a session ends.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from knowledge.store.base import Base, BigId, utcnow


class Student(Base):
    """A Discord user who answered a question, with the display name seen at their latest answer."""

    __tablename__ = "students"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)  # Discord user id
    display_name: Mapped[str] = mapped_column(String(100))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class QuizSessionRow(Base):
    """One quiz (kind "channel") or personal review quiz (kind "review")."""

    __tablename__ = "quiz_sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="channel")
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    channel_id: Mapped[int] = mapped_column(BigInteger)
    starter_id: Mapped[int] = mapped_column(BigInteger)
    course_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="open")  # open|finished|stopped|expired
    end_reason: Mapped[str | None] = mapped_column(String(32))
    question_count: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[int] = mapped_column(Integer)
    allow_change: Mapped[bool] = mapped_column(Boolean, default=True)
    idle_limit: Mapped[int] = mapped_column(Integer)
    idle_streak: Mapped[int] = mapped_column(Integer, default=0)
    difficulty: Mapped[str | None] = mapped_column(String(16))
    tags: Mapped[list] = mapped_column(JSON, default=list)
    seed: Mapped[int] = mapped_column(BigInteger, default=0)
    current_index: Mapped[int] = mapped_column(Integer, default=-1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (Index("ix_quiz_sessions_status", "status"),)  # restart recovery: open sessions


class QuizSessionQuestion(Base):
    """A question as asked in a session: a snapshot of it, its choice order and its timings."""

    __tablename__ = "quiz_session_questions"

    session_id: Mapped[str] = mapped_column(
        ForeignKey("quiz_sessions.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    question_id: Mapped[str] = mapped_column(String(64))
    topic: Mapped[str] = mapped_column(String(64))
    difficulty: Mapped[str] = mapped_column(String(16))
    choice_order: Mapped[list] = mapped_column(JSON)  # choice_order[i]: file index of the choice shown as letter i
    snapshot: Mapped[dict] = mapped_column(JSON)  # the QuizQuestion as drawn (course reloads don't change it)
    opened_at: Mapped[datetime | None] = mapped_column()
    deadline: Mapped[datetime | None] = mapped_column()
    closed_at: Mapped[datetime | None] = mapped_column()


class QuizAnswer(Base):
    """A student's answer to one question of one session (the latest click when changes are allowed).

    ``guild_id`` is the guild whose leaderboard the answer counts for: NULL for review quizzes and DMs.
    """

    __tablename__ = "quiz_answers"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("quiz_sessions.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    student_id: Mapped[int] = mapped_column(ForeignKey("students.id", ondelete="CASCADE"))
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    question_id: Mapped[str] = mapped_column(String(64))
    topic: Mapped[str] = mapped_column(String(64))
    letter: Mapped[str] = mapped_column(String(1))
    choice: Mapped[int] = mapped_column(Integer)
    correct: Mapped[bool] = mapped_column(Boolean)
    points: Mapped[int] = mapped_column(Integer)
    elapsed: Mapped[float] = mapped_column(Float)  # seconds from the question opening
    changes: Mapped[int] = mapped_column(Integer, default=0)
    answered_at: Mapped[datetime] = mapped_column()

    __table_args__ = (
        UniqueConstraint("session_id", "position", "student_id", name="uq_quiz_answers_session_position_student"),
        # stats by topic for one student; covering, so the table itself is not read
        Index("ix_quiz_answers_student_topic", "student_id", "topic", "correct"),
        # leaderboards over a period ("this week"): range scan on (guild, time), covering
        Index("ix_quiz_answers_guild_time", "guild_id", "answered_at", "student_id", "points", "correct"),
    )


class QuizScore(Base):
    """A student's running totals in one guild (the leaderboard). Accuracy = correct / answered."""

    __tablename__ = "quiz_scores"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    student_id: Mapped[int] = mapped_column(
        ForeignKey("students.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    total: Mapped[int] = mapped_column(Integer, default=0)
    quizzes: Mapped[int] = mapped_column(Integer, default=0)
    correct: Mapped[int] = mapped_column(Integer, default=0)
    answered: Mapped[int] = mapped_column(Integer, default=0)
    current_streak: Mapped[int] = mapped_column(Integer, default=0)
    best_streak: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_quiz_scores_guild_total", "guild_id", "total"),)  # top N of a guild


class ReviewItem(Base):
    """A question under spaced review for a student (Leitner box 1-5, due at ``due_at``)."""

    __tablename__ = "review_items"

    student_id: Mapped[int] = mapped_column(
        ForeignKey("students.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    course_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    question_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    box: Mapped[int] = mapped_column(Integer, default=1)
    due_at: Mapped[datetime] = mapped_column()
    lapses: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Due items are found through the primary key (student_id, course_id, ...): a student has few
    # items per course, so an extra (student_id, due_at) index measured no faster (docs/BENCHMARKS.md).
