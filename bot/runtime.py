"""Builds and hot-swaps the tutor's parts: course, index, retriever, answer model.

Shared by the terminal tutor, `tutorbot ask` and the Discord bot (its admin commands call
``reindex`` and ``reload_model``). The only place where ``bot`` reaches ``finetune``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bot.config import Settings
from knowledge.course import Course, load_course
from knowledge.embedder import shared_minilm
from knowledge.generation import Generator
from knowledge.index import KnowledgeIndex, build_index, open_index
from knowledge.retriever import Retriever
from knowledge.tutor import Tutor

log = logging.getLogger(__name__)


@dataclass
class RuntimeStatus:
    course_id: str
    course_title: str
    index_chunks: int
    index_type: str
    index_built: str
    model: str
    mode: str
    uptime_s: float
    extra: dict = field(default_factory=dict)


def registry_token(settings: Settings) -> str | None:
    """Identity of the registry's current model (None: no registry or nothing promoted)."""
    try:
        from finetune.registry import Registry

        current = Registry(settings.resolved_models_dir).current_dir()
    except Exception:  # no registry yet, or unreadable: treat as "no promoted model"
        return None
    return str(current.resolve()) if current is not None else None


def current_model_dir(settings: Settings, progress=None) -> Path:
    """The promoted model in the registry, or the converted base model."""
    try:
        from finetune.registry import Registry

        current = Registry(settings.resolved_models_dir).current_dir()
        if current is not None:
            return current
    except ImportError:
        pass
    from finetune.base_model import ensure_base_model

    return ensure_base_model(settings.data_dir, progress=progress)


def load_generator(settings: Settings, progress=None) -> Generator | None:
    """The answer model wrapped in a batching worker; None (extractive answers) if it cannot load.
    In "auto" mode only a promoted (fine-tuned) model answers: the base model's words are too often
    unsupported (docs/BENCHMARKS.md), so fine-tuning has to earn the model its place."""
    if settings.answer_mode == "extractive" or (settings.answer_mode == "auto" and registry_token(settings) is None):
        return None
    try:
        from finetune.generator import HFGenerator
        from knowledge.batching import BatchingGenerator

        model_dir = current_model_dir(settings, progress)
        inner = HFGenerator(model_dir, passage_cache=settings.passage_cache,
                            passage_cache_mb=settings.passage_cache_mb)
        return BatchingGenerator(inner, max_batch=settings.max_concurrent_generations,
                                 timeout_s=settings.generation_timeout_s)
    except Exception as exc:  # one clear line, then extractive answers
        log.error("answer model unavailable, answering extractively: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


class TutorRuntime:
    def __init__(self, settings: Settings, *, progress=None):
        self.settings = settings
        self.progress = progress or (lambda msg: print(msg, file=sys.stderr))
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._course_listeners: list = []
        self.embedder = shared_minilm()
        self.course: Course = load_course(settings.course_dir)
        retriever = Retriever(self._open_index(self.course), self.embedder,
                              dense_weight=settings.dense_weight, bm25_weight=settings.bm25_weight)
        self._model_token = registry_token(settings)
        self.tutor = Tutor(self.course, retriever, load_generator(settings, self.progress),
                           mode="extractive" if settings.answer_mode == "extractive" else "generative",
                           k=settings.retrieval_k,
                           max_question_chars=settings.max_question_chars, max_new_tokens=settings.max_new_tokens)

    def _open_index(self, course: Course) -> KnowledgeIndex:
        return open_index(course, self.settings.resolved_index_dir(course.id), self.embedder,
                          progress=self.progress, show_progress=sys.stderr.isatty())

    def reindex(self) -> KnowledgeIndex:
        """Reload the course folder and rebuild its index; the old one serves until the swap.
        A course that fails validation raises CourseError and changes nothing."""
        with self._lock:
            course = load_course(self.settings.course_dir)
            idx = build_index(course, self.settings.resolved_index_dir(course.id), self.embedder)
            retriever = Retriever(idx, self.embedder, dense_weight=self.settings.dense_weight,
                                  bm25_weight=self.settings.bm25_weight)
            self.tutor.swap(retriever=retriever, course=course)
            self.course = course
            for listener in self._course_listeners:  # e.g. the quiz engine's question bank
                listener(course)
            return idx

    def add_course_listener(self, fn) -> None:
        """Call ``fn(course)`` after every successful reindex (running quizzes keep their questions)."""
        self._course_listeners.append(fn)

    def reload_model(self) -> str:
        """Load the current model (after a promotion or rollback) and swap it in; answers in flight
        finish on the old one. Returns the model's name."""
        with self._lock:
            token = registry_token(self.settings)
            gen = load_generator(self.settings, self.progress)
            if gen is None:
                raise RuntimeError("the answer model could not be loaded; still serving the previous one")
            self._model_token = token
            old = self.tutor.generator
            self.tutor.swap(generator=gen)
            if old is not None and hasattr(old, "close"):
                old.close(drain=True)  # questions already queued on the old model are still answered
            return gen.name

    def reload_if_changed(self) -> str | None:
        """Reload when the registry's current model changed since the last load. Returns the new
        model's name, or None when nothing changed (or answers are extractive by setting)."""
        token = registry_token(self.settings)
        if token == self._model_token or self.settings.answer_mode == "extractive":
            return None
        return self.reload_model()

    def status(self) -> RuntimeStatus:
        m = self.tutor.retriever.index.manifest
        gen = self.tutor.generator
        return RuntimeStatus(
            course_id=self.course.id, course_title=self.course.title, index_chunks=m.chunk_count,
            index_type=m.index_type, index_built=m.created_at,
            model=gen.name if gen is not None else "extractive", mode=self.tutor.mode if gen else "extractive",
            uptime_s=round(time.monotonic() - self.started, 1),
        )

    def close(self) -> None:
        gen = self.tutor.generator
        if gen is not None and hasattr(gen, "close"):
            gen.close()
