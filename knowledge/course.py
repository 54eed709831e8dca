"""A course folder -> a validated ``Course`` (documents, FAQ records, quiz questions, flashcards).

Layout (see docs/COURSE_FORMAT.md)::

    course.yaml                       id, title, description
    lessons/**/*.md | *.txt           optional YAML front matter: title, order, tags
    faq/*.json | *.jsonl | *.csv      records: id, question, answer (or text), section
    quizzes/*.yaml                    questions: [...]
    flashcards/*.yaml                 cards: [...]

Validation names the file, the record and the field at fault. A course with any error is refused
whole (``CourseError`` lists every problem found), so a half-valid course never reaches the index.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_FILE_BYTES = 5 * 1024 * 1024  # a lesson or data file larger than this is almost certainly a mistake
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FRONT_MATTER_RE = re.compile(r"\A---[ \t]*\n(?:(.*?)\n)?---[ \t]*(?:\n|\Z)", re.DOTALL)  # on \n-only text
FRONT_MATTER_OPEN_RE = re.compile(r"\A---[ \t]*\n")
LESSON_SUFFIXES = (".md", ".txt")
FAQ_SUFFIXES = (".json", ".jsonl", ".csv")
YAML_SUFFIXES = (".yaml", ".yml")
BUTTON_LABEL_MAX = 80  # Discord's limit on a button label


class CourseError(ValueError):
    """A course folder failed validation. ``problems`` holds one line per problem."""

    def __init__(self, course_dir: Path | str, problems: list[str]):
        self.course_dir = Path(course_dir)
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"course {self.course_dir} is invalid ({len(problems)} problem(s)):\n{lines}\n"
            "Fix the files named above; see docs/COURSE_FORMAT.md for the format."
        )


# --- schemas -----------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)


ALIAS_RE = re.compile(r"^[a-z0-9]{1,32}$")
MAX_ALIASES = 500


class CourseMeta(_Strict):
    id: str
    title: str = Field(min_length=1)
    description: str = ""
    # Students' shorthand and the course's words for it ("lr": "learning rate"): the tutor reads a
    # question with these expanded, so "typical lr values?" finds the lessons on learning rates.
    aliases: tuple[tuple[str, str], ...] = ()  # a mapping in course.yaml, kept as sorted pairs

    @field_validator("aliases", mode="before")
    @classmethod
    def _aliases(cls, v: object) -> tuple[tuple[str, str], ...]:
        if v is None:
            return ()
        if not isinstance(v, dict):
            raise ValueError("expected a mapping of word: meaning (lr: learning rate)")
        if len(v) > MAX_ALIASES:
            raise ValueError(f"at most {MAX_ALIASES} aliases (found {len(v)})")
        out: dict[str, str] = {}
        for word, meaning in v.items():
            key = str(word).strip().lower()
            if not ALIAS_RE.match(key):
                raise ValueError(f"{word!r}: an alias is one word of at most 32 letters or digits")
            if not isinstance(meaning, str | int | float) or isinstance(meaning, bool):
                raise ValueError(f"{word!r}: its meaning must be text")
            text = " ".join(str(meaning).split())
            if not text or len(text) > 100:
                raise ValueError(f"{word!r}: its meaning must be 1-100 characters")
            out[key] = text
        return tuple(sorted(out.items()))

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ID_RE.match(v):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-'")
        return v


class FrontMatter(_Strict):
    title: str | None = None
    order: int | None = None
    tags: list[str] = Field(default_factory=list)


class QuizQuestion(_Strict):
    id: str
    question: str = Field(min_length=1, max_length=1000)
    choices: list[str] = Field(min_length=2, max_length=6)
    answer: str
    explanation: str = Field(min_length=1)
    common_mistakes: list[str] = Field(default_factory=list)
    difficulty: Literal["easy", "medium", "hard"] = "medium"
    tags: list[str] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ID_RE.match(v):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("choices")
    @classmethod
    def _choices(cls, v: list[str]) -> list[str]:
        v = [c.strip() for c in v]
        if any(not c for c in v):
            raise ValueError("a choice is empty")
        lowered = [c.casefold() for c in v]
        dupes = sorted({c for c in v if lowered.count(c.casefold()) > 1})
        if dupes:
            raise ValueError(f"duplicated choice(s): {dupes}")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        return [t.strip().lower() for t in v if t.strip()]

    @model_validator(mode="after")
    def _answer_in_choices(self) -> QuizQuestion:
        if self.answer not in self.choices:
            raise ValueError(f"answer {self.answer!r} is not one of the choices")
        return self

    @property
    def answer_index(self) -> int:
        return self.choices.index(self.answer)


class Flashcard(_Strict):
    id: str = Field(min_length=1)
    front: str = Field(min_length=1, max_length=1000)
    back: str = Field(min_length=1, max_length=2000)
    tags: list[str] = Field(default_factory=list)


class FaqRecord(_Strict):
    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    section: str = ""
    course: str = ""


class _QuizFile(_Strict):
    questions: list[dict] = Field(min_length=1)


class _FlashcardFile(_Strict):
    cards: list[dict] = Field(min_length=1)


@dataclass(frozen=True)
class Document:
    """One lesson file. ``source`` is the path relative to the course folder (POSIX)."""

    source: str
    title: str
    text: str
    order: int = 0
    tags: tuple[str, ...] = ()
    format: Literal["markdown", "text"] = "markdown"


@dataclass(frozen=True)
class Course:
    root: Path
    meta: CourseMeta
    documents: tuple[Document, ...] = ()
    faq: tuple[FaqRecord, ...] = ()
    faq_sources: tuple[str, ...] = ()  # per FAQ record: the file it came from
    quizzes: tuple[QuizQuestion, ...] = ()
    quiz_sources: tuple[str, ...] = ()  # per question: the file it came from
    flashcards: tuple[Flashcard, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    @property
    def id(self) -> str:
        return self.meta.id

    @property
    def title(self) -> str:
        return self.meta.title

    def quiz_tags(self) -> list[str]:
        return sorted({t for q in self.quizzes for t in q.tags})


# --- loading -----------------------------------------------------------------------------------


ITEM_NAMES = {"choices": "choice", "questions": "question", "cards": "card", "tags": "tag",
              "common_mistakes": "common mistake"}


def _fmt_loc(loc: tuple) -> str:
    """pydantic's location, with list positions counted from 1 like every other message ("choice 4")."""
    parts: list[str] = []
    for x in loc:
        if isinstance(x, int) and parts:
            parts[-1] = f"{ITEM_NAMES.get(parts[-1], parts[-1])} {x + 1}"
        else:
            parts.append(str(x))
    return ".".join(parts)


