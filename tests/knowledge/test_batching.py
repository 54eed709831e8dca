"""BatchingGenerator: concurrent callers are answered in batches by one worker thread.

``EchoGenerator`` stands in for the answer model so the batching logic can be checked without
the model's timing: it answers each request deterministically from its question, records every
batch it was given, and can be told to be slow or to fail.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from knowledge.batching import BatchingGenerator
from knowledge.generation import GenerationError, GenerationRequest, Generator, Passage

PASSAGE = Passage(title="Lesson", section="Intro", text="Pre-training learns general knowledge.")


def req(question: str) -> GenerationRequest:
    return GenerationRequest(question=question, passages=(PASSAGE,), max_new_tokens=16)


class EchoGenerator:
    """Deterministic stand-in for the model: answer = 'A:' + question; records the batches."""

    def __init__(self, delay_s: float = 0.0, fail_on: str | None = None) -> None:
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return "echo"

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        with self._lock:
            self.batches.append([r.question for r in requests])
            self.threads.add(threading.current_thread().name)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and any(r.question == self.fail_on for r in requests):
            raise ValueError(f"cannot answer {self.fail_on!r}")
        return [f"A:{r.question}" for r in requests]


@pytest.fixture
def echo() -> EchoGenerator:
    return EchoGenerator(delay_s=0.05)


def test_is_a_generator_and_keeps_the_inner_name(echo):
    with BatchingGenerator(echo) as gen:
        assert isinstance(gen, Generator)
        assert gen.name == "echo"
        assert gen.generate([]) == []


def test_concurrent_callers_get_their_own_answers(echo):
    questions = [f"q{i}" for i in range(24)]
    with BatchingGenerator(echo, max_batch=8, max_wait_s=0.02) as gen, ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda q: gen.generate([req(q)]), questions))
    assert answers == [[f"A:{q}"] for q in questions]
    # the inner generator is only ever called from the one worker thread
    assert echo.threads == {"tutorbot-generation-batcher"}


def test_waiting_requests_are_batched(echo):
    start = threading.Barrier(16)

    def ask(q: str) -> list[str]:
        start.wait()
        return gen.generate([req(q)])

    with BatchingGenerator(echo, max_batch=8, max_wait_s=0.05) as gen, ThreadPoolExecutor(16) as pool:
        list(pool.map(ask, [f"q{i}" for i in range(16)]))
    sizes = [len(b) for b in echo.batches]
    assert sum(sizes) == 16
    assert max(sizes) <= 8
    assert len(echo.batches) <= 4, sizes  # 16 simultaneous callers: a few batches, not 16 calls
    assert gen.stats.batches == len(echo.batches) and gen.stats.requests == 16


def test_one_call_with_several_requests_keeps_their_order(echo):
    with BatchingGenerator(echo, max_batch=3) as gen:
        questions = [f"q{i}" for i in range(7)]
        assert gen.generate([req(q) for q in questions]) == [f"A:{q}" for q in questions]
    assert all(len(b) <= 3 for b in echo.batches)


def test_an_error_reaches_every_caller_of_the_batch():
    failing = EchoGenerator(delay_s=0.01, fail_on="bad")
    start = threading.Barrier(4)

    def ask(q: str) -> str:
        start.wait()
        try:
            return gen.generate([req(q)])[0]
        except GenerationError as exc:
            return f"error: {exc}"

    with BatchingGenerator(failing, max_batch=8, max_wait_s=0.2) as gen, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, ["bad", "ok1", "ok2", "ok3"]))
        assert len(failing.batches) == 1  # all four were in the failing batch
        assert all(r.startswith("error:") and "cannot answer 'bad'" in r for r in results)
        # the worker survives a failed batch
        assert gen.generate([req("later")]) == ["A:later"]
    assert gen.stats.failed_batches == 1


def test_timeout_raises_generation_error_and_drops_the_waiting_request():
    slow = EchoGenerator(delay_s=0.5)
    with BatchingGenerator(slow, max_batch=1, max_wait_s=0.0) as gen:
        busy = threading.Thread(target=gen.generate, args=([req("first")],))
        busy.start()
        time.sleep(0.05)  # "first" is now being answered
        t0 = time.monotonic()
        with pytest.raises(GenerationError, match=r"No answer within 0\.1 s"):
            gen.generate([req("second")], timeout=0.1)
        assert time.monotonic() - t0 < 0.4
        busy.join()
        time.sleep(0.1)
    assert slow.batches == [["first"]]  # "second" was dropped, never computed


def test_default_timeout_from_constructor():
    with BatchingGenerator(EchoGenerator(delay_s=0.3), timeout_s=0.05) as gen, pytest.raises(GenerationError):
        gen.generate([req("q")])


def test_close_fails_queued_requests_and_later_calls():
    slow = EchoGenerator(delay_s=0.3)
    gen = BatchingGenerator(slow, max_batch=1, max_wait_s=0.0)
    results: dict[str, object] = {}

    def ask(q: str) -> None:
        try:
            results[q] = gen.generate([req(q)])
        except GenerationError as exc:
            results[q] = exc

    first = threading.Thread(target=ask, args=("first",))
    first.start()
    time.sleep(0.05)
    queued = threading.Thread(target=ask, args=("queued",))
    queued.start()
    time.sleep(0.05)
    gen.close()
    first.join(2)
    queued.join(2)
    assert results["first"] == ["A:first"]  # the batch in progress finishes
    assert isinstance(results["queued"], GenerationError)
    assert gen.closed
    with pytest.raises(GenerationError, match="shut down"):
        gen.generate([req("after")])
    gen.close()  # idempotent


def test_rejects_bad_settings(echo):
    with pytest.raises(ValueError):
        BatchingGenerator(echo, max_batch=0)
    with pytest.raises(ValueError):
        BatchingGenerator(echo, max_wait_s=-1)


def test_close_with_drain_answers_queued_requests_first():
    """A model swap closes the old generator with drain=True: nothing already queued is dropped."""
    slow = EchoGenerator(delay_s=0.2)
    gen = BatchingGenerator(slow, max_batch=1, max_wait_s=0.0)
    results: dict[str, object] = {}

    def ask(q: str) -> None:
        try:
            results[q] = gen.generate([req(q)])
        except GenerationError as exc:
            results[q] = exc

    threads = [threading.Thread(target=ask, args=(q,)) for q in ("first", "second", "third")]
    for t in threads:
        t.start()
        time.sleep(0.03)
    gen.close(timeout=5, drain=True)
    for t in threads:
        t.join(5)
    assert results == {"first": ["A:first"], "second": ["A:second"], "third": ["A:third"]}
    with pytest.raises(GenerationError, match="shut down"):
        gen.generate([req("after")])
