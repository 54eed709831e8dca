"""Hybrid retrieval: dense (MiniLM + FAISS) and BM25 candidates, fused by a weighted sum of scores.

Candidates are the union of the top ``candidates`` of each ranking (within the course/section
filter); each gets

    score = w_dense * cosine(query, passage) + w_bm25 * bm25(query, passage) / max bm25 in the filter

On the FAQ benchmark (benchmarks/bench_retrieval.py, docs/BENCHMARKS.md) this beat reciprocal-rank
fusion (hit@5 0.967 / MRR@5 0.922 against 0.962 / 0.903 for the best RRF weights) and was flat
for w_dense between 0.4 and 0.6; on the sample course's question set 0.6-0.8 put the passage holding
the answer first more often than 0.5, so the defaults are 0.6 / 0.4.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import faiss
import numpy as np

from knowledge.chunking import Chunk
from knowledge.embedder import Embedder
from knowledge.index import KnowledgeIndex
from knowledge.text import keyword_tokens

CANDIDATES = 50  # depth of each ranking before fusion


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float  # fused score
    dense_score: float  # cosine similarity of query and passage (-1..1)
    bm25_score: float
    dense_rank: int | None
    bm25_rank: int | None

    @property
    def source(self) -> str:
        return self.chunk.source

    def excerpt(self, limit: int = 300) -> str:
        text = " ".join(self.chunk.text.split())
        return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + "…"


class Retriever:
    def __init__(
        self,
        index: KnowledgeIndex,
        embedder: Embedder,
        *,
        dense_weight: float = 0.6,
        bm25_weight: float = 0.4,
        candidates: int = CANDIDATES,
    ):
        if embedder.name != index.manifest.embedding_model:
            from knowledge.index import IndexMismatchError

            raise IndexMismatchError(
                f"the index was built with {index.manifest.embedding_model} but the embedder is {embedder.name}; "
                "rebuild it with `tutorbot index build`"
            )
        self.index = index
        self.embedder = embedder
        self.dense_weight = dense_weight
        self.bm25_weight = bm25_weight
        self.candidates = candidates
        self._faiss_lock = threading.Lock()

    def _allowed(self, course: str | None, section: str | None) -> np.ndarray | None:
        if course is None and section is None:
            return None
        sec = section.casefold() if section else None
        ids = [
            i for i, c in enumerate(self.index.chunks)
            if (course is None or c.course_id == course)
            and (sec is None or c.section.casefold().startswith(sec) or c.title.casefold() == sec)
        ]
        return np.asarray(ids, dtype=np.int64)

    def encode_query(self, query: str) -> np.ndarray:
        return self.embedder.encode([query])

    def search(
        self,
        query: str,
        k: int = 5,
        *,
        course: str | None = None,
        section: str | None = None,
        query_vector: np.ndarray | None = None,
        dense_weight: float | None = None,
        bm25_weight: float | None = None,
    ) -> list[Hit]:
        n = len(self.index)
        if not query.strip() or n == 0:
            return []
        allowed = self._allowed(course, section)
        if allowed is not None and allowed.size == 0:
            return []
        depth = min(max(self.candidates, k * 4), n if allowed is None else allowed.size)
        wd = self.dense_weight if dense_weight is None else dense_weight
        wb = self.bm25_weight if bm25_weight is None else bm25_weight

        qv = query_vector if query_vector is not None else self.encode_query(query)
        qv = np.ascontiguousarray(qv.reshape(1, -1), dtype=np.float32)
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed)) if allowed is not None else None
        with self._faiss_lock:
            d_scores, d_ids = self.index.dense.search(qv, depth, params=params) if params else self.index.dense.search(qv, depth)
        dense_rank = {int(i): r for r, i in enumerate(d_ids[0]) if i >= 0}
        dense_cos = {int(i): float(s) for s, i in zip(d_scores[0], d_ids[0], strict=True) if i >= 0}

        tokens = keyword_tokens(query)
        bm25_rank: dict[int, int] = {}
        bm25_all = np.zeros(n, dtype=np.float32)
        if tokens:
            bm25_all = np.asarray(self.index.bm25.get_scores(tokens), dtype=np.float32)
            cand = bm25_all if allowed is None else np.full(n, -1.0, dtype=np.float32)
            if allowed is not None:
                cand[allowed] = bm25_all[allowed]
            top = np.argpartition(-cand, min(depth, n - 1))[:depth] if depth < n else np.arange(n)
            top = top[np.argsort(-cand[top], kind="stable")]
            bm25_rank = {int(i): r for r, i in enumerate(top) if cand[i] > 0}

        cands = set(dense_rank) | set(bm25_rank)
        missing = [i for i in cands if i not in dense_cos]
        if missing:  # keyword-only candidates still get their true cosine
            for i, sim in zip(missing, (self.index.vectors[missing] @ qv[0]).tolist(), strict=True):
                dense_cos[i] = float(sim)
        top_bm25 = max((float(bm25_all[i]) for i in bm25_rank), default=0.0)
        fused = {
            i: wd * dense_cos[i] + (wb * float(bm25_all[i]) / top_bm25 if top_bm25 > 0 else 0.0) for i in cands
        }
        order = sorted(fused, key=lambda i: (-fused[i], i))[:k]
        return [
            Hit(
                chunk=self.index.chunks[i],
                score=fused[i],
                dense_score=dense_cos[i],
                bm25_score=float(bm25_all[i]),
                dense_rank=dense_rank.get(i),
                bm25_rank=bm25_rank.get(i),
            )
            for i in order
        ]

    def search_sources(self, query: str, k: int = 5, **kw) -> list[Hit]:
        """Top hits with one hit per distinct source (the best chunk of each)."""
        hits = self.search(query, k * 4, **kw)
        seen: set[str] = set()
        out = []
        for h in hits:
            if h.source not in seen:
                seen.add(h.source)
                out.append(h)
                if len(out) == k:
                    break
        return out
