"""Quiz answer buttons and the flashcard "Flip" button, working across restarts (``DynamicItem``).

A quiz button's custom_id is the engine's stable click reference
``quiz:<session id>:<question position from 0>:<letter>`` (``knowledge.quiz.format_custom_id``), so
every click reaches ``QuizService.answer`` whether or not this process posted the message: the bot
registers the item class once (``bot.add_dynamic_items``) and no view is kept in memory.

The reply to a click is ephemeral and sent only once the answer is committed (``QuizService.answer``
returns after the database write). If the database is slow, the click is deferred (ephemerally)
before Discord's 3-second window closes and the acknowledgment follows.

A flashcard's Flip button carries the card id (``card:flip:<card id>``, or ``card:flip:#<hash>``
for ids that do not fit a custom_id) and shows the back of the card by updating its message.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import discord

from bot import errors, render_quiz
from knowledge.course import Flashcard
from knowledge.quiz import QuestionView, QuizError, Reveal

log = logging.getLogger(__name__)

# The engine's session ids are [0-9a-z]{1,32} (uuid hex by default); positions 0-24; letters A-F.
QUIZ_TEMPLATE = r"quiz:(?P<sid>[0-9a-z]{1,32}):(?P<pos>\d{1,2}):(?P<letter>[A-F])"
CARD_TEMPLATE = r"card:flip:(?P<ref>#[0-9a-f]{16}|[A-Za-z0-9_.\-]{1,80})"
_PLAIN_CARD_ID = re.compile(r"[A-Za-z0-9_.\-]{1,80}")
REPLY_WITHIN = 2.0  # seconds: past this, defer the interaction (Discord's window is 3 s)

T = TypeVar("T")


async def within_window(
    interaction: discord.Interaction, work: Awaitable[T], *, ephemeral: bool, budget: float = REPLY_WITHIN
) -> T:
    """Await ``work``; if it takes longer than ``budget`` seconds, defer the interaction first, so the
    reply (sent with ``send``) can still arrive after Discord's 3-second window."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=budget)
    if not done and not interaction.response.is_done():
        await interaction.response.defer(thinking=True, ephemeral=ephemeral)
    return await task


async def send(
    interaction: discord.Interaction,
    content: str | None = None,
    *,
    embeds: Sequence[discord.Embed] = (),
    ephemeral: bool = False,
    view: discord.ui.View | None = None,
) -> discord.Message | discord.WebhookMessage | None:
    """Reply to an interaction, or follow up if it was already answered or deferred."""
    kwargs: dict[str, Any] = {"embeds": list(embeds), "ephemeral": ephemeral}
    if content:
        kwargs["content"] = content
    if view is not None:
        kwargs["view"] = view
    if interaction.response.is_done():
        return await interaction.followup.send(wait=True, **kwargs)
    await interaction.response.send_message(**kwargs)
    return None


# ------------------------------------------------------------------------------------------ quiz buttons
class QuizAnswerButton(discord.ui.DynamicItem[discord.ui.Button], template=QUIZ_TEMPLATE):
    """One lettered choice of one question of one quiz session."""

    def __init__(
        self,
        session_id: str,
        position: int,
        letter: str,
        *,
        label: str | None = None,
        style: discord.ButtonStyle = discord.ButtonStyle.primary,
        disabled: bool = False,
    ) -> None:
        super().__init__(
            discord.ui.Button(
                style=style,
                label=label or letter,
                custom_id=f"quiz:{session_id}:{position}:{letter}",
                disabled=disabled,
            )
        )
        self.session_id = session_id
        self.position = position
        self.letter = letter

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> QuizAnswerButton:
        return cls(match["sid"], int(match["pos"]), match["letter"], label=item.label, style=item.style)

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        service = getattr(interaction.client, "quiz_service", None)
        user = interaction.user
        try:
            if service is None:
                await send(interaction, "Quizzes are not available right now.", ephemeral=True)
                return
            ack = await within_window(
                interaction,
                service.answer(self.custom_id, user.id, user.display_name),
                ephemeral=True,
            )
            log.debug("quiz click %s by user %s: %s", self.custom_id, user.id, ack.kind)
            await send(interaction, render_quiz.ack_text(ack.ok, ack.message), ephemeral=True)
            if ack.kind in ("closed", "ended", "missing"):
                await disable_stale_buttons(interaction)
        except Exception as exc:
            await errors.handle_interaction_error(interaction, exc, action="quiz answer")


