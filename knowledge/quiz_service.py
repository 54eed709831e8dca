"""QuizService: what the Discord cog and the terminal call. The engine decides, the repository stores.

A cog stays thin::

    session = await quizzes.start(guild_id=g, channel_id=c, starter_id=u)       # AlreadyRunning, NoQuestions...
    while (view := await quizzes.next_question(session.id)) is not None:
        post(view)                       # text, lettered choices, deadline; buttons use view.custom_ids
        await sleep_until(view.deadline)
        reveal = await quizzes.reveal(session.id)                                 # right answer, explanation...
        post(reveal)
        if reveal.session_over:
            break
    results = await quizzes.finish(session.id)                                   # results + leaderboard

    # a button click (custom_id "quiz:<session id>:<position>:<letter>"), also after a restart:
    ack = await quizzes.answer(interaction.data["custom_id"], user.id, user.display_name)
    reply_ephemeral(ack.message)         # "Recorded B.", "Changed to C (was B).", "Time is up for this question."

    # at startup, before accepting clicks:
    for r in await quizzes.recover(): ...   # resumed (schedule the reveal at r.question.deadline) or closed

Guarantees: an answer is committed before ``answer`` returns its acknowledgment; a student has one
answer per question even when they click twice at once (clicks are serialised per student and the
database upserts on its unique key); a reveal waits for answers that were accepted before the deadline
and are still being written, so "who got it right" and the final scores agree; a session is added to
the leaderboard exactly once (see ``QuizRepo.finish_session``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from knowledge.course import Flashcard
from knowledge.quiz import (
    MAX_QUESTIONS,
    AlreadyRunning,
    ClickRef,
    LeaderboardRow,
    NoQuestions,
    NoSuchSession,
    QuestionView,
    QuizEngine,
    QuizError,
    QuizSession,
    Results,
    Reveal,
    StudentStats,
    compute_results,
    parse_custom_id,
)
from knowledge.store.quiz_repo import QuizRepo

log = logging.getLogger(__name__)

AckKind = Literal[
    "recorded", "changed", "unchanged", "closed", "ended", "missing", "not_allowed", "invalid", "error"
]


@dataclass(frozen=True)
class Ack:
    """The short, ephemeral reply to a click. ``ok``: the student's answer is stored as ``letter``."""

    ok: bool
    kind: AckKind
    message: str
    letter: str | None = None


@dataclass(frozen=True)
class Recovery:
    """What restart recovery did with one open session.

    ``resumed``: the session runs again; if ``question`` is set it is open until its deadline (schedule
    the reveal), else call ``next_question``. ``closed``: it was ended with ``results`` recorded.
    """

    action: Literal["resumed", "closed"]
    session: QuizSession
    question: QuestionView | None = None
    results: Results | None = None


