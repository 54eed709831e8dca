"""Hybrid retrieval: dense (MiniLM + FAISS) and keyword (BM25) candidates, fused by a weighted sum of scores.

Candidates are the union of the top ``candidates`` of each ranking (within the course/section
filter); each gets

    keyword = bm25(query words, passage) + bm25(query phrases, passage)
    score = w_dense * cosine(query, passage) + w_bm25 * keyword / max keyword in the filter

Words are ``keyword_tokens``; phrases are adjacent pairs of them (``phrase_terms``), matched against
a second BM25 index that holds the pairs of each FAQ record's section, question and answer (lessons
have none: ``Chunk.phrase_fields`` says why). ``Hit.bm25_score`` is the words' score alone, as
before the phrases, so the tutor's relevance thresholds keep their meaning.

On the FAQ benchmark (benchmarks/bench_retrieval.py, docs/BENCHMARKS.md) score fusion beat
reciprocal-rank fusion (hit@5 0.967 / MRR@5 0.922 against 0.962 / 0.903 for the best RRF weights) and
was flat for w_dense between 0.4 and 0.6; on the sample course's question set 0.6-0.8 put the passage
holding the answer first more often than 0.5, so the defaults are 0.6 / 0.4. The phrase index took
hit@5 0.9669 -> 0.9687 and MRR@5 0.9218 -> 0.9244 at the same weights, better or equal in each of the
three courses. Measured and not adopted (hit@5 at 0.6 / 0.4 unless said): other BM25 variants and
k1/b (0.963-0.968; with phrases a k1/b/weight grid chosen on two courses and tested on the third gave
0.967-0.968, below the defaults), BM25 divided by the query's idf sum instead of the best score
(0.966-0.968), z-score or min-max normalisation (0.963-0.967), question-only or answer-only cosines as
extra signals (0.962-0.967), 128-token passages for the dense side (dense alone 0.927 -> 0.931, hybrid
unchanged), Rocchio feedback on the query vector (0.966-0.967), RM3 expansion (MRR@5 down to
0.88-0.91), and a logistic regression over 14 such features, trained on two courses and tested on the
third (0.968 over the three), and adapting MiniLM to the corpus (one epoch of in-batch-negative training on
each record's own question -> answer, 4.7 minutes on 2 cores: dense alone 0.927 -> 0.938, the hybrid
only 0.9691-0.9695 at w_dense 0.5-0.7, not worth minutes on every index build), BM25 over one field (question,
answer or section) as a third signal (0.960-0.968), one keyword index per record instead of per chunk
(0.968-0.969) and a power on the normalised keyword score (at most the defaults' 0.9687).
About 110 of the ~145 remaining misses cannot be found from their text: placeholder questions
("question1") shared by several records, and questions about content no record contains.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import faiss
import numpy as np

from knowledge.chunking import Chunk
from knowledge.embedder import Embedder
from knowledge.index import KnowledgeIndex
from knowledge.text import keyword_tokens, phrase_terms

CANDIDATES = 50  # depth of each ranking before fusion


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float  # fused score
    dense_score: float  # cosine similarity of query and passage (-1..1)
    bm25_score: float  # BM25 of the query's words (the word index alone: the tutor's relevance rule reads it)
    dense_rank: int | None
    bm25_rank: int | None  # rank by the keyword score (words + phrases)
    phrase_score: float = 0.0  # BM25 of the query's adjacent word pairs (the phrase index)
    row: int = -1  # the passage's position in the index (its vector is index.vectors[row])

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
                f"the index was built with {index.manifest.embedding_model} but the embedder is {embedder.name}"
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

    def cosines(self, text: str, hits: list[Hit]) -> list[float]:
        """The cosine of ``text`` to each hit's passage (hits found for another query)."""
        if not hits:
            return []
        if any(h.row < 0 for h in hits):
            raise ValueError("cosines() needs hits from this retriever's search (they carry their index row)")
        qv = self.encode_query(text).reshape(-1)
        return (self.index.vectors[[h.row for h in hits]] @ qv).tolist()

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
        pairs = phrase_terms(tokens)
        bm25_rank: dict[int, int] = {}
        bm25_all = np.zeros(n, dtype=np.float32)
        phrase_all = np.zeros(n, dtype=np.float32)
        if tokens:
            bm25_all = np.asarray(self.index.bm25.get_scores(tokens), dtype=np.float32)
        if pairs:
            phrase_all = np.asarray(self.index.phrases.get_scores(pairs), dtype=np.float32)
        keyword_all = bm25_all + phrase_all
        if tokens:
            cand = keyword_all if allowed is None else np.full(n, -1.0, dtype=np.float32)
            if allowed is not None:
                cand[allowed] = keyword_all[allowed]
            top = np.argpartition(-cand, min(depth, n - 1))[:depth] if depth < n else np.arange(n)
            top = top[np.argsort(-cand[top], kind="stable")]
            bm25_rank = {int(i): r for r, i in enumerate(top) if cand[i] > 0}

        cands = set(dense_rank) | set(bm25_rank)
        missing = [i for i in cands if i not in dense_cos]
        if missing:  # keyword-only candidates still get their true cosine
            for i, sim in zip(missing, (self.index.vectors[missing] @ qv[0]).tolist(), strict=True):
                dense_cos[i] = float(sim)
        top_kw = max((float(keyword_all[i]) for i in bm25_rank), default=0.0)
        fused = {
            i: wd * dense_cos[i] + (wb * float(keyword_all[i]) / top_kw if top_kw > 0 else 0.0) for i in cands
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
                phrase_score=float(phrase_all[i]),
                row=i,
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
