"""Course documents -> ``Chunk``s with stable ids, each carrying its lesson title and section path.

Lessons are split at Markdown headings (outside code fences); a section too long for the embedding
model's window is split again at paragraphs, then sentences, so nothing is silently truncated.
A FAQ record is one chunk (question + answer) unless its answer alone overflows the window.
Chunk ids are a hash of (source, section path, piece number within the section, text): rebuilding
the same course gives the same ids, and editing one section changes only that section's ids (an id
built from character offsets would change for every chunk after the edit).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from knowledge.course import FENCE_RE, Course, Document, FaqRecord

HEADING_RE = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
SENTENCE_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
DEFAULT_MAX_TOKENS = 256
EMBED_OVERHEAD_TOKENS = 8  # [CLS], [SEP] and slack for the title/section line separators


def approx_tokens(text: str) -> int:
    """Word-piece count estimate used when no tokenizer is given (about 1.3 pieces per word)."""
    return int(len(re.findall(r"\w+|[^\w\s]", text)) * 1.15) + 1


@dataclass(frozen=True)
class Chunk:
    id: str
    course_id: str
    source: str  # lesson path relative to the course folder, or FAQ record id
    title: str
    section: str  # "Section > Subsection"; "" for a lesson's opening text
    text: str  # the passage shown to the student and the answer model
    start: int = 0  # character span in the source text (lessons)
    end: int = 0
    kind: str = "lesson"  # lesson | faq
    question: str = ""  # FAQ: the record's question

    @property
    def embed_text(self) -> str:
        """What is embedded: title and section path give the passage its context."""
        head = self.title if not self.section else f"{self.title} > {self.section}"
        if self.kind == "faq":
            return f"{self.question}\n{self.text}"
        return f"{head}\n{self.text}"

    @property
    def keyword_text(self) -> str:
        """What the word index (BM25) reads, and the tutor's course vocabulary."""
        return f"{self.title} {self.section} {self.question} {self.text}"

    @property
    def phrase_fields(self) -> tuple[str, ...]:
        """The text fields of the phrase index (adjacent word pairs), kept apart so that no phrase spans
        two fields. Only FAQ records have them: a record's question names its problem in a student's
        words ("could not translate host name"), and there phrases put the right record higher (FAQ
        benchmark hit@5 0.9669 -> 0.9687). A lesson's sections repeat the lesson's topic phrase ("the
        movie-review experiment"), and phrase matches lifted its summary above the section holding the
        answer (the sample course's question set: 47 -> 45/60 full answers), so lessons have none. A FAQ
        record's title is its course's name, the search filter rather than content: left out too."""
        if self.kind == "faq":
            return (self.section, self.question, self.text)
        return ()

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.embed_text.encode("utf-8")).hexdigest()[:32]


def chunk_id(course_id: str, source: str, anchor: str, text: str) -> str:
    """Stable id: ``anchor`` locates the chunk structurally (section path and piece number), not by offset."""
    h = hashlib.sha256(f"{course_id}\x00{source}\x00{anchor}\x00{text}".encode()).hexdigest()
    return h[:16]


@dataclass
class _Section:
    path: tuple[str, ...]
    start: int
    end: int


def _markdown_sections(text: str, title: str) -> list[_Section]:
    """Split at headings. Returns sections with their heading path and body span (heading line excluded)."""
    sections: list[_Section] = []
    stack: list[tuple[int, str]] = []
    in_fence = False
    body_start = 0
    path: tuple[str, ...] = ()
    pos = 0
    for line in text.splitlines(keepends=True):
        if FENCE_RE.match(line):
            in_fence = not in_fence
        m = None if in_fence else HEADING_RE.match(line.rstrip("\n"))
        if m:
            sections.append(_Section(path, body_start, pos))
            level, heading = len(m.group(1)), m.group(2).strip()
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, heading))
            # A top-level heading equal to the lesson title adds nothing to the path.
            path = tuple(h for lv, h in stack if not (lv == 1 and h.strip().casefold() == title.casefold()))
            body_start = pos + len(line)
        pos += len(line)
    sections.append(_Section(path, body_start, len(text)))
    return sections


def _paragraph_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans = []
    # A paragraph ends at a blank line or at the end of the span; trailing spaces or a single
    # final newline must not hide the last paragraph (or merge it with the next one).
    for m in re.finditer(r"\S(?:.*?\S)?(?=[ \t]*\n\s*\n|\s*\Z)", text[start:end], re.DOTALL):
        spans.append((start + m.start(), start + m.end()))
    return spans


def _sentence_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans, cur = [], start
    for m in SENTENCE_RE.finditer(text, start, end):
        spans.append((cur, m.start()))
        cur = m.end()
    spans.append((cur, end))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def _word_spans(text: str, start: int, end: int, budget: int, count: Callable[[str], int]) -> list[tuple[int, int]]:
    """Last resort for a single overlong sentence: cut between words."""
    out: list[tuple[int, int]] = []
    a = last = None
    for m in re.finditer(r"\S+", text[start:end]):
        ws, we = m.start() + start, m.end() + start
        if a is None:
            a = ws
        elif count(text[a:we]) > budget:
            out.append((a, last))
            a = ws
        last = we
    if a is not None:
        out.append((a, last))
    return out


