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
    """The index cannot serve as it is (damaged, another format or model) and must be rebuilt."""

    def __init__(self, reason: str, hint: str = "rebuild it with `tutorbot index build`"):
        super().__init__(f"{reason}; {hint}")
        self.reason = reason  # without the hint, for when a rebuild is already under way


class IndexWriteError(IndexError_):
    """The index folder cannot be written (not a folder, read-only, disk full)."""


class IndexInUseError(IndexError_):
    """The index folder holds another course's index, which a build would overwrite."""


def _rebuild_hint(course_dir: str | Path | None = None, index_dir: str | Path | None = None) -> str:
    return ("rebuild it with `tutorbot index build" + (f" --course {course_dir}" if course_dir else "")
            + (f" --index {index_dir}" if index_dir else "") + "`")


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
        self.up_to_date = False  # build_index found the index in service already matches the course

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
        link_tmp = index_dir / f".current-{build_id}"
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
            os.symlink(Path("builds") / build_id, link_tmp)
            os.replace(link_tmp, index_dir / "current")  # the atomic swap
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if link_tmp.is_symlink():  # the swap itself failed: the new build is not in service
                link_tmp.unlink()
                shutil.rmtree(final, ignore_errors=True)
            if isinstance(exc, OSError):
                raise IndexWriteError(f"cannot write the index at {index_dir} ({exc.strerror or exc}); "
                                      "the index in service (if any) was left untouched") from exc
            raise
        self.path = final
        keep = {build_id, *sorted(p.name for p in builds.iterdir() if not p.name.startswith("."))[-2:]}
        for old in builds.iterdir():  # keep the live build and the one before it
            if old.name not in keep and not old.name.startswith(".tmp-"):
                shutil.rmtree(old, ignore_errors=True)
        return final

    @classmethod
    def load(
        cls, index_dir: Path | str, *, embedding_model: str | None = None, course_id: str | None = None,
        course_dir: Path | str | None = None,
    ) -> KnowledgeIndex:
        """The index in service at ``index_dir``; ``embedding_model`` and ``course_id``, when given, must
        match its manifest. ``course_dir`` only makes the hints in error messages runnable as they stand."""
        index_dir = Path(index_dir)
        if not (index_dir / "current" / "manifest.json").is_file():
            raise IndexMissingError(f"no search index at {index_dir}; {_rebuild_hint(course_dir, index_dir)}")
        # Follow the symlink once: a build swapped in while we read must not mix two builds' files.
        current = (index_dir / "current").resolve()
        try:
            raw = json.loads((current / "manifest.json").read_text(encoding="utf-8"))
            manifest = IndexManifest(**raw)
        except (ValueError, TypeError) as exc:
            raise IndexMismatchError(f"the index manifest at {current} is unreadable ({exc})", _rebuild_hint(course_dir, index_dir)) from exc
        hint = _rebuild_hint(course_dir or manifest.course_dir, index_dir)
        if manifest.format_version != FORMAT_VERSION:
            raise IndexMismatchError(
                f"the index at {index_dir} has format {manifest.format_version}, this tutorbot reads {FORMAT_VERSION}", hint
            )
        if embedding_model and manifest.embedding_model != embedding_model:
            raise IndexMismatchError(
                f"the index at {index_dir} was built with {manifest.embedding_model}, not {embedding_model}", hint
            )
        if course_id and manifest.course_id != course_id:
            raise IndexInUseError(_in_use(index_dir, manifest, course_id, course_dir))
        try:
            with open(current / "chunks.jsonl", encoding="utf-8") as f:
                chunks = [Chunk(**json.loads(line)) for line in f if line.strip()]
            vectors = np.load(current / "vectors.npy")
            dense = faiss.read_index(str(current / "dense.faiss"))
            bm25 = bm25s.BM25.load(str(current / "bm25"))
            phrases = bm25s.BM25.load(str(current / "bm25_phrases"))
        except (OSError, ValueError, TypeError, RuntimeError) as exc:
            raise IndexMismatchError(f"the index at {index_dir} is damaged ({exc})", hint) from exc
        if len(chunks) != manifest.chunk_count or vectors.shape != (manifest.chunk_count, manifest.dim) or dense.ntotal != len(chunks):
            raise IndexMismatchError(f"the index at {index_dir} is inconsistent", hint)
        idx = cls(manifest, chunks, vectors, dense, bm25, phrases)
        idx.path = current
        return idx


