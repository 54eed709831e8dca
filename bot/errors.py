"""The one place where failures become short replies for students, and log lines for maintainers.

Handling order (``classify`` walks it top to bottom; the first match wins):

1. Unwrap: ``app_commands.CommandInvokeError`` and ``TransformerError`` wrap the real exception.
2. Refusals the student caused: not an admin (``NotAdmin``), command used in DMs, check
   failures, the bot restarting (``ShuttingDown``). Replied to; logged at INFO.
3. Known core failures: the database unreachable (``DatabaseError``), the answer model failing
   (``GenerationError``), the course or its index not loadable (``CourseError``, index errors),
   a vote on an answer that no longer exists (``AnswerNotFound``), a timeout. Replied to with
   what happened and what to do; logged at WARNING with the context, without a traceback.
4. Discord refusing delivery: unknown interaction (10062, the 3 s window or 15 min token
   expired), unknown message or channel, missing permissions or access (403). No reply is
   possible there; logged at WARNING with the context.
5. Other Discord HTTP errors (5xx after discord.py's retries, rate limits too long to wait).
   A reply is attempted; logged at WARNING.
6. Anything else is a bug: a generic reply, and the traceback logged at ERROR with the context
   (command, user, guild, channel) so it can be found.

A reply that itself fails is logged at WARNING and never raised: handlers must not throw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import discord
from discord import app_commands

from bot import render
from bot.answering import ShuttingDown
from knowledge.course import CourseError
from knowledge.generation import GenerationError
from knowledge.store.db import DatabaseError
from knowledge.store.qa_repo import AnswerNotFound

log = logging.getLogger(__name__)

DATABASE_DOWN = (
    "The tutor's database is unavailable right now, so this couldn't be saved. Please try again in a minute."
)
ANSWER_NOT_SAVED = (
    "This answer couldn't be saved (the database is unavailable), so feedback buttons are off for it."
)
GENERIC = "Something went wrong on my side. It has been logged for the maintainers; please try again."


class NotAdmin(app_commands.CheckFailure):
    """The user lacks Manage Server and the configured admin role."""

    def __init__(self, role: str | None) -> None:
        need = "the **Manage Server** permission" + (f" or the **{role}** role" if role else "")
        super().__init__(f"Only members with {need} can use this command.")


def _index_errors() -> tuple[type[BaseException], ...]:
    try:
        from knowledge.index import IndexError_
    except ImportError:  # pragma: no cover - the index module is optional for this module
        return ()
    return (IndexError_,)


@dataclass(frozen=True)
class Outcome:
    reply: str | None  # what the user reads; None when no reply can reach them
    level: int  # logging level
    traceback: bool = False


def unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, (app_commands.CommandInvokeError, app_commands.TransformerError)) and exc.__cause__:
        exc = exc.__cause__
    return exc


def classify(exc: BaseException) -> Outcome:
    """What to reply and how loudly to log, following the order in the module docstring."""
    exc = unwrap(exc)
    # 2. refusals
    if isinstance(exc, NotAdmin):
        return Outcome(str(exc), logging.INFO)
    if isinstance(exc, app_commands.NoPrivateMessage):
        return Outcome("This command only works in a server.", logging.INFO)
    if isinstance(exc, app_commands.CommandOnCooldown):
        return Outcome(f"Slow down a little: try again in {exc.retry_after:.0f} s.", logging.INFO)
    if isinstance(exc, app_commands.CheckFailure):
        return Outcome(str(exc) or "You can't use this command here.", logging.INFO)
    if isinstance(exc, ShuttingDown):
        return Outcome("I'm restarting right now. Please ask again in a minute.", logging.INFO)
    # 3. known core failures
    if isinstance(exc, DatabaseError):
        return Outcome(DATABASE_DOWN, logging.WARNING)
    if isinstance(exc, AnswerNotFound):
        return Outcome(
            "That answer is no longer available, so your feedback can't be recorded.", logging.INFO
        )
    if isinstance(exc, GenerationError):
        return Outcome(
            "The answer model failed on this question. Please try again, or rephrase it.", logging.WARNING
        )
    if isinstance(exc, (CourseError, *_index_errors())):
        return Outcome(
            "The course material isn't loaded properly right now; the maintainers need to "
            "rebuild it (`/tutor reindex`).",
            logging.WARNING,
        )
    if isinstance(exc, TimeoutError):
        return Outcome("That took too long. Please try again in a moment.", logging.WARNING)
    # 4. Discord refusing delivery
    if isinstance(exc, (discord.NotFound, discord.Forbidden)):
        return Outcome(None, logging.WARNING)
    # 5. other Discord HTTP errors
    if isinstance(exc, (discord.HTTPException, discord.RateLimited)):
        return Outcome("Discord is having trouble right now. Please try again shortly.", logging.WARNING)
    # 6. bugs
    return Outcome(GENERIC, logging.ERROR, traceback=True)


def describe_interaction(interaction: discord.Interaction) -> str:
    cmd = interaction.command.qualified_name if interaction.command else None
    data: dict[str, Any] = interaction.data or {}  # type: ignore[assignment]
    what = (
        f"/{cmd}"
        if cmd
        else (f"component {data.get('custom_id')!r}" if data.get("custom_id") else "interaction")
    )
    return (
        f"{what} by user {interaction.user.id if interaction.user else '?'} "
        f"in guild {interaction.guild_id} channel {interaction.channel_id}"
    )


def describe_message(message: discord.Message) -> str:
    return (
        f"message {message.id} by user {message.author.id} "
        f"in guild {message.guild.id if message.guild else None} channel {message.channel.id}"
    )


def _log(outcome: Outcome, exc: BaseException, action: str, context: str) -> None:
    exc = unwrap(exc)
    if outcome.traceback:
        log.log(outcome.level, "%s failed (%s)", action, context, exc_info=exc)
    else:
        detail = getattr(exc, "text", None) or str(exc)
        code = getattr(exc, "code", None)
        log.log(
            outcome.level,
            "%s failed (%s): %s%s: %s",
            action,
            context,
            type(exc).__name__,
            f" {code}" if code else "",
            detail,
        )


async def send_interaction_reply(
    interaction: discord.Interaction, text: str, *, ephemeral: bool = True
) -> bool:
    """Reply (or follow up, if already responded); False if Discord refused it."""
    content = render.notice(text)
    try:
        if interaction.response.is_done():
            await interaction.followup.send(content, ephemeral=ephemeral)
        else:
            await interaction.response.send_message(content, ephemeral=ephemeral)
    except discord.HTTPException as e:
        log.warning(
            "could not deliver an error reply (%s): %s %s",
            describe_interaction(interaction),
            type(e).__name__,
            getattr(e, "text", e),
        )
        return False
    return True


async def handle_interaction_error(
    interaction: discord.Interaction, exc: BaseException, *, action: str | None = None
) -> None:
    """Log ``exc`` with the interaction's context and tell the user what happened. Never raises."""
    outcome = classify(exc)
    _log(outcome, exc, action or "interaction", describe_interaction(interaction))
    if outcome.reply is not None:
        await send_interaction_reply(interaction, outcome.reply)


async def handle_message_error(
    message: discord.Message, exc: BaseException, *, action: str = "message"
) -> None:
    """Log ``exc`` with the message's context and reply in its channel if possible. Never raises."""
    outcome = classify(exc)
    _log(outcome, exc, action, describe_message(message))
    if outcome.reply is None:
        return
    try:
        await message.reply(render.notice(outcome.reply), mention_author=False)
    except discord.HTTPException as e:
        log.warning(
            "could not deliver an error reply (%s): %s %s",
            describe_message(message),
            type(e).__name__,
            getattr(e, "text", e),
        )


def install(bot: discord.Client, tree: app_commands.CommandTree) -> None:
    """Route slash-command errors here (discord.py's default only logs them)."""

    async def on_app_command_error(
        interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        await handle_interaction_error(interaction, error)

    tree.on_error = on_app_command_error  # type: ignore[method-assign]
