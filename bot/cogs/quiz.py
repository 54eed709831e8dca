"""Quizzes on Discord: ``/quiz start|stop|leaderboard|review|stats`` and ``/flashcard``.

The cog is thin: it parses options, calls ``knowledge.quiz_service.QuizService`` (bot.quiz_service)
and renders with ``bot.render_quiz``. Clicks never come through here: the answer buttons are
``DynamicItem``s (``bot.views.quiz``) that call ``QuizService.answer`` directly, so they work after
a restart whether or not anything is in memory.

A running quiz is a ``QuizRun``: one task per session that owns its loop

    post question N (lettered buttons) -> edit the countdown in place every ``QuizTiming.countdown_every``
    seconds (one edit per 10 s per quiz: far inside Discord's 5 edits / 5 s per channel) -> at the
    deadline: reveal (waits for answers still being stored), grey out the buttons with the right
    one green, post the answer, explanation, common mistakes and who got it right -> pause ->
    question N+1 ... -> results table + guild leaderboard.

Time comes from the service's clock (``QuizService.now``), so a test clock drives the loop. A
run that fails logs the error with its session, guild and channel, closes the quiz (answers
given so far are scored) and tells the channel; it never dies silently. When the bot shuts down
(cog unload) runs are cancelled *without* closing their quizzes: everything is already stored,
and the next process resumes them.

Restart: ``cog_load`` (inside ``setup_hook``, before the gateway delivers any click) calls
``QuizService.recover()``. A resumed channel quiz gets a new run that re-posts its open question
(the old message's buttons keep working: same custom_ids) or asks the next one; a closed one has
its results posted in its channel. Review quizzes are ephemeral (only their student sees them,
through the interaction's 15-minute webhook, which a new process cannot reach): a resumed review
is finished at once, its answers scored and scheduled.

``/quiz review`` is ephemeral on purpose: it shows one student's past mistakes, only they may
answer it, and a personal quiz should not interleave its messages with the channel's quiz.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol

import discord
from discord import app_commands
from discord.ext import commands

from bot import errors, render_quiz
from bot.views.quiz import DYNAMIC_ITEMS, card_view, closed_view, question_view, send, within_window
from knowledge.course import Course
from knowledge.quiz import (
    DIFFICULTIES,
    MAX_QUESTIONS,
    MAX_SECONDS,
    MIN_SECONDS,
    NoSuchSession,
    QuestionView,
    QuizEnded,
    QuizError,
    Results,
    Reveal,
)
from knowledge.store.db import DatabaseError

if TYPE_CHECKING:
    from bot.client import TutorBot
    from knowledge.quiz_service import QuizService

log = logging.getLogger(__name__)

REVIEW_MAX_QUESTIONS = 10
REVIEW_BUDGET_S = 13 * 60  # an ephemeral review must end within the interaction token's 15 minutes


class Outlet(Protocol):
    """Where a run posts: a channel (channel quizzes) or an interaction's follow-ups (reviews)."""

    async def send(self, **kwargs: Any) -> discord.Message | discord.WebhookMessage: ...


class ChannelOutlet:
    def __init__(self, channel: discord.abc.Messageable) -> None:
        self.channel = channel

    async def send(self, **kwargs: Any) -> discord.Message:
        return await self.channel.send(**kwargs)


class FollowupOutlet:
    """Ephemeral follow-ups of one interaction (valid for 15 minutes)."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction

    async def send(self, **kwargs: Any) -> discord.WebhookMessage:
        return await self.interaction.followup.send(ephemeral=True, wait=True, **kwargs)


@dataclass(frozen=True)
class QuizTiming:
    """The loop's pace. The bot may carry its own as ``bot.quiz_timing`` (tests do)."""

    #: Quiz-clock seconds between two countdown edits of a question (rate limits: see the docstring).
    countdown_every: float = 10.0
    #: Quiz-clock seconds between a reveal and the next question.
    pause_seconds: float = 5.0
    #: Longest real sleep between two looks at the clock (None: sleep until the next event). Tests
    #: that drive a manual clock set it small.
    max_sleep: float | None = None


@dataclass(eq=False)
class QuizRun:
    """One running quiz: its loop task and what it has posted."""

    session_id: str
    kind: Literal["channel", "review"]
    guild_id: int | None
    channel_id: int
    starter_id: int
    outlet: Outlet
    allow_change: bool = True
    idle_limit: int | None = None
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    question: QuestionView | None = None  # the question on screen
    message: discord.Message | discord.WebhookMessage | None = None  # its message
    stopping: bool = False  # stopped by a person: the stop command posts the results

    def describe(self) -> str:
        return f"quiz {self.session_id} ({self.kind}) in guild {self.guild_id} channel {self.channel_id}"