def _fmt_validation(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = _fmt_loc(e["loc"]) or "(record)"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def read_text_file(path: Path, rel: str, problems: list[str]) -> str | None:
    """Read a UTF-8 text file; report oversized, binary or non-UTF-8 files instead of raising."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        problems.append(f"{rel}: cannot read ({exc.strerror})")
        return None
    if size > MAX_FILE_BYTES:
        problems.append(f"{rel}: file is {size / 2**20:.1f} MiB, over the {MAX_FILE_BYTES // 2**20} MiB limit")
        return None
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        problems.append(f"{rel}: looks like a binary file, expected UTF-8 text")
        return None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        start = exc.start + bom  # a position in the file's bytes, BOM included
        line = data.count(b"\n", 0, start) + 1
        problems.append(f"{rel}: not valid UTF-8 at line {line} (byte {start}); save it as UTF-8")
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _load_yaml(path: Path, rel: str, problems: list[str]) -> object | None:
    text = read_text_file(path, rel, problems)
    if text is None:
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.append(f"{rel}: malformed YAML{where}: {getattr(exc, 'problem', None) or exc}")
        return None


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _title_from(text: str, path: Path) -> str:
    for line in text.splitlines():
        m = re.match(r"^#\s+(.+?)\s*#*\s*$", line)
        if m:
            return m.group(1)
    return path.stem.replace("-", " ").replace("_", " ").strip().title()


def _gather(root: Path, folder: str, suffixes: tuple[str, ...], load) -> list[tuple]:
    """(item, file relative to the course, label) for every valid entry of every file in ``folder``."""
    return [(item, _rel(root, p), label) for p in course_files(root / folder, suffixes) for label, item in load(p)]


def _load_lesson(root: Path, path: Path, problems: list[str], warnings: list[str] | None = None) -> Document | None:
    rel = _rel(root, path)
    text = read_text_file(path, rel, problems)
    if text is None:
        return None
    fm = FrontMatter()
    skipped_lines = 0  # lines of front matter before ``text``: messages count lines in the file
    m = FRONT_MATTER_RE.match(text)
    if not m and FRONT_MATTER_OPEN_RE.match(text):
        problems.append(f"{rel}: front matter opened on line 1 is never closed with ---")
        return None
    if m:
        try:
            raw = yaml.safe_load(m.group(1) or "") or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)  # counted from line 2 of the file
            where = f" at line {mark.line + 2}, column {mark.column + 1}" if mark else ""
            problems.append(f"{rel}: malformed front matter{where}: {getattr(exc, 'problem', None) or exc}")
            return None
        if not isinstance(raw, dict):
            problems.append(f"{rel}: front matter must be a mapping (title, order, tags)")
            return None
        try:
            fm = FrontMatter.model_validate(raw)
        except ValidationError as exc:
            problems.append(f"{rel}: front matter: {_fmt_validation(exc)}")
            return None
        skipped_lines = text.count("\n", 0, m.end())
        text = text[m.end():]
    if not text.strip():
        problems.append(f"{rel}: lesson is empty")
        return None
    fmt: Literal["markdown", "text"] = "markdown" if path.suffix.lower() == ".md" else "text"
    if fmt == "markdown":
        before, commented = len(problems), "<!--" in text
        text = without_comments(text, rel, problems, skipped_lines)
        if len(problems) > before:
            return None
        if not re.sub(r"(?m)^#{1,6}[ \t]+.*$", "", text).strip():
            problems.append(f"{rel}: lesson has headings but no text under them"
                            + (" (only HTML comments, which students never see)" if commented else ""))
            return None
    text = _without_embedded_images(text, rel, warnings, skipped_lines)
    return Document(
        source=rel,
        title=fm.title or _title_from(text, path),
        text=text,
        order=fm.order if fm.order is not None else 10_000,
        tags=tuple(fm.tags),
        format=fmt,
    )


# --- HTML comments in Markdown lessons --------------------------------------------------------------

_COMMENT_OPEN = "<!--"
_COMMENT_CLOSE = "-->"
FENCE_RE = re.compile(r"^\s*(```|~~~)")  # a line that opens or closes a fenced code block


def _fenced_lines(text: str) -> list[bool]:
    """Per line: inside a fenced code block (the fence lines included)."""
    out, inside = [], False
    for line in text.split("\n"):
        fence = bool(FENCE_RE.match(line))
        out.append(inside or fence)
        if fence:
            inside = not inside
    return out


def without_comments(text: str, rel: str = "", problems: list[str] | None = None, skipped_lines: int = 0) -> str:
    """A Markdown lesson with its HTML comments (``<!-- ... -->``, the author's notes, which Markdown
    viewers hide too) blanked: every character but newlines becomes a space, so offsets and line
    numbers hold. Comments inside fenced code blocks are code and stay. An unclosed comment, which
    would hide the rest of the lesson in a viewer, goes to ``problems`` with the file and line."""
    if _COMMENT_OPEN not in text:
        return text
    fenced = _fenced_lines(text)
    line_starts = [0, *(i + 1 for i, ch in enumerate(text) if ch == "\n")]
    chars = list(text)
    pos = 0
    while (start := text.find(_COMMENT_OPEN, pos)) >= 0:
        line = bisect.bisect_right(line_starts, start)  # 1-based within ``text``
        if fenced[line - 1]:
            pos = start + len(_COMMENT_OPEN)
            continue
        end = text.find(_COMMENT_CLOSE, start + len(_COMMENT_OPEN))
        if end < 0:
            if problems is not None:
                problems.append(f"{rel}: line {line + skipped_lines}: an HTML comment (<!--) is never closed "
                                "with -->; everything after it would be hidden")
            end = len(text)
        else:
            end += len(_COMMENT_CLOSE)
        for i in range(start, end):
            if chars[i] != "\n":
                chars[i] = " "
        pos = end
    return "".join(chars)


_EMBEDDED_IMAGE = re.compile(r"!\[([^\]\n]*)\]\(\s*data:[^)]*\)|<img\b[^>]*\bsrc=[\"']?data:[^>]*>", re.IGNORECASE)


def _without_embedded_images(text: str, rel: str, warnings: list[str] | None, skipped_lines: int = 0) -> str:
    """Images pasted into a lesson as data: URIs are kilobytes of base64 that nobody asks about and
    no embedder can read: each becomes its alt text, with a warning saying where it was."""
    def drop(m: re.Match) -> str:
        if warnings is not None:
            line = skipped_lines + text.count("\n", 0, m.start()) + 1
            warnings.append(f"{rel}: line {line}: an embedded image ({len(m[0]) // 1024 or 1} KiB data: URI) "
                            "was left out, the tutor reads text only; link the image file instead")
        return f"(image: {m[1].strip()})" if m[1] and m[1].strip() else ""
    return _EMBEDDED_IMAGE.sub(drop, text)


def _csv_rows(text: str, rel: str, problems: list[str]) -> list[tuple[str, object]] | None:
    """CSV records with their line numbers; a row with more or fewer fields than the header, or an
    unclosed quote, is malformed (csv's default would silently drop or pad fields)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[str, object]] = []
    line = 1
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            problems.append(f"{rel}: empty CSV; expected a header row (id, question, answer, section)")
            return None
        if not _csv_header_ok(header, rel, problems):
            return None
        n = 0
        line = reader.line_num + 1
        for fields in reader:
            if any(f.strip() for f in fields):
                n += 1
                if len(fields) != len(header):
                    problems.append(f"{rel}: line {line}: malformed CSV: {len(fields)} fields, the header has {len(header)}")
                    return None
                rows.append((f"record {n} (line {line})", dict(zip(header, fields, strict=True))))
            line = reader.line_num + 1
    except csv.Error as exc:
        problems.append(f"{rel}: line {line}: malformed CSV: {exc} (an unclosed quote?)")
        return None
    return rows


def _csv_header_ok(header: list[str], rel: str, problems: list[str]) -> bool:
    """Field names are case-insensitive, so ``answer,Answer`` is a duplicate (one would silently win)."""
    names = [h.strip() for h in header]
    keys = [n.lower() for n in names]
    dupes = [n for n, k in zip(names, keys, strict=True) if k and keys.count(k) > 1]
    found = ", ".join(n for n in names if n)
    if dupes:
        problems.append(f"{rel}: duplicate column(s) in the header: {', '.join(map(repr, dupes))}")
    elif "question" not in keys:
        problems.append(f"{rel}: no 'question' column; found: {found}")
    elif "answer" not in keys and "text" not in keys:
        problems.append(f"{rel}: no 'answer' or 'text' column; found: {found}")
    else:
        return True
    return False


def _faq_rows(path: Path, rel: str, problems: list[str]) -> list[tuple[str, object]] | None:
    """The raw records of a FAQ file, each with a label naming where it is ("record 3 (line 4)")."""
    text = read_text_file(path, rel, problems)
    if text is None:
        return None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(text, rel, problems)
    elif suffix == ".jsonl":
        rows = []
        for line, raw in enumerate(text.splitlines(), 1):
            if raw.strip():
                try:
                    rows.append((f"record {len(rows) + 1} (line {line})", json.loads(raw)))
                except json.JSONDecodeError as exc:
                    problems.append(f"{rel}: line {line}: malformed JSON at column {exc.colno}: {exc.msg}")
                    return None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(f"{rel}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")
            return None
        if isinstance(data, dict) and isinstance(data.get("records"), list):
            data = data["records"]
        if not isinstance(data, list):
            problems.append(f"{rel}: expected a JSON list of records")
            return None
        rows = [(f"record {n}", row) for n, row in enumerate(data, 1)]
    if rows is not None and not rows:
        problems.append(f"{rel}: no FAQ records (expected records with question and answer)")
        return None
    return rows


def faq_record_from(row: object, default_id: str) -> FaqRecord:
    """Normalise a FAQ row: ``answer`` or ``text``; ``id`` (or ``document``) optional."""
    if not isinstance(row, dict):
        raise ValueError("record must be an object with question and answer")
    row = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
    for key in ("id", "document", "question", "answer", "text", "section", "course"):
        value = row.get(key)
        if isinstance(value, bool | list | dict):  # str() would index "['q1', 'q2']" or "True"
            kind = "true/false" if isinstance(value, bool) else "a list" if isinstance(value, list) else "an object"
            raise ValueError(f"{key}: must be text, not {kind}")
    row = {k: "" if v is None else str(v).strip() for k, v in row.items()}
    return FaqRecord.model_validate(
        {
            "id": row.get("id") or row.get("document") or default_id,
            "question": row.get("question", ""),
            "answer": row.get("answer") or row.get("text", ""),
            "section": row.get("section", ""),
            "course": row.get("course", ""),
        }
    )


def _load_faq(root: Path, path: Path, problems: list[str]) -> list[tuple[str, FaqRecord]]:
    """The valid records of a FAQ file, each with its label ("record 3 (line 4)")."""
    rel = _rel(root, path)
    rows = _faq_rows(path, rel, problems)
    if rows is None:
        return []
    out = []
    for n, (label, row) in enumerate(rows, 1):
        try:
            out.append((label, faq_record_from(row, default_id=f"{path.stem}-{n}")))
        except ValidationError as exc:
            problems.append(f"{rel}: {label}: {_fmt_validation(exc)}")
        except ValueError as exc:
            problems.append(f"{rel}: {label}: {exc}")
    return out


def _load_items(root: Path, path: Path, schema, key: str, model, problems: list[str]) -> list:
    return [item for _, item in _load_entries(root, path, schema, key, model, problems)]


def _load_entries(root: Path, path: Path, schema, key: str, model, problems: list[str]) -> list[tuple[str, object]]:
    """The valid entries of a quiz or flashcard file, each with its label ("entry 3")."""
    rel = _rel(root, path)
    data = _load_yaml(path, rel, problems)
    if data is None:
        if not any(p.startswith(rel) for p in problems):
            problems.append(f"{rel}: file is empty; expected a '{key}:' list")
        return []
    try:
        container = schema.model_validate(data)
    except ValidationError as exc:
        problems.append(f"{rel}: expected a mapping with a non-empty '{key}:' list ({_fmt_validation(exc)})")
        return []
    out = []
    for n, item in enumerate(getattr(container, key), 1):
        label = f"entry {n}"
        if isinstance(item, dict) and str(item.get("id") or "").strip():
            label += f" (id {str(item['id']).strip()})"
        try:
            out.append((f"entry {n}", model.model_validate(item)))
        except ValidationError as exc:
            problems.append(f"{rel}: {label}: {_fmt_validation(exc)}")
    return out


def course_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files under ``folder`` with these suffixes (any, for none), sorted; hidden ones are skipped."""
    if not folder.is_dir():
        return []
    return sorted(  # a hidden file, or any file in a hidden folder (.ipynb_checkpoints, .git), is skipped
        p for p in folder.rglob("*")
        if p.is_file() and (p.suffix.lower() in suffixes or not suffixes)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def load_quiz_file(root: Path, path: Path, problems: list[str]) -> list[QuizQuestion]:
    return _load_items(root, path, _QuizFile, "questions", QuizQuestion, problems)


def load_course(course_dir: Path | str) -> Course:
    """Load and validate a whole course folder. Raises ``CourseError`` listing every problem."""
    root = Path(course_dir).expanduser()
    if not root.is_dir():
        raise CourseError(root, [f"{root}: no such course folder (expected a folder with course.yaml)"])
    root = root.resolve()
    problems: list[str] = []
    warnings: list[str] = []

    meta = None
    meta_path = root / "course.yaml"
    if not meta_path.is_file():
        problems.append("course.yaml: missing (needs id, title, description)")
    else:
        raw = _load_yaml(meta_path, "course.yaml", problems)
        if raw is not None:
            if not isinstance(raw, dict):
                problems.append("course.yaml: expected a mapping with id, title, description")
            else:
                try:
                    meta = CourseMeta.model_validate(raw)
                except ValidationError as exc:
                    problems.append(f"course.yaml: {_fmt_validation(exc)}")
        elif not any(p.startswith("course.yaml") for p in problems):
            problems.append("course.yaml: file is empty (needs id, title, description)")

    documents = []
    for p in course_files(root / "lessons", ()):
        if p.suffix.lower() in LESSON_SUFFIXES:
            if d := _load_lesson(root, p, problems, warnings):
                documents.append(d)
        elif p.suffix.lower() in (".markdown", ".mdown", ".mkd", ".rst", ".text", ".html", ".htm"):
            warnings.append(f"{_rel(root, p)}: not read: lessons are .md or .txt files (rename it to read it)")
    documents.sort(key=lambda d: (d.order, d.source))

    faq_found = _gather(root, "faq", FAQ_SUFFIXES, lambda p: _load_faq(root, p, problems))
    faq: list[FaqRecord] = [r for r, _, _ in faq_found]

    quiz_found = _gather(root, "quizzes", YAML_SUFFIXES,
                         lambda p: _load_entries(root, p, _QuizFile, "questions", QuizQuestion, problems))
    quizzes: list[QuizQuestion] = [q for q, _, _ in quiz_found]
    for q, src, _ in quiz_found:
        for i, choice in enumerate(q.choices, 1):
            if len(choice) > BUTTON_LABEL_MAX:  # a quiz choice is a Discord button label
                problems.append(
                    f"{src}: question {q.id}: choice {i} is {len(choice)} characters, over the {BUTTON_LABEL_MAX} limit"
                )

    cards_found = _gather(root, "flashcards", YAML_SUFFIXES, lambda p: _load_entries(root, p, _FlashcardFile, "cards", Flashcard, problems))
    flashcards: list[Flashcard] = [c for c, _, _ in cards_found]

    _check_unique("quiz question", [(q.id, src, label) for q, src, label in quiz_found], problems)
    _check_unique("FAQ record", [(r.id, src, label) for r, src, label in faq_found], problems)
    _check_unique("flashcard", [(c.id, src, label) for c, src, label in cards_found], problems)

    if not documents and not faq:
        problems.append("course has no lessons (lessons/*.md|*.txt) and no FAQ records (faq/*): nothing to teach")
    if problems or meta is None:
        raise CourseError(root, problems)
    if not quizzes:
        warnings.append("course has no quiz questions (quizzes/*.yaml): /quiz will be unavailable")
    return Course(
        root=root,
        meta=meta,
        documents=tuple(documents),
        faq=tuple(faq),
        faq_sources=tuple(src for _, src, _ in faq_found),
        quizzes=tuple(quizzes),
        quiz_sources=tuple(src for _, src, _ in quiz_found),
        flashcards=tuple(flashcards),
        warnings=tuple(warnings),
    )


def _check_unique(kind: str, items: list[tuple[str, str, str]], problems: list[str]) -> None:
    """Items are (id, file, label); a repeat in the same file names both entries or records."""
    seen: dict[str, tuple[str, str]] = {}
    for ident, src, label in items:
        if ident not in seen:
            seen[ident] = (src, label)
        elif seen[ident][0] == src:
            problems.append(f"{src}: duplicate {kind} id {ident!r} in {seen[ident][1]} and {label}")
        else:
            problems.append(f"{src}: duplicate {kind} id {ident!r} (also in {seen[ident][0]})")


def faq_course_from_json(path: Path | str, course_id: str = "faq") -> Course:
    """A FAQ JSON file (list of id/question/text/section/course records) seen as a course, for evaluation."""
    path = Path(path).resolve()
    problems: list[str] = []
    rows = _faq_rows(path, path.name, problems)
    records, labels = [], []
    for n, (label, row) in enumerate(rows or [], 1):
        try:
            records.append(faq_record_from(row, default_id=f"{path.stem}-{n}"))
            labels.append(label)
        except ValidationError as exc:
            problems.append(f"{path.name}: {label}: {_fmt_validation(exc)}")
        except ValueError as exc:
            problems.append(f"{path.name}: {label}: {exc}")
    if not records and not problems:
        problems.append(f"{path.name}: no records")
    if problems:
        raise CourseError(path, problems)
    # Evaluation data is taken as published: a repeated id (one real FAQ has a near-duplicate record)
    # is a warning, and both records count as that one source.
    dupes: list[str] = []
    _check_unique("FAQ record", [(r.id, path.name, label) for r, label in zip(records, labels, strict=True)], dupes)
    return Course(
        root=path.parent,
        meta=CourseMeta(id=course_id, title=path.stem),
        faq=tuple(records),
        faq_sources=(path.name,) * len(records),
        warnings=tuple(dupes),
    )
