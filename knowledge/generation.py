"""The contract between the tutor and whatever writes answers (base model, fine-tuned model, ...).

The prompt is built here, in one place, so fine-tuning trains on exactly the prompt that
inference uses (``finetune.data`` imports ``build_messages``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# Measured on the base SmolLM2-135M with 8 course questions (benchmarks/bench_generation.py):
# "You are a course tutor" made it answer about "the course tutor"; this wording kept more of
# the answers' words in the passages (69% vs 58%). Longer passages help too: 550 characters
# instead of 700 dropped that share to 43%.
SYSTEM_PROMPT = (
    "Answer the question in two or three sentences, using only the passages below. "
    "If they do not contain the answer, say that the course does not cover it."
)
MAX_PASSAGE_CHARS = 700  # keeps the prompt near 500 tokens with three passages


@dataclass(frozen=True)
class Passage:
    """A retrieved piece of the course, as the answer model sees it."""

    title: str
    section: str
    text: str
    source: str = ""


@dataclass(frozen=True)
class GenerationRequest:
    question: str
    passages: tuple[Passage, ...]
    max_new_tokens: int = 96


def passage_label(i: int) -> str:
    """The number a passage carries in the prompt ("[1]"); answers may cite it."""
    return f"[{i}]"


def passage_body(p: Passage) -> str:
    """A passage as the prompt shows it after its label: " Title > Section\ntext" (long text cut).

    The same passage gives the same body whatever its rank, so the answer model can reuse the work
    it did on it (``finetune.generator``'s passage cache)."""
    where = f"{p.title} > {p.section}" if p.section else p.title
    text = (
        p.text if len(p.text) <= MAX_PASSAGE_CHARS else p.text[:MAX_PASSAGE_CHARS].rsplit(" ", 1)[0] + " ..."
    )
    return f" {where}\n{text}"


PASSAGES_HEADER = "Course passages:\n\n"
PASSAGE_SEPARATOR = "\n\n"


def build_messages(question: str, passages: Sequence[Passage]) -> list[dict[str, str]]:
    """Chat messages for one question: the system rule, then numbered passages and the question."""
    blocks = [passage_label(i) + passage_body(p) for i, p in enumerate(passages, 1)]
    user = PASSAGES_HEADER + PASSAGE_SEPARATOR.join(blocks) + f"{PASSAGE_SEPARATOR}Question: {question}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


class GenerationError(RuntimeError):
    """The generator could not produce an answer (load failure, timeout, runtime error)."""


@runtime_checkable
class Generator(Protocol):
    """Writes answers. Implementations must be safe to call from a worker thread."""

    @property
    def name(self) -> str:
        """Model identity shown to maintainers, e.g. 'base:SmolLM2-135M-Instruct' or 'v3'."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Answer a batch of requests (same order). Raises GenerationError on failure."""
        ...
