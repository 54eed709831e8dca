"""Students ask: ``/ask question [private]``, a mention of the bot, or a direct message.

Each path is the same pipeline: rate limit (before anything slow) -> visible "thinking" (the
interaction is deferred well within Discord's 3 s, or the channel shows typing) -> the student's
recent exchanges in that channel (15 min) as history -> the tutor answers off the event loop
under the concurrency cap -> the Q/A/sources/latency are stored ->
the answer is rendered and sent with 👍/👎 buttons. If storing fails (database down) the student
still gets the answer, with a note that feedback is off for it.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot import errors, render
from bot.answering import TimedAnswer
from bot.ratelimit import SlidingWindow, friendly_message
from bot.views.feedback import feedback_view
from knowledge.store.db import DatabaseError
from knowledge.store.qa_repo import GuildConfig
from knowledge.tutor import Turn

if TYPE_CHECKING:
    from bot.client import TutorBot

log = logging.getLogger(__name__)
MAX_QUESTION = 4000  # Discord allows 6000 in an option; the tutor truncates beyond its own limit
HISTORY_WINDOW = timedelta(minutes=15)  # earlier exchanges than this don't make a conversation
HISTORY_EXCHANGES = 3


def strip_bot_mention(content: str, bot_id: int) -> str:
    """The question in ``<@bot> question`` (the mention may be anywhere, in either form)."""
    return " ".join(re.sub(rf"<@!?{bot_id}>", " ", content).split())


@contextlib.asynccontextmanager
async def typing_in(channel: discord.abc.Messageable) -> AsyncIterator[None]:
    """Show "typing…" while the block runs; a channel that refuses it doesn't stop the answer."""
    cm = channel.typing()
    try:
        await cm.__aenter__()
    except discord.HTTPException as e:
        log.info("cannot show typing in channel: %s", e)
        cm = None
    try:
        yield
    finally:
        if cm is not None:
            await cm.__aexit__(None, None, None)


