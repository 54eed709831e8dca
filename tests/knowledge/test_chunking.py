"""Chunking: heading paths, code fences, stable ids, the embedder's 256-token window, FAQ records."""

from __future__ import annotations

import random

import pytest

from knowledge.chunking import Chunk, chunk_course, chunk_document, chunk_faq, sentences
from knowledge.course import Document, FaqRecord, load_course
from knowledge.embedder import shared_minilm


@pytest.fixture(scope="module")
def minilm():
    return shared_minilm()


def by_section(chunks: list[Chunk]) -> dict[str, Chunk]:
    return {c.section: c for c in chunks}


# --- heading paths ---------------------------------------------------------------------------------


def test_tiny_course_heading_paths(tiny_course):
    chunks = chunk_course(load_course(tiny_course))
    basics = [c for c in chunks if c.source == "lessons/01-basics.md"]
    # the H1 equal to the lesson title adds nothing to the path; H3 nests under its H2
    assert [c.section for c in basics] == ["", "Pre-training", "Fine-tuning", "Fine-tuning > Freezing layers"]
    assert all(c.title == "Basics" and c.course_id == "tiny" and c.kind == "lesson" for c in basics)
    secs = by_section(basics)
    assert secs["Pre-training"].text.startswith("Pre-training teaches a model general patterns")
    assert secs["Fine-tuning"].text.endswith("low learning rate.")  # the H3 body is not in its parent
    assert secs["Fine-tuning > Freezing layers"].text == (
        "Freezing the early layers keeps general knowledge and reduces overfitting."
    )
    # the heading text itself is carried by the section path, not repeated in the passage
    assert not any(c.text.lstrip().startswith("#") for c in basics)


def test_last_paragraph_of_a_file_is_kept(tiny_course):
    """Regression: a section ending with a single newline at the end of the file was dropped."""
    chunks = chunk_course(load_course(tiny_course))
    lora = [c for c in chunks if c.source == "lessons/02-lora.txt"]
    assert len(lora) == 1 and lora[0].section == ""
    assert lora[0].text == "Low-rank adaptation (LoRA) trains small extra matrices instead of all weights."
    doc = Document("l.md", "L", "## A\n\nfirst.\n\nsecond, with trailing spaces.   \n\nthird, no newline at the end")
    assert [c.text for c in chunk_document(doc, "c")] == [
        "first.\n\nsecond, with trailing spaces.   \n\nthird, no newline at the end"
    ]


def test_embed_text_carries_title_and_section_path(tiny_course):
    chunks = chunk_course(load_course(tiny_course))
    c = by_section(chunks)["Fine-tuning > Freezing layers"]
    assert c.embed_text == "Basics > Fine-tuning > Freezing layers\n" + c.text
    intro = by_section([x for x in chunks if x.source == "lessons/01-basics.md"])[""]
    assert intro.embed_text.startswith("Basics\n")
    assert "Freezing layers" in c.keyword_text and "Basics" in c.keyword_text


def test_deeper_headings_and_heading_levels_going_back_up():
    text = "# T\n\n## A\n\na\n\n### A1\n\na1\n\n#### A1x\n\na1x\n\n## B\n\nb\n\n### B1 ###\n\nb1\n"
    secs = [c.section for c in chunk_document(Document("t.md", "T", text), "c")]
    assert secs == ["A", "A > A1", "A > A1 > A1x", "B", "B > B1"]


def test_a_top_heading_other_than_the_title_stays_in_the_path():
    doc = Document("t.md", "Lesson title", "# Another Part\n\nbody\n")
    assert [c.section for c in chunk_document(doc, "c")] == ["Another Part"]


def test_text_lessons_are_not_split_at_hash_lines():
    doc = Document("t.txt", "T", "# not a heading in a .txt\n\nbody\n", format="text")
    chunks = chunk_document(doc, "c")
    assert [c.section for c in chunks] == [""] and "# not a heading" in chunks[0].text


@pytest.mark.parametrize("fence", ["```", "~~~"])
def test_code_fences_are_not_split_as_headings(fence):
    text = (
        "# Code\n\n## Example\n\nBefore the code.\n\n"
        f"{fence}python\n# a comment, not a heading\n## neither is this\nx = 1\n{fence}\n\n"
        "After the code.\n\n## Next\n\nnext section\n"
    )
    chunks = chunk_document(Document("code.md", "Code", text), "c")
    assert [c.section for c in chunks] == ["Example", "Next"]
    example = chunks[0].text
    assert "# a comment, not a heading" in example and "## neither is this" in example
    assert example.startswith("Before the code.") and example.endswith("After the code.")


def test_sample_course_code_block_comment_is_not_a_section(sample_course_dir):
    chunks = chunk_course(load_course(sample_course_dir))
    overview = [c for c in chunks if c.source == "lessons/01-overview.md"]
    assert not any("one brand-new model per task" in c.section for c in overview)
    assert any("# one brand-new model per task" in c.text for c in overview)