class _Gate:
    """Counts answers being written for a session, so a reveal can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count <= 0:
            self.count = 0
            self._idle.set()

    async def drain(self) -> None:
        await self._idle.wait()


class QuizService:
    """Async orchestration over a ``QuizEngine`` (rules, in memory) and a ``QuizRepo`` (storage).

    ``resume_grace``: an open question with less time left than this is closed on restart instead of
    resumed. ``resume_window``: a session between questions is resumed after a restart only if its
    last activity is this recent.
    """

    def __init__(
        self,
        engine: QuizEngine,
        repo: QuizRepo,
        *,
        resume_grace: timedelta = timedelta(seconds=3),
        resume_window: timedelta = timedelta(seconds=60),
        leaderboard_size: int = 10,
    ):
        self.engine = engine
        self.repo = repo
        self.resume_grace = resume_grace
        self.resume_window = resume_window
        self.leaderboard_size = leaderboard_size
        self._user_locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._session_locks: dict[str, asyncio.Lock] = {}
        self._gates: dict[str, _Gate] = {}

    def now(self) -> datetime:
        return self.engine.now()

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._session_locks.setdefault(session_id, asyncio.Lock())

    def _gate(self, session_id: str) -> _Gate:
        return self._gates.setdefault(session_id, _Gate())

    def _forget(self, session_id: str) -> None:
        self.engine.drop(session_id)
        self._session_locks.pop(session_id, None)
        self._gates.pop(session_id, None)
        for key in [k for k in self._user_locks if k[0] == session_id]:
            self._user_locks.pop(key, None)

    # --- starting --------------------------------------------------------------------------

    async def start(
        self,
        *,
        guild_id: int | None,
        channel_id: int,
        starter_id: int,
        questions: int | None = None,
        seconds: int | None = None,
        difficulty: str | None = None,
        tags: Iterable[str] = (),
        allow_change: bool | None = None,
        idle_limit: int | None = None,
    ) -> QuizSession:
        """Start and store a channel quiz. Raises AlreadyRunning, NoQuestions or InvalidOption."""
        session = self.engine.start(
            guild_id=guild_id, channel_id=channel_id, starter_id=starter_id, questions=questions,
            seconds=seconds, difficulty=difficulty, tags=tags, allow_change=allow_change, idle_limit=idle_limit,
        )
        try:
            await self.repo.create_session(session)
        except BaseException:
            self.engine.drop(session.id)
            raise
        return session

    async def start_review(
        self,
        *,
        guild_id: int | None,
        channel_id: int,
        student_id: int,
        questions: int = 10,
        seconds: int | None = None,
    ) -> QuizSession:
        """Start a personal review quiz from the student's due questions (most overdue first)."""
        course = self.engine.course
        if course is None:
            raise NoQuestions("No course is loaded, so there is nothing to review.")
        if self.engine.review_of(student_id) is not None:
            raise AlreadyRunning("You already have a review quiz running. Finish it first.")
        limit = max(1, min(questions, MAX_QUESTIONS))
        due = await self.repo.due_review_items(student_id, course.id, self.now(), limit=limit * 2)
        session = self.engine.start_review(
            guild_id=guild_id, channel_id=channel_id, student_id=student_id,
            question_ids=[d.question_id for d in due], limit=limit, seconds=seconds,
        )
        try:
            await self.repo.create_session(session)
        except BaseException:
            self.engine.drop(session.id)
            raise
        return session

    def running(self, channel_id: int) -> QuizSession | None:
        """The quiz running in a channel, if any."""
        return self.engine.in_channel(channel_id)

    # --- questions -------------------------------------------------------------------------

    async def next_question(self, session_id: str) -> QuestionView | None:
        """Open and store the next question; None when the quiz has no more (call ``finish``)."""
        async with self._lock(session_id):
            view = self.engine.open_next(session_id)
            if view is not None:
                await self.repo.save_progress(self.engine.get(session_id))
            return view

    def current_question(self, session_id: str) -> QuestionView:
        """The question being asked (for re-posting it after a restart)."""
        return self.engine.view(session_id)

    async def answer(self, click: str | ClickRef, user_id: int, display_name: str) -> Ack:
        """Grade and store a click; the acknowledgment is sent only once the answer is committed."""
        ref = parse_custom_id(click) if isinstance(click, str) else click
        if ref is None:
            return Ack(False, "invalid", "That button is not part of a quiz.")
        key = (ref.session_id, user_id)
        lock = self._user_locks.setdefault(key, asyncio.Lock())
        async with lock:
            try:
                outcome = self.engine.check_answer(ref.session_id, ref.position, ref.letter, user_id, display_name)
            except NoSuchSession:
                self._user_locks.pop(key, None)
                status = await self.repo.session_status(ref.session_id)
                if status is None:
                    return Ack(False, "missing", "This quiz no longer exists.")
                if status == "open":
                    return Ack(False, "ended", "This quiz is not running right now.")
                return Ack(False, "ended", "This quiz has ended.")
            except QuizError as exc:
                return Ack(False, exc.kind, str(exc))  # type: ignore[arg-type]
            if outcome.kind == "unchanged":
                return Ack(True, "unchanged", outcome.message, outcome.letter)
            session = self.engine.get(ref.session_id)
            gate = self._gate(ref.session_id)
            gate.enter()
            try:
                await self.repo.record_answer(
                    outcome, guild_id=session.guild_id if session.kind == "channel" else None
                )
                self.engine.apply(outcome)
            except Exception:
                log.exception("could not store answer %s for session %s", ref.custom_id, ref.session_id)
                return Ack(False, "error", "Your answer could not be saved. Please click again.")
            finally:
                gate.leave()
        return Ack(True, outcome.kind, outcome.message, outcome.letter)

    async def reveal(self, session_id: str) -> Reveal:
        """Close the current question (at its deadline) and return what to show.

        Waits for answers still being stored. ``reveal.session_over``: call ``finish`` next (the last
        question was asked, or the quiz stopped itself after too many unanswered questions).
        """
        async with self._lock(session_id):
            self.engine.close(session_id)
            await self._gate(session_id).drain()
            await self.repo.save_progress(self.engine.get(session_id))  # also when it just stopped (idle)
            return self.engine.reveal(session_id)

    # --- ending ----------------------------------------------------------------------------

    async def stop(
        self,
        session_id: str | None = None,
        *,
        channel_id: int | None = None,
        user_id: int,
        can_moderate: bool = False,
    ) -> Results:
        """Stop a quiz (by id, or the one running in ``channel_id``) for its starter or a moderator.

        Answers already given count; results and the leaderboard are recorded."""
        if session_id is None:
            running = self.engine.in_channel(channel_id) if channel_id is not None else None
            if running is None:
                raise NoSuchSession("No quiz is running in this channel.")
            session_id = running.id
        async with self._lock(session_id):
            self.engine.stop(session_id, user_id, can_moderate=can_moderate)
        return await self.finish(session_id)

    async def finish(self, session_id: str) -> Results:
        """End the quiz (if still open), record scores, streaks and review boxes once, and return
        the results table with the guild leaderboard. Safe to call twice."""
        async with self._lock(session_id):
            session = self.engine.find(session_id)
            if session is not None:
                self.engine.finish(session_id)
                await self._gate(session_id).drain()
                status, reason, when = session.status, session.end_reason, session.ended_at or self.now()
            else:
                status, reason, when = "finished", "completed", self.now()
            results = await self.repo.finish_session(session_id, status=status, end_reason=reason, now=when)
            if results is None:
                raise NoSuchSession()
        self._forget(session_id)
        return await self._with_leaderboard(results)

    async def _with_leaderboard(self, results: Results) -> Results:
        if results.kind != "channel" or results.guild_id is None:
            return results
        board = await self.repo.leaderboard(results.guild_id, self.leaderboard_size)
        return replace(results, leaderboard=tuple(board))

    async def results(self, session_id: str) -> Results:
        """The results table so far (running quiz) or final (ended quiz)."""
        session = self.engine.find(session_id)
        if session is not None:
            return compute_results(session)
        loaded = await self.repo.load_session(session_id)
        if loaded is None:
            raise NoSuchSession()
        return compute_results(loaded)

    # --- restart recovery ------------------------------------------------------------------

    async def recover(self, owns: Callable[[int | None], bool] | None = None) -> list[Recovery]:
        """Resume or close every session left open by a previous process. No recorded answer is lost:
        answers are read back from the database, and closed sessions are scored from them.

        Resumed: an open question with at least ``resume_grace`` left, or a session between questions
        whose last activity is within ``resume_window``. Everything else is closed as "expired"
        (reason "restart"), "finished" if every question had already been asked, or "stopped" (reason
        "idle") if it had just stopped itself.

        ``owns(guild_id)`` limits recovery to this process's sessions when shards run in several
        processes sharing one database (each process recovers only its own guilds' quizzes).
        """
        out: list[Recovery] = []
        for session in await self.repo.open_sessions():
            if self.engine.find(session.id) is not None or (owns is not None and not owns(session.guild_id)):
                continue
            now = self.now()
            q = session.current_question
            if session.idle_streak >= session.idle_limit:
                pass  # it stopped itself (idle) just before the restart: close it below
            elif q is not None and q.is_open:
                assert q.deadline is not None
                if q.deadline - now >= self.resume_grace:
                    self.engine.adopt(session)
                    out.append(Recovery("resumed", session, question=self.engine.view(session.id)))
                    continue
            elif session.has_more and now - (session.updated_at or session.created_at) <= self.resume_window:
                self.engine.adopt(session)
                out.append(Recovery("resumed", session))
                continue
            if session.idle_streak >= session.idle_limit:
                status, reason = "stopped", "idle"
            elif q is not None and not session.has_more and not q.is_open:
                status, reason = "finished", "completed"
            else:
                status, reason = "expired", "restart"
            results = await self.repo.finish_session(session.id, status=status, end_reason=reason, now=now)
            if results is not None:
                loaded = await self.repo.load_session(session.id)
                out.append(Recovery("closed", loaded or session, results=await self._with_leaderboard(results)))
        return out

    # --- leaderboards, stats, flashcards ---------------------------------------------------

    async def leaderboard(self, guild_id: int, limit: int | None = None, *, since: datetime | None = None
                          ) -> list[LeaderboardRow]:
        return await self.repo.leaderboard(guild_id, limit or self.leaderboard_size, since=since)

    async def stats(self, student_id: int, *, guild_id: int | None = None) -> StudentStats:
        course = self.engine.course
        return await self.repo.student_stats(
            student_id, guild_id=guild_id, course_id=course.id if course else None, now=self.now()
        )

    def draw_card(self, tag: str | None = None) -> Flashcard:
        return self.engine.draw_card(tag)

    def flip(self, card_id: str) -> Flashcard:
        return self.engine.flip(card_id)