class AskCog(commands.Cog):
    def __init__(self, bot: TutorBot) -> None:
        self.bot = bot
        self._told_to_wait = SlidingWindow(1, bot.settings.rate_window_s)

    # ------------------------------------------------------------------ shared steps
    async def _store(
        self, timed: TimedAnswer, *, guild_id: int | None, channel_id: int | None, user_id: int
    ) -> tuple[int | None, Sequence[str]]:
        """The stored answer's id, or None and a note for the student if the database is down."""
        try:
            answer_id = await self.bot.qa.log_answer(
                timed.answer,
                course_id=self.bot.course_id,
                guild_id=guild_id,
                channel_id=channel_id,
                user_id=user_id,
                latency_ms=timed.latency_ms,
            )
        except DatabaseError as exc:
            log.warning(
                "answer not stored (user %s, guild %s, channel %s): %s", user_id, guild_id, channel_id, exc
            )
            return None, (errors.ANSWER_NOT_SAVED,)
        return answer_id, ()

    async def _history(self, user_id: int, channel_id: int | None) -> list[Turn]:
        """The student's recent exchanges here, so "and why is that?" follows on (empty if none,
        or if the database is down)."""
        since = datetime.now(UTC) - HISTORY_WINDOW
        try:
            return await self.bot.qa.recent_turns(
                user_id=user_id, channel_id=channel_id, since=since, limit=HISTORY_EXCHANGES
            )
        except DatabaseError as exc:
            log.warning("no conversation history for user %s (database unavailable): %s", user_id, exc)
            return []

    # ------------------------------------------------------------------ /ask
    @app_commands.command(name="ask", description="Ask the course tutor a question")
    @app_commands.describe(
        question="Your question about the course",
        private="Only you see the answer (default: everyone in the channel)",
    )
    async def ask(
        self,
        interaction: discord.Interaction,
        question: app_commands.Range[str, 1, MAX_QUESTION],
        private: bool = False,
    ) -> None:
        bot = self.bot
        question = question.strip()
        if not question:
            await interaction.response.send_message("Please type a question.", ephemeral=True)
            return
        decision = bot.limiter.check(interaction.user.id, interaction.channel_id)
        if not decision.allowed:
            log.info(
                "rate limited /ask by user %s in channel %s (%s)",
                interaction.user.id,
                interaction.channel_id,
                decision.scope,
            )
            await interaction.response.send_message(friendly_message(decision), ephemeral=True)
            return
        async with bot.runner.job():
            await interaction.response.defer(thinking=True, ephemeral=private)
            history = await self._history(interaction.user.id, interaction.channel_id)
            timed = await bot.runner.answer(question, history=history)
            answer_id, notes = await self._store(
                timed,
                guild_id=interaction.guild_id,
                channel_id=interaction.channel_id,
                user_id=interaction.user.id,
            )
            messages = render.answer_messages(timed.answer, notes=notes)
            for i, msg in enumerate(messages):
                kwargs: dict = {"embeds": list(msg.embeds), "ephemeral": private, "wait": True}
                if msg.content:
                    kwargs["content"] = msg.content
                if i == len(messages) - 1 and answer_id is not None and timed.answer.mode != "smalltalk":
                    kwargs["view"] = feedback_view(answer_id)
                await interaction.followup.send(**kwargs)
        log.info(
            "answered /ask %s for user %s in %.0f ms (answered=%s)",
            answer_id,
            interaction.user.id,
            timed.latency_ms,
            timed.answer.answered,
        )

    # ------------------------------------------------------------------ mentions and DMs
    async def _guild_config(self, guild_id: int) -> GuildConfig:
        default = self.bot.settings.answer_on_mention
        try:
            return await self.bot.qa.get_guild_config(guild_id, default_answer_on_mention=default)
        except DatabaseError as exc:
            log.warning("guild %s settings unavailable, using the defaults: %s", guild_id, exc)
            return GuildConfig(guild_id, answer_on_mention=default)

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        bot = self.bot
        if message.author.bot or message.webhook_id is not None or bot.user is None:
            return
        if message.guild is None:
            if not bot.settings.answer_in_dms:
                return
            question = " ".join(message.content.split())
        else:
            if not bot.settings.answer_on_mention or not any(u.id == bot.user.id for u in message.mentions):
                return
            if not self._can_send(message):
                log.info(
                    "mentioned in channel %s of guild %s where I cannot send messages; ignored",
                    message.channel.id,
                    message.guild.id,
                )
                return
            config = await self._guild_config(message.guild.id)
            if not config.answer_on_mention:
                return
            if not config.allows_channel(message.channel.id):
                where = ", ".join(f"<#{c}>" for c in config.answer_channels)
                await self._notice(message, f"I answer mentions in {where} here, or anywhere with `/ask`.")
                return
            question = strip_bot_mention(message.content, bot.user.id)
        if not question:
            hint = (
                "Ask me something after the mention"
                if message.guild
                else "Ask me a question about the course"
            )
            await self._notice(message, f"{hint}, e.g. *what is fine-tuning?*, or use `/ask`.")
            return
        decision = bot.limiter.check(message.author.id, message.channel.id)
        if not decision.allowed:
            log.info(
                "rate limited mention by user %s in channel %s (%s)",
                message.author.id,
                message.channel.id,
                decision.scope,
            )
            # Say it once per window: a student spamming mentions must not make the bot spam the channel.
            if self._told_to_wait.retry_after(message.author.id) == 0:
                self._told_to_wait.record(message.author.id)
                await self._notice(message, friendly_message(decision))
            return
        try:
            async with bot.runner.job():
                async with typing_in(message.channel):
                    history = await self._history(message.author.id, message.channel.id)
                    timed = await bot.runner.answer(question[:MAX_QUESTION], history=history)
                answer_id, notes = await self._store(
                    timed,
                    guild_id=message.guild.id if message.guild else None,
                    channel_id=message.channel.id,
                    user_id=message.author.id,
                )
                await self._reply_with_answer(message, timed, answer_id, notes)
        except Exception as exc:
            await errors.handle_message_error(message, exc, action="answering a message")

    @staticmethod
    def _can_send(message: discord.Message) -> bool:
        if message.guild is None or message.guild.me is None:
            return True
        perms = message.channel.permissions_for(message.guild.me)  # type: ignore[union-attr]
        if isinstance(message.channel, discord.Thread):
            return perms.send_messages_in_threads
        return perms.send_messages

    def _can_embed(self, message: discord.Message) -> bool:
        if message.guild is None or message.guild.me is None:
            return True
        return message.channel.permissions_for(message.guild.me).embed_links  # type: ignore[union-attr]

    async def _reply_with_answer(
        self, message: discord.Message, timed: TimedAnswer, answer_id: int | None, notes: Sequence[str]
    ) -> None:
        if self._can_embed(message):
            messages = render.answer_messages(timed.answer, notes=notes)
        else:
            messages = render.answer_text(timed.answer, notes=notes)
        for i, msg in enumerate(messages):
            kwargs: dict = {}
            if msg.embeds:
                kwargs["embeds"] = list(msg.embeds)
            if msg.content:
                kwargs["content"] = msg.content
            if i == len(messages) - 1 and answer_id is not None and timed.answer.mode != "smalltalk":
                kwargs["view"] = feedback_view(answer_id)  # a "you're welcome" is not rated
            if i == 0:
                await message.reply(mention_author=False, **kwargs)
            else:
                await message.channel.send(**kwargs)
        log.info(
            "answered message %s for user %s in %.0f ms (answered=%s)",
            answer_id,
            message.author.id,
            timed.latency_ms,
            timed.answer.answered,
        )

    async def _notice(self, message: discord.Message, text: str) -> None:
        try:
            await message.reply(render.notice(text), mention_author=False)
        except discord.HTTPException as e:
            log.warning("could not reply to %s: %s", errors.describe_message(message), e)


async def setup(bot: TutorBot) -> None:
    await bot.add_cog(AskCog(bot))
