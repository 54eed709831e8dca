"""Every table, imported in one place so ``Base.metadata`` is complete (Alembic's target)."""

from knowledge.store.base import Base
from knowledge.store.qa_models import AnswerLog, Feedback, GuildSettings
from knowledge.store.quiz_models import (
    QuizAnswer,
    QuizScore,
    QuizSessionQuestion,
    QuizSessionRow,
    ReviewItem,
    Student,
)

__all__ = ["AnswerLog", "Base", "Feedback", "GuildSettings"]
__all__ += ["QuizAnswer", "QuizScore", "QuizSessionQuestion", "QuizSessionRow", "ReviewItem", "Student"]