def parse_topics(topic: str | None) -> list[str]:
    """``"lora, fine-tuning"`` -> ["lora", "fine-tuning"] (a quiz matches questions with any of them)."""
    if not topic:
        return []
    return [t.strip().lower() for t in topic.replace(";", ",").split(",") if t.strip()]


def _can_post(perms: discord.Permissions, channel: Any) -> list[str]:
    """Permissions the bot lacks to run a quiz in a channel (empty: all there)."""
    missing = []
    if not perms.view_channel:
        missing.append("View Channel")
    if isinstance(channel, discord.Thread):
        if not perms.send_messages_in_threads:
            missing.append("Send Messages in Threads")
    elif not perms.send_messages:
        missing.append("Send Messages")
    if not perms.embed_links:
        missing.append("Embed Links")
    return missing


class QuizCog(commands.Cog):
    """/quiz and /flashcard; owns the running quizzes' loops."""

    quiz = app_commands.Group(name="quiz", description="Multiple-choice quizzes on the course")

    def __init__(self, bot: TutorBot) -> None:
        self.bot = bot
        self.service: QuizService = bot.quiz_service  # type: ignore[assignment]
        self.timing: QuizTiming = getattr(bot, "quiz_timing", None) or QuizTiming()
        self.runs: dict[str, QuizRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # other background work (recovery posts)

    # ------------------------------------------------------------------ lifecycle
    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(*DYNAMIC_ITEMS)
        await self._recover()

    async def cog_unload(self) -> None:
        """Shutdown: stop the loops but leave the quizzes open (stored), for the next process."""
        tasks = [r.task for r in self.runs.values() if r.task is not None] + list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
            log.info("paused %d quiz task(s) for shutdown; open quizzes resume after a restart", len(tasks))
        self.runs.clear()

    def _background(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _owns_guild(self, guild_id: int | None) -> bool:
        """Whether this process runs the shard of ``guild_id`` (shards may be split across processes)."""
        shard_ids = getattr(self.bot, "shard_ids", None)
        count = getattr(self.bot, "shard_count", None)
        if guild_id is None or not shard_ids or not count:
            return True
        return (guild_id >> 22) % count in shard_ids

    async def _recover(self) -> None:
        try:
            recoveries = await self.service.recover(owns=self._owns_guild)
        except Exception:
            log.exception("quiz recovery failed: quizzes left open by the previous process stay open")
            return
        for r in recoveries:
            s = r.session
            if s.kind == "review":
                if r.action == "resumed":
                    self._background(self._close_review(s.id), f"quiz-review-close-{s.id}")
                else:
                    log.info("review quiz %s of user %s closed after a restart", s.id, s.starter_id)
                continue
            if r.action == "resumed":
                run = QuizRun(
                    session_id=s.id,
                    kind="channel",
                    guild_id=s.guild_id,
                    channel_id=s.channel_id,
                    starter_id=s.starter_id,
                    outlet=ChannelOutlet(self._channel(s.channel_id, s.guild_id)),
                    allow_change=s.allow_change,
                    idle_limit=s.idle_limit,
                )
                log.info("resuming %s at question %d/%d", run.describe(), max(s.current, 0) + 1, s.total)
                self._start_run(run, first=r.question, resumed=True)
            elif r.results is not None:
                log.info(
                    "quiz %s in channel %s closed after a restart (%s)", s.id, s.channel_id, s.end_reason
                )
                self._background(
                    self._post_recovered_results(s.channel_id, s.guild_id, r.results), f"quiz-results-{s.id}"
                )

    async def _close_review(self, session_id: str) -> None:
        try:
            await self.service.finish(session_id)
            log.info("review quiz %s finished after a restart (its answers are scored)", session_id)
        except Exception:
            log.exception("could not finish review quiz %s after a restart", session_id)

    async def _post_recovered_results(self, channel_id: int, guild_id: int | None, results: Results) -> None:
        await self.bot.wait_until_ready()
        try:
            await self._channel(channel_id, guild_id).send(
                embeds=render_quiz.results_embeds(results, title="Quiz results (closed after a restart)")
            )
        except discord.HTTPException as e:
            log.warning(
                "could not post the results of quiz %s in channel %s: %s", results.session_id, channel_id, e
            )

    def _channel(self, channel_id: int, guild_id: int | None) -> discord.abc.Messageable:
        channel = self.bot.get_channel(channel_id)
        if isinstance(channel, discord.abc.Messageable):
            return channel
        return self.bot.get_partial_messageable(channel_id, guild_id=guild_id)

    # ------------------------------------------------------------------ runs
    def _start_run(self, run: QuizRun, *, first: QuestionView | None = None, resumed: bool = False) -> None:
        self.runs[run.session_id] = run
        run.task = asyncio.create_task(self._run(run, first, resumed), name=f"quiz-{run.session_id}")

    def run_in(self, channel_id: int) -> QuizRun | None:
        for run in self.runs.values():
            if run.kind == "channel" and run.channel_id == channel_id:
                return run
        return None

    async def _sleep_until(self, run: QuizRun, when: datetime) -> None:
        """Sleep until ``when`` on the service's clock (or until woken)."""
        while not run.stopping:
            left = (when - self.service.now()).total_seconds()
            if left <= 0:
                return
            if self.timing.max_sleep is not None:
                left = min(left, self.timing.max_sleep)
            run.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.wake.wait(), left)

    async def _run(self, run: QuizRun, first: QuestionView | None, resumed: bool) -> None:
        """The loop's guard: every failure is logged with context and closes the quiz cleanly."""
        try:
            if resumed:
                await self.bot.wait_until_ready()
            await self._loop(run, first, resumed)
        except asyncio.CancelledError:
            if not run.stopping:
                log.info("%s paused (shutting down); it resumes after a restart", run.describe())
            raise
        except (NoSuchSession, QuizEnded) as exc:
            # Ended elsewhere (a /quiz stop that raced the loop, or another finisher): nothing to do.
            log.info("%s ended elsewhere: %s", run.describe(), exc)
        except (discord.Forbidden, discord.NotFound) as exc:
            log.warning(
                "%s cannot post any more (%s %s: %s); closing it",
                run.describe(),
                type(exc).__name__,
                exc.code,
                exc.text,
            )
            await self._abandon(run, "unreachable", tell=False)
        except discord.HTTPException as exc:
            log.warning("%s: Discord failed (%s %s); closing it", run.describe(), exc.status, exc.text)
            await self._abandon(run, "error", tell=True)
        except DatabaseError as exc:
            log.warning("%s: the database is unavailable (%s); closing it", run.describe(), exc)
            await self._abandon(run, "error", tell=True)
        except Exception:
            log.exception("%s failed; closing it", run.describe())
            await self._abandon(run, "error", tell=True)
        finally:
            if self.runs.get(run.session_id) is run:
                del self.runs[run.session_id]

    async def _loop(self, run: QuizRun, first: QuestionView | None, resumed: bool) -> None:
        service = self.service
        question = first if first is not None else await service.next_question(run.session_id)
        while question is not None:
            await self._ask(run, question, resumed=resumed)
            resumed = False
            await self._countdown(run, question)
            if run.stopping:
                return
            reveal = await service.reveal(run.session_id)
            await self._show_reveal(run, question, reveal)
            if reveal.session_over:
                break
            # anchored at the deadline (not "now"), so the pause is the same however long the reveal took
            await self._sleep_until(run, question.deadline + timedelta(seconds=self.timing.pause_seconds))
            if run.stopping:
                return
            question = await service.next_question(run.session_id)
        results = await service.finish(run.session_id)
        run.question = run.message = None
        await run.outlet.send(embeds=render_quiz.results_embeds(results))
        log.info("%s finished: %d questions, %d players", run.describe(), results.asked, len(results.rows))

    def _answered(self, run: QuizRun, position: int) -> int:
        session = self.service.engine.find(run.session_id)
        if session is None or not 0 <= position < session.total:
            return 0
        return len(session.questions[position].answers)

    def _question_embed(self, run: QuizRun, question: QuestionView, **kw: Any) -> discord.Embed:
        return render_quiz.question_embed(
            question,
            now=self.service.now(),
            answered=self._answered(run, question.position),
            allow_change=run.allow_change,
            review=run.kind == "review",
            **kw,
        )

    async def _ask(self, run: QuizRun, question: QuestionView, *, resumed: bool) -> None:
        run.question = question
        run.message = None
        run.message = await run.outlet.send(
            embed=self._question_embed(run, question, resumed=resumed), view=question_view(question)
        )

    async def _countdown(self, run: QuizRun, question: QuestionView) -> None:
        """Wait for the deadline, editing the countdown in place every ``countdown_every`` seconds."""
        step = timedelta(seconds=self.timing.countdown_every)
        next_edit = question.opened_at + step
        while not run.stopping:
            now = self.service.now()
            if now >= question.deadline:
                return
            if now >= next_edit:
                await self._edit(run, embed=self._question_embed(run, question))
                while next_edit <= now:
                    next_edit += step
            await self._sleep_until(run, min(next_edit, question.deadline))

    async def _edit(self, run: QuizRun, **kwargs: Any) -> None:
        """Edit the question on screen; a failed edit is not worth stopping the quiz for."""
        if run.message is None:
            return
        try:
            # without new content discord.py omits allowed_mentions; send it anyway, empty
            await run.message.edit(allowed_mentions=discord.AllowedMentions.none(), **kwargs)
        except discord.HTTPException as e:
            log.warning(
                "%s: could not edit message %s: %s %s", run.describe(), run.message.id, e.status, e.text
            )

    async def _show_reveal(self, run: QuizRun, question: QuestionView, reveal: Reveal) -> None:
        await self._edit(
            run,
            embed=self._question_embed(run, question, closed=True),
            view=question_view(question, reveal=reveal),
        )
        await run.outlet.send(embed=render_quiz.reveal_embed(reveal, idle_limit=run.idle_limit))

    async def _abandon(self, run: QuizRun, reason: str, *, tell: bool) -> None:
        """Close a quiz whose loop failed: score the answers given, tell the channel if possible."""
        try:
            results = await self.service.finish(run.session_id)
        except QuizError:
            return
        except Exception:
            log.exception("%s: could not close it after a failure", run.describe())
            return
        if tell:
            try:
                if run.question is not None and run.message is not None:
                    await self._edit(run, view=closed_view(run.question))
                results = _with_reason(results, reason)
                await run.outlet.send(
                    embeds=render_quiz.results_embeds(
                        results, note="This quiz was closed because of a problem."
                    )
                )
            except discord.HTTPException as e:
                log.warning("%s: could not post its results: %s", run.describe(), e)

    # ------------------------------------------------------------------ helpers for commands
    def _sync_course(self) -> Course | None:
        """Follow a reload of the same course (``/tutor reindex`` swaps the tutor's course)."""
        engine = self.service.engine
        course = getattr(self.bot.tutor, "course", None)
        current = engine.course
        if (
            isinstance(course, Course)
            and course is not current
            and (current is None or course.id == current.id)
        ):
            engine.set_course(course)
        return engine.course

    async def _guild_defaults(self, guild_id: int | None) -> tuple[int | None, int | None]:
        if guild_id is None:
            return None, None
        try:
            cfg = await self.bot.qa.get_guild_config(
                guild_id, default_answer_on_mention=self.bot.settings.answer_on_mention
            )
        except DatabaseError as exc:
            log.warning("guild %s quiz defaults unavailable, using the deployment's: %s", guild_id, exc)
            return None, None
        return cfg.quiz_questions, cfg.quiz_seconds

    @staticmethod
    async def _refuse(interaction: discord.Interaction, message: str) -> None:
        log.info("quiz refusal (%s): %s", errors.describe_interaction(interaction), message)
        await send(interaction, render_quiz.ack_text(False, message), ephemeral=True)

    # ------------------------------------------------------------------ /quiz start
    @quiz.command(name="start", description="Start a multiple-choice quiz in this channel")
    @app_commands.describe(
        questions=f"How many questions (1-{MAX_QUESTIONS}; default: this server's setting)",
        difficulty="Only questions of this difficulty",
        topic="Only questions on this topic (several: separate with commas)",
        seconds=f"Seconds per question ({MIN_SECONDS}-{MAX_SECONDS}; default: this server's setting)",
    )
    @app_commands.choices(difficulty=[app_commands.Choice(name=d, value=d) for d in DIFFICULTIES])
    async def quiz_start(
        self,
        interaction: discord.Interaction,
        questions: app_commands.Range[int, 1, MAX_QUESTIONS] | None = None,
        difficulty: str | None = None,
        topic: app_commands.Range[str, 1, 200] | None = None,
        seconds: app_commands.Range[int, MIN_SECONDS, MAX_SECONDS] | None = None,
    ) -> None:
        channel_id = interaction.channel_id
        assert channel_id is not None
        missing = _can_post(interaction.app_permissions, interaction.channel) if interaction.guild_id else []
        if missing:
            await self._refuse(
                interaction, f"I can't run a quiz here: I need {', '.join(missing)} in this channel."
            )
            return
        running = self.service.running(channel_id)
        if running is not None:
            await self._refuse(
                interaction,
                f"A quiz is already running in this channel (question {max(running.current, 0) + 1} of "
                f"{running.total}). Wait for it to end or stop it with /quiz stop.",
            )
            return
        self._sync_course()
        tags = parse_topics(topic)

        async def begin():
            default_q, default_s = await self._guild_defaults(interaction.guild_id)
            return await self.service.start(
                guild_id=interaction.guild_id,
                channel_id=channel_id,
                starter_id=interaction.user.id,
                questions=questions if questions is not None else default_q,
                seconds=seconds if seconds is not None else default_s,
                difficulty=difficulty,
                tags=tags,
            )

        try:
            session = await within_window(interaction, begin(), ephemeral=False)
        except QuizError as exc:
            await self._refuse(interaction, str(exc))
            return
        run = QuizRun(
            session_id=session.id,
            kind="channel",
            guild_id=session.guild_id,
            channel_id=channel_id,
            starter_id=session.starter_id,
            outlet=ChannelOutlet(self._channel(channel_id, interaction.guild_id)),
            allow_change=session.allow_change,
            idle_limit=session.idle_limit,
        )
        log.info(
            "%s started by user %s: %d questions, %d s, difficulty %s, topics %s",
            run.describe(),
            interaction.user.id,
            session.total,
            session.seconds,
            session.difficulty,
            list(session.tags),
        )
        try:
            await send(
                interaction,
                embeds=[
                    render_quiz.announcement(
                        questions=session.total,
                        seconds=session.seconds,
                        difficulty=session.difficulty,
                        tags=session.tags,
                        starter=interaction.user.display_name,
                    )
                ],
            )
        finally:
            self._start_run(run)

    @quiz_start.autocomplete("topic")
    async def _topic_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        course = self._sync_course()
        tags = course.quiz_tags() if course is not None else []
        return topic_choices(tags, current)

    # ------------------------------------------------------------------ /quiz stop
    @quiz.command(name="stop", description="Stop the quiz in this channel (its starter or Manage Messages)")
    async def quiz_stop(self, interaction: discord.Interaction) -> None:
        channel_id = interaction.channel_id
        user = interaction.user
        can_moderate = bool(interaction.permissions.manage_messages)
        session = self.service.running(channel_id) if channel_id is not None else None
        if session is None:
            review = self.service.engine.review_of(user.id)
            if review is None:
                await self._refuse(interaction, "No quiz is running in this channel.")
                return
            session = review
        if session.kind == "channel" and user.id != session.starter_id and not can_moderate:
            log.info(
                "refused /quiz stop of quiz %s by user %s (not the starter, no Manage Messages)",
                session.id,
                user.id,
            )
            await self._refuse(
                interaction, "Only the person who started this quiz or a moderator can stop it."
            )
            return
        ephemeral = session.kind == "review"
        try:
            results = await within_window(
                interaction,
                self.service.stop(session.id, user_id=user.id, can_moderate=can_moderate),
                ephemeral=ephemeral,
            )
        except QuizError as exc:
            await self._refuse(interaction, str(exc))
            return
        run = self.runs.get(session.id)
        if run is not None:
            run.stopping = True
            run.wake.set()
            if run.task is not None:
                run.task.cancel()
                await asyncio.gather(run.task, return_exceptions=True)
            if run.question is not None and run.message is not None:
                await self._edit(
                    run,
                    embed=self._question_embed(run, run.question, closed=True),
                    view=closed_view(run.question),
                )
        log.info("quiz %s stopped by user %s", session.id, user.id)
        await send(
            interaction,
            f"⏹️ Quiz stopped by {render_quiz.name(user.display_name)}.",
            embeds=render_quiz.results_embeds(results),
            ephemeral=ephemeral,
        )

    # ------------------------------------------------------------------ /quiz leaderboard
    @quiz.command(name="leaderboard", description="This server's quiz leaderboard")
    @app_commands.describe(period="All-time totals, or points earned in the last 7 days")
    @app_commands.choices(
        period=[
            app_commands.Choice(name="all time", value="all"),
            app_commands.Choice(name="this week", value="week"),
        ]
    )
    async def quiz_leaderboard(self, interaction: discord.Interaction, period: str = "all") -> None:
        if interaction.guild_id is None:
            await self._refuse(interaction, "Leaderboards are per server: use this command in a server.")
            return
        since = self.service.now() - timedelta(days=7) if period == "week" else None
        rows = await within_window(
            interaction, self.service.leaderboard(interaction.guild_id, since=since), ephemeral=False
        )
        await send(
            interaction, embeds=[render_quiz.leaderboard_embed(rows, period="last 7 days" if since else None)]
        )

    # ------------------------------------------------------------------ /quiz stats
    @quiz.command(
        name="stats", description="Your quiz accuracy by topic and your review queue (only you see it)"
    )
    async def quiz_stats(self, interaction: discord.Interaction) -> None:
        user = interaction.user
        stats = await within_window(interaction, self.service.stats(user.id), ephemeral=True)
        await send(interaction, embeds=[render_quiz.stats_embed(stats, user.display_name)], ephemeral=True)

    # ------------------------------------------------------------------ /quiz review
    @quiz.command(
        name="review",
        description="A personal quiz of the questions you missed that are due (only you see it)",
    )
    @app_commands.describe(questions=f"At most this many due questions (1-{REVIEW_MAX_QUESTIONS}, default 5)")
    async def quiz_review(
        self,
        interaction: discord.Interaction,
        questions: app_commands.Range[int, 1, REVIEW_MAX_QUESTIONS] = 5,
    ) -> None:
        channel_id = interaction.channel_id
        assert channel_id is not None
        self._sync_course()
        seconds = self.service.engine.default_seconds
        fit = max(1, int(REVIEW_BUDGET_S // (seconds + self.timing.pause_seconds + 2)))
        try:
            session = await within_window(
                interaction,
                self.service.start_review(
                    guild_id=interaction.guild_id,
                    channel_id=channel_id,
                    student_id=interaction.user.id,
                    questions=min(questions, fit),
                    seconds=seconds,
                ),
                ephemeral=True,
            )
        except QuizError as exc:
            await self._refuse(interaction, str(exc))
            return
        run = QuizRun(
            session_id=session.id,
            kind="review",
            guild_id=interaction.guild_id,
            channel_id=channel_id,
            starter_id=interaction.user.id,
            outlet=FollowupOutlet(interaction),
            allow_change=session.allow_change,
            idle_limit=session.idle_limit,
        )
        log.info(
            "%s started by user %s: %d due questions", run.describe(), interaction.user.id, session.total
        )
        try:
            await send(
                interaction,
                embeds=[
                    render_quiz.announcement(
                        questions=session.total,
                        seconds=session.seconds,
                        difficulty=None,
                        tags=(),
                        starter=interaction.user.display_name,
                        review=True,
                    )
                ],
                ephemeral=True,
            )
        finally:
            self._start_run(run)

    # ------------------------------------------------------------------ /flashcard
    @app_commands.command(
        name="flashcard", description="Draw a flashcard from the course; flip it to see the answer"
    )
    @app_commands.describe(
        topic="Only cards on this topic", share="Show the card to the channel (default: only you)"
    )
    async def flashcard(
        self,
        interaction: discord.Interaction,
        topic: app_commands.Range[str, 1, 100] | None = None,
        share: bool = False,
    ) -> None:
        self._sync_course()
        try:
            card = self.service.draw_card(topic.strip().lower() if topic else None)
        except QuizError as exc:
            await self._refuse(interaction, str(exc))
            return
        await send(
            interaction, embeds=[render_quiz.card_embed(card)], view=card_view(card), ephemeral=not share
        )

    @flashcard.autocomplete("topic")
    async def _card_topic_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        course = self._sync_course()
        tags = sorted({t for c in course.flashcards for t in c.tags}) if course is not None else []
        return topic_choices(tags, current)


def topic_choices(tags: list[str], current: str) -> list[app_commands.Choice[str]]:
    """Up to 25 tags for an autocomplete: the last comma-separated part typed so far is matched."""
    head, _, last = current.rpartition(",")
    prefix = (head + ", ") if head.strip() else ""
    last = last.strip().lower()
    starts = [t for t in tags if t.lower().startswith(last)]
    contains = [t for t in tags if last in t.lower() and t not in starts]
    return [
        app_commands.Choice(name=(prefix + t)[:100], value=(prefix + t)[:100])
        for t in (starts + contains)[:25]
    ]


def _with_reason(results: Results, reason: str) -> Results:
    from dataclasses import replace

    return replace(results, end_reason=reason) if results.end_reason in (None, "completed") else results


async def setup(bot: TutorBot) -> None:
    if getattr(bot, "quiz_service", None) is None:
        log.warning("no quiz service: /quiz and /flashcard are not offered")
        return
    await bot.add_cog(QuizCog(bot))
