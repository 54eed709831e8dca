"""The search index with the real MiniLM and FAISS: save/load round trip, manifest, atomic swap,
incremental rebuilds, mismatch and missing-index errors, and the approximate index above a threshold."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import faiss
import numpy as np
import pytest

from knowledge.chunking import chunk_course
from knowledge.course import load_course
from knowledge.embedder import MINILM_NAME, shared_minilm
from knowledge.index import (
    FORMAT_VERSION,
    IndexInUseError,
    IndexMismatchError,
    IndexMissingError,
    IndexWriteError,
    KnowledgeIndex,
    build_index,
    chunk_phrases,
    content_hash,
    open_index,
)
from knowledge.retriever import Retriever
from tests.conftest import TINY_COURSE, write_course


@pytest.fixture(scope="module")
def embedder():
    return shared_minilm()


class CountingEmbedder:
    """The real MiniLM, recording which texts it was asked to embed."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.dim, self.max_tokens = inner.name, inner.dim, inner.max_tokens
        self.encoded: list[str] = []

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def encode(self, texts, **kw):
        self.encoded.extend(texts)
        return self.inner.encode(texts, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_course(write_course(tmp_path_factory.mktemp("tiny") / "tiny", TINY_COURSE))


@pytest.fixture(scope="module")
def built(tiny, embedder, tmp_path_factory):
    """The tiny course's index, built once and saved to a module-wide folder."""
    index_dir = tmp_path_factory.mktemp("index")
    idx = build_index(tiny, index_dir, embedder)
    return idx, index_dir


def builds(index_dir: Path) -> list[str]:
    return sorted(p.name for p in (index_dir / "builds").iterdir())


# --- round trip and manifest ------------------------------------------------------------------------


def test_round_trip(built, embedder):
    idx, index_dir = built
    loaded = KnowledgeIndex.load(index_dir, embedding_model=embedder.name, course_id="tiny")
    assert loaded.chunks == idx.chunks
    np.testing.assert_array_equal(loaded.vectors, idx.vectors)
    assert loaded.dense.ntotal == len(idx.chunks)
    assert loaded.manifest == idx.manifest
    assert loaded.path == (index_dir / "current").resolve() and loaded.path.parent.name == "builds"
    # the loaded index answers exactly like the one in memory
    q = "why freeze the early layers?"
    a = [(h.chunk.id, round(h.score, 5)) for h in Retriever(idx, embedder).search(q, 3)]
    b = [(h.chunk.id, round(h.score, 5)) for h in Retriever(loaded, embedder).search(q, 3)]
    assert a == b
    assert a[0][0] == next(c.id for c in idx.chunks if c.section == "Fine-tuning > Freezing layers")


def test_manifest_fields(built, tiny, embedder):
    idx, index_dir = built
    m = json.loads((index_dir / "current" / "manifest.json").read_text())
    chunks = chunk_course(tiny, embedder.max_tokens, embedder.count_tokens)
    assert m["course_id"] == "tiny" and m["course_title"] == "Tiny Course"
    assert m["embedding_model"] == MINILM_NAME and m["dim"] == 384
    assert m["chunk_count"] == len(chunks) == len(idx) == 5
    assert m["source_count"] == 2
    assert m["content_hash"] == content_hash(chunks) and re.fullmatch(r"[0-9a-f]{32}", m["content_hash"])
    assert m["index_type"] == "flat-ip"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", m["created_at"])
    assert m["embedded"] == 5 and m["reused"] == 0
    assert m["format_version"] == FORMAT_VERSION and m["course_dir"] == str(tiny.root)
    assert m["build_seconds"] >= 0
    assert sorted(p.name for p in (index_dir / "current").iterdir()) == [
        "bm25", "bm25_phrases", "chunks.jsonl", "dense.faiss", "manifest.json", "vectors.npy",
    ]


def test_the_phrase_index_holds_word_pairs_of_faq_records(embedder, tmp_path):
    faq = '[{"id": "f1", "question": "Docker could not translate host name", "answer": "Start the database first.", '
    faq += '"section": "Setup"}]'
    root = write_course(tmp_path / "c", {**TINY_COURSE, "faq/general.json": faq})
    idx = build_index(load_course(root), tmp_path / "idx", embedder)
    rec = next(c for c in idx.chunks if c.kind == "faq")
    terms = chunk_phrases(rec)
    assert "translat_host" in terms and "host_name" in terms and "databas_first" in terms
    assert "name_start" not in terms and "setup_docker" not in terms  # no phrase spans two fields
    assert all(chunk_phrases(c) == [] for c in idx.chunks if c.kind == "lesson")  # lessons have none
    loaded = KnowledgeIndex.load(tmp_path / "idx")
    scores = idx.phrases.get_scores(["host_name"])
    np.testing.assert_allclose(loaded.phrases.get_scores(["host_name"]), scores)
    assert scores[idx.chunks.index(rec)] > 0 and np.count_nonzero(scores) == 1


def test_vectors_are_normalised_and_ordered_like_chunks(built, embedder):
    idx, _ = built
    np.testing.assert_allclose(np.linalg.norm(idx.vectors, axis=1), 1.0, atol=1e-5)
    assert idx.vectors.dtype == np.float32
    again = embedder.encode([idx.chunks[2].embed_text])[0]
    np.testing.assert_allclose(idx.vectors[2], again, atol=1e-5)


def test_content_hash_is_stable_across_rebuilds(tiny, embedder, built):
    idx, _ = built
    assert KnowledgeIndex.build(tiny, embedder).manifest.content_hash == idx.manifest.content_hash


# --- atomic swap --------------------------------------------------------------------------------------


def edited_tiny(tmp_path):
    return load_course(write_course(tmp_path / "edited", {
        **TINY_COURSE, "lessons/02-lora.txt": "LoRA adds low-rank matrices; the base weights stay frozen.\n",
    }))


def test_current_is_a_relative_symlink_swapped_to_the_new_build(tiny, embedder, tmp_path):
    first = build_index(tiny, tmp_path / "idx", embedder)
    link = tmp_path / "idx" / "current"
    assert link.is_symlink() and not os.readlink(link).startswith("/")  # the folder can be moved
    second = build_index(edited_tiny(tmp_path), tmp_path / "idx", embedder)
    assert second.path != first.path and link.resolve() == second.path
    assert not [p for p in (tmp_path / "idx").iterdir() if p.name.startswith(".current-")]


def test_an_unchanged_course_keeps_the_index_in_service_and_the_build_before_it(tiny, embedder, tmp_path):
    first = build_index(tiny, tmp_path / "idx", embedder)
    second = build_index(edited_tiny(tmp_path), tmp_path / "idx", embedder)
    before = builds(tmp_path / "idx")
    again = build_index(edited_tiny(tmp_path), tmp_path / "idx", embedder)
    assert again.up_to_date and not second.up_to_date and again.path == second.path
    assert builds(tmp_path / "idx") == before == sorted([first.path.name, second.path.name])


def test_failure_mid_save_leaves_the_old_index_in_service(built, tiny, embedder, monkeypatch, tmp_path):
    idx, _ = built
    index_dir = tmp_path / "idx"
    idx.save(index_dir)
    before = builds(index_dir)
    old_target = (index_dir / "current").resolve()

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faiss, "write_index", disk_full)
    with pytest.raises(IndexWriteError, match=f"cannot write the index at {re.escape(str(index_dir))} .No space left"):
        build_index(edited_tiny(tmp_path), index_dir, embedder)
    assert (index_dir / "current").resolve() == old_target
    assert builds(index_dir) == before  # no half-written build left behind (no .tmp- folder)
    still = KnowledgeIndex.load(index_dir, embedding_model=embedder.name, course_id="tiny")
    assert still.manifest.content_hash == idx.manifest.content_hash
    assert any("extra matrices" in c.text for c in still.chunks)


