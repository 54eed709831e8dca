"""Hybrid retrieval on the tiny course (real MiniLM): ranking, filters, distinct sources, edge cases."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from knowledge.course import faq_course_from_json, load_course
from knowledge.embedder import shared_minilm
from knowledge.index import KnowledgeIndex
from knowledge.retriever import Retriever
from tests.conftest import TINY_COURSE, write_course

FAQ = [
    {"id": "faq-cert", "question": "Do I get a certificate?", "answer": "Yes, after passing the final quiz.",
     "section": "Logistics"},
    {"id": "faq-gpu", "question": "Do I need a GPU for the exercises?",
     "answer": "No, every exercise runs on a laptop CPU in a few minutes.", "section": "Setup"},
]


@pytest.fixture(scope="module")
def embedder():
    return shared_minilm()


@pytest.fixture(scope="module")
def retriever(embedder, tmp_path_factory):
    root = write_course(tmp_path_factory.mktemp("r") / "tiny", {**TINY_COURSE, "faq/general.json": json.dumps(FAQ)})
    return Retriever(KnowledgeIndex.build(load_course(root), embedder), embedder)


@pytest.mark.parametrize(
    ("query", "source", "section"),
    [
        ("what does pre-training learn?", "lessons/01-basics.md", "Pre-training"),
        ("why would I freeze the early layers", "lessons/01-basics.md", "Fine-tuning > Freezing layers"),
        ("what is LoRA", "lessons/02-lora.txt", ""),
        ("learning rate when fine tuning a model", "lessons/01-basics.md", "Fine-tuning"),
        ("pretraining", "lessons/01-basics.md", "Pre-training"),  # unhyphenated spelling
        ("will I receive a certificate at the end", "faq-cert", "Logistics"),
        ("can I do the exercises without a graphics card", "faq-gpu", "Setup"),
    ],
)
def test_relevant_passage_ranks_first(retriever, query, source, section):
    hits = retriever.search(query, 3)
    assert (hits[0].source, hits[0].chunk.section) == (source, section), [(h.source, h.chunk.section) for h in hits]
    assert hits[0].score > hits[1].score


def test_hits_carry_scores_and_citation_fields(retriever):
    hits = retriever.search("freezing layers to reduce overfitting", 5)
    assert len(hits) == 5
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    top = hits[0]
    assert top.chunk.title == "Basics" and top.source == "lessons/01-basics.md"
    assert -1.0 <= top.dense_score <= 1.0 and top.bm25_score > 0
    assert top.dense_rank is not None and top.bm25_rank == 0
    assert top.excerpt() == "Freezing the early layers keeps general knowledge and reduces overfitting."
    short = top.excerpt(30)
    assert len(short) <= 30 and short.endswith("…")


def test_fused_score_follows_the_weights(retriever):
    dense_only = retriever.search("freezing layers", 3, dense_weight=1.0, bm25_weight=0.0)
    assert all(h.score == pytest.approx(h.dense_score) for h in dense_only)
    kw_only = retriever.search("freezing layers", 3, dense_weight=0.0, bm25_weight=1.0)
    assert kw_only[0].score == pytest.approx(1.0)  # BM25 normalised by the best score


def test_keyword_only_candidates_get_their_true_cosine(retriever, embedder):
    narrow = Retriever(retriever.index, embedder, candidates=1)
    hits = narrow.search("adaptation matrices weights", 2)
    qv = embedder.encode(["adaptation matrices weights"])[0]
    for h in hits:
        i = retriever.index.chunks.index(h.chunk)
        assert h.dense_score == pytest.approx(float(retriever.index.vectors[i] @ qv), abs=1e-5)


# --- filters -------------------------------------------------------------------------------------------


def test_section_filter(retriever):
    hits = retriever.search("what should I know", 10, section="Fine-tuning")
    assert {h.chunk.section for h in hits} == {"Fine-tuning", "Fine-tuning > Freezing layers"}
    nested = retriever.search("what should I know", 10, section="fine-tuning > freezing")  # prefix, any case
    assert [h.chunk.section for h in nested] == ["Fine-tuning > Freezing layers"]
    assert {h.source for h in retriever.search("quiz", 10, section="Logistics")} == {"faq-cert"}
    assert retriever.search("fine-tuning", 5, section="No such section") == []


def test_section_filter_by_lesson_title(retriever):
    hits = retriever.search("anything at all", 10, section="Basics")
    assert hits and {h.source for h in hits} == {"lessons/01-basics.md"}


def test_course_filter(retriever):
    assert {h.chunk.course_id for h in retriever.search("fine-tuning", 10, course="tiny")} == {"tiny"}
    assert retriever.search("fine-tuning", 5, course="another-course") == []


@pytest.fixture(scope="module")
def two_course_faq(embedder, tmp_path_factory):
    """An evaluation corpus where records belong to different courses (the FAQ benchmark's shape)."""
    rows = [
        {"id": "a1", "question": "How do I install Docker?", "text": "Use the official installer.", "course": "alpha"},
        {"id": "a2", "question": "When is the deadline?", "text": "Homework is due on Monday.", "course": "alpha"},
        {"id": "b1", "question": "How do I install Docker on Windows?", "text": "Use WSL 2 and Docker Desktop.",
         "course": "beta"},
        {"id": "b2", "question": "When is the deadline?", "text": "Projects are due on Friday.", "course": "beta"},
    ]
    p = tmp_path_factory.mktemp("faq") / "faq.json"
    p.write_text(json.dumps(rows))
    c = faq_course_from_json(p)
    return Retriever(KnowledgeIndex.build(c, embedder), embedder)


def test_course_filter_on_a_multi_course_corpus(two_course_faq):
    r = two_course_faq
    assert r.search("when is the deadline", 2, course="alpha")[0].source == "a2"
    assert r.search("when is the deadline", 2, course="beta")[0].source == "b2"
    assert {h.chunk.course_id for h in r.search("docker", 10, course="beta")} == {"beta"}
    both = {h.source for h in r.search("install docker", 10)}
    assert {"a1", "b1"} <= both


# --- distinct sources, edge cases ----------------------------------------------------------------------


def test_search_sources_are_distinct(retriever):
    hits = retriever.search_sources("fine-tuning and freezing layers", 5)
    sources = [h.source for h in hits]
    assert len(sources) == len(set(sources))
    assert sources[0] == "lessons/01-basics.md"
    assert set(sources) == {"lessons/01-basics.md", "lessons/02-lora.txt", "faq-cert", "faq-gpu"}
    # the best chunk of each source is the one kept
    assert hits[0].chunk.section == retriever.search("fine-tuning and freezing layers", 1)[0].chunk.section
    assert len(retriever.search_sources("fine-tuning", 2)) == 2


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_empty_query_returns_nothing(retriever, query):
    assert retriever.search(query, 5) == []
    assert retriever.search_sources(query, 5) == []


def test_stop_words_or_symbols_only_still_answer_densely(retriever):
    for q in ("the of and", "???", "🙂"):
        hits = retriever.search(q, 3)
        assert len(hits) == 3 and all(h.bm25_rank is None for h in hits)


def test_k_larger_than_the_index(retriever):
    assert len(retriever.search("fine-tuning", 50)) == len(retriever.index)


def test_concurrent_searches_agree(retriever):
    queries = ["what is LoRA", "why freeze layers", "certificate", "learning rate"] * 4
    expected = [[h.chunk.id for h in retriever.search(q, 3)] for q in queries]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda q: [h.chunk.id for h in retriever.search(q, 3)], queries))
    assert got == expected


