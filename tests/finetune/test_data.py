"""Fine-tuning data: examples from the course, split by source, manifest and hash, feedback from the DB."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune.data import (
    Dataset,
    DatasetError,
    FeedbackItem,
    build_dataset,
    course_examples,
    fetch_feedback,
    quiz_answer,
    split_examples,
    split_sentences,
)
from knowledge.chunking import Chunk
from knowledge.course import load_course
from knowledge.generation import build_messages
from knowledge.retriever import Hit


class FakeRetriever:
    """Returns the course's lessons as passages, the one sharing most words with the query first."""

    class _Emb:
        name = "fake-embedder"
        dim = 4

        def encode(self, texts, **kw):  # the tutor embeds the query once and hands it to search
            return np.zeros((len(texts), self.dim), dtype=np.float32)

    embedder = _Emb()

    def __init__(self, course):
        self.index = self
        self.chunks = [
            Chunk(id=f"c{i}", course_id=course.id, source=d.source, title=d.title, section=f"Part {i}", text=d.text[:500])
            for i, d in enumerate(course.documents)
        ]

    def search(self, query, k=5, *, query_vector=None):
        words = set(query.lower().split())
        ranked = sorted(self.chunks, key=lambda c: -len(words & set(c.text.lower().split())))
        return [Hit(c, 1.0 - i / 10, 0.5, 5.0, i, i) for i, c in enumerate(ranked[:k])]


@pytest.fixture(scope="module")
def sample_course():
    from tests.conftest import SAMPLE_COURSE

    return load_course(SAMPLE_COURSE)


@pytest.fixture(scope="module")
def sample_ds(sample_course, tmp_path_factory):
    return build_dataset(sample_course, FakeRetriever(sample_course), seed=7,
                         out_dir=tmp_path_factory.mktemp("ds"))


def test_examples_cover_quizzes_and_flashcards(sample_course, sample_ds):
    all_ex = sample_ds.train + sample_ds.val + sample_ds.test
    kinds = {k: sum(e.kind == k for e in all_ex) for k in ("quiz", "flashcard")}
    assert kinds == {"quiz": len(sample_course.quizzes), "flashcard": len(sample_course.flashcards)}
    q = sample_course.quizzes[0]
    ex = next(e for e in all_ex if e.id == f"quiz:{q.id}")
    assert ex.answer.lower().startswith(q.answer.lower()) and q.explanation.split()[0] in ex.answer
    assert 1 <= len(split_sentences(ex.answer)) <= 3
    assert len(ex.passages) == 3  # the tutor hands the model three passages
    assert ex.messages() == build_messages(ex.question, ex.passages)  # THE inference prompt
    card = sample_course.flashcards[0]
    assert next(e for e in all_ex if e.id == f"flashcard:{card.id}").question == card.front


def test_split_is_by_source_seeded_and_stratified(sample_ds, sample_course):
    groups = {name: {e.group for e in sample_ds.split(name)} for name in ("train", "val", "test")}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert not (groups["val"] & groups["test"])
    for name in ("val", "test"):
        assert {e.kind for e in sample_ds.split(name)} == {"quiz", "flashcard"}
    again = build_dataset(sample_course, FakeRetriever(sample_course), seed=7)
    assert again.sha256 == sample_ds.sha256  # same seed, same split, same hash
    other = build_dataset(sample_course, FakeRetriever(sample_course), seed=8)
    assert {e.id for e in other.test} != {e.id for e in sample_ds.test}


def test_same_question_from_two_sources_never_straddles(sample_course):
    card = sample_course.flashcards[0]
    fb = [FeedbackItem(answer_id=900 + i, question=f"  {card.front.upper()} ", answer=f"Answer {i}.") for i in range(4)]
    exs = course_examples(sample_course, FakeRetriever(sample_course), fb)
    same = {e.group for e in exs if e.kind in ("feedback", "flashcard") and e.question.lower().strip() == card.front.lower()}
    assert same == {f"flashcard:{card.id}"}
    for seed in range(5):
        parts = split_examples(exs, seed=seed)
        where = {name for name, lst in parts.items() for e in lst if e.group == f"flashcard:{card.id}"}
        assert len(where) == 1


def test_feedback_examples_correction_wins_and_others_ignored(sample_course):
    fb = [
        FeedbackItem(1, "what is lora?", "LoRA trains small matrices.", "approved"),
        FeedbackItem(1, "what is lora?", "LoRA adds small low-rank matrices and trains only them.", "corrected"),
        FeedbackItem(2, "is dropout useful?", "Yes.", "rejected"),
        FeedbackItem(3, "what is early stopping?", "   ", "approved"),
    ]
    exs = [e for e in course_examples(sample_course, FakeRetriever(sample_course), fb) if e.kind == "feedback"]
    assert [(e.id, e.answer) for e in exs] == [("feedback:1", "LoRA adds small low-rank matrices and trains only them.")]


