"""Small talk: "thanks", "hi", "ok got it", "are you a bot?", "what time is it?".

Students chat. In a conversation, a tutor that reads "thanks" as a follow-up to the last question
answers it with that question's lesson again (it did: with the last question added, "thanks" finds
the same passages). A short message close in meaning to one of the examples below gets a short
reply of its own kind instead, and is never read as a follow-up.

Measured with the packaged MiniLM (the examples below, scratch sets written for the purpose;
benchmarks/bench_tutor.py reports a blind set, benchmarks/data/tutor_smalltalk.yaml): the closest
example to a course question is at most 0.44 for the sample course's 100 questions ("why does that
help tho") and 0.52 for the 4,627 student questions of ../shared/eval/faq ("questions"); a follow-up
like "tell me more" or "what do you mean" reaches 0.45-0.55; small talk written apart from the
examples reaches 0.36-0.89, 31 of 45 of it from 0.6. Hence MIN_COSINE below: what it misses goes
the usual way (the course does not cover it; as a follow-up it must still pass the follow-up rules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from knowledge.embedder import Embedder, VectorCache

Intent = Literal["thanks", "greeting", "goodbye", "acknowledgement", "about", "offtopic"]

MIN_COSINE = 0.6
MAX_WORDS = 8  # longer messages carry a question of their own ("hi, what is LoRA and why is it cheap?")

EXAMPLES: dict[Intent, tuple[str, ...]] = {
    "thanks": ("thanks", "thank you", "thanks a lot", "thank you so much", "ty", "thx", "cheers",
               "much appreciated", "thanks, that helped", "thanks, that was helpful"),
    "greeting": ("hi", "hello", "hey", "hey there", "good morning", "good evening", "hiya", "what's up", "sup",
                 "how are you", "how's it going"),
    "goodbye": ("bye", "goodbye", "see you later", "good night", "gotta go", "talk to you later"),
    "acknowledgement": ("ok", "okay", "cool", "nice", "great", "got it", "that makes sense", "i see", "lol",
                        "haha", "awesome", "perfect", "understood", "alright", "sounds good", "yes", "no"),
    "about": ("who are you", "who made you", "are you a bot", "are you human", "are you an AI",
              "what can you do", "what can i ask you", "how can you help me"),
    # Everyday questions no course answers; declined like any other off-topic message.
    "offtopic": ("what time is it", "what day is it", "what's the weather like", "tell me a joke",
                 "is it going to rain"),
}


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# A message made only of chat words, with at least one that marks its kind, is small talk whatever
# its cosine ("tysm", "thanks for the help", "ok thx", "no thanks"). The first kind found wins.
MARKERS: dict[Intent, frozenset[str]] = {
    "thanks": _words("thanks thank thx thnx thanx ty tysm tyvm cheers appreciate appreciated"),
    "goodbye": _words("bye goodbye cya ttyl later goodnight night brb gtg g2g farewell"),
    "greeting": _words("hi hello hey heya hiya howdy yo sup greetings morning afternoon evening"),
    "acknowledgement": _words(
        "ok okay okie k kk cool nice great awesome perfect gotcha understood understand alright sure yes yeah yep "
        "yup no nope nah lol lmao haha hah omg wow hmm hm ah ahh oh interesting fair clear"
    ),
}
FILLER = _words(
    "a lot so much very you u ur bot tutor for the help it that this now i again everyone all guys there thing "
    "please pls plz mate man one really too and get got makes sense see good job just me okay thats that's "
    "was is many"
)
_WORD = re.compile(r"[a-z0-9']+")


def _chat_words(text: str) -> list[str]:
    """Lower-case words with stretched letters shortened ("youuu" -> "you", "heyyy" -> "hey")."""
    return [re.sub(r"(.)\1{2,}", r"\1", w) for w in _WORD.findall(text.lower())]


def lexical_intent(text: str) -> Intent | None:
    words = _chat_words(text)
    if not words or not all(w in FILLER or any(w in m for m in MARKERS.values()) for w in words):
        return None
    return next((intent for intent, m in MARKERS.items() if any(w in m for w in words)), None)


@dataclass(frozen=True)
class SmallTalk:
    intent: Intent
    cosine: float
    example: str


class SmallTalkDetector:
    """Finds small talk by the cosine of a message to the nearest example (vectors from ``cache``)."""

    def __init__(self, min_cosine: float = MIN_COSINE, max_words: int = MAX_WORDS):
        self.min_cosine = min_cosine
        self.max_words = max_words
        self._labels = [intent for intent, texts in EXAMPLES.items() for _ in texts]
        self._texts = [t for texts in EXAMPLES.values() for t in texts]

    def detect(self, text: str, embedder: Embedder, cache: VectorCache) -> SmallTalk | None:
        words = text.split()
        if not words or len(words) > self.max_words:
            return None
        intent = lexical_intent(text)
        if intent is not None:
            return SmallTalk(intent, 1.0, "")
        vecs = cache.encode(embedder, [text, *self._texts])
        cos = vecs[1:] @ vecs[0]
        best = int(np.argmax(cos))
        if float(cos[best]) < self.min_cosine:
            return None
        return SmallTalk(self._labels[best], round(float(cos[best]), 3), self._texts[best])


def reply(intent: Intent, help_text: str) -> str:
    """A short reply in kind, ending with what the tutor can do (the off-topic one is the caller's)."""
    if intent == "thanks":
        return "You're welcome! Ask me anything else about the course, or try /quiz."
    if intent == "goodbye":
        return "Bye, and good luck with the course! I'm here whenever you have a question."
    if intent == "acknowledgement":
        return "👍 Ask me a follow-up or another question about the course whenever you like."
    if intent == "greeting":
        return "Hi! " + help_text
    return help_text  # "about": who the tutor is and what it does
