"""The Discord client: ``TutorBot`` gets every dependency in ``__init__``; ``run_bot`` runs it.

The composition root (``bot.__main__`` / ``bot.cli``) builds Settings, the database, the Tutor and
(optionally) the quiz service and a ``TutorRuntime``, then calls::

    await run_bot(settings, tutor, quiz_service, session_factory, runtime)

which fails fast with ``TokenError`` (a readable message, never the token) when DISCORD_TOKEN is
missing or rejected, and on SIGTERM/SIGINT stops taking questions, lets answers in flight finish
(and shutdown hooks such as saving quiz state run), then disconnects.

Intents are the minimum the configuration needs: ``guilds`` always (channels, roles and
permissions of the servers the bot is in); ``guild_messages`` only if mention answering is on;
``dm_messages`` only if DM answering is on. No privileged intent is requested: Discord delivers
the content of messages that mention the bot and of DMs without ``message_content``, and the
bot never needs the member list (no ``members`` intent, no chunking).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import discord
from discord.ext import commands
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import errors
from bot.answering import AnswerRunner
from bot.cogs.admin import TutorRuntime
from bot.ratelimit import AnswerRateLimiter
from bot.views.feedback import FeedbackButton
from knowledge.store.qa_repo import QARepository
from knowledge.tutor import Answer, Turn

log = logging.getLogger(__name__)

CORE_EXTENSIONS: tuple[str, ...] = ("bot.cogs.ask", "bot.cogs.admin")
# Cogs that need the quiz service; loaded only when one is given. bot/cogs/quiz.py defines
# ``async def setup(bot)`` and reaches the service as ``bot.quiz_service``.
QUIZ_EXTENSIONS: tuple[str, ...] = ("bot.cogs.quiz",)

__all__ = [
    "CORE_EXTENSIONS",
    "QUIZ_EXTENSIONS",
    "TokenError",
    "TutorBot",
    "TutorRuntime",
    "intents_for",
    "run_bot",
]


class TokenError(RuntimeError):
    """DISCORD_TOKEN is missing or Discord rejected it. The message says what to do."""


def intents_for(settings: Any) -> discord.Intents:
    """The minimum gateway intents for this configuration (see the module docstring)."""
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = bool(settings.answer_on_mention)
    intents.dm_messages = bool(settings.answer_in_dms)
    return intents


def default_extensions(quiz_service: object | None) -> list[str]:
    exts = list(CORE_EXTENSIONS)
    if quiz_service is not None:
        for ext in QUIZ_EXTENSIONS:
            if importlib.util.find_spec(ext) is None:
                log.warning("a quiz service was given but %s does not exist yet; /quiz is unavailable", ext)
            else:
                exts.append(ext)
    return exts


class TutorBot(commands.AutoShardedBot):
    """The tutor on Discord. Cogs reach the dependencies as attributes:

    ``settings``, ``tutor`` (``answer(question, *, history)``, ``course``), ``quiz_service`` (or
    None), ``runtime`` (a ``TutorRuntime`` or None), ``session_factory``, ``qa`` (QARepository),
    ``runner`` (AnswerRunner: concurrency cap and in-flight tracking), ``limiter`` (answer rate
    limits). ``options`` go to discord.py (tests pass ``guild_ready_timeout``).
    """

    def __init__(
        self,
        *,
        settings: Any,
        tutor: Any,
        session_factory: async_sessionmaker[AsyncSession],
        quiz_service: object | None = None,
        runtime: TutorRuntime | None = None,
        runner: AnswerRunner | None = None,
        limiter: AnswerRateLimiter | None = None,
        extensions: Sequence[str] | None = None,
        **options: Any,
    ) -> None:
        if settings.shard_ids is not None and settings.shard_count is None:
            raise ValueError("SHARD_IDS needs SHARD_COUNT (the total number of shards across all processes)")
        intents = intents_for(settings)
        options.setdefault("shard_count", settings.shard_count)
        options.setdefault("shard_ids", settings.shard_ids)
        super().__init__(
            command_prefix=commands.when_mentioned,  # no prefix commands; this keeps discord.py quiet
            help_command=None,
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            chunk_guilds_at_startup=False,
            member_cache_flags=discord.MemberCacheFlags.from_intents(intents),
            max_messages=None,
            **options,
        )
        self.settings = settings
        self.tutor = tutor
        self.quiz_service = quiz_service
        self.runtime = runtime
        self.session_factory = session_factory
        self.qa = QARepository(session_factory)
        self.runner = runner or AnswerRunner(self._answer, max_concurrent=settings.max_concurrent_generations)
        self.limiter = limiter or AnswerRateLimiter.from_settings(settings)
        self.started_monotonic = time.monotonic()
        self._extensions = list(extensions) if extensions is not None else default_extensions(quiz_service)
        self._shutdown_hooks: list[Callable[[], Awaitable[None]]] = []
        self._shutting_down = False

    def _answer(self, question: str, *, history: Sequence[Turn] = ()) -> Answer:
        # Looked up per call, so the composition root may swap ``bot.tutor``.
        return self.tutor.answer(question, history=history)

    @property
    def course_id(self) -> str:
        return str(getattr(getattr(self.tutor, "course", None), "id", None) or "unknown")

    # ------------------------------------------------------------------ startup
    async def setup_hook(self) -> None:
        errors.install(self, self.tree)
        self.add_dynamic_items(FeedbackButton)
        for ext in self._extensions:
            await self.load_extension(ext)
        await self.sync_commands()

    async def sync_commands(self) -> None:
        """Register the slash commands: to ``DEV_GUILD_ID`` only (instant) if set, else globally."""
        guild_id = self.settings.dev_guild_id
        try:
            if guild_id:
                guild = discord.Object(id=guild_id)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
                log.info("synced %d commands to the development guild %s", len(synced), guild_id)
            else:
                synced = await self.tree.sync()
                log.info("synced %d commands globally (they can take a while to appear)", len(synced))
        except discord.Forbidden as e:
            log.error(
                "could not sync slash commands%s: %s. Invite the bot with the applications.commands scope.",
                f" to guild {guild_id}" if guild_id else "",
                e.text or e,
            )
        except discord.HTTPException as e:
            log.error("could not sync slash commands (the previous ones stay registered): %s", e)

    async def on_message(self, message: discord.Message, /) -> None:
        """No prefix commands: messages are handled by the cogs' listeners only."""

    async def on_ready(self) -> None:
        log.info(
            "connected as %s (application %s) to %d servers", self.user, self.application_id, len(self.guilds)
        )

    # ------------------------------------------------------------------ shutdown
    def add_shutdown_hook(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook`` on graceful shutdown, after answers in flight finish (e.g. save quiz state)."""
        self._shutdown_hooks.append(hook)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    async def shutdown(self, *, timeout: float = 30.0) -> None:
        """Stop taking questions, let those in flight finish (up to ``timeout``), run hooks, close."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self.runner.close()
        if self.runner.in_flight:
            log.info("shutting down: finishing %d answers in flight", self.runner.in_flight)
        if not await self.runner.drain(timeout):
            log.warning(
                "shutting down with %d answers still in flight after %.0f s", self.runner.in_flight, timeout
            )
        for hook in self._shutdown_hooks:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook %r failed", hook)
        await self.close()

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self.runner.shutdown_executor()


async def run_bot(
    settings: Any,
    tutor: Any,
    quiz_service: object | None,
    session_factory: async_sessionmaker[AsyncSession],
    runtime: TutorRuntime | None,
    *,
    stop: asyncio.Event | None = None,
    install_signal_handlers: bool = True,
    shutdown_timeout: float = 30.0,
    **bot_options: Any,
) -> None:
    """Run the bot until it is stopped (SIGTERM/SIGINT, or ``stop`` set) or the connection fails.

    Raises TokenError when DISCORD_TOKEN is missing or rejected (the token is never logged).
    """
    token = settings.discord_token.get_secret_value().strip() if settings.discord_token else ""
    if not token:
        raise TokenError(
            "DISCORD_TOKEN is not set. Create a bot at https://discord.com/developers/applications, "
            "copy its token (Bot > Reset Token) and set DISCORD_TOKEN in the environment or .env."
        )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if install_signal_handlers:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
                pass
    bot = TutorBot(
        settings=settings,
        tutor=tutor,
        quiz_service=quiz_service,
        session_factory=session_factory,
        runtime=runtime,
        **bot_options,
    )
    try:
        async with bot:
            try:
                await bot.login(token)
            except discord.LoginFailure:
                raise TokenError(
                    "Discord rejected DISCORD_TOKEN (401 Unauthorized). Reset the token in the Developer "
                    "Portal (Bot > Reset Token) and update DISCORD_TOKEN."
                ) from None
            connect = asyncio.create_task(bot.connect(), name="tutorbot-gateway")
            stopper = asyncio.create_task(stop.wait(), name="tutorbot-stop")
            done, _ = await asyncio.wait({connect, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                log.info("stop requested: shutting down gracefully")
                await bot.shutdown(timeout=shutdown_timeout)
            else:
                stopper.cancel()
            try:
                await connect
            except discord.PrivilegedIntentsRequired as e:
                raise RuntimeError(f"Discord refused a privileged intent for shard {e.shard_id}") from None
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def build_quiz_service(
    settings: Any, course: Any, session_factory: async_sessionmaker[AsyncSession]
) -> object | None:
    """The quiz service, once the quiz cog exists (until then /quiz is not offered)."""
    if not all(importlib.util.find_spec(ext) for ext in QUIZ_EXTENSIONS):
        return None
    from knowledge.quiz import QuizEngine
    from knowledge.quiz_service import QuizService
    from knowledge.store.quiz_repo import QuizRepo

    engine = QuizEngine(
        course,
        default_questions=settings.quiz_questions,
        default_seconds=settings.quiz_seconds,
        allow_change=settings.quiz_allow_change,
        idle_limit=settings.quiz_idle_questions,
    )
    return QuizService(engine, QuizRepo(session_factory))


async def main(settings: Any) -> int:
    """Compose and run the Discord bot (``bot.__main__.run_discord``); returns the exit code.

    Order: token present? -> database reachable and migrated? -> course, index and answer model
    (slow: in a thread) -> quiz service -> run_bot. Each failure is one clear log line, exit 2.
    """
    from bot.runtime import TutorRuntime
    from knowledge.course import CourseError
    from knowledge.embedder import EmbedderError
    from knowledge.index import IndexError_
    from knowledge.store import migrate
    from knowledge.store.db import DatabaseError, create_engine, create_session_factory, redact_url

    if settings.discord_token is None or not settings.discord_token.get_secret_value().strip():
        log.error("DISCORD_TOKEN is not set; see README 'Run it on your Discord server'.")
        return 2
    url = settings.resolved_database_url
    engine = create_engine(url)
    runtime = None
    try:
        try:
            current, head = await migrate.current_revision(engine), migrate.head_revision()
        except Exception as exc:
            raise DatabaseError(f"cannot reach the database at {redact_url(url)}: {exc}") from None
        if current != head:
            log.error(
                "the database at %s is at revision %s, not %s: run `tutorbot db upgrade`",
                redact_url(url),
                current,
                head,
            )
            return 2
        session_factory = create_session_factory(engine)
        runtime = await asyncio.to_thread(TutorRuntime, settings)
        quiz_service = build_quiz_service(settings, runtime.course, session_factory)
        if quiz_service is not None:
            runtime.add_course_listener(quiz_service.engine.set_course)
        await run_bot(settings, runtime.tutor, quiz_service, session_factory, runtime)
        return 0
    except (TokenError, DatabaseError, CourseError, IndexError_, EmbedderError) as exc:
        log.error("%s", exc)
        return 2
    finally:
        if runtime is not None:
            runtime.close()
        await engine.dispose()
