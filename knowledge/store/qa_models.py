"""Tables for answered questions, students' feedback on them, and per-guild settings."""

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
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from knowledge.store.base import Base, BigId, utcnow


class AnswerLog(Base):
    """One question the tutor answered (or declined), with what it said and where it looked."""

    __tablename__ = "answer_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    channel_id: Mapped[int | None] = mapped_column(BigInteger)
    user_id: Mapped[int | None] = mapped_column(BigInteger)
    course_id: Mapped[str] = mapped_column(String(64))
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    answered: Mapped[bool] = mapped_column(Boolean)
    confidence: Mapped[float] = mapped_column(Float)
    mode: Mapped[str] = mapped_column(String(16))
    model_version: Mapped[str | None] = mapped_column(String(128))
    sources: Mapped[list] = mapped_column(JSON, default=list)
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_answer_log_created_at", "created_at"),)


class Feedback(Base):
    """A student's vote on an answer; maintainers approve or correct it for fine-tuning."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    answer_id: Mapped[int] = mapped_column(ForeignKey("answer_log.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(BigInteger)
    vote: Mapped[int] = mapped_column(Integer)  # +1 helpful, -1 not helpful
    comment: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|approved|corrected|rejected
    corrected_answer: Mapped[str | None] = mapped_column(Text)
    reviewed_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        UniqueConstraint("answer_id", "user_id", name="uq_feedback_answer_user"),
        Index("ix_feedback_status", "status"),
    )


class GuildSettings(Base):
    """Per-guild configuration set with /tutor config."""

    __tablename__ = "guild_settings"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    answer_channels: Mapped[list] = mapped_column(JSON, default=list)  # empty: every channel
    answer_on_mention: Mapped[bool] = mapped_column(Boolean, default=True)
    quiz_questions: Mapped[int | None] = mapped_column(Integer)
    quiz_seconds: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
