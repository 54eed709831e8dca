"""Fine-tuning data: the course's Q&A (and approved feedback) -> prompt/answer examples -> splits.

Sources, one example each:

- quiz questions: the question -> the correct choice followed by its explanation;
- flashcards: front -> back;
- FAQ records: question -> answer;
- students' feedback that a maintainer approved (the tutor's answer) or corrected (the correction).

Every example carries the passages the REAL retriever returns for its question, chosen exactly as
the tutor chooses them at inference (``Tutor.context_for``), and the prompt is
``knowledge.generation.build_messages(question, passages)``: the model learns to answer from context,
with the same prompt it will see in service.

Examples are split into train/validation/test BY SOURCE: every example has a ``group`` (the quiz id,
flashcard id, FAQ record id or feedback answer id; two sources asking the very same question share
one group), and a group never straddles splits. The split is seeded and stratified by kind, so each
split holds quiz questions and flashcards alike. A dataset is saved as ``train.jsonl``,
``val.jsonl``, ``test.jsonl`` and ``manifest.json`` (counts per split and kind, sha256 of the
examples, seed, course id, created_at); loading checks the hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from knowledge.generation import Passage, build_messages

FORMAT = "tutorbot-dataset/1"
KINDS = ("quiz", "flashcard", "faq", "feedback", "lesson")
SPLITS = ("train", "val", "test")
MIN_EXAMPLES = 10  # below this a split cannot hold out anything meaningful
MAX_ANSWER_SENTENCES = 4  # the tutor shows at most four sentences; longer targets teach rambling
MAX_ANSWER_CHARS = 700


class DatasetError(ValueError):
    """The dataset cannot be built or read (too small, empty split, corrupt files)."""


@dataclass(frozen=True)
class Example:
    """One training example: the prompt is ``build_messages(question, passages)``, the target ``answer``."""

    id: str  # unique: "<kind>:<source id>"
    group: str  # split key: examples of one source share it
    kind: str  # quiz | flashcard | faq | feedback | lesson
    question: str
    answer: str
    passages: tuple[Passage, ...] = ()
    source_in_passages: bool | None = None  # FAQ: whether retrieval found the record itself

    def messages(self) -> list[dict[str, str]]:
        return build_messages(self.question, self.passages)

    def to_json(self) -> dict:
        d = asdict(self)
        d["passages"] = [asdict(p) for p in self.passages]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Example:
        return cls(
            id=d["id"], group=d["group"], kind=d["kind"], question=d["question"], answer=d["answer"],
            passages=tuple(Passage(**p) for p in d.get("passages") or ()),
            source_in_passages=d.get("source_in_passages"),
        )


@dataclass(frozen=True)
class FeedbackItem:
    """An answer a maintainer reviewed: approved (the tutor's answer stands) or corrected."""

    answer_id: int
    question: str
    answer: str  # the approved answer, or the correction
    status: str = "approved"  # approved | corrected


@dataclass
class Dataset:
    train: list[Example]
    val: list[Example]
    test: list[Example]
    manifest: dict = field(default_factory=dict)
    path: Path | None = None

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise KeyError(name)
        return getattr(self, name)

    @property
    def sha256(self) -> str:
        return self.manifest.get("sha256") or dataset_hash(self)

    def save(self, folder: Path | str) -> Path:
        """Write the three JSONL files and the manifest (the manifest last: it marks a complete dataset)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in SPLITS:
            _atomic_write(folder / f"{name}.jsonl", _jsonl(self.split(name)))
        _atomic_write(folder / "manifest.json", json.dumps(self.manifest, indent=2, ensure_ascii=False) + "\n")
        self.path = folder
        return folder

    @classmethod
    def load(cls, folder: Path | str) -> Dataset:
        folder = Path(folder)
        try:
            manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DatasetError(f"{folder}: no manifest.json (not a dataset, or an interrupted build)") from None
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{folder}/manifest.json is unreadable ({exc})") from exc
        parts = {}
        for name in SPLITS:
            try:
                lines = (folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
                parts[name] = [Example.from_json(json.loads(line)) for line in lines if line.strip()]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DatasetError(f"{folder}/{name}.jsonl is unreadable ({type(exc).__name__}: {exc})") from exc
        ds = cls(parts["train"], parts["val"], parts["test"], manifest, folder)
        if manifest.get("sha256") != dataset_hash(ds):
            raise DatasetError(
                f"{folder}: the examples do not match the manifest's sha256 (edited or truncated files); rebuild the dataset"
            )
        return ds


# --- examples --------------------------------------------------------------------------------


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[A-Z0-9\"'(\[])")


def split_sentences(text: str) -> list[str]:
    """Sentences of an answer, text kept verbatim (code, underscores and all)."""
    text = " ".join(text.split())
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        out.append(text[start:m.end()].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [x for x in out if x]


def _sentence_cap(text: str, max_sentences: int = MAX_ANSWER_SENTENCES, max_chars: int = MAX_ANSWER_CHARS) -> str:
    text = " ".join(text.split())
    parts = split_sentences(text)
    if len(text) <= max_chars and len(parts) <= max_sentences:
        return text
    out = ""
    for s in parts[:max_sentences]:
        if out and len(out) + len(s) + 1 > max_chars:
            break
        out = f"{out} {s}".strip()
    if not out:  # one enormous "sentence" (a code dump): cut at a word boundary
        out = text[:max_chars].rsplit(" ", 1)[0]
    return out


def quiz_answer(choice: str, explanation: str) -> str:
    """The correct choice as a sentence, then the explanation: 1-3 sentences."""
    choice = " ".join(choice.split())
    lead = choice[:1].upper() + choice[1:]
    if lead[-1:] not in ".!?":
        lead += "."
    return _sentence_cap(f"{lead} {explanation}", max_sentences=3)


def _norm_question(q: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", q.casefold()).strip()


def retrieve_passages(course, retriever, question: str, k: int = 5) -> tuple[Passage, ...]:
    """The passages the tutor would hand the answer model for this question (``Tutor.context_for``:
    the same aliases, retrieval, relevance rule and number of passages as in service)."""
    from knowledge.tutor import Tutor

    return Tutor(course, retriever, None, k=k).context_for(question)


_HEADING_PREFIX = re.compile(
    r"^(quick recall|key terms|step \d+|change \d+|pitfall \d+|misconception \d+|worked example \d+|"
    r"bonus experiment|example|results|goal and rules|starting point|the task)\s*:\s*", re.I)
_SKIP_HEADINGS = re.compile(r"explain it yourself|self-check|memory hooks|practice prompts", re.I)


def heading_question(heading: str) -> str | None:
    """A student's question from a lesson heading ("Quick recall: what is pre-training?" -> "What is
    pre-training?", "Change 3: lowering the learning rate to 1e-5" -> "What does the course say about
    lowering the learning rate to 1e-5?")."""
    h = " ".join(heading.split()).strip(" #")
    if not h or _SKIP_HEADINGS.search(h):
        return None
    h = _HEADING_PREFIX.sub("", h).strip()
    if len(h) < 4:
        return None
    if h.endswith("?"):
        return h[0].upper() + h[1:]
    return f"What does the course say about {h[0].lower() + h[1:]}?"


def _plain(markdown: str) -> str:
    """Lesson Markdown as plain sentences: code blocks, emphasis markers and list bullets removed
    (underscores inside words and inline code text are kept)."""
    text = re.sub(r"```.*?```", " ", markdown, flags=re.S)
    text = re.sub(r"^\s*([-*+]|\d+[.)])\s+", "", text, flags=re.M)
    text = re.sub(r"(\*\*|__|`)", "", text)
    text = re.sub(r"(?<!\w)\*(\S[^*]*)\*(?!\w)", r"\1", text)
    return text


def lesson_items(course, retriever) -> list[tuple[str, str, str, str]]:
    """One (kind, id, question, answer) per lesson section of the index: the heading as a question,
    the section's first sentences (verbatim, at most 3) as the answer. Teaches answering in the
    course's own words from the passage that holds them."""
    index = getattr(retriever, "index", None)
    out, seen = [], set()
    for c in getattr(index, "chunks", None) or []:
        if getattr(c, "kind", "lesson") != "lesson" or not c.section:
            continue
        key = f"{c.source}#{c.section}"
        if key in seen:
            continue
        seen.add(key)
        q = heading_question(c.section.rsplit(" > ", 1)[-1])
        body = [x for x in split_sentences(_plain(c.text)) if len(x) >= 25 and not x.endswith(":") and "|" not in x]
        if q is None or not body:
            continue
        answer = _sentence_cap(" ".join(body[:3]), max_sentences=3, max_chars=450)
        if len(answer) >= 60:
            out.append(("lesson", key, q, answer))
    return out


def raw_items(course, feedback: Iterable[FeedbackItem] = (), lessons: Sequence[tuple[str, str, str, str]] = ()
              ) -> list[tuple[str, str, str, str]]:
    """(kind, source id, question, answer) for every usable Q&A source of the course, in a stable order."""
    items: list[tuple[str, str, str, str]] = []
    for q in course.quizzes:
        items.append(("quiz", q.id, q.question, quiz_answer(q.answer, q.explanation)))
    for c in course.flashcards:
        items.append(("flashcard", c.id, c.front, _sentence_cap(c.back)))
    for r in course.faq:
        items.append(("faq", r.id, r.question, _sentence_cap(r.answer)))
    latest: dict[int, FeedbackItem] = {}
    for fb in feedback:  # one example per answer: a correction wins over an approval
        if fb.status not in ("approved", "corrected") or not fb.answer.strip() or not fb.question.strip():
            continue
        prev = latest.get(fb.answer_id)
        if prev is None or (fb.status == "corrected" and prev.status != "corrected"):
            latest[fb.answer_id] = fb
    for aid in sorted(latest):
        fb = latest[aid]
        items.append(("feedback", str(aid), fb.question, _sentence_cap(fb.answer)))
    items.extend(lessons)
    return items


def course_examples(course, retriever, feedback: Iterable[FeedbackItem] = (), *, k: int = 5,
                    lessons: bool = False, progress=None) -> list[Example]:
    """One example per source, with retrieved passages. Duplicate (kind, id) pairs are merged.
    ``lessons``: also one example per lesson section (see ``lesson_items``)."""
    from knowledge.tutor import Tutor, clean_question

    tutor = Tutor(course, retriever, None, k=k)  # one tutor: it caches the course vocabulary
    out: list[Example] = []
    group_of_question: dict[str, str] = {}
    seen_ids: Counter[str] = Counter()
    items = raw_items(course, feedback, lesson_items(course, retriever) if lessons else ())
    for n, (kind, sid, question, answer) in enumerate(items, 1):
        question, _ = clean_question(question, 2000)
        if not question or not answer:
            continue
        ex_id = f"{kind}:{sid}"
        seen_ids[ex_id] += 1
        if seen_ids[ex_id] > 1:  # a repeated FAQ id (published data has one): same source, same group
            ex_id = f"{ex_id}#{seen_ids[ex_id]}"
        group = f"{kind}:{sid}"
        nq = _norm_question(question)
        group = group_of_question.setdefault(nq, group) if nq else group
        passages = tutor.context_for(question)
        in_passages = any(p.source == sid for p in passages) if kind == "faq" else None
        if kind == "lesson" and not any(f"{p.source}#{p.section}" == sid for p in passages):
            continue  # its answer would not be in the context: that would teach inventing
        out.append(Example(ex_id, group, kind, question, answer, passages, in_passages))
        if progress is not None and n % 100 == 0:
            progress(f"retrieved passages for {n}/{len(items)} questions")
    return out


def split_examples(examples: Sequence[Example], *, seed: int = 13, val_fraction: float = 0.15,
                   test_fraction: float = 0.2) -> dict[str, list[Example]]:
    """Seeded split by group, stratified by kind; each kind with >= 3 groups puts >= 1 group in val and test."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DatasetError(f"bad split fractions: val {val_fraction}, test {test_fraction}")
    by_kind: dict[str, list[str]] = {}
    group_kind: dict[str, str] = {}
    for ex in examples:
        if ex.group not in group_kind:
            group_kind[ex.group] = ex.kind
            by_kind.setdefault(ex.kind, []).append(ex.group)
    assignment: dict[str, str] = {}
    for kind in sorted(by_kind):
        groups = sorted(by_kind[kind])
        random.Random(f"{seed}:{kind}").shuffle(groups)
        n = len(groups)
        n_test = round(n * test_fraction)
        n_val = round(n * val_fraction)
        if n >= 3:
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        else:
            n_test = n_val = 0
        for i, g in enumerate(groups):
            assignment[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for ex in examples:
        out[assignment[ex.group]].append(ex)
    return out


def dataset_hash(ds: Dataset) -> str:
    h = hashlib.sha256()
    for name in SPLITS:
        h.update(f"[{name}]\n".encode())
        h.update(_jsonl(ds.split(name)).encode("utf-8"))
    return h.hexdigest()


def _counts(examples: Sequence[Example]) -> dict[str, int]:
    c = Counter(ex.kind for ex in examples)
    return {**{k: c[k] for k in KINDS if c[k]}, "total": len(examples)}


def build_dataset(
    course,
    retriever=None,
    *,
    feedback: Iterable[FeedbackItem] = (),
    seed: int = 13,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    k: int = 5,
    min_examples: int = MIN_EXAMPLES,
    lessons: bool = False,
    out_dir: Path | str | None = None,
    progress=None,
) -> Dataset:
    """Examples from ``course`` (+ reviewed ``feedback``), split, optionally saved to ``out_dir``.

    ``retriever``: the course's retriever; None builds an in-memory index with MiniLM.
    Raises DatasetError when there is too little to train on.
    """
    feedback = list(feedback)
    items = raw_items(course, feedback)
    if len(items) < min_examples:
        kinds = Counter(kind for kind, *_ in items)
        raise DatasetError(
            f"course {course.id!r} gives only {len(items)} training example(s) "
            f"(quiz questions: {kinds['quiz']}, flashcards: {kinds['flashcard']}, FAQ records: {kinds['faq']}, "
            f"reviewed feedback: {kinds['feedback']}); fine-tuning needs at least {min_examples}. "
            "Add quiz questions with explanations (quizzes/*.yaml), flashcards (flashcards/*.yaml) or FAQ "
            "records (faq/*), or approve students' answers with `tutorbot feedback review`."
        )
    if retriever is None:
        retriever = in_memory_retriever(course)
    examples = course_examples(course, retriever, feedback, k=k, lessons=lessons, progress=progress)
    parts = split_examples(examples, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    for name in ("train", "val", "test"):
        if not parts[name]:
            raise DatasetError(
                f"the {name} split is empty ({len(examples)} examples from {len({e.group for e in examples})} "
                f"sources); add more quiz questions, flashcards or FAQ records so every split gets some"
            )
    ds = Dataset(parts["train"], parts["val"], parts["test"])
    faq = [e for e in examples if e.kind == "faq"]
    ds.manifest = {
        "format": FORMAT,
        "course_id": course.id,
        "course_title": course.title,
        "seed": seed,
        "lessons": lessons,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "counts": {name: _counts(parts[name]) for name in SPLITS},
        "groups": {name: len({e.group for e in parts[name]}) for name in SPLITS},
        "retrieval": {
            "embedding_model": getattr(getattr(retriever, "embedder", None), "name", None),
            "k": k,
            "passages_per_prompt": max((len(e.passages) for e in examples), default=0),
            "faq_source_in_passages": (sum(bool(e.source_in_passages) for e in faq) / len(faq)) if faq else None,
        },
        "sha256": dataset_hash(ds),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if out_dir is not None:
        ds.save(out_dir)
    return ds


def in_memory_retriever(course):
    from knowledge.embedder import shared_minilm
    from knowledge.index import KnowledgeIndex
    from knowledge.retriever import Retriever

    emb = shared_minilm()
    return Retriever(KnowledgeIndex.build(course, emb), emb)


# --- feedback from the database ----------------------------------------------------------------


async def fetch_feedback(session_factory, limit: int = 100_000) -> list[FeedbackItem]:
    """Approved and corrected feedback with the question it is about (newest first)."""
    from knowledge.store.qa_repo import QARepository

    repo = QARepository(session_factory)
    out: list[FeedbackItem] = []
    for status in ("corrected", "approved"):
        for fb, ans in await repo.list_feedback(status=status, limit=limit):
            # an approved decline teaches nothing about the course; a correction always counts
            text = fb.corrected_answer if status == "corrected" else (ans.answer if ans.answered else None)
            if text and text.strip():
                out.append(FeedbackItem(int(ans.id), ans.question, text, status))
    return out


def load_feedback(database_url: str) -> list[FeedbackItem]:
    """Reviewed feedback from the database at ``database_url``. Raises knowledge.store.db.DatabaseError."""
    from knowledge.store.db import create_engine, create_session_factory

    async def go() -> list[FeedbackItem]:
        engine = create_engine(database_url)
        try:
            return await fetch_feedback(create_session_factory(engine))
        finally:
            await engine.dispose()

    return asyncio.run(go())


# --- io ----------------------------------------------------------------------------------------


def _jsonl(examples: Sequence[Example]) -> str:
    return "".join(json.dumps(e.to_json(), ensure_ascii=False, sort_keys=True) + "\n" for e in examples)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
