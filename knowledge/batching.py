"""Micro-batching in front of a Generator: many threads ask, one worker answers them in batches.

Answering eight questions in one model call costs far less than eight calls (the weights are
read once per decoding step for the whole batch), so when several students ask at once the
bot should batch them. Callers keep the simple ``generate([request])`` interface from any
thread (``asyncio.to_thread`` workers, the CLI); a single worker thread gathers what is waiting
(up to ``max_batch`` requests, waiting at most ``max_wait_s`` after the first one) and calls
``inner.generate(batch)`` once. Each caller gets its own answers back; if the batch fails,
every caller of that batch gets the error. A caller that waits longer than its timeout gets a
``GenerationError`` (and its request is dropped if the worker has not started it yet).

Pure standard library: no torch, no discord.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from knowledge.generation import GenerationError, GenerationRequest, Generator

logger = logging.getLogger(__name__)


@dataclass
class BatchingStats:
    """Counters since start: how many inner calls, how many requests answered, how many failed."""

    batches: int = 0
    requests: int = 0
    failed_batches: int = 0
    largest_batch: int = 0

    @property
    def mean_batch(self) -> float:
        return self.requests / self.batches if self.batches else 0.0


@dataclass(frozen=True)
class _Item:
    request: GenerationRequest
    future: Future[str]
    enqueued: float


class BatchingGenerator:
    """A Generator that funnels concurrent ``generate`` calls into batched calls of ``inner``.

    Args:
        inner: the real generator (e.g. ``finetune.generator.HFGenerator``). It is only ever
            called from the single worker thread, one batch at a time.
        max_batch: largest batch handed to ``inner`` (8 suits the 135M model on 2 CPU cores).
        max_wait_s: how long the worker waits for company after the first request arrives.
            While ``inner`` is busy, new requests queue up anyway, so this only matters when idle.
        timeout_s: default per-call timeout (None: wait forever); ``generate(..., timeout=)`` overrides.
    """

    def __init__(
        self,
        inner: Generator,
        max_batch: int = 8,
        max_wait_s: float = 0.015,
        *,
        timeout_s: float | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must be >= 0")
        self.inner = inner
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s
        self.stats = BatchingStats()
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._drain = False
        self._worker = threading.Thread(target=self._run, name="tutorbot-generation-batcher", daemon=True)
        self._worker.start()

    # --- Generator protocol -----------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.inner.name

    def generate(self, requests: Sequence[GenerationRequest], timeout: float | None = None) -> list[str]:
        """Answer ``requests`` (same order), batched with whatever other threads are asking.

        ``timeout`` (seconds, default: the constructor's ``timeout_s``) bounds the whole call;
        when it passes, ``GenerationError`` is raised and any of these requests not yet started
        are dropped.
        """
        if not requests:
            return []
        timeout = self.timeout_s if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        items = [_Item(r, Future(), time.monotonic()) for r in requests]
        with self._cond:
            if self._closed:
                raise GenerationError("The answer generator is shut down.")
            self._queue.extend(items)
            self._cond.notify()
        answers: list[str] = []
        try:
            for item in items:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                answers.append(item.future.result(timeout=remaining))
        except FutureTimeout:
            for item in items:
                item.future.cancel()  # not started yet: the worker skips it
            raise GenerationError(
                f"No answer within {timeout:g} s (the answer model is busy or slow)."
            ) from None
        except CancelledError:
            raise GenerationError("The answer generator was shut down before answering.") from None
        return answers

    # --- lifecycle ------------------------------------------------------------------------
    def close(self, timeout: float | None = 5.0, *, drain: bool = False) -> None:
        """Stop the worker: the batch in progress finishes; queued requests fail with GenerationError,
        or, with ``drain=True`` (a model swap), are answered first.

        Idempotent. Later ``generate`` calls raise ``GenerationError``.
        """
        with self._cond:
            self._closed = True
            self._drain = drain
            pending = [] if drain else list(self._queue)
            if not drain:
                self._queue.clear()
            self._cond.notify_all()
        for item in pending:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(GenerationError("The answer generator was shut down."))
        if self._worker is not threading.current_thread():
            self._worker.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> BatchingGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- worker ---------------------------------------------------------------------------
    def _take_batch(self) -> list[_Item] | None:
        """Block until there is work; gather up to max_batch live items. None when closed."""
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not (self._drain and self._queue):
                    return None
                first_wait_end = self._queue[0].enqueued + self.max_wait_s
                while len(self._queue) < self.max_batch and not self._closed:
                    remaining = first_wait_end - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._closed and not self._drain:
                    return None
                batch: list[_Item] = []
                while self._queue and len(batch) < self.max_batch:
                    item = self._queue.popleft()
                    # Skip requests whose caller already gave up (timed out).
                    if item.future.set_running_or_notify_cancel():
                        batch.append(item)
                if batch:
                    return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._answer(batch)

    def _answer(self, batch: list[_Item]) -> None:
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        try:
            answers = self.inner.generate([item.request for item in batch])
            if len(answers) != len(batch):
                raise GenerationError(
                    f"{self.inner.name} returned {len(answers)} answers for {len(batch)} questions."
                )
        except Exception as exc:  # every caller of the batch gets the failure
            self.stats.failed_batches += 1
            error = (
                exc
                if isinstance(exc, GenerationError)
                else GenerationError(f"Answer generation failed: {exc}")
            )
            if error is not exc:
                error.__cause__ = exc
            logger.warning("generation batch of %d failed: %s", len(batch), exc)
            for item in batch:
                with contextlib.suppress(Exception):
                    item.future.set_exception(error)
            return
        for item, answer in zip(batch, answers, strict=True):
            item.future.set_result(answer)
