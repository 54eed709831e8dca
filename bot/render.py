"""Pure functions from domain objects to what Discord shows: embeds and text within Discord's limits.

Nothing here talks to Discord; everything is deterministic and tested on its own.

- Limits (Discord's): 2000 characters of content, 4096 of embed description, 256 of title,
  1024 of field value, 256 of field name, 2048 of footer, 6000 in all the embeds of a message,
  10 embeds and 25 fields. Long text is split at paragraph, line, sentence, then word
  boundaries (code fences are closed and reopened), or trimmed with an ellipsis.
- No mass mentions, twice over: every echoed text (questions, answers, course excerpts) goes
  through ``neutralize`` (``@everyone``, ``@here``, user and role mentions get a zero-width
  space), and the bot sends ``allowed_mentions=AllowedMentions.none()`` on every message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import discord

from knowledge.tutor import Answer, SourceRef

CONTENT_LIMIT = 2000
TITLE_LIMIT = 256
DESCRIPTION_LIMIT = 4096
FIELD_NAME_LIMIT = 256
FIELD_VALUE_LIMIT = 1024
FOOTER_LIMIT = 2048
EMBED_TOTAL_LIMIT = 6000
EMBEDS_PER_MESSAGE = 10
FIELDS_PER_EMBED = 25
MAX_SOURCES = 5

ZWSP = "\u200b"
ELLIPSIS = "…"
ANSWERED_COLOR = discord.Color.blurple()
DECLINED_COLOR = discord.Color.light_grey()
ERROR_COLOR = discord.Color.orange()

_MASS = re.compile(r"@(everyone|here)", re.IGNORECASE)  # no \b: "@here_" (italics) pings too
_USER_OR_ROLE = re.compile(r"<@([!&]?)(\d+)>")
_FENCE = "```"


def neutralize(text: str) -> str:
    """Text that cannot ping anyone even if shown without ``allowed_mentions``."""
    text = _MASS.sub(lambda m: f"@{ZWSP}{m[1]}", text)
    return _USER_OR_ROLE.sub(lambda m: f"<@{ZWSP}{m[1]}{m[2]}>", text)


def one_line(text: str) -> str:
    return " ".join(text.split())


def trim(text: str, limit: int, *, marker: str = ELLIPSIS) -> str:
    """``text`` cut to ``limit`` characters at a word boundary, ending in ``marker`` if cut."""
    if limit <= 0:
        return ""
    if len(text) <= limit:
        return text
    room = limit - len(marker)
    if room <= 0:
        return marker[:limit]
    cut = text[:room]
    if not text[room].isspace():  # mid-word: back up to the last space if that keeps most of it
        space = cut.rfind(" ")
        if space >= room * 2 // 3:
            cut = cut[:space]
    return cut.rstrip() + marker


_SEPARATORS = ("\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " ")


def _cut_point(text: str, limit: int) -> int:
    window = text[: limit + 1]
    for sep in _SEPARATORS:
        i = window.rfind(sep, 0, limit)
        if i >= limit // 2:
            keep = 1 if sep[0] in ".?!;," else 0
            return i + keep
    return limit


def split_text(text: str, limit: int) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, cut at the most natural boundary.

    Prefers paragraph breaks, then lines, sentences, clauses and words; only a single word longer
    than the limit is cut mid-word. A code fence left open at a cut is closed in that piece and
    reopened in the next, so each piece renders on its own.
    """
    text = text.strip()
    if not text:
        return []
    if len(text) <= limit:
        return [text]
    has_fences = _FENCE in text
    budget = limit - (8 if has_fences else 0)  # room to close and reopen a fence
    if budget < 16:
        raise ValueError("limit too small to split into")
    pieces: list[str] = []
    carry = ""  # fence reopened at the start of the next piece
    rest = text
    while rest:
        room = budget - len(carry)
        if len(rest) <= room:
            pieces.append(carry + rest)
            break
        cut = _cut_point(rest, room)
        piece, rest = carry + rest[:cut].rstrip(), rest[cut:].lstrip()
        carry = ""
        if has_fences and piece.count(_FENCE) % 2 == 1:
            piece += "\n" + _FENCE
            carry = _FENCE + "\n"
        pieces.append(piece)
    return [p for p in pieces if p.strip()]


# --------------------------------------------------------------------------------------- answers
@dataclass(frozen=True)
class OutgoingMessage:
    """One Discord message: text and/or embeds, already within every limit."""

    content: str | None = None
    embeds: tuple[discord.Embed, ...] = ()


def source_lines(sources: Sequence[SourceRef], *, limit: int = MAX_SOURCES) -> list[str]:
    """'1. Lesson > Section' per distinct cited place, best first."""
    seen: set[str] = set()
    lines = []
    for s in sources:
        label = one_line(s.label) or s.source
        if label in seen:
            continue
        seen.add(label)
        lines.append(f"{len(lines) + 1}. {neutralize(trim(label, 200))}")
        if len(lines) >= limit:
            break
    return lines


def join_lines(lines: Sequence[str], limit: int) -> str:
    """As many whole lines as fit in ``limit``, then '…and N more' for those left out."""
    out: list[str] = []
    for i, line in enumerate(lines):
        after = len(lines) - i - 1
        reserve = len(f"\n…and {after} more") if after else 0
        if len("\n".join([*out, line])) + reserve > limit:
            left = len(lines) - i
            if out:
                return "\n".join([*out, f"…and {left} more"])
            tail = f"\n…and {left - 1} more" if left > 1 else ""
            return trim(line, limit - len(tail)) + tail
        out.append(line)
    return "\n".join(out)