def test_failure_while_writing_the_manifest_also_leaves_the_old_index(built, monkeypatch, tmp_path):
    idx, _ = built
    idx.save(tmp_path)
    old = (tmp_path / "current").resolve()

    def boom(self, *_a, **_k):
        raise KeyboardInterrupt  # even an interrupt cleans up

    monkeypatch.setattr(Path, "write_text", boom)
    with pytest.raises(KeyboardInterrupt):
        idx.save(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "current").resolve() == old
    assert all(not n.startswith(".tmp-") for n in builds(tmp_path))
    KnowledgeIndex.load(tmp_path)


def test_old_builds_are_pruned(built, tmp_path):
    idx, _ = built
    for _ in range(4):
        idx.save(tmp_path)
    names = builds(tmp_path)
    assert len(names) == 2  # the live build and the one before it
    assert (tmp_path / "current").resolve().name == names[-1]


# --- incremental rebuilds -------------------------------------------------------------------------


def test_rebuild_reembeds_only_changed_chunks(embedder, tmp_path):
    spy = CountingEmbedder(embedder)
    root = write_course(tmp_path / "c", TINY_COURSE)
    first = build_index(load_course(root), tmp_path / "idx", spy)
    assert (first.manifest.embedded, first.manifest.reused) == (5, 0)

    spy.encoded.clear()
    unchanged = build_index(load_course(root), tmp_path / "idx", spy)
    assert unchanged.up_to_date and unchanged.path == first.path
    assert spy.encoded == []

    lesson = TINY_COURSE["lessons/01-basics.md"].replace(
        "reduces overfitting.", "reduces overfitting on small datasets."
    )
    write_course(root, {"lessons/01-basics.md": lesson, "lessons/03-new.md": "# New\n\nA brand new lesson.\n"})
    spy.encoded.clear()
    changed = build_index(load_course(root), tmp_path / "idx", spy)
    assert (changed.manifest.embedded, changed.manifest.reused) == (2, 4)  # 1 edited + 1 new; 4 unchanged
    assert changed.manifest.chunk_count == 6
    assert len(spy.encoded) == 2
    assert any("on small datasets" in t for t in spy.encoded) and any("brand new" in t for t in spy.encoded)
    # reused vectors are the same as freshly computed ones
    fresh = KnowledgeIndex.build(load_course(root), embedder)
    np.testing.assert_allclose(changed.vectors, fresh.vectors, atol=1e-5)