def _pack(text: str, spans: list[tuple[int, int]], budget: int, count: Callable[[str], int]) -> list[tuple[int, int]]:
    """Greedily merge consecutive spans while the merged text fits the budget; split what never fits."""
    out: list[tuple[int, int]] = []
    cur: tuple[int, int] | None = None
    for a, b in spans:
        if count(text[a:b]) > budget:
            if cur:
                out.append(cur)
                cur = None
            sentences = _sentence_spans(text, a, b)
            if len(sentences) > 1:
                out.extend(_pack(text, sentences, budget, count))
            else:
                out.extend(_word_spans(text, a, b, budget, count))
            continue
        if cur and count(text[cur[0]:b]) <= budget:
            cur = (cur[0], b)
        else:
            if cur:
                out.append(cur)
            cur = (a, b)
    if cur:
        out.append(cur)
    return out


def chunk_document(
    doc: Document, course_id: str, max_tokens: int = DEFAULT_MAX_TOKENS, count_tokens: Callable[[str], int] = approx_tokens
) -> list[Chunk]:
    text = doc.text
    if doc.format == "markdown":
        sections = _markdown_sections(text, doc.title)
    else:
        sections = [_Section((), 0, len(text))]
    chunks: list[Chunk] = []
    seen: dict[str, int] = {}
    for sec in sections:
        if not text[sec.start:sec.end].strip():
            continue
        section = " > ".join(sec.path)
        head = f"{doc.title} > {section}" if section else doc.title
        budget = max_tokens - count_tokens(head) - EMBED_OVERHEAD_TOKENS
        spans = _pack(text, _paragraph_spans(text, sec.start, sec.end), budget, count_tokens)
        for piece, (a, b) in enumerate(spans):
            body = text[a:b].strip()
            if body:
                cid = chunk_id(course_id, doc.source, f"{section}\x00{piece}", body)
                # the same heading path repeated with the same text: still distinct ids, in document order
                seen[cid] = seen.get(cid, 0) + 1
                if seen[cid] > 1:
                    cid = chunk_id(course_id, doc.source, f"{section}\x00{piece}\x00{seen[cid]}", body)
                chunks.append(Chunk(cid, course_id, doc.source, doc.title, section, body, a, b))
    return chunks


def chunk_faq(
    rec: FaqRecord, course_id: str, title: str, max_tokens: int = DEFAULT_MAX_TOKENS,
    count_tokens: Callable[[str], int] = approx_tokens,
) -> list[Chunk]:
    budget = max_tokens - count_tokens(rec.question) - EMBED_OVERHEAD_TOKENS
    text = rec.answer
    spans = [(0, len(text))] if count_tokens(text) <= budget else _pack(text, _paragraph_spans(text, 0, len(text)), budget, count_tokens)
    cid = rec.course or course_id
    return [
        Chunk(chunk_id(cid, rec.id, str(piece), text[a:b].strip()), cid, rec.id, title, rec.section, text[a:b].strip(),
              a, b, "faq", rec.question)
        for piece, (a, b) in enumerate(spans)
        if text[a:b].strip()
    ]


def chunk_course(
    course: Course, max_tokens: int = DEFAULT_MAX_TOKENS, count_tokens: Callable[[str], int] = approx_tokens
) -> list[Chunk]:
    chunks: list[Chunk] = []
    for doc in course.documents:
        chunks.extend(chunk_document(doc, course.id, max_tokens, count_tokens))
    for rec in course.faq:
        chunks.extend(chunk_faq(rec, course.id, rec.course or course.title, max_tokens, count_tokens))
    return chunks


_LIST_ITEM_RE = re.compile(r"^\s*([-*+]|\d+[.)])\s+")
_FENCE_RE = re.compile(r"^```.*?^```[^\n]*$", re.DOTALL | re.MULTILINE)
_TABLE_RULE_RE = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def _table_sentences(block: list[str]) -> list[str]:
    """A Markdown table as sentences: each body row names its first cell, then header: value pairs
    ("After: Training accuracy 90%, Validation accuracy 87% (better generalisation).")."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block if not _TABLE_RULE_RE.match(line.strip())]
    if len(rows) < 2:
        return [" ".join(c for c in rows[0] if c) + "."] if rows else []
    header, out = rows[0], []
    for row in rows[1:]:
        label, cells = (row[0], row[1:]) if row and row[0] else ("", row[1:] if row else [])
        pairs = [f"{h} {c}".strip() if h else c for h, c in zip(header[1:], cells, strict=False) if c]
        if pairs:
            out.append((f"{label}: " if label else "") + ", ".join(pairs) + ".")
    return out


def _prose_blocks(text: str) -> list[str]:
    """Paragraphs with code blocks dropped and tables turned into sentences."""
    text = _FENCE_RE.sub("\n\n", text)
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        table = [ln for ln in lines if ln.strip().startswith("|")]
        prose = [ln for ln in lines if not ln.strip().startswith("|")]
        if prose:
            out.append("\n".join(prose))
        if len(table) >= 2:
            out.extend(_table_sentences(table))
    return out


def sentences(text: str) -> Iterable[str]:
    """Sentences of a passage (for extractive answers and grounding checks): Markdown list markers and
    emphasis removed, code blocks left out, tables turned into sentences."""
    for block in _prose_blocks(text):
        lines = []
        for line in block.split("\n"):
            item = _LIST_ITEM_RE.match(line)
            if item:  # a list item is a sentence of its own, ended if its author did not end it
                line = line[item.end():].rstrip().rstrip(",;")  # "rate 0.3 (30%)," ends as "rate 0.3 (30%)."
                line = line if not line or line[-1] in ".!?:" else line + "."
            lines.append(line)
        clean = "\n".join(lines)
        clean = re.sub(r"\*{1,3}|`+|(?<!\w)_{1,2}(?=\w)|(?<=\w)_{1,2}(?!\w)", "", clean)
        para = " ".join(clean.split())
        for a, b in _sentence_spans(para, 0, len(para)):
            s = para[a:b].strip()
            if s:
                yield s