def test_quiz_answer_and_long_answers_are_capped():
    assert quiz_answer("to learn general patterns", "Because. It reuses them.") == \
        "To learn general patterns. Because. It reuses them."
    assert quiz_answer("Yes!", "One. Two. Three. Four.").count(".") == 2  # at most 3 sentences
    assert split_sentences('Run `pip install x_y`. He said "ok." Then stop.') == \
        ["Run `pip install x_y`.", 'He said "ok."', "Then stop."]


def test_tiny_and_empty_datasets_are_refused_with_advice(tiny_course):
    course = load_course(tiny_course)
    with pytest.raises(DatasetError, match=r"only 3 training example.*quiz questions: 2.*flashcards: 1.*at least 10"):
        build_dataset(course, FakeRetriever(course))
    with pytest.raises(DatasetError, match="tutorbot feedback review"):
        build_dataset(course, FakeRetriever(course))
    fb = [FeedbackItem(i, f"question number {i}?", f"Answer {i}.") for i in range(20)]
    ds = build_dataset(course, FakeRetriever(course), feedback=fb)  # reviewed feedback makes it big enough
    assert ds.manifest["counts"]["train"]["feedback"] > 0


def test_manifest_and_roundtrip(sample_ds):
    m = json.loads((sample_ds.path / "manifest.json").read_text())
    assert m["course_id"] == "pretraining-finetuning" and m["seed"] == 7 and m["created_at"]
    assert m["counts"]["train"]["total"] == len(sample_ds.train)
    assert sum(m["counts"][s]["total"] for s in ("train", "val", "test")) == 64
    assert len(m["sha256"]) == 64
    loaded = Dataset.load(sample_ds.path)
    assert loaded.train == sample_ds.train and loaded.sha256 == sample_ds.sha256


def test_tampered_or_missing_files_are_detected(sample_ds, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sample_ds.path, copy)
    lines = (copy / "train.jsonl").read_text().splitlines()
    (copy / "train.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetError, match="sha256"):
        Dataset.load(copy)
    (copy / "val.jsonl").write_text("{not json\n")
    with pytest.raises(DatasetError, match=r"val\.jsonl is unreadable"):
        Dataset.load(copy)
    with pytest.raises(DatasetError, match="no manifest"):
        Dataset.load(tmp_path / "nothing")


async def test_reviewed_feedback_comes_from_the_database(session_factory):
    from knowledge.store.qa_repo import QARepository
    from knowledge.tutor import Answer

    repo = QARepository(session_factory)

    async def answer(q, text, answered=True):
        return await repo.log_answer(Answer(question=q, text=text, answered=answered, confidence=0.5),
                                     course_id="c", guild_id=1, channel_id=2, user_id=3)

    a1 = await answer("what is fine-tuning?", "Adapting a pre-trained model.")
    a2 = await answer("what is lora?", "Something wrong.")
    a3 = await answer("capital of france?", "Sorry, the course doesn't cover that.", answered=False)
    a4 = await answer("what is dropout?", "Pending answer.")
    fb1 = await repo.record_vote(a1, 10, 1)
    fb2 = await repo.record_vote(a2, 10, -1)
    fb3 = await repo.record_vote(a3, 10, 1)
    await repo.record_vote(a4, 10, 1)
    await repo.review_feedback(fb1.id, status="approved", reviewed_by="t")
    await repo.review_feedback(fb2.id, status="corrected", reviewed_by="t", corrected_answer="Low-rank adapters.")
    await repo.review_feedback(fb3.id, status="approved", reviewed_by="t")  # an approved decline: not training data
    items = await fetch_feedback(session_factory)
    got = sorted((i.question, i.answer, i.status) for i in items)
    assert got == [("what is fine-tuning?", "Adapting a pre-trained model.", "approved"),
                   ("what is lora?", "Low-rank adapters.", "corrected")]


def test_real_retriever_passages_on_the_tiny_course(tiny_course):
    """The real MiniLM + BM25 retriever picks the passage that answers the question."""
    from finetune.data import in_memory_retriever, retrieve_passages

    course = load_course(tiny_course)
    passages = retrieve_passages(course, in_memory_retriever(course), "Why use a low learning rate when fine-tuning?")
    assert passages and "low learning rate" in passages[0].text


def test_lesson_section_examples_are_grounded(sample_course):
    from finetune.data import _plain, heading_question

    assert heading_question("Quick recall: what is pre-training?") == "What is pre-training?"
    assert heading_question("Change 3: lowering the learning rate to 1e-5") == \
        "What does the course say about lowering the learning rate to 1e-5?"
    assert heading_question("Explain it yourself: two practice prompts") is None
    assert _plain("- **Bold** and `validation_data` here.\n```python\nx = 1\n```\n") == "Bold and validation_data here.\n \n"
    retr = FakeRetriever(sample_course)
    exs = [e for e in course_examples(sample_course, retr, lessons=True) if e.kind == "lesson"]
    assert exs, "no lesson examples"
    for e in exs:  # the answer's own section is always in the prompt
        assert e.id.removeprefix("lesson:") in {f"{p.source}#{p.section}" for p in e.passages}
        assert e.answer and len(split_sentences(e.answer)) <= 3
    plain = course_examples(sample_course, retr)
    assert not [e for e in plain if e.kind == "lesson"]  # off by default