def test_renaming_a_section_reembeds_its_chunk(embedder, tmp_path):
    """The section path is part of what is embedded, so a renamed heading is a changed chunk."""
    root = write_course(tmp_path / "c", TINY_COURSE)
    build_index(load_course(root), tmp_path / "idx", embedder)
    write_course(root, {"lessons/01-basics.md": TINY_COURSE["lessons/01-basics.md"].replace(
        "### Freezing layers", "### Freezing the early layers")})
    m = build_index(load_course(root), tmp_path / "idx", embedder).manifest
    assert (m.embedded, m.reused) == (1, 4)


def test_an_index_from_another_model_is_not_reused(tiny, embedder, tmp_path):
    class OtherModel(CountingEmbedder):
        pass

    other = OtherModel(embedder)
    other.name = "someone/else"
    build_index(tiny, tmp_path, other)
    spy = CountingEmbedder(embedder)
    m = build_index(tiny, tmp_path, spy).manifest
    assert (m.embedded, m.reused) == (5, 0) and m.embedding_model == MINILM_NAME


# --- mismatch and missing ------------------------------------------------------------------------------


def test_loading_for_another_model_says_how_to_rebuild(built):
    _, index_dir = built
    with pytest.raises(IndexMismatchError) as err:
        KnowledgeIndex.load(index_dir, embedding_model="sentence-transformers/other-model")
    msg = str(err.value)
    assert MINILM_NAME in msg and "other-model" in msg
    assert "tutorbot index build" in msg


