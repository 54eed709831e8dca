"""Every question file the project ships is valid; broken banks are refused with the file and entry named."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowledge.course import BUTTON_LABEL_MAX, CourseError, load_course
from knowledge.quiz import LETTERS, lint_quiz_bank
from tests.conftest import ROOT, TINY_COURSE, write_course

SHIPPED = sorted({p.parent.parent for p in ROOT.glob("courses/*/quizzes/**/*.y*ml")})


def test_the_project_ships_a_question_bank():
    assert SHIPPED, "no question files under courses/*/quizzes/"


@pytest.mark.parametrize("course_dir", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_question_file_is_valid(course_dir: Path):
    report = lint_quiz_bank(course_dir)
    assert report.errors == [], "\n".join(report.errors)
    assert report.questions > 0
    for q in report.question_list:
        assert q.explanation.strip()
        assert len(q.choices) <= len(LETTERS)
        assert all(len(c) <= BUTTON_LABEL_MAX for c in q.choices)
    course = load_course(course_dir)
    assert len(course.quizzes) == report.questions


BROKEN = {
    "quizzes/bad.yaml": (
        "questions:\n"
        "  - id: ok1\n    question: Fine?\n    choices: [Sure, Nope]\n    answer: Sure\n    explanation: Because.\n"
        "    tags: [basics]\n"
        "  - id: q2\n    question: Answer missing from choices?\n    choices: [One, Two]\n    answer: Three\n"
        "    explanation: Nope.\n"
        "  - id: q3\n    question: No explanation?\n    choices: [One, Two]\n    answer: One\n"
        "  - id: q4\n    question: Duplicated choices?\n    choices: [Same, same, Other]\n    answer: Other\n"
        "    explanation: Dupes.\n"
        "  - id: q5\n    question: Long choice?\n    choices: ['" + "x" * 81 + "', Short]\n    answer: Short\n"
        "    explanation: Too long for a button.\n    tags: [basics]\n"
        "  - id: q6\n    question: Order-dependent?\n    choices: [Red, Blue, All of the above]\n"
        "    answer: All of the above\n    explanation: Shuffling breaks this.\n    tags: [basics]\n"
        "  - just a string\n"
        "  - id: q8\n    question: YAML turns yes/no into booleans\n    choices: [Yes, No]\n    answer: 'Yes'\n"
        "    explanation: Quote them.\n"
    ),
    "quizzes/dupe.yaml": (
        "questions:\n"
        "  - id: ok1\n    question: Same id as in bad.yaml?\n    choices: [A thing, B thing]\n"
        "    answer: A thing\n    explanation: Dupe id.\n    tags: [basics]\n"
    ),
    "quizzes/malformed.yaml": "questions:\n  - id: [unclosed\n",
    "quizzes/empty.yaml": "",
    "quizzes/wrong-shape.yaml": "- id: x\n",
}


@pytest.fixture
def broken_course(tmp_path):
    files = dict(TINY_COURSE)
    files.update(BROKEN)
    return write_course(tmp_path / "broken", files)


def test_a_broken_bank_is_refused_with_file_and_entry_named(broken_course):
    report = lint_quiz_bank(broken_course)
    errors = "\n".join(report.errors)
    assert "quizzes/bad.yaml: entry 2 (id q2): (record): answer 'Three' is not one of the choices" in errors
    assert "quizzes/bad.yaml: entry 3 (id q3): explanation" in errors
    assert "quizzes/bad.yaml: entry 4 (id q4)" in errors and "duplicated choice" in errors
    assert "quizzes/bad.yaml: question q5: choice 1 is 81 characters" in errors
    assert "quizzes/bad.yaml: entry 7: expected a mapping" in errors
    assert "quizzes/bad.yaml: entry 8 (id q8): choice 1: Input should be a valid string" in errors
    assert "quizzes/dupe.yaml: question ok1: duplicate question id (also in quizzes/bad.yaml)" in errors
    assert "quizzes/malformed.yaml: malformed YAML at line" in errors
    assert "quizzes/empty.yaml: file is empty" in errors
    assert "quizzes/wrong-shape.yaml: expected a mapping" in errors
    warnings = "\n".join(report.warnings)
    assert "quizzes/bad.yaml: question q6: choice 'All of the above' depends on the order" in warnings
    # the valid questions still count; the course loader refuses the course, naming the files
    assert report.questions == 5  # q1, q2 (tiny) + ok1, q5, q6
    with pytest.raises(CourseError) as err:
        load_course(broken_course)
    assert any(p.startswith("quizzes/bad.yaml") for p in err.value.problems)


def test_lint_still_works_when_the_course_itself_is_broken(tmp_path):
    course = write_course(tmp_path / "c", {
        "course.yaml": "title: no id\n",
        "quizzes/a.yaml": BROKEN["quizzes/dupe.yaml"],
    })
    report = lint_quiz_bank(course)
    assert report.errors == [] and report.questions == 1
    assert any(w.startswith("course: course.yaml") for w in report.warnings)
    assert any("only 1 valid question" in w for w in report.warnings)


def test_lint_skips_quiz_files_in_hidden_folders_as_the_course_loader_does(tmp_path):
    course = write_course(tmp_path / "c", {
        "course.yaml": "id: c\ntitle: C\n",
        "quizzes/a.yaml": BROKEN["quizzes/dupe.yaml"],
        "quizzes/.backup/a.yaml": BROKEN["quizzes/dupe.yaml"],  # an editor's or git's copy
    })
    report = lint_quiz_bank(course)
    assert report.files == 1 and report.errors == [] and report.questions == 1


def test_missing_course_or_bank(tmp_path):
    assert lint_quiz_bank(tmp_path / "nope").errors[0].endswith("no such course folder")
    bare = write_course(tmp_path / "bare", {"course.yaml": "id: b\ntitle: B\n", "lessons/a.md": "# A\ntext\n"})
    assert lint_quiz_bank(bare).errors == ["quizzes/: no question files (quizzes/*.yaml)"]


def test_long_question_and_untagged_warnings(tmp_path):
    q = "Why " + "really " * 50 + "?"
    course = write_course(tmp_path / "w", {
        "course.yaml": "id: w\ntitle: W\n",
        "lessons/a.md": "# A\ntext\n",
        "quizzes/a.yaml": (
            f"questions:\n  - id: long\n    question: {q}\n    choices: [A one, B one]\n    answer: A one\n"
            "    explanation: x\n  - id: long2\n    question: " + q + "\n    choices: [C, D]\n    answer: C\n"
            "    explanation: y\n    tags: [t]\n"
        ),
    })
    report = lint_quiz_bank(course)
    assert report.errors == []
    w = "\n".join(report.warnings)
    assert "question long: question is" in w and "longer than an embed title" in w
    assert "question long: no tags" in w
    assert "question long2: same question text as long" in w
