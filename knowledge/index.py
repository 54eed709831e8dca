"""The search index of a course: FAISS (dense) + BM25 (keywords), saved with a manifest.

Folder layout (``index_dir``)::

    current -> builds/<build id>     a symlink swapped atomically when a build completes
    builds/<build id>/
        manifest.json                embedding model, dimension, chunk count, content hash, index type, ...
        chunks.jsonl                 one Chunk per line, in index order
        vectors.npy                  (n, dim) float32 normalised embeddings (reused by the next build)
        dense.faiss                  the FAISS index
        bm25/                        the bm25s index of words (keyword_tokens)
        bm25_phrases/                the bm25s index of adjacent word pairs (phrase_terms) of FAQ records

A build writes a new folder, then repoints ``current``: a reader never sees a half-written index,
and a failed build leaves the index in service untouched. Rebuilding re-embeds only chunks whose
embedded text changed (matched by content hash against the previous build).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import bm25s
import faiss
import numpy as np

from knowledge.chunking import Chunk, chunk_course
from knowledge.course import Course
from knowledge.embedder import Embedder
from knowledge.text import keyword_tokens, phrase_terms

log = logging.getLogger(__name__)
FORMAT_VERSION = 3  # 2: keyword tokens join British and American spellings (knowledge.text); 3: the phrase index
HNSW_THRESHOLD = 50_000  # below this, exact inner product search is fast enough (< 5 ms)
HNSW_M = 32
HNSW_EF_SEARCH = 128


class IndexError_(RuntimeError):
    """Base for index problems; messages tell the user what to run."""


class IndexMissingError(IndexError_):
    pass


class IndexMismatchError(IndexError_):
    pass


def _rebuild_hint(course_dir: str | None = None) -> str:
    return "rebuild it with `tutorbot index build" + (f" --course {course_dir}" if course_dir else "") + "`"


@dataclass
class IndexManifest:
    course_id: str
    course_title: str
    embedding_model: str
    dim: int
    chunk_count: int
    source_count: int
    content_hash: str
    index_type: str
    created_at: str
    build_seconds: float = 0.0
    embedded: int = 0
    reused: int = 0
    course_dir: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)


def content_hash(chunks: list[Chunk]) -> str:
    import hashlib

    h = hashlib.sha256()
    for c in chunks:
        h.update(c.id.encode())
        h.update(c.content_hash.encode())
    return h.hexdigest()[:32]


def _make_dense(vectors: np.ndarray, hnsw_threshold: int) -> tuple[faiss.Index, str]:
    n, dim = vectors.shape
    if n >= hnsw_threshold:
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = HNSW_EF_SEARCH
        kind = f"hnsw-flat-ip(M={HNSW_M})"
    else:
        index = faiss.IndexFlatIP(dim)
        kind = "flat-ip"
    if n:
        index.add(vectors)
    return index, kind


def _make_bm25(chunks: list[Chunk]) -> bm25s.BM25:
    bm25 = bm25s.BM25()
    bm25.index([keyword_tokens(c.keyword_text) or [""] for c in chunks], show_progress=False)
    return bm25


def chunk_phrases(chunk: Chunk) -> list[str]:
    """The phrase index's terms of a chunk: adjacent word pairs within each of its phrase fields."""
    return [t for f in chunk.phrase_fields for t in phrase_terms(keyword_tokens(f))]


def _make_phrase_bm25(chunks: list[Chunk]) -> bm25s.BM25:
    bm25 = bm25s.BM25()
    bm25.index([chunk_phrases(c) or [""] for c in chunks], show_progress=False)
    return bm25


