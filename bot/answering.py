"""Runs the tutor off the event loop under a cap on concurrent generations, with a queue beyond it.

``Tutor.answer`` is synchronous and takes 1-3 s; it runs on a dedicated thread pool sized to
``max_concurrent`` (not the shared default executor, so a reindex or other ``to_thread`` work never
starves answers, and the cap is exact). Extra questions wait on a semaphore in arrival order.

``job()`` brackets everything a question does (answer, store, reply) so that shutdown can stop
taking questions (``close``) and wait for those in flight (``drain``) before disconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from knowledge.tutor import Answer, Turn

AnswerFn = Callable[..., Answer]  # (question, *, history=()) -> Answer


class ShuttingDown(RuntimeError):
    """The bot is shutting down and takes no new questions."""


@dataclass(frozen=True)
class TimedAnswer:
    answer: Answer
    latency_ms: float  # from the question arriving here to the answer being ready (queue included)
    queued_ms: float  # of which waiting for a free generation slot


class AnswerRunner:
    def __init__(
        self, answer_fn: AnswerFn, *, max_concurrent: int, clock: Callable[[], float] = time.perf_counter
    ):
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self._answer_fn = answer_fn
        self.max_concurrent = max_concurrent
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="tutor-answer")
        self._sem = asyncio.Semaphore(max_concurrent)
        self._jobs = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._running = 0
        self._queued = 0
        self._closed = False
        self.recent_latencies_ms: deque[float] = deque(maxlen=1000)

    # --- state
    @property
    def in_flight(self) -> int:
        """Questions being handled (queued, generating or replying)."""
        return self._jobs

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def closed(self) -> bool:
        return self._closed

    # --- work
    @contextlib.asynccontextmanager
    async def job(self) -> AsyncIterator[None]:
        """Bracket one question from start to reply; raises ShuttingDown once ``close`` was called."""
        if self._closed:
            raise ShuttingDown("the tutor is restarting")
        self._jobs += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._jobs -= 1
            if self._jobs == 0:
                self._idle.set()

    async def answer(self, question: str, *, history: Sequence[Turn] = ()) -> TimedAnswer:
        """The tutor's answer, computed on the pool once a generation slot is free."""
        start = self._clock()
        self._queued += 1
        queued = True
        try:
            async with self._sem:
                self._queued -= 1
                queued = False
                waited = self._clock() - start
                self._running += 1
                try:
                    loop = asyncio.get_running_loop()
                    call = functools.partial(self._answer_fn, question, history=tuple(history))
                    ctx = contextvars.copy_context()
                    answer = await loop.run_in_executor(self._executor, ctx.run, call)
                finally:
                    self._running -= 1
        finally:
            if queued:
                self._queued -= 1
        latency = (self._clock() - start) * 1000
        self.recent_latencies_ms.append(latency)
        return TimedAnswer(answer, latency, waited * 1000)

    # --- shutdown
    def close(self) -> None:
        """Take no new questions; those in flight carry on."""
        self._closed = True

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait for the questions in flight; True if they all finished within ``timeout``."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def shutdown_executor(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
