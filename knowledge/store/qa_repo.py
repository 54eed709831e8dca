"""Repository for answered questions, students' votes on them, and per-guild settings.

All the SQL of the bot's Q&A features lives here (cogs call these methods, never the session).
Works on SQLite and PostgreSQL alike. Failures to reach the database (connection refused,
file missing, server gone) are raised as ``knowledge.store.db.DatabaseError`` so callers can
answer "the database is unavailable" without knowing SQLAlchemy; integrity errors and bugs
propagate unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from knowledge.store.db import DatabaseError, guarded
from knowledge.store.qa_models import AnswerLog, Feedback, GuildSettings
from knowledge.tutor import Answer, Turn

FeedbackStatus = Literal["pending", "approved", "corrected", "rejected"]
EXCERPT_CHARS = 500


class AnswerNotFound(LookupError):
    """No answer with this id (never logged, or deleted)."""


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class GuildConfig:
    """A guild's settings, with the deployment's defaults where the guild has set nothing."""

    guild_id: int
    answer_channels: tuple[int, ...] = ()  # empty: every channel
    answer_on_mention: bool = True
    quiz_questions: int | None = None
    quiz_seconds: int | None = None
    stored: bool = field(default=False, compare=False)  # whether a row exists

    def allows_channel(self, channel_id: int | None) -> bool:
        return not self.answer_channels or channel_id in self.answer_channels


@dataclass(frozen=True)
class LatencyStats:
    count: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True)
class VoteCounts:
    up: int
    down: int


def _percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


class QARepository:
    def __init__(self, session_factory: async_sessionmaker[AsyncSession]) -> None:
        self._session = guarded(session_factory)

    async def ping(self) -> None:
        """Raises DatabaseError if the database cannot be queried."""
        async with self._session() as s:
            await s.execute(text("SELECT 1"))

    # ------------------------------------------------------------------ answers
    async def log_answer(
        self,
        answer: Answer,
        *,
        course_id: str,
        guild_id: int | None,
        channel_id: int | None,
        user_id: int | None,
        latency_ms: float | None = None,
    ) -> int:
        """Store a question and the tutor's answer with its sources; returns the answer id."""
        row = AnswerLog(
            guild_id=guild_id,
            channel_id=channel_id,
            user_id=user_id,
            course_id=course_id,
            question=answer.question,
            answer=answer.text,
            answered=answer.answered,
            confidence=float(answer.confidence),
            mode=answer.mode,
            model_version=answer.model,
            sources=[
                {
                    "source": s.source,
                    "title": s.title,
                    "section": s.section,
                    "score": float(s.score),
                    "excerpt": s.excerpt[:EXCERPT_CHARS],
                }
                for s in answer.sources
            ],
            latency_ms=float(answer.latency_ms if latency_ms is None else latency_ms),
        )
        async with self._session() as s:
            s.add(row)
            await s.commit()
        return row.id

    async def get_answer(self, answer_id: int) -> AnswerLog | None:
        async with self._session() as s:
            return await s.get(AnswerLog, answer_id)

    async def recent_answers(self, *, limit: int = 50, guild_id: int | None = None) -> list[AnswerLog]:
        stmt = select(AnswerLog).order_by(AnswerLog.id.desc()).limit(limit)
        if guild_id is not None:
            stmt = stmt.where(AnswerLog.guild_id == guild_id)
        async with self._session() as s:
            return list((await s.scalars(stmt)).all())

    async def recent_turns(
        self, *, user_id: int, channel_id: int | None, since: datetime, limit: int = 3
    ) -> list[Turn]:
        """The student's last ``limit`` exchanges in this channel since ``since``, oldest first, as
        conversation turns (a follow-up like "and why?" is then understood in context)."""
        stmt = (
            select(AnswerLog.question, AnswerLog.answer)
            .where(AnswerLog.user_id == user_id, AnswerLog.created_at >= since)
            .order_by(AnswerLog.id.desc())
            .limit(limit)
        )
        stmt = stmt.where(
            AnswerLog.channel_id.is_(None) if channel_id is None else AnswerLog.channel_id == channel_id
        )
        async with self._session() as s:
            rows = (await s.execute(stmt)).all()
        turns: list[Turn] = []
        for question, answer in reversed(rows):
            turns += [Turn("user", question), Turn("assistant", answer)]
        return turns

    async def count_answers(self) -> int:
        async with self._session() as s:
            return int(await s.scalar(select(func.count()).select_from(AnswerLog)) or 0)

    async def latency_stats(self, *, last: int = 1000) -> LatencyStats:
        """Percentiles of the latency of the ``last`` answers."""
        sub = select(AnswerLog.latency_ms).order_by(AnswerLog.id.desc()).limit(last).subquery()
        async with self._session() as s:
            values = sorted(float(v) for v in (await s.scalars(select(sub.c.latency_ms))).all())
        return LatencyStats(
            len(values), _percentile(values, 50), _percentile(values, 90), _percentile(values, 99)
        )

    # ------------------------------------------------------------------ feedback
    async def record_vote(self, answer_id: int, user_id: int, vote: int) -> Feedback:
        """A student's vote (+1 helpful, -1 not): one per student and answer; voting again changes it.

        Changing the vote resets the review status, since a maintainer reviewed the old one.
        """
        if vote not in (1, -1):
            raise ValueError("vote must be +1 or -1")
        async with self._session() as s:
            if await s.get(AnswerLog, answer_id) is None:
                raise AnswerNotFound(answer_id)
            fb = await self._feedback(s, answer_id, user_id)
            if fb is None:
                fb = Feedback(answer_id=answer_id, user_id=user_id, vote=vote, status="pending")
                s.add(fb)
                try:
                    await s.commit()
                except sa_exc.IntegrityError:  # a concurrent first vote by the same student
                    await s.rollback()
                    fb = await self._feedback(s, answer_id, user_id)
                    if fb is None:
                        raise
                else:
                    return fb
            if fb.vote != vote:
                fb.vote = vote
                fb.status = "pending"
                fb.comment = None
            await s.commit()
            return fb

    @staticmethod
    async def _feedback(s: AsyncSession, answer_id: int, user_id: int) -> Feedback | None:
        return await s.scalar(
            select(Feedback).where(Feedback.answer_id == answer_id, Feedback.user_id == user_id)
        )

    async def add_comment(self, answer_id: int, user_id: int, comment: str, *, vote: int = -1) -> Feedback:
        """Attach "what was wrong?" to the student's vote (creating the vote if it is missing)."""
        comment = comment.strip()[:2000]
        async with self._session() as s:
            fb = await self._feedback(s, answer_id, user_id)
            if fb is None:
                if await s.get(AnswerLog, answer_id) is None:
                    raise AnswerNotFound(answer_id)
                fb = Feedback(answer_id=answer_id, user_id=user_id, vote=vote, status="pending")
                s.add(fb)
            fb.comment = comment or None
            await s.commit()
            return fb

    async def votes(self, answer_id: int) -> VoteCounts:
        async with self._session() as s:
            rows = (
                await s.execute(
                    select(Feedback.vote, func.count())
                    .where(Feedback.answer_id == answer_id)
                    .group_by(Feedback.vote)
                )
            ).all()
        counts = {int(v): int(n) for v, n in rows}
        return VoteCounts(counts.get(1, 0), counts.get(-1, 0))

    async def list_feedback(
        self, *, status: FeedbackStatus | None = None, vote: int | None = None, limit: int = 100
    ) -> list[tuple[Feedback, AnswerLog]]:
        """Feedback with its answer, newest first (for review and for fine-tuning data)."""
        stmt = select(Feedback, AnswerLog).join(AnswerLog, Feedback.answer_id == AnswerLog.id)
        if status is not None:
            stmt = stmt.where(Feedback.status == status)
        if vote is not None:
            stmt = stmt.where(Feedback.vote == vote)
        stmt = stmt.order_by(Feedback.id.desc()).limit(limit)
        async with self._session() as s:
            return [(fb, a) for fb, a in (await s.execute(stmt)).all()]

    async def review_feedback(
        self,
        feedback_id: int,
        *,
        status: FeedbackStatus,
        reviewed_by: str,
        corrected_answer: str | None = None,
    ) -> Feedback:
        if status == "corrected" and not (corrected_answer and corrected_answer.strip()):
            raise ValueError("a correction needs the corrected answer")
        async with self._session() as s:
            fb = await s.get(Feedback, feedback_id)
            if fb is None:
                raise LookupError(f"no feedback {feedback_id}")
            fb.status = status
            fb.reviewed_by = reviewed_by
            fb.corrected_answer = corrected_answer if status == "corrected" else None
            await s.commit()
            return fb

    # ------------------------------------------------------------------ guild settings
    async def get_guild_config(self, guild_id: int, *, default_answer_on_mention: bool = True) -> GuildConfig:
        async with self._session() as s:
            row = await s.get(GuildSettings, guild_id)
        if row is None:
            return GuildConfig(guild_id, answer_on_mention=default_answer_on_mention)
        return self._config(row)

    @staticmethod
    def _config(row: GuildSettings) -> GuildConfig:
        return GuildConfig(
            guild_id=row.guild_id,
            answer_channels=tuple(int(c) for c in (row.answer_channels or [])),
            answer_on_mention=bool(row.answer_on_mention),
            quiz_questions=row.quiz_questions,
            quiz_seconds=row.quiz_seconds,
            stored=True,
        )

    async def update_guild_config(
        self,
        guild_id: int,
        *,
        answer_on_mention: bool = UNSET,
        answer_channels: Sequence[int] = UNSET,
        add_channels: Sequence[int] = (),
        remove_channels: Sequence[int] = (),
        quiz_questions: int | None = UNSET,
        quiz_seconds: int | None = UNSET,
        default_answer_on_mention: bool = True,
    ) -> GuildConfig:
        """Change some of a guild's settings (UNSET leaves one as it is); returns the new settings."""
        for _attempt in range(2):
            async with self._session() as s:
                row = await s.get(GuildSettings, guild_id)
                created = row is None
                if row is None:
                    row = GuildSettings(
                        guild_id=guild_id, answer_channels=[], answer_on_mention=default_answer_on_mention
                    )
                    s.add(row)
                if answer_on_mention is not UNSET:
                    row.answer_on_mention = bool(answer_on_mention)
                channels = (
                    list(row.answer_channels or [])
                    if answer_channels is UNSET
                    else [int(c) for c in answer_channels]
                )
                for c in add_channels:
                    if int(c) not in channels:
                        channels.append(int(c))
                channels = [c for c in channels if c not in {int(r) for r in remove_channels}]
                row.answer_channels = channels  # a new list, so the JSON change is detected
                if quiz_questions is not UNSET:
                    row.quiz_questions = quiz_questions
                if quiz_seconds is not UNSET:
                    row.quiz_seconds = quiz_seconds
                try:
                    await s.commit()
                except sa_exc.IntegrityError:
                    if not created:
                        raise
                    continue  # another process created the row first: apply the change to theirs
                return self._config(row)
        raise DatabaseError(f"could not save settings of guild {guild_id}")
