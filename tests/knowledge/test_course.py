"""Course loading: the sample and tiny courses load; every bad input is refused whole, naming the
file (and the line, record or field) at fault (issue 2, "Bad input")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knowledge.course import (
    MAX_FILE_BYTES,
    Course,
    CourseError,
    faq_course_from_json,
    load_course,
)
from tests.conftest import TINY_COURSE, write_course


def refused(root: Path) -> CourseError:
    """Load a course that must fail; return the error (the whole course is refused, no partial Course)."""
    with pytest.raises(CourseError) as err:
        load_course(root)
    return err.value


def broken(tmp_path: Path, files: dict[str, str], remove: tuple[str, ...] = ()) -> Path:
    """The tiny course with some files replaced/added (and some removed)."""
    root = write_course(tmp_path / "course", {**TINY_COURSE, **files})
    for rel in remove:
        (root / rel).unlink()
    return root


def problem_about(err: CourseError, rel: str) -> str:
    matches = [p for p in err.problems if p.startswith(f"{rel}:")]
    assert matches, f"no problem names {rel}: {err.problems}"
    return matches[0]


# --- good courses --------------------------------------------------------------------------------


def test_sample_course_loads(sample_course_dir):
    c = load_course(sample_course_dir)
    assert isinstance(c, Course)
    assert c.id == "pretraining-finetuning" and c.title
    assert len(c.documents) >= 4
    assert len(c.quizzes) >= 25
    assert len(c.flashcards) >= 10
    assert {q.difficulty for q in c.quizzes} == {"easy", "medium", "hard"}
    assert all(q.explanation and q.answer in q.choices for q in c.quizzes)
    assert all(2 <= len(q.choices) <= 6 for q in c.quizzes)
    assert c.warnings == ()
    # lessons come in front-matter order, sources are POSIX paths relative to the course folder
    assert [d.order for d in c.documents] == sorted(d.order for d in c.documents)
    assert all(d.source.startswith("lessons/") and d.source.endswith(".md") for d in c.documents)
    assert not any(d.text.startswith("---") for d in c.documents)  # front matter stripped


def test_tiny_course_loads(tiny_course):
    c = load_course(tiny_course)
    assert c.id == "tiny" and c.title == "Tiny Course" and c.meta.description == "A course for tests."
    assert [d.source for d in c.documents] == ["lessons/01-basics.md", "lessons/02-lora.txt"]
    basics, lora = c.documents
    assert basics.title == "Basics" and basics.order == 1 and basics.tags == ("intro",)
    assert basics.format == "markdown" and lora.format == "text"
    assert lora.title == "02 Lora"  # no front matter, no heading: from the file name
    assert [q.id for q in c.quizzes] == ["q1", "q2"]
    assert c.quiz_sources == ("quizzes/basics.yaml", "quizzes/basics.yaml")
    assert c.quizzes[0].answer_index == 0
    assert [f.id for f in c.flashcards] == ["c1"]


def test_title_from_first_heading_and_crlf_and_bom(tmp_path):
    root = broken(tmp_path, {})
    (root / "lessons/03-win.md").write_bytes("\ufeff# Windows Lesson\r\n\r\nSaved with CRLF.\r\n".encode())
    doc = next(d for d in load_course(root).documents if d.source == "lessons/03-win.md")
    assert doc.title == "Windows Lesson"
    assert "\r" not in doc.text and not doc.text.startswith("\ufeff")


def test_files_in_hidden_folders_are_ignored(tmp_path):
    root = broken(tmp_path, {
        "lessons/.ipynb_checkpoints/01-basics-checkpoint.md": TINY_COURSE["lessons/01-basics.md"],
        "quizzes/.backup/basics.yaml": TINY_COURSE["quizzes/basics.yaml"],  # would be duplicate ids
        "faq/.cache/broken.json": "[{]",
    })
    c = load_course(root)
    assert [d.source for d in c.documents] == ["lessons/01-basics.md", "lessons/02-lora.txt"]
    assert c.quiz_sources == ("quizzes/basics.yaml", "quizzes/basics.yaml") and c.faq == ()


def test_course_without_quizzes_loads_with_a_warning(tmp_path):
    root = broken(tmp_path, {}, remove=("quizzes/basics.yaml",))
    c = load_course(root)
    assert c.quizzes == ()
    assert any("no quiz questions" in w for w in c.warnings)


# --- FAQ files in each format -------------------------------------------------------------------

FAQ_ROWS = [
    {"id": "faq-1", "question": "How long is the course?", "answer": "About four hours.", "section": "Logistics"},
    {"id": "faq-2", "question": "Is there a certificate?", "answer": "Yes, after the final quiz.", "section": "Logistics"},
]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_faq_in_each_format(tmp_path, fmt):
    if fmt == "json":
        content = json.dumps(FAQ_ROWS)
    elif fmt == "jsonl":
        content = "\n".join(json.dumps(r) for r in FAQ_ROWS) + "\n\n"
    else:
        content = "id,question,answer,section\n" + "".join(
            f'{r["id"]},"{r["question"]}","{r["answer"]}",{r["section"]}\n' for r in FAQ_ROWS
        )
    c = load_course(broken(tmp_path, {f"faq/general.{fmt}": content}))
    assert [(r.id, r.question, r.answer, r.section) for r in c.faq] == [
        (r["id"], r["question"], r["answer"], r["section"]) for r in FAQ_ROWS
    ]
    assert c.faq_sources == (f"faq/general.{fmt}",) * 2


def test_faq_text_column_document_id_and_default_ids(tmp_path):
    rows = [
        {"document": "doc-7", "question": "What is it?", "text": "An answer in the text field."},
        {"question": "No id here?", "answer": "Then one is made from the file name."},
    ]
    c = load_course(broken(tmp_path, {"faq/misc.json": json.dumps({"records": rows})}))
    assert [r.id for r in c.faq] == ["doc-7", "misc-2"]
    assert c.faq[0].answer == "An answer in the text field."


def test_a_course_of_faq_only_loads(tmp_path):
    root = write_course(tmp_path / "faqonly", {
        "course.yaml": "id: faqonly\ntitle: FAQ only\n",
        "faq/a.json": json.dumps(FAQ_ROWS),
    })
    c = load_course(root)
    assert c.documents == () and len(c.faq) == 2


def test_faq_course_from_json(tmp_path):
    p = tmp_path / "faq.json"
    rows = [
        {"id": "r1", "question": "Q one?", "text": "A one.", "section": "S", "course": "c1"},
        {"id": "r2", "question": "Q two?", "text": "A two.", "section": "S", "course": "c2"},
        {"id": "r2", "question": "Q two again?", "text": "Near duplicate.", "section": "S", "course": "c2"},
    ]
    p.write_text(json.dumps(rows), encoding="utf-8")
    c = faq_course_from_json(p)
    assert c.id == "faq" and len(c.faq) == 3
    assert [r.course for r in c.faq] == ["c1", "c2", "c2"]
    assert any("duplicate FAQ record id 'r2'" in w for w in c.warnings)  # published data: a warning


def test_faq_course_from_json_bad_record_names_file_and_record(tmp_path):
    p = tmp_path / "faq.json"
    p.write_text(json.dumps([{"id": "r1", "question": "Q?", "text": "A."}, {"id": "r2", "text": "no question"}]))
    with pytest.raises(CourseError) as err:
        faq_course_from_json(p)
    assert err.value.problems == ["faq.json: record 2: question: String should have at least 1 character"]
    p.write_text("[]")
    with pytest.raises(CourseError, match=r"faq\.json: no FAQ records"):
        faq_course_from_json(p)


# --- malformed YAML / JSON / CSV: file and line named ---------------------------------------------


def test_malformed_quiz_yaml_names_file_and_line(tmp_path):
    err = refused(broken(tmp_path, {"quizzes/basics.yaml": "questions:\n  - id: q1\n    question: [unclosed\n"}))
    msg = problem_about(err, "quizzes/basics.yaml")
    assert "malformed YAML at line 4" in msg
    assert "quizzes/basics.yaml" in str(err) and "docs/COURSE_FORMAT.md" in str(err)


def test_malformed_course_yaml(tmp_path):
    err = refused(broken(tmp_path, {"course.yaml": 'id: tiny\ntitle: "unterminated\n'}))
    assert "malformed YAML at line" in problem_about(err, "course.yaml")


def test_malformed_flashcard_yaml(tmp_path):
    err = refused(broken(tmp_path, {"flashcards/cards.yaml": "cards:\n  - front: a\n   back: b\n"}))
    assert "malformed YAML at line 3" in problem_about(err, "flashcards/cards.yaml")


def test_malformed_json_names_file_line_and_column(tmp_path):
    bad = '[{"id": "a", "question": "q?", "answer": "a"},\n {"id": }]'
    err = refused(broken(tmp_path, {"faq/f.json": bad}))
    assert problem_about(err, "faq/f.json") == "faq/f.json: malformed JSON at line 2, column 9: Expecting value"


def test_malformed_jsonl_names_the_line(tmp_path):
    bad = '{"id": "a", "question": "q?", "answer": "a"}\n\n{bad json\n'
    err = refused(broken(tmp_path, {"faq/f.jsonl": bad}))
    assert problem_about(err, "faq/f.jsonl").startswith("faq/f.jsonl: line 3: malformed JSON")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('id,question,answer\na,"unclosed quote,ans\n', "faq/f.csv: line 2: malformed CSV"),
        ("id,question,answer\na,q?,ans\nb,q2?,ans,EXTRA\n", "faq/f.csv: line 3: malformed CSV: 4 fields, the header has 3"),
        ("id,question,answer\na,q?\n", "faq/f.csv: line 2: malformed CSV: 2 fields, the header has 3"),
        ("", "faq/f.csv: empty CSV"),
    ],
    ids=["unclosed-quote", "extra-field", "missing-field", "empty"],
)
def test_malformed_csv_names_file_and_line(tmp_path, content, expected):
    err = refused(broken(tmp_path, {"faq/f.csv": content}))
    assert problem_about(err, "faq/f.csv").startswith(expected)


def test_csv_quoted_newlines_keep_line_numbers_right(tmp_path):
    content = 'id,question,answer\na,q?,"two\nlines"\nb,,ans\n'
    err = refused(broken(tmp_path, {"faq/f.csv": content}))
    assert problem_about(err, "faq/f.csv") == (
        "faq/f.csv: record 2 (line 4): question: String should have at least 1 character"
    )


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("f.json", '[{"id": "a", "question": "q?", "answer": "a"}, {"id": "b", "answer": "a"}]',
         "faq/f.json: record 2: question:"),
        ("f.json", "[1]", "faq/f.json: record 1: record must be an object"),
        ("f.json", '{"question": "not a list"}', "faq/f.json: expected a JSON list of records"),
        ("f.json", "[]", "faq/f.json: no FAQ records"),
        ("f.jsonl", '{"id": "a", "question": "q?"}\n', "faq/f.jsonl: record 1 (line 1): answer:"),
        ("f.csv", "id,question,answer\n", "faq/f.csv: no FAQ records"),
    ],
)
def test_bad_faq_records_name_file_record_and_field(tmp_path, name, content, expected):
    err = refused(broken(tmp_path, {f"faq/{name}": content}))
    assert problem_about(err, f"faq/{name}").startswith(expected)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"question": ["q1", "q2"]}, "record 1: question: must be text, not a list"),
        ({"answer": True}, "record 1: answer: must be text, not true/false"),
        ({"answer": None, "text": {"x": 1}}, "record 1: text: must be text, not an object"),
        ({"section": False}, "record 1: section: must be text, not true/false"),
    ],
)
def test_faq_values_that_are_not_text_are_refused(tmp_path, fields, expected):
    row = {k: v for k, v in {**FAQ_ROWS[0], **fields}.items() if v is not None}
    err = refused(broken(tmp_path, {"faq/f.json": json.dumps([row])}))
    assert err.problems == [f"faq/f.json: {expected}"]


def test_faq_numeric_id_is_still_accepted(tmp_path):
    c = load_course(broken(tmp_path, {"faq/f.json": json.dumps([{**FAQ_ROWS[0], "id": 7}])}))
    assert c.faq[0].id == "7"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("id,question,section\na,q?,s\nb,q2?,s\n", "faq/f.csv: no 'answer' or 'text' column; found: id, question, section"),
        ("id,answer\na,ans\nb,ans\n", "faq/f.csv: no 'question' column; found: id, answer"),
        ("id,question,answer,Answer\na,q?,,ans\n", "faq/f.csv: duplicate column(s) in the header: 'answer', 'Answer'"),
    ],
    ids=["no-answer-column", "no-question-column", "duplicate-header"],
)
def test_faq_csv_header_problems_are_one_line(tmp_path, content, expected):
    err = refused(broken(tmp_path, {"faq/f.csv": content}))
    assert err.problems == [expected]


# --- empty, binary, non-UTF-8, huge --------------------------------------------------------------


def test_empty_course_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    err = refused(tmp_path / "empty")
    assert any(p.startswith("course.yaml: missing") for p in err.problems)
    assert any("nothing to teach" in p for p in err.problems)


def test_course_without_lessons_or_faq_is_refused(tmp_path):
    root = write_course(tmp_path / "c", {"course.yaml": TINY_COURSE["course.yaml"],
                                         "quizzes/basics.yaml": TINY_COURSE["quizzes/basics.yaml"]})
    err = refused(root)
    assert err.problems == [
        "course has no lessons (lessons/*.md|*.txt) and no FAQ records (faq/*): nothing to teach"
    ]


def test_missing_folder_is_refused(tmp_path):
    err = refused(tmp_path / "nope")
    assert "no such course folder" in str(err) and "nope" in str(err)


def test_empty_lesson_and_empty_data_files(tmp_path):
    err = refused(broken(tmp_path, {
        "lessons/03-empty.md": "  \n\n",
        "lessons/04-only-front-matter.md": "---\ntitle: Nothing else\n---\n",
        "quizzes/basics.yaml": "",
        "flashcards/cards.yaml": "# just a comment\n",
    }))
    assert problem_about(err, "lessons/03-empty.md") == "lessons/03-empty.md: lesson is empty"
    assert problem_about(err, "lessons/04-only-front-matter.md").endswith("lesson is empty")
    assert "file is empty; expected a 'questions:' list" in problem_about(err, "quizzes/basics.yaml")
    assert "file is empty; expected a 'cards:' list" in problem_about(err, "flashcards/cards.yaml")


def test_a_lesson_of_headings_only_is_refused(tmp_path):
    """It would give no passage at all (a course of such lessons used to crash the index build)."""
    err = refused(broken(tmp_path, {"lessons/03-draft.md": "# Draft\n\n## To do\n\n### Later\n"}))
    assert problem_about(err, "lessons/03-draft.md") == "lessons/03-draft.md: lesson has headings but no text under them"
    ok = broken(tmp_path / "ok", {"lessons/03-code.md": "# Code\n\n```\n# a comment\n```\n"})
    assert any(d.source == "lessons/03-code.md" for d in load_course(ok).documents)


def test_non_utf8_file_is_refused_naming_file_and_line(tmp_path):
    root = broken(tmp_path, {})
    (root / "lessons/03-latin1.md").write_bytes(b"# Cafe\n\nOK line.\nCaf\xe9 au lait.\n")
    err = refused(root)
    msg = problem_about(err, "lessons/03-latin1.md")
    assert "not valid UTF-8 at line 4" in msg and "save it as UTF-8" in msg


def test_non_utf8_position_after_a_bom_counts_the_real_bytes(tmp_path):
    root = broken(tmp_path, {})
    (root / "lessons/03-bom.md").write_bytes(b"\xef\xbb\xbfab\ncd\n\xe9\n")
    assert problem_about(refused(root), "lessons/03-bom.md") == (
        "lessons/03-bom.md: not valid UTF-8 at line 3 (byte 9); save it as UTF-8"
    )


def test_non_utf8_faq_csv(tmp_path):
    root = broken(tmp_path, {})
    (root / "faq").mkdir()
    (root / "faq/f.csv").write_bytes("id,question,answer\na,Qu'est-ce?,Réponse\n".encode("cp1252"))
    assert "not valid UTF-8 at line 2" in problem_about(refused(root), "faq/f.csv")


@pytest.mark.parametrize("rel", ["lessons/03-image.md", "quizzes/image.yaml", "course.yaml"])
def test_binary_file_is_refused(tmp_path, rel):
    root = broken(tmp_path, {})
    (root / rel).write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00")
    assert "looks like a binary file" in problem_about(refused(root), rel)


def test_huge_file_is_refused(tmp_path):
    root = broken(tmp_path, {})
    big = root / "lessons/03-huge.md"
    with open(big, "wb") as f:
        f.write(b"# Huge\n\n")
        f.write(b"All work and no play. " * (MAX_FILE_BYTES // 22 + 10))
    assert big.stat().st_size > MAX_FILE_BYTES
    msg = problem_about(refused(root), "lessons/03-huge.md")
    assert msg == f"lessons/03-huge.md: file is {big.stat().st_size / 2**20:.1f} MiB, over the 5 MiB limit"


def test_file_just_under_the_limit_loads(tmp_path):
    root = broken(tmp_path, {})
    para = "A sentence about fine-tuning with a small dataset and a low learning rate.\n\n"
    (root / "lessons/03-big.md").write_text("# Big\n\n" + para * ((MAX_FILE_BYTES - 100) // len(para)))
    assert any(d.source == "lessons/03-big.md" for d in load_course(root).documents)


# --- course.yaml ---------------------------------------------------------------------------------


def test_missing_course_yaml(tmp_path):
    err = refused(broken(tmp_path, {}, remove=("course.yaml",)))
    assert err.problems == ["course.yaml: missing (needs id, title, description)"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "course.yaml: file is empty"),
        ("- id: x\n", "course.yaml: expected a mapping"),
        ("id: 'bad id!'\ntitle: T\n", "course.yaml: id: must be 1-64 letters"),
        ("id: x\n", "course.yaml: title: Field required"),
        ("id: x\ntitle: T\nauthor: me\n", "course.yaml: author: Extra inputs are not permitted"),
        ("id: x\ntitle: T\naliases: [lr]\n", "course.yaml: aliases: expected a mapping of word: meaning"),
        ("id: x\ntitle: T\naliases:\n  learning rate: lr\n", "course.yaml: aliases: 'learning rate': an alias is one word"),
        ("id: x\ntitle: T\naliases:\n  lr: ''\n", "course.yaml: aliases: 'lr': its meaning must be 1-100 characters"),
        ("id: x\ntitle: T\naliases:\n  lr: [a, b]\n", "course.yaml: aliases: 'lr': its meaning must be text"),
    ],
)
def test_bad_course_yaml(tmp_path, content, expected):
    assert problem_about(refused(broken(tmp_path, {"course.yaml": content})), "course.yaml").startswith(expected)


def test_course_aliases_are_read_lower_cased_and_sorted(tmp_path):
    c = load_course(broken(tmp_path, {"course.yaml": "id: x\ntitle: T\naliases:\n  LR: learning   rate\n  acc: accuracy\n"}))
    assert c.meta.aliases == (("acc", "accuracy"), ("lr", "learning rate"))


def test_too_many_aliases(tmp_path):
    many = "".join(f"  w{i}: word {i}\n" for i in range(501))
    err = refused(broken(tmp_path, {"course.yaml": "id: x\ntitle: T\naliases:\n" + many}))
    assert "at most 500 aliases (found 501)" in problem_about(err, "course.yaml")


# --- front matter --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("front", "expected"),
    [
        ("title: [unclosed\n", "malformed front matter"),
        ("- a list\n", "front matter must be a mapping"),
        ("order: first\n", "front matter: order: Input should be a valid integer"),
        ("author: me\n", "front matter: author: Extra inputs are not permitted"),
        ("tags: 5\n", "front matter: tags: Input should be a valid list"),
    ],
)
def test_bad_front_matter_names_file_and_field(tmp_path, front, expected):
    err = refused(broken(tmp_path, {"lessons/01-basics.md": f"---\n{front}---\n# Basics\n\nSome text.\n"}))
    assert expected in problem_about(err, "lessons/01-basics.md")


def test_front_matter_yaml_error_gives_line_and_column_in_the_file(tmp_path):
    err = refused(broken(tmp_path, {"lessons/01-basics.md": "---\ntitle: Basics\nbad: x: y\n---\n# Basics\n\nText.\n"}))
    assert problem_about(err, "lessons/01-basics.md") == (
        "lessons/01-basics.md: malformed front matter at line 3, column 7: mapping values are not allowed here"
    )


def test_unclosed_front_matter_is_refused(tmp_path):
    err = refused(broken(tmp_path, {"lessons/01-basics.md": "---\ntitle: Basics\n\n# Basics\n\nSome text.\n"}))
    assert problem_about(err, "lessons/01-basics.md") == (
        "lessons/01-basics.md: front matter opened on line 1 is never closed with ---"
    )


@pytest.mark.parametrize("content", ["---\ntitle: Only front matter\n---", "---\r\ntitle: Only front matter\r\n---  "])
def test_front_matter_closed_at_end_of_file_is_front_matter(tmp_path, content):
    err = refused(broken(tmp_path, {"lessons/03-only.md": content}))
    assert problem_about(err, "lessons/03-only.md") == "lessons/03-only.md: lesson is empty"


def test_empty_front_matter_is_fine(tmp_path):
    c = load_course(broken(tmp_path, {"lessons/03-empty-fm.md": "---\n---\n# Empty FM\n\nSome text.\n"}))
    doc = next(d for d in c.documents if d.source == "lessons/03-empty-fm.md")
    assert doc.title == "Empty FM" and not doc.text.startswith("---")


# --- duplicate ids -------------------------------------------------------------------------------

EXTRA_QUIZ = "questions:\n  - id: q1\n    question: Again?\n    choices: [Sure, Nope]\n    answer: Nope\n    explanation: e\n"


def test_duplicate_quiz_id_across_files(tmp_path):
    err = refused(broken(tmp_path, {"quizzes/more.yaml": EXTRA_QUIZ}))
    assert problem_about(err, "quizzes/more.yaml") == (
        "quizzes/more.yaml: duplicate quiz question id 'q1' (also in quizzes/basics.yaml)"
    )


def test_duplicate_flashcard_id_names_both_files(tmp_path):
    err = refused(broken(tmp_path, {"flashcards/more.yaml": "cards:\n  - id: c1\n    front: F\n    back: B\n"}))
    assert problem_about(err, "flashcards/more.yaml") == (
        "flashcards/more.yaml: duplicate flashcard id 'c1' (also in flashcards/cards.yaml)"
    )


def test_duplicate_faq_id_across_files(tmp_path):
    err = refused(broken(tmp_path, {"faq/a.json": json.dumps(FAQ_ROWS[:1]), "faq/b.jsonl": json.dumps(FAQ_ROWS[0])}))
    assert problem_about(err, "faq/b.jsonl") == "faq/b.jsonl: duplicate FAQ record id 'faq-1' (also in faq/a.json)"


def test_duplicate_ids_within_one_file_name_both_entries(tmp_path):
    quizzes = TINY_COURSE["quizzes/basics.yaml"] + EXTRA_QUIZ.removeprefix("questions:\n")
    cards = "cards:\n" + "".join(f"  - id: {i}\n    front: F\n    back: B\n" for i in ("c1", "c2", "c1"))
    faq = "id,question,answer\nfaq-1,Q?,A.\nfaq-2,Q2?,A2.\nfaq-1,Q3?,A3.\n"
    err = refused(broken(tmp_path, {"quizzes/basics.yaml": quizzes, "flashcards/cards.yaml": cards, "faq/f.csv": faq}))
    assert problem_about(err, "quizzes/basics.yaml") == (
        "quizzes/basics.yaml: duplicate quiz question id 'q1' in entry 1 and entry 3"
    )
    assert problem_about(err, "flashcards/cards.yaml") == (
        "flashcards/cards.yaml: duplicate flashcard id 'c1' in entry 1 and entry 3"
    )
    assert problem_about(err, "faq/f.csv") == (
        "faq/f.csv: duplicate FAQ record id 'faq-1' in record 1 (line 2) and record 3 (line 4)"
    )


# --- quiz questions ------------------------------------------------------------------------------


def quiz(**fields) -> str:
    base = {"id": "q1", "question": "What?", "choices": ["Alpha", "Beta"], "answer": "Alpha", "explanation": "Because."}
    base.update(fields)
    base = {k: v for k, v in base.items() if v is not None}
    return "questions:\n  - " + json.dumps(base) + "\n"  # JSON is valid YAML


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"answer": "Gamma"}, "entry 1 (id q1): (record): answer 'Gamma' is not one of the choices"),
        ({"choices": ["Alpha"]}, "entry 1 (id q1): choices: List should have at least 2 items"),
        ({"choices": list("ABCDEFG"), "answer": "A"}, "entry 1 (id q1): choices: List should have at most 6 items"),
        ({"choices": ["Alpha", "alpha "]}, "entry 1 (id q1): choices: duplicated choice"),
        ({"choices": ["Alpha", " "]}, "entry 1 (id q1): choices: a choice is empty"),
        ({"explanation": None}, "entry 1 (id q1): explanation: Field required"),
        ({"difficulty": "extreme"}, "entry 1 (id q1): difficulty: Input should be 'easy', 'medium' or 'hard'"),
        ({"id": "has space"}, "entry 1 (id has space): id: must be 1-64 letters"),
        ({"hint": "nope"}, "entry 1 (id q1): hint: Extra inputs are not permitted"),
        ({"choices": ["A" * 81, "Beta"], "answer": "Beta"}, "question q1: choice 1 is 81 characters, over the 80 limit"),
    ],
    ids=["answer-not-in-choices", "one-choice", "seven-choices", "duplicate-choice", "empty-choice",
         "no-explanation", "bad-difficulty", "bad-id", "unknown-field", "choice-too-long"],
)
def test_bad_quiz_question_names_file_entry_and_field(tmp_path, fields, expected):
    err = refused(broken(tmp_path, {"quizzes/basics.yaml": quiz(**fields)}))
    assert problem_about(err, "quizzes/basics.yaml").startswith(f"quizzes/basics.yaml: {expected}")


def test_six_choices_of_80_characters_are_fine(tmp_path):
    choices = [f"{i}" * 80 for i in range(6)]
    c = load_course(broken(tmp_path, {"quizzes/basics.yaml": quiz(choices=choices, answer=choices[5])}))
    assert c.quizzes[0].answer_index == 5


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"choices": ["Alpha", 2]}, "entry 1 (id q1): choice 2: Input should be a valid string"),
        ({"tags": ["ok", 5]}, "entry 1 (id q1): tag 2: Input should be a valid string"),
        ({"common_mistakes": [None]}, "entry 1 (id q1): common mistake 1: Input should be a valid string"),
    ],
)
def test_list_positions_in_messages_count_from_1(tmp_path, fields, expected):
    err = refused(broken(tmp_path, {"quizzes/basics.yaml": quiz(**fields)}))
    assert problem_about(err, "quizzes/basics.yaml") == f"quizzes/basics.yaml: {expected}"


def test_quiz_file_entry_of_the_wrong_type_counts_from_1(tmp_path):
    err = refused(broken(tmp_path, {"quizzes/basics.yaml": "questions:\n  - just a string\n"}))
    assert problem_about(err, "quizzes/basics.yaml").endswith("(question 1: Input should be a valid dictionary)")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("- id: x\n", "expected a mapping with a non-empty 'questions:' list"),
        ("questions: []\n", "expected a mapping with a non-empty 'questions:' list"),
        ("question:\n  - id: x\n", "expected a mapping with a non-empty 'questions:' list"),
    ],
)
def test_quiz_file_of_the_wrong_shape(tmp_path, content, expected):
    assert expected in problem_about(refused(broken(tmp_path, {"quizzes/basics.yaml": content})), "quizzes/basics.yaml")


def test_bad_flashcard_names_entry_and_field(tmp_path):
    err = refused(broken(tmp_path, {"flashcards/cards.yaml": "cards:\n  - id: c1\n    front: F\n"}))
    assert problem_about(err, "flashcards/cards.yaml") == "flashcards/cards.yaml: entry 1 (id c1): back: Field required"


@pytest.mark.parametrize("ident", ['""', "'  '"])
def test_flashcard_with_an_empty_id_is_refused(tmp_path, ident):
    err = refused(broken(tmp_path, {"flashcards/cards.yaml": f"cards:\n  - id: {ident}\n    front: F\n    back: B\n"}))
    assert problem_about(err, "flashcards/cards.yaml") == (
        "flashcards/cards.yaml: entry 1: id: String should have at least 1 character"
    )


# --- refused whole -------------------------------------------------------------------------------


def test_every_problem_is_listed_and_nothing_half_loads(tmp_path):
    root = broken(tmp_path, {
        "quizzes/basics.yaml": quiz(answer="Gamma"),
        "faq/f.json": "[{]",
        "lessons/03-empty.md": "",
    })
    err = refused(root)
    named = {p.split(":", 1)[0] for p in err.problems}
    assert {"quizzes/basics.yaml", "faq/f.json", "lessons/03-empty.md"} <= named
    assert f"({len(err.problems)} problem(s))" in str(err)
    assert err.course_dir == root.resolve()


def test_an_image_pasted_as_a_data_uri_is_left_out_with_a_warning(tmp_path):
    blob = "iVBORw0KGgo" + "A" * 60_000
    root = write_course(tmp_path / "c", {
        **TINY_COURSE,
        "lessons/03-figure.md": f"# Figure\n\nThe loss curve:\n\n![loss curve]({'data:image/png;base64,' + blob})\n\n"
                                f'Raw HTML too: <img src="data:image/png;base64,{blob}">\n',
    })
    course = load_course(root)
    doc = next(d for d in course.documents if d.source == "lessons/03-figure.md")
    assert "base64" not in doc.text and "(image: loss curve)" in doc.text and "Raw HTML too:" in doc.text
    found = [w for w in course.warnings if "embedded image" in w]
    assert len(found) == 2 and found[0].startswith("lessons/03-figure.md: line 5: an embedded image (58 KiB")


def test_a_lesson_with_another_text_suffix_is_named_in_a_warning(tmp_path):
    root = write_course(tmp_path / "c", {**TINY_COURSE, "lessons/03-extra.markdown": "# Extra\n\nNot read.\n",
                                         "lessons/figure.png": "not text"})
    course = load_course(root)
    assert [d.source for d in course.documents] == ["lessons/01-basics.md", "lessons/02-lora.txt"]
    assert "lessons/03-extra.markdown: not read: lessons are .md or .txt files (rename it to read it)" in course.warnings
    assert not any("figure.png" in w for w in course.warnings)  # images beside lessons are fine


# --- HTML comments ---------------------------------------------------------------------------------


def test_html_comments_are_the_authors_and_never_reach_students(tmp_path):
    lesson = ("---\ntitle: Notes\n---\n## Section\n<!-- TODO: check the numbers with Sam -->\n\nVisible text.\n\n"
              "<!--\nA note\nover lines\n-->\nMore text.\n\n```html\n<!-- a comment in code is code -->\n```\n")
    c = load_course(broken(tmp_path, {"lessons/03-notes.md": lesson}))
    doc = next(d for d in c.documents if d.source == "lessons/03-notes.md")
    assert "TODO" not in doc.text and "over lines" not in doc.text
    assert "Visible text." in doc.text and "More text." in doc.text
    assert "<!-- a comment in code is code -->" in doc.text
    assert doc.text.count("\n") == lesson.split("---\n", 2)[2].count("\n")  # line numbers hold
    from knowledge.chunking import chunk_course

    texts = " ".join(ch.text for ch in chunk_course(c) if ch.source == "lessons/03-notes.md")
    assert "TODO" not in texts and "A note" not in texts and "Visible text." in texts


def test_an_unclosed_html_comment_is_refused_with_its_line_in_the_file(tmp_path):
    err = refused(broken(tmp_path, {"lessons/03-notes.md": "---\ntitle: Notes\n---\n## Section\n\nText.\n\n<!-- draft\nMore.\n"}))
    assert problem_about(err, "lessons/03-notes.md") == (
        "lessons/03-notes.md: line 8: an HTML comment (<!--) is never closed with -->; everything after it would be hidden")


def test_a_lesson_of_only_comments_is_refused(tmp_path):
    err = refused(broken(tmp_path, {"lessons/03-notes.md": "## Section\n\n<!-- to be written -->\n"}))
    assert problem_about(err, "lessons/03-notes.md") == (
        "lessons/03-notes.md: lesson has headings but no text under them (only HTML comments, which students never see)")


def test_line_numbers_in_warnings_count_the_front_matter(tmp_path):
    blob = "iVBORw0KGgo" + "A" * 2000
    c = load_course(broken(tmp_path, {"lessons/03-fig.md": f"---\ntitle: Fig\norder: 3\n---\n## A figure\n\n![x](data:image/png;base64,{blob})\n"}))
    assert any(w.startswith("lessons/03-fig.md: line 7: an embedded image") for w in c.warnings), c.warnings
