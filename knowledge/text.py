"""Keyword tokenisation shared by the BM25 indexes and the tutor's grounding checks."""

from __future__ import annotations

import functools
import re
import threading
from itertools import pairwise

import Stemmer

# A compact English stop-word list (function words only; domain words such as "model" are kept).
STOPWORDS = frozenset(
    ["a", "about", "above", "after", "again", "against", "all", "am", "an", "and", "any", "are", "aren't", "as", "at", "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "can't", "cannot", "could", "couldn't", "did", "didn't", "do", "does", "doesn't", "doing", "don't", "down", "during", "each", "few", "for", "from", "further", "had", "hadn't", "has", "hasn't", "have", "haven't", "having", "he", "he'd", "he'll", "he's", "her", "here", "here's", "hers", "herself", "him", "himself", "his", "how", "how's", "i", "i'd", "i'll", "i'm", "i've", "if", "in", "into", "is", "isn't", "it", "it's", "its", "itself", "let's", "me", "more", "most", "mustn't", "my", "myself", "no", "nor", "not", "of", "off", "on", "once", "only", "or", "other", "ought", "our", "ours", "ourselves", "out", "over", "own", "same", "shan't", "she", "she'd", "she'll", "she's", "should", "shouldn't", "so", "some", "such", "than", "that", "that's", "the", "their", "theirs", "them", "themselves", "then", "there", "there's", "these", "they", "they'd", "they'll", "they're", "they've", "this", "those", "through", "to", "too", "under", "until", "up", "very", "was", "wasn't", "we", "we'd", "we'll", "we're", "we've", "were", "weren't", "what", "what's", "when", "when's", "where", "where's", "which", "while", "who", "who's", "whom", "why", "why's", "with", "won't", "would", "wouldn't", "you", "you'd", "you'll", "you're", "you've", "your", "yours", "yourself", "yourselves", "also", "just", "get", "got", "may", "might", "must", "shall", "will", "would", "us", "im", "ive", "dont", "doesnt", "isnt", "whats", "hey", "hi", "hello", "please", "thanks", "thank", "ok", "okay", "yeah", "yes", "pls", "plz", "thx", "ty", "eli5", "tbh", "lol", "idk", "imo", "u", "ur", "though", "although", "cool", "nice", "awesome", "wow", "hmm", "alright", "gotcha", "oh", "ah"]
)
_WORD_RE = re.compile(r"[a-z0-9]+(?:['’-][a-z0-9]+)*")
# British and American spellings meet before stemming (the stemmer strips "-ize" but not "-ise",
# so "memorising" and "memorizing" stemmed apart): -ise/-isation/-yse -> -ize/-ization/-yze, -our -> -or.
_BRITISH_ISE = re.compile(r"(?<=[a-z]{3})is(e|es|ed|ing|ation|ations|er|ers)$")
_BRITISH_YSE = re.compile(r"(?<=[a-z]{3})ys(e|es|ed|ing|er|ers)$")
_BRITISH_OUR = re.compile(
    r"^(colo|behavio|favo|flavo|hono|labo|neighbo|humo|rumo|harbo|vapo|savo|endeavo|armo|odo|vigo|rigo|tumo|savio)ur"
)


def _american(word: str) -> str:
    if "is" in word:
        word = _BRITISH_ISE.sub(r"iz\1", word)
    if "ys" in word:
        word = _BRITISH_YSE.sub(r"yz\1", word)
    if "our" in word:
        word = _BRITISH_OUR.sub(r"\1r", word)
    return word


_local = threading.local()


def _stemmer() -> Stemmer.Stemmer:
    """One stemmer per thread: PyStemmer's Stemmer objects are not thread-safe (a shared one gave
    different tokens, hence different answers, under concurrent questions)."""
    st = getattr(_local, "stemmer", None)
    if st is None:
        st = _local.stemmer = Stemmer.Stemmer("english")
    return st


def keyword_tokens(text: str) -> list[str]:
    """Lower-cased, stop words removed, stemmed. Hyphenated words also count as their joined form
    ("pre-training" -> "pretrain", "pre", "train") so "pretraining" and "pre-training" match, and
    British spellings meet American ones ("memorising" and "memorizing" give the same token)."""
    words: list[str] = []
    for w in _WORD_RE.findall(text.lower().replace("’", "'")):
        if w in STOPWORDS:
            continue
        if "-" in w:
            parts = [p for p in w.split("-") if p and p not in STOPWORDS]
            words.append(w.replace("-", ""))
            words.extend(parts)
        else:
            words.append(w.replace("'", ""))
    words = [_american(w) for w in words]
    return _stemmer().stemWords(words) if words else []


def phrase_terms(tokens: list[str]) -> list[str]:
    """Adjacent pairs of keyword tokens, the terms of the phrase index: "learning rate" ->
    ["learn_rate"]. Tokens never contain "_", so a pair cannot collide with a word."""
    return [f"{a}_{b}" for a, b in pairwise(tokens)]


@functools.lru_cache(maxsize=32)
def _alias_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(words, key=len, reverse=True))) + r")(?![\w-])", re.I)


