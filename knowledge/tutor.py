"""The tutor: question -> retrieved passages -> grounded answer with citations, or an honest decline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class SourceRef:
    """A cited passage: ``source`` is the lesson path relative to the course folder or a FAQ record id."""

    source: str
    title: str
    section: str
    score: float
    excerpt: str

    @property
    def label(self) -> str:
        return f"{self.title} > {self.section}" if self.section else self.title


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "assistant"]
    content: str


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    answered: bool
    confidence: float
    sources: tuple[SourceRef, ...] = ()
    mode: Literal["generative", "extractive", "declined"] = "extractive"
    model: str | None = None
    notices: tuple[str, ...] = field(default=())
    latency_ms: float = 0.0
