"""Rendering answers for Discord: limits, clean splits, citations, no mass mentions."""

from __future__ import annotations

import pytest

from bot import render
from bot.render import (
    CONTENT_LIMIT,
    DESCRIPTION_LIMIT,
    EMBED_TOTAL_LIMIT,
    FIELD_VALUE_LIMIT,
    TITLE_LIMIT,
    ZWSP,
    answer_embeds,
    answer_messages,
    answer_text,
    neutralize,
    split_text,
    trim,
)
from knowledge.tutor import Answer, SourceRef


def make_answer(
    text="Fine-tuning adapts a pre-trained model.", question="What is fine-tuning?", **kw
) -> Answer:
    kw.setdefault("sources", (SourceRef("lessons/01.md", "Basics", "Fine-tuning", 0.9, "excerpt"),))
    return Answer(question=question, text=text, answered=kw.pop("answered", True), confidence=0.75, **kw)


def embed_text(e) -> str:
    d = e.to_dict()
    parts = [d.get("title", ""), d.get("description", ""), d.get("footer", {}).get("text", "")]
    parts += [f["name"] + f["value"] for f in d.get("fields", [])]
    return "".join(parts)


# ------------------------------------------------------------------------------ mentions
@pytest.mark.parametrize(
    ("raw", "pinging"),
    [
        ("@everyone look", "@everyone"),
        ("hey @here", "@here"),
        ("@EVERYONE shouting", "@EVERYONE"),
        ("<@123456789012345678> hi", "<@123456789012345678>"),
        ("<@!123456789012345678> hi", "<@!123456789012345678>"),
        ("<@&223456789012345678> role", "<@&223456789012345678>"),
    ],
)
def test_neutralize_breaks_every_mention(raw, pinging):
    out = neutralize(raw)
    assert pinging not in out
    assert ZWSP in out
    assert out.replace(ZWSP, "") == raw  # reads the same


def test_neutralize_leaves_ordinary_text_and_channel_links():
    text = "email me at a@b.c, see <#123> and `code`"
    assert neutralize(text) == text


def test_answer_embeds_neutralize_question_answer_sources_and_notes():
    a = make_answer(
        text="@everyone LoRA is <@1> cheap",
        question="@here what is <@&2>?",
        sources=(SourceRef("x.md", "@everyone lesson", "<@3>", 0.5, ""),),
        notices=("asked by <@4> @here",),
    )
    text = "".join(embed_text(e) for e in answer_embeds(a, notes=["@everyone note"]))
    for bad in ("@everyone", "@here", "<@1>", "<@&2>", "<@3>", "<@4>"):
        assert bad not in text
    plain = "".join(m.content for m in answer_text(a))
    for bad in ("@everyone", "@here", "<@1>", "<@&2>"):
        assert bad not in plain


# ------------------------------------------------------------------------------ splitting
def test_short_text_is_one_piece():
    assert split_text("  hello  ", 10) == ["hello"]
    assert split_text("", 10) == []


def test_split_prefers_paragraphs_then_sentences_then_words():
    paras = ["First paragraph. " * 5, "Second paragraph. " * 5, "Third. " * 5]
    text = "\n\n".join(p.strip() for p in paras)
    pieces = split_text(text, 120)
    assert all(len(p) <= 120 for p in pieces)
    assert pieces[0] == paras[0].strip()  # cut at the paragraph break
    sentences = split_text("One two three. Four five six. Seven eight nine ten eleven.", 32)
    assert sentences[0] == "One two three. Four five six."
    words = split_text("alpha beta gamma delta epsilon zeta eta theta iota kappa", 20)
    assert all(len(p) <= 20 for p in words) and all(not p.startswith(" ") for p in words)
    assert " ".join(words) == "alpha beta gamma delta epsilon zeta eta theta iota kappa"


def test_split_hard_cuts_only_a_giant_word():
    pieces = split_text("x" * 50, 20)
    assert [len(p) for p in pieces] == [20, 20, 10]


def test_split_keeps_code_fences_balanced():
    code = "```python\n" + "\n".join(f"x_{i} = {i}" for i in range(60)) + "\n```\nAfter the code."
    pieces = split_text(code, 200)
    assert len(pieces) > 1
    for p in pieces:
        assert len(p) <= 200
        assert p.count("```") % 2 == 0, p


def test_split_loses_no_words():
    text = " ".join(f"word{i}" for i in range(3000))
    pieces = split_text(text, DESCRIPTION_LIMIT)
    assert " ".join(pieces).split() == text.split()


def test_trim():
    assert trim("short", 10) == "short"
    t = trim("the quick brown fox jumps over the lazy dog", 20)
    assert len(t) <= 20 and t.endswith("…") and t == "the quick brown fox…"
    assert len(trim("x" * 300, 256)) == 256
    assert trim("abc", 0) == ""


# ------------------------------------------------------------------------------ answers
def test_answer_embed_layout():
    (e,) = answer_embeds(make_answer())
    d = e.to_dict()
    assert d["title"] == "❓ What is fine-tuning?"
    assert d["description"] == "Fine-tuning adapts a pre-trained model."
    assert d["fields"] == [{"name": "Sources", "value": "1. Basics > Fine-tuning", "inline": False}]
    assert d["footer"]["text"] == "quoted from the course: the sources are below"  # no confidence figure
    (g,) = answer_embeds(make_answer(mode="generative", model="smollm2-ft-3"))
    assert g.to_dict()["footer"]["text"] == "written by smollm2-ft-3 from the sources below"