def expand_aliases(text: str, aliases: tuple[tuple[str, str], ...]) -> str:
    """The text with each whole-word alias replaced by its meaning ("typical lr?" -> "typical
    learning rate?"), case-insensitively; a hyphenated word ("lr-schedule") is left alone."""
    if not aliases or not text:
        return text
    meaning = dict(aliases)
    return _alias_pattern(tuple(meaning)).sub(lambda m: meaning[m.group(1).lower()], text)


# Chat spellings students type, read as standard English before the course's own aliases: without
# the apostrophe "thats" is no pronoun to the follow-up rule and "tho" is a word the course never
# uses, so "how do i tell from the numbers if thats happening to me" lost its conversation.
# Only unambiguous forms: "its", "lets", "were", "wed", "ill" and "r"/"y" are ordinary words too.
CHAT_WORDS: dict[str, str] = {
    "thats": "that's", "whats": "what's", "wheres": "where's", "whos": "who's", "hows": "how's", "whys": "why's",
    "theres": "there's", "heres": "here's", "dont": "don't", "doesnt": "doesn't", "didnt": "didn't",
    "isnt": "isn't", "arent": "aren't", "wasnt": "wasn't", "werent": "weren't", "cant": "can't",
    "wont": "won't", "wouldnt": "wouldn't", "shouldnt": "shouldn't", "couldnt": "couldn't",
    "havent": "haven't", "hasnt": "hasn't", "hadnt": "hadn't", "im": "I'm", "ive": "I've", "youre": "you're",
    "theyre": "they're", "youve": "you've", "theyve": "they've", "u": "you", "ur": "your", "tho": "though",
    "altho": "although", "thru": "through", "bc": "because", "bcs": "because", "cuz": "because",
    "coz": "because", "pls": "please", "plz": "please", "abt": "about", "b4": "before",
    "ppl": "people", "smth": "something", "sth": "something", "gonna": "going to", "wanna": "want to",
    "gotta": "got to", "kinda": "kind of", "sorta": "sort of", "dunno": "don't know", "idk": "I don't know",
    "rn": "right now", "w/o": "without", "w/": "with", "btw": "by the way", "imo": "in my opinion",
    "tbh": "to be honest", "govt": "government", "diff": "difference",
    "thx": "thanks", "ty": "thank you", "tysm": "thank you so much",
}
_CHAT_RE = re.compile(r"(?<![\w'’/-])(" + "|".join(map(re.escape, sorted(CHAT_WORDS, key=len, reverse=True))) + r")(?![\w'’-])", re.I)


def standard_spelling(text: str) -> str:
    """The text with chat spellings written out ("whats the diff tho" -> "what's the difference though")."""
    if not text:
        return text
    return _CHAT_RE.sub(lambda m: CHAT_WORDS[m.group(1).lower()], text)


def course_reading(text: str, aliases: tuple[tuple[str, str], ...]) -> str:
    """How the tutor reads a student's words: chat spellings written out, then the course's aliases."""
    return expand_aliases(standard_spelling(text), aliases)