def test_loading_for_another_course_says_how_to_replace_it(built):
    _, index_dir = built
    with pytest.raises(IndexInUseError) as err:
        KnowledgeIndex.load(index_dir, course_id="another-course", course_dir="courses/other")
    msg = str(err.value)
    assert "'tiny'" in msg and "'another-course'" in msg
    assert f"tutorbot index build --course courses/other --index {index_dir} --replace" in msg


def test_another_courses_index_is_never_overwritten_unless_asked(tiny, embedder, tmp_path):
    other = load_course(write_course(tmp_path / "other", {**TINY_COURSE, "course.yaml": "id: other\ntitle: Other\n"}))
    kept = build_index(tiny, tmp_path / "idx", embedder)
    spy = CountingEmbedder(embedder)
    for attempt in (lambda: build_index(other, tmp_path / "idx", spy),
                    lambda: open_index(other, tmp_path / "idx", spy)):  # what ask, chat, search and the bot call
        with pytest.raises(IndexInUseError, match="--replace"):
            attempt()
    assert spy.encoded == [] and (tmp_path / "idx" / "current").resolve() == kept.path
    replaced = build_index(other, tmp_path / "idx", spy, replace=True)
    assert replaced.manifest.course_id == "other" and (replaced.manifest.embedded, replaced.manifest.reused) == (0, 5)