def test_sources_deduplicated_numbered_and_capped():
    srcs = tuple(SourceRef(f"l{i}.md", f"Lesson {i}", f"Section {i}", 1 - i / 10, "") for i in range(8))
    srcs = (srcs[0], *srcs)  # a duplicate of the first
    (e,) = answer_embeds(make_answer(sources=srcs))
    value = e.to_dict()["fields"][0]["value"].splitlines()
    assert value == [f"{i + 1}. Lesson {i} > Section {i}" for i in range(render.MAX_SOURCES)]
    assert render.source_lines([SourceRef("faq:7", "FAQ", "", 0.3, "")]) == ["1. FAQ"]


def test_sources_field_stays_under_1024():
    srcs = tuple(SourceRef(f"l{i}.md", "T" * 300, f"S{i} " + "s" * 300, 0.5, "") for i in range(5))
    (e,) = answer_embeds(make_answer(sources=srcs))
    value = e.to_dict()["fields"][0]["value"]
    assert len(value) <= FIELD_VALUE_LIMIT
    assert [line[:3] for line in value.splitlines()] == ["1. ", "2. ", "3. ", "4. ", "5. "]


def test_lines_that_do_not_fit_are_counted():
    lines = [f"{i}. " + "x" * 300 for i in range(1, 6)]
    value = render.join_lines(lines, 1024)
    assert len(value) <= 1024 and value.splitlines()[-1] == "…and 2 more"
    assert render.join_lines(["y" * 2000, "z"], 100).endswith("…\n…and 1 more")


def test_declined_answer_is_marked_as_such():
    a = make_answer(text="The course doesn't cover that.", answered=False, mode="declined")
    (e,) = answer_embeds(a)
    d = e.to_dict()
    assert d["fields"][0]["name"] == "Closest course material"
    assert "doesn't cover" in d["footer"]["text"]
    assert d["color"] != answer_embeds(make_answer())[0].to_dict()["color"]


def test_generative_footer_names_the_model_and_notes_are_shown():
    a = make_answer(mode="generative", model="ft-v3", notices=("Your question was shortened.",))
    (e,) = answer_embeds(a, notes=["Feedback is off for this answer."])
    d = e.to_dict()
    assert "ft-v3" in d["footer"]["text"]
    note = next(f for f in d["fields"] if f["name"] == "Note")["value"]
    assert note.splitlines() == ["Your question was shortened.", "Feedback is off for this answer."]


def test_a_huge_answer_is_split_across_embeds_and_messages_within_every_limit():
    text = "\n\n".join(f"Paragraph {i}. " + "Some explanation of fine-tuning. " * 20 for i in range(40))
    a = make_answer(text=text, question="Q" * 400)
    messages = answer_messages(a)
    assert len(messages) > 1
    embeds = [e for m in messages for e in m.embeds]
    assert embeds[0].title and len(embeds[0].title) <= TITLE_LIMIT
    assert all(e.title is None for e in embeds[1:])  # continuations
    for m in messages:
        assert 1 <= len(m.embeds) <= 10
        assert sum(len(e) for e in m.embeds) <= EMBED_TOTAL_LIMIT
        for e in m.embeds:
            assert len(e.description or "") <= DESCRIPTION_LIMIT
    # the sources and footer are on the very last embed, where the buttons go
    assert embeds[-1].fields[0].name == "Sources" and embeds[-1].footer.text
    assert " ".join(e.description for e in embeds).split() == text.split()


def test_plain_text_fallback_stays_under_2000():
    a = make_answer(text="Long answer sentence. " * 300)
    messages = answer_text(a)
    assert len(messages) > 1
    assert all(len(m.content) <= CONTENT_LIMIT and not m.embeds for m in messages)
    assert "**Sources**" in messages[-1].content and "Basics > Fine-tuning" in messages[-1].content


def test_table_embed_trims_and_caps_fields():
    rows = {f"row {i}": "v" * 2000 for i in range(30)}
    e = render.table_embed("Status @everyone", rows)
    assert "@everyone" not in e.title
    assert len(e.fields) <= 25
    assert all(len(f.value) <= FIELD_VALUE_LIMIT for f in e.fields)
    assert len(e) <= EMBED_TOTAL_LIMIT


def test_notice_is_safe_and_short():
    n = render.notice("@everyone " + "x" * 3000)
    assert len(n) <= CONTENT_LIMIT and "@everyone" not in n


def test_a_small_talk_reply_is_one_plain_line_in_either_rendering():
    a = make_answer("You're welcome! Ask @everyone anything.", question="thanks", answered=False, mode="smalltalk", sources=())
    for rendered in (answer_messages(a), render.answer_text(a)):
        assert len(rendered) == 1 and rendered[0].embeds == ()
        assert rendered[0].content.startswith("You're welcome!")
        assert "@everyone" not in rendered[0].content  # neutralized, never a ping