def _in_use(index_dir: Path, held: IndexManifest, course_id: str, course_dir: Path | str | None) -> str:
    return (f"the index at {index_dir} is for course {held.course_id!r}, not {course_id!r}, and was left as it is; "
            "give this course its own folder (--index or TUTORBOT_INDEX_DIR), or replace that index with "
            f"`tutorbot index build{f' --course {course_dir}' if course_dir else ''} --index {index_dir} --replace`")


def _held_manifest(index_dir: Path) -> IndexManifest | None:
    """The manifest of the index in service, if one can be read (whatever its model or format)."""
    try:
        raw = json.loads((index_dir / "current" / "manifest.json").read_text(encoding="utf-8"))
        return IndexManifest(**{k: v for k, v in raw.items() if k in IndexManifest.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None


def _check_writable(index_dir: Path) -> None:
    """Fail before any embedding work when the build could not be saved."""
    try:
        builds = index_dir / "builds"
        builds.mkdir(parents=True, exist_ok=True)
        probe = builds / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise IndexWriteError(f"cannot write the index at {index_dir} ({exc.strerror or exc}); "
                              "choose a folder you can write with --index or TUTORBOT_INDEX_DIR") from exc
    current = index_dir / "current"
    if current.exists() and not current.is_symlink():
        raise IndexWriteError(
            f"{current} is a folder, not the link to the build in service (was the index copied with its links "
            "followed, e.g. cp -rL?); move that folder away or delete it, then build again")


def build_index(
    course: Course, index_dir: Path | str, embedder: Embedder, *, show_progress: bool = False,
    hnsw_threshold: int = HNSW_THRESHOLD, replace: bool = False,
) -> KnowledgeIndex:
    """Build (re-embedding only what changed since the index in service) and swap it in.

    An index that already matches the course is kept as it is (``up_to_date``), so the build before
    it stays the one to go back to. Another course's index in the folder is refused unless ``replace``.
    """
    index_dir = Path(index_dir)
    held = _held_manifest(index_dir)
    if held is not None and held.course_id != course.id and not replace:
        raise IndexInUseError(_in_use(index_dir, held, course.id, course.root))
    _check_writable(index_dir)
    try:
        previous = KnowledgeIndex.load(index_dir, embedding_model=embedder.name)
    except IndexError_:
        previous = None
    idx = KnowledgeIndex.build(course, embedder, previous=previous, hnsw_threshold=hnsw_threshold, show_progress=show_progress)
    if previous is not None and _same_index(previous.manifest, idx.manifest):
        previous.up_to_date = True
        return previous
    idx.save(index_dir)
    return idx


def _same_index(a: IndexManifest, b: IndexManifest) -> bool:
    keys = ("course_id", "course_title", "embedding_model", "dim", "chunk_count", "content_hash", "index_type",
            "course_dir", "format_version")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def open_index(
    course: Course, index_dir: Path | str, embedder: Embedder, *, progress=None, show_progress: bool = False,
) -> KnowledgeIndex:
    """The course's index for serving: loaded as it stands when it matches the course, built on first
    use, updated when the course changed, rebuilt when it is damaged, in an older format or from
    another model. ``progress`` (a callable taking one line) hears why a build happens. Another
    course's index in the folder is refused (IndexInUseError), never overwritten."""
    say = progress or (lambda _line: None)
    index_dir = Path(index_dir)
    try:
        idx = KnowledgeIndex.load(index_dir, embedding_model=embedder.name, course_id=course.id, course_dir=course.root)
        if idx.manifest.content_hash == content_hash(chunk_course(course, embedder.max_tokens, embedder.count_tokens)):
            return idx
        say("The course changed since its index was built; updating the index…")
    except IndexMissingError:
        say(f"Building the search index for {course.title} (first run only)…")
    except IndexMismatchError as exc:  # another course's index (IndexInUseError) is not rebuilt over
        say(f"Rebuilding the search index ({exc.reason})…")
    return build_index(course, index_dir, embedder, show_progress=show_progress)
