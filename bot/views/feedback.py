"""👍/👎 buttons under every answer, working across restarts (``DynamicItem``, no stored view).

The custom_id carries everything needed: ``fb:<answer_id>:up`` or ``fb:<answer_id>:down``. A click
records the vote at once (one per student and answer; a second click changes it). 👎 then opens
an optional "what was wrong?" form whose text is attached to the vote.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

import discord

from bot import errors, render

log = logging.getLogger(__name__)

TEMPLATE = r"fb:(?P<answer_id>[0-9]{1,20}):(?P<vote>up|down)"
Vote = Literal["up", "down"]


def feedback_custom_id(answer_id: int, vote: Vote) -> str:
    return f"fb:{answer_id}:{vote}"


def parse_custom_id(custom_id: str) -> tuple[int, Vote] | None:
    m = re.fullmatch(TEMPLATE, custom_id)
    return (int(m["answer_id"]), m["vote"]) if m else None  # type: ignore[return-value]


class FeedbackButton(discord.ui.DynamicItem[discord.ui.Button], template=TEMPLATE):
    def __init__(self, answer_id: int, vote: Vote) -> None:
        up = vote == "up"
        super().__init__(
            discord.ui.Button(
                style=discord.ButtonStyle.secondary,
                emoji="👍" if up else "👎",
                label="Helpful" if up else "Not helpful",
                custom_id=feedback_custom_id(answer_id, vote),
            )
        )
        self.answer_id = answer_id
        self.vote: Vote = vote

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> FeedbackButton:
        return cls(int(match["answer_id"]), match["vote"])  # type: ignore[arg-type]

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        repo = interaction.client.qa
        try:
            await repo.record_vote(self.answer_id, interaction.user.id, 1 if self.vote == "up" else -1)
            log.info("vote %s on answer %s by user %s", self.vote, self.answer_id, interaction.user.id)
            if self.vote == "up":
                await interaction.response.send_message(
                    render.notice("Thanks! Glad it helped. 👍"), ephemeral=True
                )
            else:
                await interaction.response.send_modal(WhatWasWrong(self.answer_id))
        except Exception as exc:
            await errors.handle_interaction_error(interaction, exc, action="feedback vote")


class WhatWasWrong(discord.ui.Modal, title="What was wrong?"):
    details: discord.ui.TextInput = discord.ui.TextInput(
        label="What was wrong? (optional)",
        style=discord.TextStyle.paragraph,
        required=False,
        max_length=1000,
        placeholder="e.g. it cited the wrong lesson, or missed part of the question",
    )

    def __init__(self, answer_id: int) -> None:
        super().__init__(timeout=15 * 60)
        self.answer_id = answer_id

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        text = self.details.value.strip()
        if text:
            await interaction.client.qa.add_comment(self.answer_id, interaction.user.id, text)
            log.info("feedback comment on answer %s by user %s", self.answer_id, interaction.user.id)
        await interaction.response.send_message(
            render.notice("Thanks for telling us. A maintainer will review it."), ephemeral=True
        )

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:  # type: ignore[override]
        await errors.handle_interaction_error(interaction, error, action="feedback comment")


def feedback_view(answer_id: int) -> discord.ui.View:
    """The 👍/👎 row for an answer; persistent without registration (the bot registers the item)."""
    view = discord.ui.View(timeout=None)
    view.add_item(FeedbackButton(answer_id, "up"))
    view.add_item(FeedbackButton(answer_id, "down"))
    return view