def test_a_precomputed_query_vector_gives_the_same_hits(retriever, embedder):
    qv = embedder.encode(["what is LoRA"])
    a = [(h.chunk.id, h.score) for h in retriever.search("what is LoRA", 3)]
    b = [(h.chunk.id, h.score) for h in retriever.search("what is LoRA", 3, query_vector=qv)]
    assert a == b
    assert isinstance(qv, np.ndarray) and qv.shape == (1, 384)


# --- phrases ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def word_order_faq(embedder, tmp_path_factory):
    """Two records with the same words in a different order: only the phrase index tells them apart."""
    rows = [
        {"id": "apart", "question": "About training?", "text": "The rate decays while learning."},
        {"id": "phrase", "question": "About training?", "text": "The learning rate decays while."},
    ]
    p = tmp_path_factory.mktemp("phr") / "faq.json"
    p.write_text(json.dumps(rows))
    return Retriever(KnowledgeIndex.build(faq_course_from_json(p), embedder), embedder)


def test_a_phrase_match_ranks_above_the_same_words_apart(word_order_faq):
    from knowledge.text import keyword_tokens

    r = word_order_faq
    hits = r.search("what learning rate?", 2, dense_weight=0.0, bm25_weight=1.0)
    assert [h.source for h in hits] == ["phrase", "apart"]
    assert hits[0].score == pytest.approx(1.0) and hits[1].score < 1.0
    # bm25_score stays the word index's score (the tutor's relevance rule reads it): equal for both
    assert hits[0].bm25_score == pytest.approx(hits[1].bm25_score) and hits[1].bm25_score > 0
    words = r.index.bm25.get_scores(keyword_tokens("what learning rate?"))
    assert hits[0].bm25_score == pytest.approx(float(words[r.index.chunks.index(hits[0].chunk)]))
    assert hits[0].phrase_score > 0 and hits[1].phrase_score == 0
    # a one-word question has no phrase: the two records tie on keywords
    one = r.search("learning", 2, dense_weight=0.0, bm25_weight=1.0)
    assert one[0].score == pytest.approx(one[1].score) and all(h.phrase_score == 0 for h in one)


def test_cosines_of_another_text_to_the_hits_of_a_search(retriever):
    hits = retriever.search("why use a low learning rate?", 3)
    again = retriever.search("why use a low learning rate?", 3)
    assert retriever.cosines("why use a low learning rate?", hits) == pytest.approx([h.dense_score for h in again], abs=1e-5)
    other = retriever.cosines("what is a cookie recipe?", hits)
    assert len(other) == 3 and all(c < h.dense_score for c, h in zip(other, hits, strict=True))
    assert retriever.cosines("anything", []) == []
    with pytest.raises(ValueError, match="index row"):
        retriever.cosines("anything", [dataclasses.replace(hits[0], row=-1)])