# --- stable ids -----------------------------------------------------------------------------------

LESSON = "# L\n\nIntro.\n\n## A\n\ntext a\n\n## B\n\ntext b\n\n### B1\n\ntext b1\n\n## C\n\ntext c\n"


def test_same_input_same_ids(tiny_course, sample_course_dir):
    for root in (tiny_course, sample_course_dir):
        first = [c.id for c in chunk_course(load_course(root))]
        second = [c.id for c in chunk_course(load_course(root))]
        assert first == second
        assert len(set(first)) == len(first)  # unique
        assert all(len(i) == 16 and int(i, 16) >= 0 for i in first)  # hex digests, never random


def test_editing_one_section_changes_only_its_id():
    before = by_section(chunk_document(Document("l.md", "L", LESSON), "c"))
    edited = LESSON.replace("text a", "text a, now rewritten and quite a bit longer than before")
    after = by_section(chunk_document(Document("l.md", "L", edited), "c"))
    assert before.keys() == after.keys()
    changed = {s for s in before if before[s].id != after[s].id}
    assert changed == {"A"}
    # later chunks moved in the file, but keep their ids
    assert after["C"].start > before["C"].start and after["C"].id == before["C"].id


def test_inserting_a_section_keeps_the_other_ids():
    before = {c.id for c in chunk_document(Document("l.md", "L", LESSON), "c")}
    grown = LESSON.replace("## B\n", "## New\n\nbrand new text\n\n## B\n")
    after = chunk_document(Document("l.md", "L", grown), "c")
    assert before <= {c.id for c in after}
    assert len(after) == len(before) + 1


def test_ids_depend_on_course_and_source():
    a = chunk_document(Document("l.md", "L", LESSON), "c")
    b = chunk_document(Document("other.md", "L", LESSON), "c")
    c = chunk_document(Document("l.md", "L", LESSON), "other-course")
    assert not {x.id for x in a} & {x.id for x in b}
    assert not {x.id for x in a} & {x.id for x in c}


def test_repeated_identical_sections_get_distinct_ids():
    text = "# L\n\n## Example\n\nsame words\n\n## Example\n\nsame words\n"
    chunks = chunk_document(Document("l.md", "L", text), "c")
    assert len(chunks) == 2 and chunks[0].id != chunks[1].id
    assert [c.id for c in chunks] == [c.id for c in chunk_document(Document("l.md", "L", text), "c")]


# --- the 256-token window (real MiniLM tokenizer) ----------------------------------------------------

WORDS = ["pre-training", "fine-tuning", "model", "dataset", "learning", "rate", "overfitting", "adapter", "tokenizer", "gradient", "embedding", "transformer", "LoRA", "validation", "accuracy", "frozen", "layers", "dropout", "checkpoint"]


def long_lesson(seed: int = 0) -> str:
    rng = random.Random(seed)
    sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40))).capitalize() + "." for _ in range(150)]
    paragraphs = "\n\n".join(" ".join(sents[i:i + 6]) for i in range(0, len(sents), 6))
    one_giant_paragraph = " ".join(sents[:60])
    run_on = " ".join(rng.choice(WORDS) for _ in range(1500))  # no sentence end at all
    return (
        "# Long lesson\n\n## Many paragraphs\n\n" + paragraphs
        + "\n\n## One giant paragraph\n\n" + one_giant_paragraph
        + "\n\n## A run-on sentence > with a long heading path\n\n" + run_on + "\n"
    )