class KnowledgeIndex:
    def __init__(
        self, manifest: IndexManifest, chunks: list[Chunk], vectors: np.ndarray, dense: faiss.Index,
        bm25: bm25s.BM25, phrases: bm25s.BM25,
    ):
        self.manifest = manifest
        self.chunks = chunks
        self.vectors = vectors
        self.dense = dense
        self.bm25 = bm25  # words
        self.phrases = phrases  # adjacent word pairs
        self.path: Path | None = None

    def __len__(self) -> int:
        return len(self.chunks)

    # --- building -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        course: Course,
        embedder: Embedder,
        *,
        previous: KnowledgeIndex | None = None,
        hnsw_threshold: int = HNSW_THRESHOLD,
        show_progress: bool = False,
        batch_size: int = 64,
    ) -> KnowledgeIndex:
        t0 = time.perf_counter()
        chunks = chunk_course(course, embedder.max_tokens, embedder.count_tokens)
        if not chunks:
            raise IndexError_(f"course {course.id} produced no passages to index")
        cache: dict[str, np.ndarray] = {}
        if previous is not None and previous.manifest.embedding_model == embedder.name:
            cache = {c.content_hash: previous.vectors[i] for i, c in enumerate(previous.chunks)}
        todo = [i for i, c in enumerate(chunks) if c.content_hash not in cache]
        vectors = np.zeros((len(chunks), embedder.dim), dtype=np.float32)
        for i, c in enumerate(chunks):
            if c.content_hash in cache:
                vectors[i] = cache[c.content_hash]
        if todo:
            vectors[todo] = embedder.encode([chunks[i].embed_text for i in todo], batch_size=batch_size, show_progress=show_progress)
        dense, kind = _make_dense(vectors, hnsw_threshold)
        bm25 = _make_bm25(chunks)
        phrases = _make_phrase_bm25(chunks)
        manifest = IndexManifest(
            course_id=course.id,
            course_title=course.title,
            embedding_model=embedder.name,
            dim=embedder.dim,
            chunk_count=len(chunks),
            source_count=len({c.source for c in chunks}),
            content_hash=content_hash(chunks),
            index_type=kind,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            build_seconds=round(time.perf_counter() - t0, 3),
            embedded=len(todo),
            reused=len(chunks) - len(todo),
            course_dir=str(course.root),
        )
        log.info("indexed %s: %d chunks (%d embedded, %d reused) in %.1fs [%s]",
                 course.id, len(chunks), len(todo), manifest.reused, manifest.build_seconds, kind)
        return cls(manifest, chunks, vectors, dense, bm25, phrases)

    # --- persistence ----------------------------------------------------------------------
    def save(self, index_dir: Path | str) -> Path:
        """Write into a new build folder, then atomically repoint ``current``. Returns the build folder."""
        index_dir = Path(index_dir)
        builds = index_dir / "builds"
        builds.mkdir(parents=True, exist_ok=True)
        build_id = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-{self.manifest.content_hash[:8]}"
        tmp = builds / f".tmp-{build_id}"
        final = builds / build_id
        try:
            tmp.mkdir()
            with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
                for c in self.chunks:
                    f.write(json.dumps(asdict(c), ensure_ascii=False) + "\n")
            np.save(tmp / "vectors.npy", self.vectors)
            faiss.write_index(self.dense, str(tmp / "dense.faiss"))
            self.bm25.save(str(tmp / "bm25"))
            self.phrases.save(str(tmp / "bm25_phrases"))
            (tmp / "manifest.json").write_text(json.dumps(asdict(self.manifest), indent=2), encoding="utf-8")
            os.replace(tmp, final)
            link_tmp = index_dir / f".current-{build_id}"
            os.symlink(Path("builds") / build_id, link_tmp)
            os.replace(link_tmp, index_dir / "current")  # the atomic swap
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = final
        keep = {build_id, *sorted(p.name for p in builds.iterdir() if not p.name.startswith("."))[-2:]}
        for old in builds.iterdir():  # keep the live build and the one before it
            if old.name not in keep and not old.name.startswith(".tmp-"):
                shutil.rmtree(old, ignore_errors=True)
        return final

    @classmethod
    def load(cls, index_dir: Path | str, *, embedding_model: str | None = None, course_id: str | None = None) -> KnowledgeIndex:
        index_dir = Path(index_dir)
        if not (index_dir / "current" / "manifest.json").is_file():
            raise IndexMissingError(f"no search index at {index_dir}; {_rebuild_hint()}")
        # Follow the symlink once: a build swapped in while we read must not mix two builds' files.
        current = (index_dir / "current").resolve()
        try:
            raw = json.loads((current / "manifest.json").read_text(encoding="utf-8"))
            manifest = IndexManifest(**raw)
        except (ValueError, TypeError) as exc:
            raise IndexMismatchError(f"the index manifest at {current} is unreadable ({exc}); {_rebuild_hint()}") from exc
        if manifest.format_version != FORMAT_VERSION:
            raise IndexMismatchError(
                f"the index at {index_dir} has format {manifest.format_version}, this tutorbot reads {FORMAT_VERSION}; {_rebuild_hint(manifest.course_dir)}"
            )
        if embedding_model and manifest.embedding_model != embedding_model:
            raise IndexMismatchError(
                f"the index at {index_dir} was built with {manifest.embedding_model}, not {embedding_model}; {_rebuild_hint(manifest.course_dir)}"
            )
        if course_id and manifest.course_id != course_id:
            raise IndexMismatchError(
                f"the index at {index_dir} is for course {manifest.course_id!r}, not {course_id!r}; {_rebuild_hint()}"
            )
        try:
            with open(current / "chunks.jsonl", encoding="utf-8") as f:
                chunks = [Chunk(**json.loads(line)) for line in f if line.strip()]
            vectors = np.load(current / "vectors.npy")
            dense = faiss.read_index(str(current / "dense.faiss"))
            bm25 = bm25s.BM25.load(str(current / "bm25"))
            phrases = bm25s.BM25.load(str(current / "bm25_phrases"))
        except (OSError, ValueError, TypeError, RuntimeError) as exc:
            raise IndexMismatchError(f"the index at {index_dir} is damaged ({exc}); {_rebuild_hint(manifest.course_dir)}") from exc
        if len(chunks) != manifest.chunk_count or vectors.shape != (manifest.chunk_count, manifest.dim) or dense.ntotal != len(chunks):
            raise IndexMismatchError(f"the index at {index_dir} is inconsistent; {_rebuild_hint(manifest.course_dir)}")
        idx = cls(manifest, chunks, vectors, dense, bm25, phrases)
        idx.path = current
        return idx


def build_index(
    course: Course, index_dir: Path | str, embedder: Embedder, *, show_progress: bool = False, hnsw_threshold: int = HNSW_THRESHOLD
) -> KnowledgeIndex:
    """Build (re-embedding only what changed since the index in service) and swap it in."""
    previous = None
    try:
        previous = KnowledgeIndex.load(index_dir, embedding_model=embedder.name)
    except IndexError_:
        previous = None
    idx = KnowledgeIndex.build(course, embedder, previous=previous, hnsw_threshold=hnsw_threshold, show_progress=show_progress)
    idx.save(index_dir)
    return idx
