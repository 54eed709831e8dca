"""The packaged MiniLM and the tutor's vector cache (real model)."""

import numpy as np
import pytest

from knowledge.embedder import VectorCache, shared_minilm


class CountingEmbedder:
    """The real MiniLM, counting the texts it is asked to embed (to see what the cache spares it)."""

    def __init__(self, inner):
        self.inner, self.name, self.dim, self.max_tokens = inner, inner.name, inner.dim, inner.max_tokens
        self.embedded: list[str] = []

    def encode(self, texts, **kw):
        self.embedded.extend(texts)
        return self.inner.encode(texts, **kw)

    def count_tokens(self, text):
        return self.inner.count_tokens(text)


@pytest.fixture(scope="module")
def minilm():
    return shared_minilm()


def test_vectors_are_normalised_and_match_meaning(minilm):
    v = minilm.encode(["fine-tuning adapts a pre-trained model", "adapting a pretrained model to a task", "the cat sat"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_cache_embeds_each_text_once_and_returns_the_same_vectors(minilm):
    spy, cache = CountingEmbedder(minilm), VectorCache()
    texts = ["Pre-training learns general patterns.", "LoRA trains a low-rank update.", "Pre-training learns general patterns."]
    first = cache.encode(spy, texts)
    assert spy.embedded == texts[:2]  # the repeated text is embedded once
    assert np.allclose(first, minilm.encode(texts), atol=1e-5)
    again = cache.encode(spy, ["LoRA trains a low-rank update.", "Dropout discourages memorising."])
    assert spy.embedded == [*texts[:2], "Dropout discourages memorising."]
    assert np.array_equal(again[0], first[1])
    assert cache.encode(spy, []).shape == (0, 384)


def test_cache_drops_the_least_recently_used(minilm):
    spy, cache = CountingEmbedder(minilm), VectorCache(max_items=2)
    cache.encode(spy, ["alpha beta", "gamma delta"])
    cache.encode(spy, ["alpha beta"])  # now the most recent
    cache.encode(spy, ["epsilon zeta"])  # evicts "gamma delta"
    assert len(cache) == 2
    spy.embedded.clear()
    cache.encode(spy, ["alpha beta", "gamma delta"])
    assert spy.embedded == ["gamma delta"]


def _ask_while_busy(minilm, requests):
    """Start one thread per request while the model is held busy (its lock taken), wait until all
    are queued, then free the model; returns each thread's vectors or exception."""
    import threading
    import time

    out: list = [None] * len(requests)

    def ask(i):
        try:
            out[i] = minilm.encode(requests[i])
        except Exception as exc:  # the test inspects it
            out[i] = exc

    with minilm._lock:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
        for th in threads:
            th.start()
        deadline = time.monotonic() + 10
        while len(minilm._pending) < len(requests) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(minilm._pending) == len(requests)
    for th in threads:
        th.join(10)
    return out


def test_small_requests_waiting_for_the_model_are_embedded_in_one_batch(minilm, monkeypatch):
    requests = [["what is fine-tuning?"], ["what is LoRA?", "why freeze layers?"], ["dropout"], ["lr?"], ["early stopping"]]
    alone = [minilm.encode(r) for r in requests]
    calls = []
    real = minilm._model.encode
    monkeypatch.setattr(minilm._model, "encode", lambda texts, **kw: calls.append(list(texts)) or real(texts, **kw))
    got = _ask_while_busy(minilm, requests)
    assert len(calls) == 1 and sorted(calls[0]) == sorted(t for r in requests for t in r)  # one batch for all
    for vecs, ref in zip(got, alone, strict=True):
        assert vecs.shape == ref.shape and np.allclose(vecs, ref, atol=1e-5)  # each gets its own vectors


def test_requests_past_the_batch_limit_wait_for_the_next_round(minilm, monkeypatch):
    from knowledge.embedder import COMBINED_BATCH, SMALL_BATCH

    requests = [[f"question {i} part {j}" for j in range(SMALL_BATCH)] for i in range(4)]  # 64 texts
    alone = [minilm.encode(r) for r in requests]
    calls = []
    real = minilm._model.encode
    monkeypatch.setattr(minilm._model, "encode", lambda texts, **kw: calls.append(len(texts)) or real(texts, **kw))
    got = _ask_while_busy(minilm, requests)
    assert calls and max(calls) <= COMBINED_BATCH and sum(calls) == 4 * SMALL_BATCH
    for vecs, ref in zip(got, alone, strict=True):  # nobody left without vectors
        assert isinstance(vecs, np.ndarray) and vecs.shape == ref.shape and np.allclose(vecs, ref, atol=1e-5)


def test_a_failing_combined_batch_fails_every_request_in_it(minilm, monkeypatch):
    def broken(texts, **kw):
        raise RuntimeError("model fell over")

    monkeypatch.setattr(minilm._model, "encode", broken)
    got = _ask_while_busy(minilm, [["a question"], ["another question"], ["a third"]])
    assert all(isinstance(r, RuntimeError) and "fell over" in str(r) for r in got)
    assert not minilm._pending  # nothing left behind for the next caller
    monkeypatch.undo()
    assert minilm.encode(["still works"]).shape == (1, 384)
