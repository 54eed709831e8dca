"""The tutor: question -> retrieved passages -> grounded answer with citations, or an honest decline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class SourceRef:
    """A cited passage: ``source`` is the lesson path relative to the course folder or a FAQ record id."""

    source: str
    title: str
    section: str
    score: float
    excerpt: str

    @property
    def label(self) -> str:
        return f"{self.title} > {self.section}" if self.section else self.title


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "assistant"]
    content: str


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    answered: bool
    confidence: float
    sources: tuple[SourceRef, ...] = ()
    # "smalltalk": a reply in kind to "thanks", "hi", "ok got it" (answered = False: no course answer)
    mode: Literal["generative", "extractive", "declined", "smalltalk"] = "extractive"
    model: str | None = None
    notices: tuple[str, ...] = field(default=())
    latency_ms: float = 0.0


# --- the tutor ---------------------------------------------------------------------------------

import logging  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import unicodedata  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import numpy as np  # noqa: E402

from knowledge.chunking import sentences  # noqa: E402
from knowledge.embedder import VectorCache  # noqa: E402
from knowledge.generation import GenerationError, GenerationRequest, Generator, Passage  # noqa: E402
from knowledge.retriever import Hit, Retriever  # noqa: E402
from knowledge.smalltalk import SmallTalk, SmallTalkDetector, reply  # noqa: E402
from knowledge.text import course_reading, keyword_tokens, standard_spelling  # noqa: E402

log = logging.getLogger(__name__)

# Relevance rule, calibrated on the sample course's question set (benchmarks/data/tutor_questions.yaml,
# benchmarks/bench_tutor.py): in-course questions reach a best-passage cosine of 0.32-0.78, off-topic
# ones 0.01-0.33 (the highest: a question on self-attention, a neighbouring ML topic). Above 0.36 the
# course covers it; from 0.20 it needs keyword evidence: a raw BM25 of 3 or more (every in-course
# question under 0.36 had one), or a short question made only of course terms ("what is LoRA?").
# A blind second set written later (benchmarks/data/tutor_questions_dev.yaml, 40 questions) showed
# the rule declining 8 in-course questions at cosines 0.17-0.34: students' shorthand ("lr", "val acc",
# now read through the course's aliases), follow-ups with no pronoun (now retried with the previous
# question), and questions mostly in the course's words with a fair cosine, now answered when at least
# 60% of their words are course words and the cosine is 0.25 or more (the off-topic messages of both
# sets that reach 0.25 use at most 57% course words).
MIN_COSINE = 0.36
MIN_COSINE_WITH_KEYWORDS = 0.20
MIN_BM25_FOR_KEYWORDS = 3.0
# A passage that shares several of the question's rare words is about it even when MiniLM misses the
# meaning: "can someone explain the customer support example from step 4, the one with chat logs"
# reaches BM25 8.1 on the section it names at cosine 0.11. The off-topic and hostile messages of every
# question set and the small-talk sets reach at most BM25 3.7 ("play some music").
MIN_BM25_STRONG = 6.0
MIN_COSINE_STRONG_KEYWORDS = 0.05
SHORT_QUESTION_TERMS = 3  # a question of at most this many content words, all of them course terms
MIN_COSINE_COURSE_TERMS = 0.15  # ... needs only this cosine ("what are adapters?" reaches 0.196)
MIN_COURSE_COVERAGE = 0.6  # share of the question's words that the course uses ...
MIN_COSINE_WITH_COVERAGE = 0.25  # ... with this cosine ("how do i check my fine-tuned model didnt get worse")
FOLLOWUP_FOREIGN_WORDS = 1  # words the course never uses that a follow-up may bring ("tho")
FOLLOWUP_MAX_DILUTION = 0.02  # how much less close a passage may be to a retried pair than to the last question
GEN_PASSAGES = 3
EXTRACT_PASSAGES = 5  # the extractor reads the top three passages, and up to five from the top lesson,
# and answers from the passage with the best (fused score / top score + this weight x the cosine of its best
# sentence to the question); a FAQ answers from the top record (one record per source: retrieval's choice).
# Measured on both question sets (benchmarks/bench_tutor.py, docs/BENCHMARKS.md, 2026-12-02): the top
# lesson's passages only, weighted by the best sentence's full score (cosine + overlap - penalties), 43/60
# and 31/40 full answers; passages of any lesson by the best sentence's cosine, weight 0.5-1.0: 44-45/60
# and 32/40 (0.75: 45/60, 95 facts against 91; 32/40, 63 facts against 62); a heading-similarity term: 40-44/60.
PASSAGE_SENTENCE_WEIGHT = 0.75
EXTRACT_SENTENCES = 3
EXTRACT_MAX_CHARS = 600
EXTRACT_WHOLE_EXTRA = 1  # a passage of up to EXTRACT_SENTENCES + 1 sentences (within the cap) is given whole
EXTRACT_EXTRA_CHARS = 150  # a close second passage may add one sentence past the cap
EXTRACT_MAX_EXTRA = 1  # sentences taken from passages other than the chosen one
EXTRACT_REDUNDANT = 0.8  # ... unless it restates one already given (cosine to it)
EXTRACT_EXTRA_MARGIN = 0.15  # measured: 0 -> 35/60 full answers, 0.05 -> 38, 0.2 -> 39 (before whole passages; with them 0.1-0.2 -> 43-44)
MAX_ANSWER_SENTENCES = 4
SHOWN_PENALTY = 0.2  # a sentence of the tutor's previous answer in the conversation counts for this much less
SUPPORT_MIN = 0.6  # share of a generated sentence's content words that must appear in the passages
MIN_SENTENCE_SUPPORT = 0.55  # cosine of a generated sentence to its closest passage sentence

_ZERO_WIDTH = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")
# No \b after everyone/here: Discord pings "@here_" and "@everyone's" too.
_MENTION = re.compile(r"<@[!&]?\d+>|<#\d+>|@(?:everyone|here)", re.IGNORECASE)
_CODE_FENCE = re.compile(r"```(?:\w+\n)?(.*?)```", re.DOTALL)
# Aimed at the bot, not at the course: "forget the previous knowledge" (catastrophic forgetting),
# "dropout acts as a regulariser" and "say the lr should be 10 times smaller" are course questions.
_INJECTION = re.compile(
    r"\b(ignore|disregard|forget)\b.{0,40}\b(instructions?|rules|prompts?|above"
    r"|(previous|prior|earlier|all|your) (messages?|context|conversation|orders|commands))\b"
    r"|\byou are now\b|(?:^|[.!?,;:]\s*|\b(?:you|please|now|want you to)\s+)act as\b"
    r"|\bpretend (to be|you)\b|\bjailbreak\b|(?-i:\bDAN\b)"
    r"|\b(system|hidden|initial) prompt\b|\bdeveloper mode\b"
    r"|\bsay\b[^.?!]{0,60}\b(\d+|two|three|five|ten|twenty|hundred|many) times\b"
    r"(?!\s+(smaller|larger|bigger|lower|higher|more|less|faster|slower|as)\b)|\brepeat after me\b",
    re.IGNORECASE,
)
_FOLLOWUP = re.compile(
    r"^(and|but|so|also|then|what about|how about|why|ok|okay|wait)\b|\b(it|that|this|those|these|they|them|then|instead|there)\b",
    re.IGNORECASE,
)
# A message about the tutor's own tastes or person, which no lesson answers.
_ABOUT_THE_TUTOR = re.compile(
    r"\b(your|ur)\s+(fav(ou?rite)?|opinion|name|age|hobb(y|ies))\b|\b(do|would)\s+(you|u)\s+(like|love|enjoy|prefer)\b"
    r"|\bwho\s+(are|r)\s+(you|u)\b",
    re.IGNORECASE,
)
_EMPHASIS = re.compile(r"\*\*[^*\n]+\*\*|(?<![\w*])\*[^*\n]+\*(?![\w*])|(?<!\w)__[^_\n]+__(?!\w)|`[^`\n]+`")
# A lesson's numbered parts ("Step 7: Adapters ...", "Worked example 3: ...", "Pitfall 2: ...").
_NUMBERED_HEADING = re.compile(r"^([a-z][a-z ]{0,30}?)\s+(\d{1,2})\s*:")
_HEDGED = re.compile(r"\b(some (people )?(believe|think|assume)|misconception|myth|wrong approach|it is a mistake)\b", re.I)
# Exercise scaffolding is not an answer ("Question (easy): ...", "Option B: ..."); a worked example's
# "Answer: ..." and "Reasoning: ..." lines are the answer and its explanation.
_SCAFFOLD = re.compile(r"^(question|common mistakes?|option [a-f]|step \d+)\b[^.]{0,40}:", re.I)
_CITATION = re.compile(r"\[\d+(?:,\s*\d+)*\]|\b(the )?answer is:?\s*|\bsource:?\s*\[?\d*\]?", re.I)
_NOT_COVERED = re.compile(r"(does not|doesn't|do not|don't) (cover|mention|say|answer)|not covered|no information", re.I)


# A list item quoted as a sentence starts as its author wrote it ("a Dense layer with 64 units"):
# capitalised for reading, after a sentence's end but not after an abbreviation ("e.g. a").
_LOWER_START = re.compile(r"(?:^|(\S*)[.!?]\s+)([a-z])")
_ABBREVIATIONS = frozenset({"e.g", "i.e", "vs", "etc", "approx", "cf", "incl", "fig"})


def _sentence_case(text: str) -> str:
    def up(m: re.Match) -> str:
        before = (m.group(1) or "").lower()
        if m.start() > 0 and before.strip("(") in _ABBREVIATIONS:
            return m.group(0)
        return m.group(0)[:-1] + m.group(2).upper()
    return _LOWER_START.sub(up, text)


def _said(sentence: str) -> str:
    """A sentence as compared with what the tutor said before (case and spacing aside)."""
    return " ".join(sentence.lower().split())


def _self_repeating(tokens: list[str]) -> bool:
    """A sentence that says the same thing twice ("fine-tuning is a process of fine-tuning")."""
    if len(tokens) < 4:
        return False
    return len(set(tokens)) / len(tokens) < 0.6


def clean_question(text: str, max_chars: int) -> tuple[str, list[str]]:
    """Normalise a student's message: Unicode NFKC, zero-width and bidi controls removed, mentions
    dropped, code fences unwrapped, whitespace collapsed, overlong text truncated (with a notice)."""
    notices: list[str] = []
    text = unicodedata.normalize("NFKC", text or "")
    text = _ZERO_WIDTH.sub("", text)
    # Every invisible character goes before mentions are looked for: "@\u00adeveryone" (soft hyphen)
    # or "<@\u061c123>" (Arabic letter mark) would otherwise survive as a mention once it is removed.
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    text = _CODE_FENCE.sub(lambda m: m.group(1), text)
    text = _MENTION.sub(" ", text)
    text = " ".join(text.split())
    if len(text) > max_chars:
        cut = text[:max_chars].rsplit(" ", 1)[0] or text[:max_chars]
        notices.append(f"Your message was {len(text):,} characters; I read the first {len(cut):,}.")
        text = cut
    return text, notices


class Tutor:
    """Answers questions about one course. Thread-safe; ``answer`` blocks (call it off the event loop)."""

    def __init__(
        self,
        course,
        retriever: Retriever,
        generator: Generator | None = None,
        *,
        mode: str = "generative",
        k: int = 5,
        max_question_chars: int = 2000,
        min_cosine: float = MIN_COSINE,
        max_new_tokens: int = 96,
        small_talk: bool = True,
    ):
        self.course = course
        self.retriever = retriever
        self.generator = generator
        self.mode = mode
        self.k = k
        self.max_question_chars = max_question_chars
        self.min_cosine = min_cosine
        self.max_new_tokens = max_new_tokens
        self._swap_lock = threading.Lock()
        self._vocab_cache: tuple[object, frozenset[str], frozenset[str]] | None = None
        self._numbered_cache: tuple[object, dict[str, dict[int, list[int]]]] | None = None
        self._vectors = VectorCache()  # the passages' sentences (and questions) embedded once
        # False: every message is read as a question (the benchmark's baseline)
        self._small_talk = SmallTalkDetector() if small_talk else None

    # --- hot swaps (admin reindex / model promotion) --------------------------------------------
    def swap(self, *, retriever: Retriever | None = None, generator: Generator | None = None, course=None) -> None:
        with self._swap_lock:
            if retriever is not None:
                self.retriever = retriever
            if generator is not None:
                self.generator = generator
            if course is not None:
                self.course = course

    @property
    def model_name(self) -> str | None:
        g = self.generator
        return g.name if g is not None and self.mode == "generative" else None

    def help_text(self) -> str:
        return (
            f"I'm the tutor for **{self.course.title}**. Ask me about its lessons, for example "
            "\"what is fine-tuning?\" or \"why use a low learning rate?\", or start a quiz with /quiz."
        )

    # --- answering ------------------------------------------------------------------------------
    def answer(self, question: str, *, history: Sequence[Turn] = ()) -> Answer:
        t0 = time.perf_counter()
        text, notices = clean_question(question, self.max_question_chars)
        retriever, generator = self.retriever, self.generator  # one consistent snapshot

        def done(**kw) -> Answer:
            return Answer(question=text, notices=tuple(notices), latency_ms=round((time.perf_counter() - t0) * 1000, 1), **kw)

        if not keyword_tokens(text) and len(text) < 3:
            return done(text="Ask me a question about the course. " + self.help_text(), answered=False,
                        confidence=0.0, mode="declined")
        if _INJECTION.search(text):
            return done(text="I can only help with questions about the course. " + self.help_text(),
                        answered=False, confidence=0.0, mode="declined")

        talk = self._detect_small_talk(text, retriever)
        if talk is not None and talk.intent != "offtopic":
            return done(text=reply(talk.intent, self.help_text()), answered=False, confidence=0.0, mode="smalltalk")
        query, hits, relevant, named = ([], [], [], []) if talk is not None else self._retrieve(text, history, retriever)
        if not relevant:
            return done(
                text=f"Sorry, the course doesn't cover that. {self.help_text()}",
                answered=False, confidence=round(self._confidence(hits), 3), mode="declined",
            )
        confidence = round(self._confidence(relevant), 3)
        if self.mode == "generative" and generator is not None:
            try:
                generated = generator.generate(
                    [GenerationRequest(text if query == text else query, self._passages(relevant), self.max_new_tokens)]
                )[0]
                checked = self._grounded(generated, relevant, retriever)
                if checked:
                    return done(text=checked, answered=True, confidence=confidence, sources=self._sources(relevant),
                                mode="generative", model=generator.name)
                log.info("generated answer not supported by the passages; using extraction")
            except GenerationError as exc:
                log.warning("generation failed (%s); using extraction", exc)
            except Exception:
                log.exception("generator raised unexpectedly; using extraction")
        # The model is given the passages that passed the relevance rule (the closest in meaning: 29/60
        # full answers, 26/60 from the top hits whatever their cosine); extraction reads the retriever's
        # ranking once the rule says the course covers the question: "how many epochs did they train
        # for in the experiment" ranks Change 4 (up to 20 epochs) first at cosine 0.29, below the rule.
        last = next((t.content for t in reversed(history) if t.role == "assistant"), "")
        shown = frozenset(_said(x) for x in sentences(last))
        extracted, quoted = self._extract(query, hits, retriever, shown, named)
        # the passages quoted come first among the sources (one may rank below the top three)
        cited = [hits[i] for i in quoted] + [h for i, h in enumerate(hits) if i not in quoted]
        return done(text=extracted, answered=True, confidence=confidence, sources=self._sources(cited),
                    mode="extractive")

    def context_for(self, question: str) -> tuple[Passage, ...]:
        """The passages the answer model is given for this question asked on its own: the same
        cleaning, aliases, retrieval and relevance rule as ``answer``. A question the tutor would
        decline still gets the top passages (fine-tuning data wants a context for every example)."""
        text, _ = clean_question(question, self.max_question_chars)
        _query, hits, relevant, _named = self._retrieve(text, (), self.retriever)
        return self._passages(relevant or hits)

    # --- steps ----------------------------------------------------------------------------------
    def _retrieve(
        self, text: str, history: Sequence[Turn], retriever: Retriever,
    ) -> tuple[str, list[Hit], list[Hit], list[int]]:
        """The query (the message, read with the conversation when it is a follow-up, aliases
        spelled out), its hits, the hits that show the course covers it, and the index rows of the
        numbered parts the message names ("step 7"), which lead both."""
        aliases = self.course.meta.aliases
        text = standard_spelling(text)  # "thats" is a pronoun and "tho" no foreign word to the rules below
        plain = course_reading(text, aliases)
        # A message is read with the conversation's last question only when it brings at most one
        # word of its own that the course never uses: "why does that help tho" is a follow-up,
        # "which crypto should i buy this week" is not, whatever came before it.
        previous = self._previous_question(history, retriever)
        # One about the tutor itself ("what's your favourite movie?") follows no lesson either.
        if previous and (not self._may_follow(plain, retriever) or _ABOUT_THE_TUTOR.search(text)):
            previous = None
        query = course_reading(self._rewrite(text, previous), aliases)
        hits = self._search(query, retriever)
        relevant = self._relevant(hits, query, retriever)
        if not relevant and previous and query == plain:
            # A follow-up with no pronoun to give it away ("how small are we talking"): when the
            # message alone finds nothing, read it with the conversation's last question.
            joined = course_reading(f"{previous} {text}", aliases)
            joined_hits = self._search(joined, retriever)
            joined_relevant = self._relevant(joined_hits, joined, retriever)
            # (A pronoun's follow-up is not held to this: "ok so what should i do instead then"
            # waters its question down too, being all pronoun and no topic.)
            if joined_relevant and not self._dilutes(previous, joined_relevant, retriever):
                query, hits, relevant = joined, joined_hits, joined_relevant
        named = self._named_parts(plain, retriever)
        if named:
            # "what does pitfall 2 say", "whats in step 7": a student naming a numbered part of a lesson
            # means that part, whatever MiniLM makes of the rest of the words.
            found = {h.row: h for h in retriever.search(query, len(retriever.index),
                                                        query_vector=self._vectors.encode(retriever.embedder, [query]))}
            first = [found[r] for r in named if r in found]
            hits = first + [h for h in hits if h.row not in named]
            relevant = first + [h for h in relevant if h.row not in named]
        return query, hits, relevant, named

    def _named_parts(self, text: str, retriever: Retriever) -> list[int]:
        """Index rows of the passages under the numbered headings the message names ("step 7",
        "pitfall #2", "worked example 3"); none when the message brings more than one word the course
        never uses, or the number counts something the course never names ("change 3 tires").
        Ordinals are not read: "the first step to learn guitar" names no step of the course."""
        labels = self._numbered_headings(retriever)
        if not labels:
            return []
        low = text.lower()
        vocab = self._vocabulary(retriever)
        wanted: set[tuple[str, int]] = set()
        for label in labels:
            for m in re.finditer(rf"\b{re.escape(label)}s?\s*(?:#|no\.?|number)?\s*(\d{{1,2}})\b(?:\s+([a-z]+))?", low):
                # "change 3 tires", "change 2 lightbulbs": a number of things the course never names
                if m.group(2) and not set(keyword_tokens(m.group(2))) <= vocab:
                    continue
                wanted.add((label, int(m.group(1))))
        if not wanted or not self._may_follow(text, retriever):
            return []
        return list(dict.fromkeys(row for key in sorted(wanted) for row in labels[key[0]].get(key[1], [])))

    def _numbered_headings(self, retriever: Retriever) -> dict[str, dict[int, list[int]]]:
        """label -> number -> index rows, from headings such as "Step 7: ...", "Worked example 3: ..."
        (a part's subsections count as the part; "Worked example 3" is also "example 3")."""
        index = retriever.index
        cached = self._numbered_cache
        if cached is not None and cached[0] is index:
            return cached[1]
        out: dict[str, dict[int, list[int]]] = {}
        for row, c in enumerate(index.chunks):
            for heading in c.section.split(" > "):
                m = _NUMBERED_HEADING.match(heading.lower())
                if m:
                    label = " ".join(m.group(1).split())
                    for name in {label, label.rsplit(" ", 1)[-1]}:
                        rows = out.setdefault(name, {}).setdefault(int(m.group(2)), [])
                        if row not in rows:
                            rows.append(row)
        self._numbered_cache = (index, out)
        return out

    def _search(self, query: str, retriever: Retriever) -> list[Hit]:
        """The retriever's top hits, the query embedded through the tutor's cache (the extractor
        reads the same vector, so an answer embeds its question once)."""
        return retriever.search(query, self.k, query_vector=self._vectors.encode(retriever.embedder, [query]))

    def _dilutes(self, previous: str, hits: list[Hit], retriever: Retriever) -> bool:
        """Whether the message read with the last question only waters the last question down: every
        passage found is less close to the pair than to the last question alone. "give me a cookie
        recipe" after "what is fine-tuning?" finds fine-tuning passages through the last question's
        words, each 0.11-0.19 less close to the pair; a real follow-up moves towards at least one."""
        before = retriever.cosines(course_reading(previous, self.course.meta.aliases), hits)
        return max(h.dense_score - c for h, c in zip(hits, before, strict=True)) < -FOLLOWUP_MAX_DILUTION

    def _previous_question(self, history: Sequence[Turn], retriever: Retriever) -> str | None:
        """The conversation's last question: its last user turn that is not small talk ("thanks"
        between a question and its follow-up leaves the follow-up following the question)."""
        for t in reversed(history):
            if t.role == "user" and self._detect_small_talk(t.content, retriever) is None:
                return t.content
        return None

    def _detect_small_talk(self, text: str, retriever: Retriever) -> SmallTalk | None:
        return self._small_talk.detect(text, retriever.embedder, self._vectors) if self._small_talk else None

    @staticmethod
    def _rewrite(text: str, previous: str | None) -> str:
        """A follow-up ("and why is that?") borrows the previous question's words for retrieval."""
        if not previous or len(text.split()) > 14 or not _FOLLOWUP.search(text):
            return text
        return f"{previous} {text}"

    def _relevant(self, hits: list[Hit], query: str, retriever: Retriever) -> list[Hit]:
        """The hits that show the course covers the question (none: the tutor declines): a high cosine,
        or a fair cosine backed by keyword evidence (a strong BM25 match, or a short question made only
        of the course's own terms, like "what is LoRA?", whose cosine is low because there is so little
        to embed). When none is, a question mostly in the course's words may still count as covered
        by the passages with a fair cosine. These are also the passages the answer model is given; the
        last rule only rescues questions the others decline, so the prompt of a question they answer
        stays the same (more passages would mean longer prompts, slower and no better answers)."""
        toks = set(keyword_tokens(query))
        vocab = self._vocabulary(retriever)
        course_terms = 0 < len(toks) <= SHORT_QUESTION_TERMS and toks <= self._terms(retriever)
        out = [
            h for h in hits
            if h.dense_score >= self.min_cosine
            or (h.dense_score >= MIN_COSINE_WITH_KEYWORDS and h.bm25_score >= MIN_BM25_FOR_KEYWORDS)
            or (course_terms and h.dense_score >= MIN_COSINE_COURSE_TERMS)
            or (h.dense_score >= MIN_COSINE_STRONG_KEYWORDS and h.bm25_score >= MIN_BM25_STRONG)
        ]
        if out or not toks or len(toks & vocab) / len(toks) < MIN_COURSE_COVERAGE:
            return out
        return [h for h in hits if h.dense_score >= MIN_COSINE_WITH_COVERAGE]

    def _may_follow(self, text: str, retriever: Retriever) -> bool:
        """At most FOLLOWUP_FOREIGN_WORDS of the message's words are words the course never uses."""
        return len(set(keyword_tokens(text)) - self._vocabulary(retriever)) <= FOLLOWUP_FOREIGN_WORDS

    def _vocabulary(self, retriever: Retriever) -> frozenset[str]:
        """Keyword tokens of every passage of the index (cached per index)."""
        return self._words_of(retriever)[0]

    def _terms(self, retriever: Retriever) -> frozenset[str]:
        """The course's terms: the keyword tokens of its headings, FAQ questions and emphasised words
        ("LoRA", "adapters", "overfitting"). A short question made only of these is about the course;
        one made of words the course merely uses ("what's good", "how are things") is not."""
        return self._words_of(retriever)[1]

    def _words_of(self, retriever: Retriever) -> tuple[frozenset[str], frozenset[str]]:
        index = retriever.index
        cached = self._vocab_cache
        if cached is None or cached[0] is not index:
            vocab = frozenset(t for c in index.chunks for t in keyword_tokens(c.keyword_text))
            named = " ".join(f"{c.title} {c.section} {c.question} " + " ".join(m.group(0) for m in _EMPHASIS.finditer(c.text))
                             for c in index.chunks)
            self._vocab_cache = cached = (index, vocab, frozenset(keyword_tokens(named)))
        return cached[1], cached[2]

    def _confidence(self, hits: list[Hit]) -> float:
        """How closely the best passage matches the question: 0 at MIN_COSINE_WITH_KEYWORDS, 1 from
        0.5 above it. It hardly predicts whether the answer holds all its facts (AUC 0.52 on the
        60-question set, 0.66 on the dev set, bench_tutor; over both, the best single signal tried,
        the fused score's margin over the second passage, reached 0.67), so the bot does not show it
        to students."""
        if not hits:
            return 0.0
        best = max(h.dense_score for h in hits)
        return float(np.clip((best - MIN_COSINE_WITH_KEYWORDS) / 0.5, 0.0, 1.0))

    @staticmethod
    def _sources(hits: list[Hit], limit: int = 3) -> tuple[SourceRef, ...]:
        seen, out = set(), []
        for h in hits:
            key = (h.source, h.chunk.section)
            if key in seen:
                continue
            seen.add(key)
            title = "FAQ" if h.chunk.kind == "faq" else h.chunk.title  # cited as "FAQ > <its section>"
            out.append(SourceRef(h.source, title, h.chunk.section, round(h.score, 4), h.excerpt(200)))
            if len(out) == limit:
                break
        return tuple(out)

    @staticmethod
    def _passages(hits: list[Hit]) -> tuple[Passage, ...]:
        return tuple(Passage(h.chunk.title, h.chunk.section, h.chunk.text, h.source) for h in hits[:GEN_PASSAGES])

    def _extract(
        self, query: str, hits: list[Hit], retriever: Retriever, shown: frozenset[str] = frozenset(),
        named: Sequence[int] = (),
    ) -> tuple[str, list[int]]:
        """The best sentences of the top passages, in reading order: cosine to the question plus
        keyword overlap, from the passage of the top lesson that answers best; and the positions in
        ``hits`` of the passages quoted, in the order the answer quotes them. Sentences in ``shown``
        (the tutor's previous answer in this conversation) count for less; a numbered part the
        question names (``named``, index rows) is the one answered from."""
        cands: list[tuple[int, int, str]] = []
        for pi, h in enumerate(hits[:EXTRACT_PASSAGES]):
            if pi >= GEN_PASSAGES and h.source != hits[0].source:
                continue
            for si, s in enumerate(sentences(h.chunk.text)):
                if len(s) >= 20 and not s.endswith((":", "?")):
                    cands.append((pi, si, s))
        if not cands:
            return hits[0].excerpt(400), [0]
        vecs = self._vectors.encode(retriever.embedder, [query] + [c[2] for c in cands])
        cos = vecs[1:] @ vecs[0]
        qtok = set(keyword_tokens(query))
        said_before = [SHOWN_PENALTY if shown and _said(s) in shown else 0.0 for _pi, _si, s in cands]
        scores = []
        for (pi, _si, s), c, again in zip(cands, cos.tolist(), said_before, strict=True):
            overlap = len(qtok & set(keyword_tokens(s))) / max(len(qtok), 1)
            # never state a misconception as the answer, nor echo exercise scaffolding
            penalty = 0.3 if _HEDGED.search(s) else 0.0
            penalty += 0.3 if _SCAFFOLD.match(s) else 0.0
            scores.append(c + 0.3 * overlap - 0.05 * pi - penalty - again)
        # The passage: mostly retrieval's order (sentence scores alone favour sentences that repeat
        # the question's words), nudged by how close its best sentence comes to the question, so that
        # a specific section ("Change 3: lowering the learning rate to 1e-5") can beat a summary that
        # names everything in passing. The window inside it starts at its best-scoring sentence.
        best_cosine: dict[int, float] = {}
        for (pi, _si, _s), c, again in zip(cands, cos.tolist(), said_before, strict=True):
            best_cosine[pi] = max(c - again, best_cosine.get(pi, -np.inf))
        bp = self._choose_passage(hits, best_cosine, named)
        own = [i for i, c in enumerate(cands) if c[0] == bp]
        best = max(own, key=lambda i: scores[i])
        # A short passage is a written unit (a section that states its point and its detail): it is
        # the answer as it stands. A longer one gives a window in reading order: the best sentence
        # and what follows it, filled backwards when the passage ends first.
        if len(own) <= EXTRACT_SENTENCES + EXTRACT_WHOLE_EXTRA and sum(len(cands[i][2]) + 1 for i in own) <= EXTRACT_MAX_CHARS:
            window = own
        else:
            pos = own.index(best)
            start = max(0, min(pos, len(own) - EXTRACT_SENTENCES))
            window = own[start:start + EXTRACT_SENTENCES]
        heading = hits[bp].chunk.section.rsplit(" > ", 1)[-1]
        # "Results: 90% training accuracy ..." carries the numbers; "Step 4: ..." only its place
        lead = heading.rstrip(".") if re.search(r"\d", _NUMBERED_HEADING.sub("", heading.lower(), count=1)) else ""
        parts: list[str] = []
        for i in window:
            if parts and len(" ".join(parts)) + len(cands[i][2]) > EXTRACT_MAX_CHARS:
                break
            parts.append(cands[i][2])
        said = " ".join(parts)
        if lead and (lead.lower() in said.lower() or set(re.findall(r"\d+(?:\.\d+)?%?", lead)) <= set(re.findall(r"\d+(?:\.\d+)?%?", said))):
            lead = ""  # the heading says nothing the answer does not (its numbers are there already)
        # A second passage often holds the other half of the answer ("how did they fix it?" spans
        # several sections): add its best sentence when it scores close to the best one, while the
        # answer stays within MAX_ANSWER_SENTENCES.
        extra, quoted = 0, [bp]
        for other in sorted({c[0] for c in cands} - {bp}):
            if extra >= EXTRACT_MAX_EXTRA or len(parts) + bool(lead) >= MAX_ANSWER_SENTENCES:
                break
            idx = [i for i, c in enumerate(cands) if c[0] == other]
            j = max(idx, key=lambda i: scores[i])
            repeats = max(float(vecs[1 + j] @ vecs[1 + i]) for i in window) >= EXTRACT_REDUNDANT
            if (not repeats and scores[j] >= scores[best] - EXTRACT_EXTRA_MARGIN
                    and len(" ".join(parts)) + len(cands[j][2]) <= EXTRACT_MAX_CHARS + EXTRACT_EXTRA_CHARS):
                parts.append(cands[j][2])
                extra += 1
                quoted.append(other)
        if lead:
            parts = [lead if lead.endswith(("?", "!")) else f"{lead}.", *parts[: MAX_ANSWER_SENTENCES - 1]]
            quoted = [pi for pi in quoted if pi == bp or any(c[0] == pi and c[2] in parts for c in cands)]
        return _sentence_case(" ".join(parts)), quoted

    @staticmethod
    def _choose_passage(hits: list[Hit], best_cosine: dict[int, float], named: Sequence[int] = ()) -> int:
        """The passage to answer from (an index into ``hits``), given the cosine of each candidate's best
        sentence to the question. Any lesson's passage may answer; a FAQ answers from its top record;
        a numbered part the question names answers first."""
        top_score = hits[0].score if hits[0].score > 0 else 1.0
        pool = [pi for pi in best_cosine if hits[pi].row in named] or list(best_cosine)
        if hits[0].chunk.kind != "lesson":
            pool = [pi for pi in pool if hits[pi].source == hits[0].source] or pool
        return max(pool, key=lambda pi: hits[pi].score / top_score + PASSAGE_SENTENCE_WEIGHT * best_cosine[pi])

    def _grounded(self, generated: str, hits: list[Hit], retriever: Retriever) -> str | None:
        """Keep the generated sentences a student can trust: each must restate something the passages
        say (its content words and numbers appear in them, and it is close in meaning to one of their
        sentences), and none may repeat another. Citation scaffolding ("[2]", "The answer is:") goes."""
        text = _CITATION.sub(" ", _MENTION.sub(" ", generated or ""))  # a model's words never ping
        text = " ".join(text.split())
        if not text or _NOT_COVERED.search(text):
            return None
        passages = hits[:GEN_PASSAGES]
        passage_text = " ".join(h.chunk.text for h in passages)
        vocab = set(keyword_tokens(passage_text))
        numbers = set(re.findall(r"\d+(?:\.\d+)?", passage_text))
        cands, seen = [], set()
        for sent in sentences(text):
            toks = keyword_tokens(sent)
            key = " ".join(toks)
            if len(toks) < 2 or key in seen or _self_repeating(toks):
                continue
            seen.add(key)
            support = sum(t in vocab for t in toks) / len(toks)
            nums_ok = all(n in numbers for n in re.findall(r"\d+(?:\.\d+)?", sent))
            if support >= SUPPORT_MIN and nums_ok:
                cands.append(sent)
        if not cands:
            return None
        source_sents = [x for h in passages for x in sentences(h.chunk.text)]
        sims = retriever.embedder.encode(cands) @ self._vectors.encode(retriever.embedder, source_sents).T
        kept = [c for c, row in zip(cands, sims, strict=True) if row.max() >= MIN_SENTENCE_SUPPORT]
        return " ".join(kept[:MAX_ANSWER_SENTENCES]) or None
