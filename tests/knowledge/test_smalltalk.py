"""Small talk found by its chat words (the embedding half is exercised through the tutor, test_tutor)."""

from __future__ import annotations

import pytest

from knowledge.smalltalk import MAX_WORDS, SmallTalkDetector, lexical_intent, reply


@pytest.mark.parametrize(
    ("message", "intent"),
    [
        ("tysm", "thanks"),
        ("thanks for the help!!", "thanks"),
        ("ok thx", "thanks"),  # thanks outranks the acknowledgement
        ("thank youuu", "thanks"),  # stretched letters
        ("heyyy", "greeting"),
        ("good morning everyone", "greeting"),
        ("brb", "goodbye"),
        ("gotcha", "acknowledgement"),
        ("lol ok", "acknowledgement"),
        ("ok makes sense", "acknowledgement"),
    ],
)
def test_chat_words_give_the_kind_of_small_talk(message, intent):
    assert lexical_intent(message) == intent


@pytest.mark.parametrize(
    "message",
    ["ok so what is dropout", "thanks, but why a low learning rate?", "is that right?", "why", "", "help"],
)
def test_a_message_with_a_word_of_its_own_is_not_chat_words_only(message):
    assert lexical_intent(message) is None  # ("help" alone is a filler word, not a marker of any kind)


def test_long_messages_are_never_small_talk():
    long = " ".join(["thanks"] * (MAX_WORDS + 1))
    assert SmallTalkDetector().detect(long, embedder=None, cache=None) is None  # no embedding needed


def test_replies_end_with_what_the_tutor_can_do():
    assert reply("greeting", "I'm the tutor for X.") == "Hi! I'm the tutor for X."
    assert reply("about", "I'm the tutor for X.") == "I'm the tutor for X."
    assert "course" in reply("thanks", "") and "course" in reply("goodbye", "")