def test_open_index_builds_updates_or_serves_as_it_stands(tiny, embedder, tmp_path):
    said: list[str] = []
    first = open_index(tiny, tmp_path / "idx", embedder, progress=said.append)
    assert said == ["Building the search index for Tiny Course (first run only)…"]
    assert open_index(tiny, tmp_path / "idx", embedder, progress=said.append).path == first.path and len(said) == 1
    updated = open_index(edited_tiny(tmp_path), tmp_path / "idx", embedder, progress=said.append)
    assert "course changed" in said[-1] and updated.path != first.path
    m = json.loads((updated.path / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION - 1
    (updated.path / "manifest.json").write_text(json.dumps(m))
    rebuilt = open_index(edited_tiny(tmp_path), tmp_path / "idx", embedder, progress=said.append)
    assert said[-1].startswith("Rebuilding the search index (the index at") and "rebuild it" not in said[-1]
    assert rebuilt.manifest.format_version == FORMAT_VERSION


def test_an_index_folder_that_cannot_be_written_fails_before_any_embedding(tiny, embedder, tmp_path):
    spy = CountingEmbedder(embedder)
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(IndexWriteError, match=r"cannot write the index at .*afile.*--index"):
        build_index(tiny, tmp_path / "afile", spy)
    assert spy.encoded == []


def test_a_copied_index_whose_current_is_a_folder_is_refused_with_what_to_do(tiny, embedder, tmp_path):
    import shutil

    built_ = build_index(tiny, tmp_path / "idx", embedder)
    shutil.copytree(tmp_path / "idx", tmp_path / "copy", symlinks=False)  # like cp -rL
    assert not (tmp_path / "copy" / "current").is_symlink()
    spy = CountingEmbedder(embedder)
    with pytest.raises(IndexWriteError, match="is a folder, not the link"):
        build_index(edited_tiny(tmp_path), tmp_path / "copy", spy)
    assert spy.encoded == [] and not list((tmp_path / "copy").glob(".current-*"))
    assert KnowledgeIndex.load(tmp_path / "copy").manifest.content_hash == built_.manifest.content_hash


def test_retriever_refuses_an_index_from_another_model(built, embedder):
    idx, _ = built
    other = CountingEmbedder(embedder)
    other.name = "someone/else"
    with pytest.raises(IndexMismatchError, match="tutorbot index build"):
        Retriever(idx, other)


def test_missing_index(tmp_path):
    with pytest.raises(IndexMissingError) as err:
        KnowledgeIndex.load(tmp_path / "nowhere")
    assert "no search index" in str(err.value) and "tutorbot index build" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexMissingError):
        KnowledgeIndex.load(tmp_path / "empty")


def copy_index(built, tmp_path) -> Path:
    idx, _ = built
    idx.save(tmp_path)
    return (tmp_path / "current").resolve()


def test_unreadable_manifest(built, tmp_path):
    cur = copy_index(built, tmp_path)
    (cur / "manifest.json").write_text("{not json")
    with pytest.raises(IndexMismatchError, match=r"unreadable.*tutorbot index build"):
        KnowledgeIndex.load(tmp_path)


def test_other_format_version(built, tmp_path):
    cur = copy_index(built, tmp_path)
    m = json.loads((cur / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (cur / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexMismatchError, match="format"):
        KnowledgeIndex.load(tmp_path)


@pytest.mark.parametrize("damage", ["vectors", "chunks", "faiss"])
def test_damaged_index_files(built, tmp_path, damage):
    cur = copy_index(built, tmp_path)
    if damage == "vectors":
        (cur / "vectors.npy").write_bytes(b"garbage")
    elif damage == "chunks":
        lines = (cur / "chunks.jsonl").read_text().splitlines()
        (cur / "chunks.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # one chunk lost
    else:
        (cur / "dense.faiss").unlink()
    with pytest.raises(IndexMismatchError, match="tutorbot index build"):
        KnowledgeIndex.load(tmp_path)


def test_build_index_over_a_damaged_index_rebuilds_everything(tiny, embedder, tmp_path):
    build_index(tiny, tmp_path, embedder)
    ((tmp_path / "current").resolve() / "vectors.npy").write_bytes(b"garbage")
    m = build_index(tiny, tmp_path, embedder).manifest
    assert (m.embedded, m.reused) == (5, 0)
    KnowledgeIndex.load(tmp_path, course_id="tiny")


# --- approximate index above the threshold -------------------------------------------------------------


def test_hnsw_is_chosen_above_the_threshold_and_recorded(tiny, embedder, tmp_path):
    idx = build_index(tiny, tmp_path, embedder, hnsw_threshold=3)
    assert idx.manifest.index_type.startswith("hnsw")
    loaded = KnowledgeIndex.load(tmp_path)
    assert loaded.manifest.index_type == idx.manifest.index_type
    assert json.loads((tmp_path / "current" / "manifest.json").read_text())["index_type"].startswith("hnsw")
    assert isinstance(loaded.dense, faiss.IndexHNSWFlat)
    r = Retriever(loaded, embedder)
    assert r.search("what is LoRA?", 1)[0].source == "lessons/02-lora.txt"
    # filters work on the approximate index too
    hits = r.search("freezing layers", 5, section="Fine-tuning")
    assert hits and all(h.chunk.section.startswith("Fine-tuning") for h in hits)


def test_below_the_threshold_search_is_exact(tiny, embedder, tmp_path):
    idx = build_index(tiny, tmp_path, embedder, hnsw_threshold=6)  # 5 chunks < 6
    assert idx.manifest.index_type == "flat-ip"
    assert isinstance(KnowledgeIndex.load(tmp_path).dense, faiss.IndexFlatIP)


def test_a_swap_during_load_never_mixes_two_builds(built, embedder, tmp_path, monkeypatch):
    """Another process may swap ``current`` while this one reads; the reader keeps to one build."""
    idx, _ = built
    old = idx.save(tmp_path)
    grown = load_course(write_course(tmp_path / "grown", {
        **TINY_COURSE, "lessons/03-more.md": "# More\n\nOne more lesson about adapters.\n",
    }))
    new = KnowledgeIndex.build(grown, embedder).save(tmp_path)
    os.replace(tmp_path / "current", tmp_path / "current.bak")
    os.symlink(Path("builds") / old.name, tmp_path / "current")  # back to the old build
    real_load = np.load

    def load_then_swap(*a, **k):
        link = tmp_path / ".swap"
        os.symlink(Path("builds") / new.name, link)
        os.replace(link, tmp_path / "current")
        return real_load(*a, **k)

    monkeypatch.setattr(np, "load", load_then_swap)
    got = KnowledgeIndex.load(tmp_path)
    assert got.path == old and got.manifest.chunk_count == len(got.chunks) == 5
    assert (tmp_path / "current").resolve() == new
