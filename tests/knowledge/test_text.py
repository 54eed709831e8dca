"""Keyword tokens: what BM25 and the tutor's grounding checks count as the same word."""

import pytest

from knowledge.text import course_reading, expand_aliases, keyword_tokens, phrase_terms, standard_spelling


@pytest.mark.parametrize(
    ("british", "american"),
    [
        ("memorising", "memorizing"),
        ("generalisation", "generalization"),
        ("specialised", "specialized"),
        ("regularisation", "regularization"),
        ("optimiser", "optimizer"),
        ("analyse", "analyze"),
        ("colour", "color"),
        ("behaviours", "behaviors"),
    ],
)
def test_british_and_american_spellings_give_the_same_token(british, american):
    assert keyword_tokens(british) == keyword_tokens(american)


def test_words_that_only_look_british_keep_their_meaning():
    # "four" must not become "for" (a stop word), and short words are left alone.
    assert keyword_tokens("four hours of noise") == ["four", "hour", "nois"]
    assert keyword_tokens("wise rise raise") == ["wise", "rise", "rais"]


def test_hyphenated_words_match_their_joined_form():
    assert "pretrain" in keyword_tokens("pre-training") and keyword_tokens("pretraining") == ["pretrain"]


def test_stop_words_and_case_are_dropped():
    assert keyword_tokens("What IS the Learning Rate?") == ["learn", "rate"]


def test_phrase_terms_are_adjacent_token_pairs():
    assert phrase_terms(keyword_tokens("What is the learning rate schedule?")) == ["learn_rate", "rate_schedul"]
    assert phrase_terms(keyword_tokens("LoRA")) == [] and phrase_terms([]) == []
    # stop words are gone before pairing: "rate of learning" pairs the content words
    assert phrase_terms(keyword_tokens("rate of learning")) == ["rate_learn"]


ALIASES = (("acc", "accuracy"), ("lr", "learning rate"), ("val", "validation"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("typical lr values?", "typical learning rate values?"),
        ("LR and Val Acc", "learning rate and validation accuracy"),
        ("(lr)", "(learning rate)"),
        ("lr-schedule and lrs", "lr-schedule and lrs"),  # whole words only
        ("valid accuracy", "valid accuracy"),
        ("", ""),
    ],
)
def test_expand_aliases(text, expected):
    assert expand_aliases(text, ALIASES) == expected


def test_no_aliases_leaves_the_text_alone():
    assert expand_aliases("typical lr?", ()) == "typical lr?"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("how do i tell if thats happening", "how do i tell if that's happening"),
        ("whats the diff tho", "what's the difference though"),
        ("Dont u need a GPU?", "don't you need a GPU?"),
        ("bc ur lr is too high", "because your lr is too high"),
        ("train w/ dropout and w/o it", "train with dropout and without it"),
        # ordinary words and other spellings are left alone
        ("its weights were frozen, lets see", "its weights were frozen, lets see"),
        ("cosine of u-net, thatsit, that's", "cosine of u-net, thatsit, that's"),
        ("", ""),
    ],
)
def test_standard_spelling_writes_chat_spellings_out(text, expected):
    assert standard_spelling(text) == expected


def test_course_reading_writes_chat_spellings_out_then_the_aliases():
    assert course_reading("whats a good lr tho", ALIASES) == "what's a good learning rate though"
    assert keyword_tokens(course_reading("why tho", ALIASES)) == []  # "though" is a stop word like "tho" was not