def test_no_chunk_exceeds_the_embedders_window(minilm):
    assert minilm.max_tokens == 256
    text = long_lesson()
    doc = Document("long.md", "Long lesson", text)
    chunks = chunk_document(doc, "c", minilm.max_tokens, minilm.count_tokens)
    sizes = [minilm.count_tokens(c.embed_text) for c in chunks]
    assert max(sizes) <= minilm.max_tokens, sizes
    assert len(chunks) >= 10
    assert {c.section for c in chunks} == {
        "Many paragraphs", "One giant paragraph", "A run-on sentence > with a long heading path",
    }
    # nothing is silently dropped: the chunks hold every word of the lesson's sections, in order
    body_words = [w for line in text.splitlines() if not line.startswith("#") for w in line.split()]
    assert [w for c in chunks for w in c.text.split()] == body_words
    # and chunks are not needlessly tiny: most use a good part of the window
    assert sorted(sizes)[len(sizes) // 2] > 120


def test_a_long_faq_answer_is_split_within_the_window(minilm):
    rec = FaqRecord(id="r1", question="What happens with very long answers?", answer=long_lesson(1).split("\n\n", 2)[2])
    chunks = chunk_faq(rec, "c", "FAQ", minilm.max_tokens, minilm.count_tokens)
    assert len(chunks) > 1
    assert max(minilm.count_tokens(c.embed_text) for c in chunks) <= minilm.max_tokens
    assert len({c.id for c in chunks}) == len(chunks)


def test_sample_course_chunks_fit_the_window(sample_course_dir, minilm):
    chunks = chunk_course(load_course(sample_course_dir), minilm.max_tokens, minilm.count_tokens)
    assert max(minilm.count_tokens(c.embed_text) for c in chunks) <= minilm.max_tokens
    # every lesson's closing words are indexed (regression for the dropped last paragraph)
    for doc in load_course(sample_course_dir).documents:
        last_words = doc.text.split()[-5:]
        own = " ".join(c.text for c in chunks if c.source == doc.source).split()
        assert own[-5:] == last_words, doc.source


# --- FAQ records ------------------------------------------------------------------------------------


def test_a_faq_record_is_one_chunk():
    rec = FaqRecord(id="faq-7", question="Can I join late?", answer="Yes, you can join at any time.", section="General")
    (chunk,) = chunk_faq(rec, "course-x", "The Course")
    assert chunk.kind == "faq" and chunk.source == "faq-7" and chunk.section == "General"
    assert chunk.question == "Can I join late?" and chunk.text == "Yes, you can join at any time."
    assert chunk.embed_text == "Can I join late?\nYes, you can join at any time."  # question + answer together
    assert chunk.course_id == "course-x" and chunk.title == "The Course"
    assert chunk_faq(rec, "course-x", "The Course")[0].id == chunk.id


def test_phrase_fields_are_a_faq_records_own_text(tiny_course):
    rec = FaqRecord(id="r", question="Can I join late?", answer="Yes.", section="General")
    (chunk,) = chunk_faq(rec, "course-x", "Machine Learning Zoomcamp")
    assert chunk.phrase_fields == ("General", "Can I join late?", "Yes.")  # the course name is the filter
    assert "Machine Learning Zoomcamp" in chunk.keyword_text  # the word index and vocabulary keep it
    lesson = by_section(chunk_course(load_course(tiny_course)))["Fine-tuning > Freezing layers"]
    assert lesson.phrase_fields == ()


def test_faq_record_course_field_sets_the_chunk_course():
    rec = FaqRecord(id="r", question="Q?", answer="A.", course="data-engineering-zoomcamp")
    assert chunk_faq(rec, "faq", "T")[0].course_id == "data-engineering-zoomcamp"


def test_faq_records_in_a_course(tmp_path):
    from tests.conftest import TINY_COURSE, write_course

    root = write_course(tmp_path / "c", {
        **TINY_COURSE,
        "faq/f.jsonl": '{"id": "f1", "question": "Q one?", "answer": "A one."}\n'
                       '{"id": "f2", "question": "Q two?", "answer": "A two."}\n',
    })
    faq = [c for c in chunk_course(load_course(root)) if c.kind == "faq"]
    assert [(c.source, c.question, c.text, c.course_id) for c in faq] == [
        ("f1", "Q one?", "A one.", "tiny"), ("f2", "Q two?", "A two.", "tiny"),
    ]


# --- sentences (extractive answers) -------------------------------------------------------------------


def test_sentences_strip_markdown_markers():
    text = "- **Pre-training** learns broad patterns. It uses lots of data.\n\n1. Fine-tuning `adapts` it."
    assert list(sentences(text)) == [
        "Pre-training learns broad patterns.", "It uses lots of data.", "Fine-tuning adapts it.",
    ]


# --- sentences of a passage (extractive answers) ------------------------------------------------------


def test_sentences_leave_code_blocks_out_and_keep_identifiers():
    text = (
        "The model is compiled with **binary_crossentropy** and watches `val_loss`.\n\n"
        "```python\nopt = Adam(learning_rate=1e-5)  # very small steps\nmodel.compile(opt)\n```\n\n"
        "Why: small steps are _gentle_."
    )
    assert list(sentences(text)) == [
        "The model is compiled with binary_crossentropy and watches val_loss.",
        "Why: small steps are gentle.",
    ]


def test_a_markdown_table_reads_as_sentences():
    text = (
        "After the four changes:\n\n"
        "| | Training accuracy | Validation accuracy |\n|---|---|---|\n"
        "| Before | 98% | 70% (overfitting) |\n| After | 90% | 87% |\n"
    )
    assert list(sentences(text)) == [
        "After the four changes:",
        "Before: Training accuracy 98%, Validation accuracy 70% (overfitting).",
        "After: Training accuracy 90%, Validation accuracy 87%.",
    ]
    assert not any("|" in s for s in sentences(text))


def test_list_items_are_sentences():
    assert list(sentences("- **Freeze** layers,\n- Lower the learning rate.\n1. Stop early;")) == [
        "Freeze layers.", "Lower the learning rate.", "Stop early.",  # an item's trailing comma or semicolon ends it
    ]