def _footer(answer: Answer) -> str:
    if not answer.answered:
        return "The course material doesn't cover this question."
    # No "confidence N%": Answer.confidence measures how closely the best passage matches the
    # question, and on the sample course's question sets it hardly tells complete answers from
    # incomplete ones (AUC 0.52 and 0.66, benchmarks/bench_tutor.py): a student would read it as
    # something it is not.
    if answer.mode == "generative" and answer.model:
        return trim(f"written by {answer.model} from the sources below", FOOTER_LIMIT)
    return "quoted from the course: the sources are below"


def answer_embeds(answer: Answer, *, notes: Iterable[str] = ()) -> list[discord.Embed]:
    """The answer as embeds: question as title, answer as description (continued over several
    embeds if longer than 4096), then the sources and any notes as fields on the last one."""
    color = ANSWERED_COLOR if answer.answered else DECLINED_COLOR
    title = trim(neutralize("❓ " + one_line(answer.question)), TITLE_LIMIT)
    body = neutralize(answer.text.strip()) or "(no answer)"
    chunks = split_text(body, DESCRIPTION_LIMIT)
    embeds = [
        discord.Embed(title=title if i == 0 else None, description=c, color=color)
        for i, c in enumerate(chunks)
    ]
    last = embeds[-1]
    lines = source_lines(answer.sources)
    if lines:
        name = "Sources" if answer.answered else "Closest course material"
        last.add_field(name=name, value=join_lines(lines, FIELD_VALUE_LIMIT), inline=False)
    all_notes = [n for n in (*answer.notices, *notes) if n and n.strip()]
    if all_notes:
        value = join_lines([neutralize(one_line(n)) for n in all_notes], FIELD_VALUE_LIMIT)
        last.add_field(name="Note", value=value, inline=False)
    last.set_footer(text=_footer(answer))
    return embeds


def pack_embeds(embeds: Sequence[discord.Embed]) -> list[OutgoingMessage]:
    """Embeds grouped into messages of at most 10 embeds and 6000 characters each."""
    messages: list[OutgoingMessage] = []
    group: list[discord.Embed] = []
    size = 0
    for e in embeds:
        n = len(e)
        if n > EMBED_TOTAL_LIMIT:
            raise ValueError(f"an embed of {n} characters exceeds Discord's 6000 per message")
        if group and (len(group) >= EMBEDS_PER_MESSAGE or size + n > EMBED_TOTAL_LIMIT):
            messages.append(OutgoingMessage(embeds=tuple(group)))
            group, size = [], 0
        group.append(e)
        size += n
    if group:
        messages.append(OutgoingMessage(embeds=tuple(group)))
    return messages


def small_talk_reply(answer: Answer) -> list[OutgoingMessage]:
    """A reply to "thanks" or "hi" is a plain line of text: no question title, sources or footer."""
    return [OutgoingMessage(content=c) for c in split_text(neutralize(answer.text.strip()), CONTENT_LIMIT)]


def answer_messages(answer: Answer, *, notes: Iterable[str] = ()) -> list[OutgoingMessage]:
    """The messages that carry an answer (usually one); feedback buttons go on the last."""
    if answer.mode == "smalltalk":
        return small_talk_reply(answer)
    return pack_embeds(answer_embeds(answer, notes=notes))


def answer_text(answer: Answer, *, notes: Iterable[str] = ()) -> list[OutgoingMessage]:
    """The answer as plain text, for channels where the bot may not embed: pieces of <= 2000."""
    if answer.mode == "smalltalk":
        return small_talk_reply(answer)
    parts = [f"**{trim(one_line(answer.question), 300)}**", answer.text.strip() or "(no answer)"]
    lines = source_lines(answer.sources)
    if lines:
        parts.append(
            ("**Sources**\n" if answer.answered else "**Closest course material**\n") + "\n".join(lines)
        )
    for n in (*answer.notices, *notes):
        if n and n.strip():
            parts.append(f"_{one_line(n)}_")
    parts.append(f"-# {_footer(answer)}")
    text = neutralize("\n\n".join(parts))
    return [OutgoingMessage(content=c) for c in split_text(text, CONTENT_LIMIT)]


# --------------------------------------------------------------------------------------- other replies
def notice(text: str) -> str:
    """A short reply (errors, refusals, confirmations): neutralized and within the content limit."""
    return trim(neutralize(text.strip()), CONTENT_LIMIT)


def table_embed(
    title: str, rows: Mapping[str, object], *, color: discord.Color | None = None
) -> discord.Embed:
    """Label/value rows as inline fields (at most 25; values trimmed), e.g. for /tutor status."""
    embed = discord.Embed(title=trim(neutralize(title), TITLE_LIMIT), color=color or ANSWERED_COLOR)
    total = len(embed.title or "")
    for label, value in list(rows.items())[:FIELDS_PER_EMBED]:
        name = trim(neutralize(str(label)), FIELD_NAME_LIMIT) or "-"
        text = trim(neutralize(str(value)), FIELD_VALUE_LIMIT) or "-"
        if total + len(name) + len(text) > EMBED_TOTAL_LIMIT:
            break
        total += len(name) + len(text)
        embed.add_field(name=name, value=text, inline=len(text) <= 40)
    return embed