async def disable_stale_buttons(interaction: discord.Interaction) -> None:
    """A click on a question that is over (e.g. a message posted before a restart, which the bot could
    not edit at the reveal): grey out that message's buttons so nobody else tries. Best effort."""
    message = interaction.message
    if message is None or message.flags.ephemeral:
        return
    old = discord.ui.View.from_message(message, timeout=None)
    if all(getattr(item, "disabled", True) for item in old.children):
        return
    view = discord.ui.View(timeout=None)
    for item in old.children:
        if isinstance(item, discord.ui.Button) and item.custom_id:
            view.add_item(
                discord.ui.Button(
                    style=discord.ButtonStyle.secondary,
                    label=item.label,
                    custom_id=item.custom_id,
                    disabled=True,
                )
            )
    try:
        await message.edit(view=view, allowed_mentions=discord.AllowedMentions.none())
    except discord.HTTPException as e:
        log.info("could not grey out the buttons of stale quiz message %s: %s", message.id, e)


def question_view(
    question: QuestionView, *, reveal: Reveal | None = None, closed: bool = False
) -> discord.ui.View:
    """The lettered buttons of a question (two rows at most). After the reveal (``reveal`` given) the
    buttons are disabled and the right one is green; ``closed`` (stopped before the reveal): all
    disabled and grey."""
    view = discord.ui.View(timeout=None)
    for letter, text in question.choices:
        if reveal is not None:
            right = letter == reveal.correct_letter
            style = discord.ButtonStyle.success if right else discord.ButtonStyle.secondary
            disabled = True
        elif closed:
            style, disabled = discord.ButtonStyle.secondary, True
        else:
            style, disabled = discord.ButtonStyle.primary, False
        view.add_item(
            QuizAnswerButton(
                question.session_id,
                question.position,
                letter,
                label=render_quiz.button_label(letter, text),
                style=style,
                disabled=disabled,
            )
        )
    return view


def closed_view(question: QuestionView) -> discord.ui.View:
    """The question's buttons, all disabled (the quiz was stopped before the reveal)."""
    return question_view(question, closed=True)


# ------------------------------------------------------------------------------------------ flashcards
def card_ref(card: Flashcard) -> str:
    """What the Flip button carries: the card id, or a short hash of it if it does not fit."""
    if _PLAIN_CARD_ID.fullmatch(card.id):
        return card.id
    return "#" + hashlib.sha1(card.id.encode()).hexdigest()[:16]


def find_card(cards: Sequence[Flashcard], ref: str) -> Flashcard | None:
    for c in cards:
        if card_ref(c) == ref:
            return c
    return None


class FlipButton(discord.ui.DynamicItem[discord.ui.Button], template=CARD_TEMPLATE):
    def __init__(self, ref: str) -> None:
        super().__init__(
            discord.ui.Button(
                style=discord.ButtonStyle.primary, label="Flip", emoji="🔄", custom_id=f"card:flip:{ref}"
            )
        )
        self.ref = ref

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> FlipButton:
        return cls(match["ref"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        service = getattr(interaction.client, "quiz_service", None)
        try:
            if service is None:
                await send(interaction, "Flashcards are not available right now.", ephemeral=True)
                return
            course = service.engine.course
            card = find_card(course.flashcards, self.ref) if course is not None else None
            if card is None:
                await send(interaction, "That flashcard is no longer in the course.", ephemeral=True)
                return
            await interaction.response.edit_message(
                embed=render_quiz.card_embed(card, flipped=True),
                view=None,
                allowed_mentions=discord.AllowedMentions.none(),
            )
        except QuizError as exc:
            await send(interaction, str(exc), ephemeral=True)
        except Exception as exc:
            await errors.handle_interaction_error(interaction, exc, action="flashcard flip")


def card_view(card: Flashcard) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(FlipButton(card_ref(card)))
    return view


DYNAMIC_ITEMS: tuple[type[discord.ui.DynamicItem[Any]], ...] = (QuizAnswerButton, FlipButton)
