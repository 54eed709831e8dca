"""All the quiz SQL: sessions, answers, finishing (scores, streaks, review items), leaderboards, stats.

Works the same on SQLite and PostgreSQL. Writes that must happen exactly once rely on the database:

- ``record_answer`` is an upsert on the unique key (session, question, student), committed before it
  returns, so a double click or a retried click can never create a second answer.
- ``finish_session`` starts with ``UPDATE quiz_sessions SET status=... WHERE id=? AND status='open'``:
  only the transaction that flips the status adds the session to the leaderboard, so a session is
  counted once even if the timer, a stop command and restart recovery all try to finish it. On SQLite
  that first write also takes the database write lock, so the reads that follow are consistent.
  Leaderboard rows are upserted with increments computed by the database (``total = total + :points``),
  never read-modify-write in Python, so concurrent sessions in one guild add up exactly.

Datetimes are stored in UTC; SQLite hands them back naive, so every read goes through ``_aware``.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from sqlalchemy import and_, case, delete, func, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from knowledge.course import QuizQuestion
from knowledge.quiz import (
    MAX_BOX,
    REVIEW_INTERVALS,
    Answer,
    AnswerOutcome,
    LeaderboardRow,
    QuizSession,
    Results,
    ReviewEntry,
    SessionQuestion,
    StudentStats,
    TopicStat,
    compute_results,
    rank_rows,
    streak_summary,
)
from knowledge.store.db import guarded
from knowledge.store.quiz_models import (
    QuizAnswer,
    QuizScore,
    QuizSessionQuestion,
    QuizSessionRow,
    ReviewItem,
    Student,
)


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        raise ValueError("naive datetime given to the quiz repository; use aware UTC datetimes")
    return dt.astimezone(UTC)


class QuizRepo:
    """Async repository over an ``async_sessionmaker`` (expire_on_commit=False)."""

    def __init__(self, session_factory: async_sessionmaker[AsyncSession]):
        self._sf = guarded(session_factory)  # a lost database raises DatabaseError
        bind = session_factory.kw.get("bind")
        self.dialect = bind.dialect.name if bind is not None else "sqlite"
        # SQLite has one writer at a time; queueing writers here instead of in SQLite's busy handler
        # (which sleeps and retries) makes a burst of clicks several times faster. PostgreSQL: no lock.
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if self.dialect == "sqlite" else None

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncSession]:
        """A write transaction, committed on exit (serialised in-process on SQLite)."""
        if self._write_lock is None:
            async with self._sf() as s, s.begin():
                yield s
            return
        async with self._write_lock, self._sf() as s, s.begin():
            yield s

    def _insert(self, table):
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    def _greatest(self, *args):
        return func.greatest(*args) if self.dialect == "postgresql" else func.max(*args)

    # --- sessions --------------------------------------------------------------------------

    async def create_session(self, session: QuizSession) -> None:
        """Store a new session with its drawn questions and choice orders."""
        async with self._write() as s:
            s.add(
                QuizSessionRow(
                    id=session.id, kind=session.kind, guild_id=session.guild_id, channel_id=session.channel_id,
                    starter_id=session.starter_id, course_id=session.course_id, status=session.status,
                    end_reason=session.end_reason, question_count=session.total, seconds=session.seconds,
                    allow_change=session.allow_change, idle_limit=session.idle_limit,
                    idle_streak=session.idle_streak, difficulty=session.difficulty, tags=list(session.tags),
                    seed=session.seed, current_index=session.current, created_at=_utc(session.created_at),
                    updated_at=_utc(session.updated_at or session.created_at),
                )
            )
            await s.flush()
            s.add_all(
                QuizSessionQuestion(
                    session_id=session.id, position=q.position, question_id=q.question.id, topic=q.topic,
                    difficulty=q.question.difficulty, choice_order=list(q.order),
                    snapshot=q.question.model_dump(mode="json"), opened_at=q.opened_at, deadline=q.deadline,
                    closed_at=q.closed_at,
                )
                for q in session.questions
            )

    async def save_progress(self, session: QuizSession) -> bool:
        """Store the progress of an open session: current question, its timings, the idle count.

        The final status is written by ``finish_session`` only. Returns False if the stored session is
        no longer open (it was finished elsewhere).
        """
        async with self._write() as s:
            res = await s.execute(
                update(QuizSessionRow)
                .where(QuizSessionRow.id == session.id, QuizSessionRow.status == "open")
                .values(current_index=session.current, idle_streak=session.idle_streak,
                        updated_at=_utc(session.updated_at or session.created_at))
            )
            if res.rowcount != 1:
                return False
            for q in session.questions:
                if q.opened_at is None:
                    continue
                await s.execute(
                    update(QuizSessionQuestion)
                    .where(QuizSessionQuestion.session_id == session.id, QuizSessionQuestion.position == q.position)
                    .values(opened_at=q.opened_at, deadline=q.deadline, closed_at=q.closed_at)
                )
        return True

    async def session_status(self, session_id: str) -> str | None:
        """The stored status of a session (open, finished, stopped, expired), or None if unknown."""
        async with self._sf() as s:
            return await s.scalar(select(QuizSessionRow.status).where(QuizSessionRow.id == session_id))

    async def load_session(self, session_id: str) -> QuizSession | None:
        """A stored session with its questions and every recorded answer."""
        async with self._sf() as s:
            return await self._load(s, session_id)

    async def _load(self, s: AsyncSession, session_id: str) -> QuizSession | None:
        row = await s.get(QuizSessionRow, session_id, populate_existing=True)
        if row is None:
            return None
        qrows = (
            await s.scalars(
                select(QuizSessionQuestion)
                .where(QuizSessionQuestion.session_id == session_id)
                .order_by(QuizSessionQuestion.position)
                .execution_options(populate_existing=True)
            )
        ).all()
        questions = [
            SessionQuestion(
                position=q.position, question=QuizQuestion.model_validate(q.snapshot),
                order=tuple(q.choice_order), opened_at=_aware(q.opened_at), deadline=_aware(q.deadline),
                closed_at=_aware(q.closed_at),
            )
            for q in qrows
        ]
        answers = (
            await s.execute(
                select(QuizAnswer, Student.display_name)
                .join(Student, Student.id == QuizAnswer.student_id)
                .where(QuizAnswer.session_id == session_id)
                .execution_options(populate_existing=True)
            )
        ).all()
        for a, name in answers:
            if 0 <= a.position < len(questions):
                questions[a.position].answers[a.student_id] = Answer(
                    user_id=a.student_id, display_name=name, letter=a.letter, choice=a.choice,
                    correct=a.correct, points=a.points, answered_at=_aware(a.answered_at), elapsed=a.elapsed,
                    changes=a.changes,
                )
        return QuizSession(
            id=row.id, guild_id=row.guild_id, channel_id=row.channel_id, starter_id=row.starter_id,
            course_id=row.course_id, seconds=row.seconds, questions=questions,
            created_at=_aware(row.created_at), kind=row.kind, allow_change=row.allow_change,
            idle_limit=row.idle_limit, difficulty=row.difficulty, tags=tuple(row.tags or ()), seed=row.seed,
            current=row.current_index, status=row.status, end_reason=row.end_reason,
            idle_streak=row.idle_streak, updated_at=_aware(row.updated_at), ended_at=_aware(row.ended_at),
        )

    async def open_sessions(self) -> list[QuizSession]:
        """Every session still marked open (for restart recovery), oldest first."""
        async with self._sf() as s:
            ids = (
                await s.scalars(
                    select(QuizSessionRow.id).where(QuizSessionRow.status == "open").order_by(QuizSessionRow.created_at)
                )
            ).all()
            out = []
            for sid in ids:
                loaded = await self._load(s, sid)
                if loaded is not None:
                    out.append(loaded)
            return out

    # --- answers ---------------------------------------------------------------------------

    async def record_answer(self, outcome: AnswerOutcome, *, guild_id: int | None) -> None:
        """Store a student's answer (replacing their earlier one for that question); committed on return.

        ``guild_id``: the guild whose leaderboard it counts for (None for review quizzes and DMs).
        """
        if outcome.kind == "unchanged":
            return
        now = _utc(outcome.answered_at)
        async with self._write() as s:
            stu = self._insert(Student).values(id=outcome.user_id, display_name=outcome.display_name, updated_at=now)
            await s.execute(
                stu.on_conflict_do_update(
                    index_elements=[Student.id],
                    set_={"display_name": stu.excluded.display_name, "updated_at": stu.excluded.updated_at},
                )
            )
            ins = self._insert(QuizAnswer).values(
                session_id=outcome.session_id, position=outcome.position, student_id=outcome.user_id,
                guild_id=guild_id, question_id=outcome.question_id, topic=outcome.topic, letter=outcome.letter,
                choice=outcome.choice, correct=outcome.correct, points=outcome.points, elapsed=outcome.elapsed,
                changes=outcome.changes, answered_at=now,
            )
            await s.execute(
                ins.on_conflict_do_update(
                    index_elements=[QuizAnswer.session_id, QuizAnswer.position, QuizAnswer.student_id],
                    set_={
                        k: getattr(ins.excluded, k)
                        for k in ("letter", "choice", "correct", "points", "elapsed", "changes", "answered_at")
                    },
                )
            )

    async def answer_count(self, session_id: str | None = None) -> int:
        async with self._sf() as s:
            q = select(func.count()).select_from(QuizAnswer)
            if session_id is not None:
                q = q.where(QuizAnswer.session_id == session_id)
            return int(await s.scalar(q) or 0)

    # --- finishing -------------------------------------------------------------------------

    async def finish_session(
        self, session_id: str, *, status: str, end_reason: str | None, now: datetime
    ) -> Results | None:
        """End a session and, in the same transaction, add it to the guild leaderboard (channel quizzes)
        and update the students' review boxes. Exactly once: finishing an ended session changes nothing
        and returns its results. None if the session does not exist."""
        if status not in ("finished", "stopped", "expired"):
            raise ValueError(f"not a final status: {status!r}")
        now = _utc(now)
        async with self._write() as s:
            res = await s.execute(
                update(QuizSessionRow)
                .where(QuizSessionRow.id == session_id, QuizSessionRow.status == "open")
                .values(status=status, end_reason=end_reason, ended_at=now, updated_at=now)
            )
            claimed = res.rowcount == 1
            if claimed:
                await s.execute(
                    update(QuizSessionQuestion)
                    .where(
                        QuizSessionQuestion.session_id == session_id,
                        QuizSessionQuestion.opened_at.is_not(None),
                        QuizSessionQuestion.closed_at.is_(None),
                    )
                    .values(closed_at=now)
                )
            session = await self._load(s, session_id)
            if session is None:
                return None
            if claimed:
                await self._add_to_totals(s, session, now)
        return compute_results(session)

    async def _add_to_totals(self, s: AsyncSession, session: QuizSession, now: datetime) -> None:
        per_student: dict[int, list[Answer]] = defaultdict(list)
        for q in session.questions:
            for a in q.answers.values():
                per_student[a.user_id].append(a)
        if not per_student:
            return
        if session.kind == "channel" and session.guild_id is not None:
            for uid in sorted(per_student):  # a fixed order: no deadlocks between concurrent finishes
                answers = per_student[uid]
                outcomes = [a.correct for a in answers]  # in question order
                _all, leading, trailing, longest = streak_summary(outcomes)
                n = len(outcomes)
                ins = self._insert(QuizScore).values(
                    guild_id=session.guild_id, student_id=uid, total=sum(a.points for a in answers), quizzes=1,
                    correct=sum(outcomes), answered=n, current_streak=trailing, best_streak=longest,
                    updated_at=now,
                )
                t = QuizScore.__table__.c
                await s.execute(
                    ins.on_conflict_do_update(
                        index_elements=[QuizScore.guild_id, QuizScore.student_id],
                        set_={
                            "total": t.total + ins.excluded.total,
                            "quizzes": t.quizzes + 1,
                            "correct": t.correct + ins.excluded.correct,
                            "answered": t.answered + ins.excluded.answered,
                            "current_streak": t.current_streak + n if _all else trailing,
                            "best_streak": self._greatest(t.best_streak, t.current_streak + leading, longest),
                            "updated_at": now,
                        },
                    )
                )
        # Spaced review (see knowledge.quiz.schedule_review): wrong -> box 1; correct and due -> up a box.
        wrong = [
            {"student_id": uid, "course_id": session.course_id, "question_id": q.question.id, "box": 1,
             "due_at": now + REVIEW_INTERVALS[1], "lapses": 1, "updated_at": now}
            for q in session.questions
            for uid, a in sorted(q.answers.items())
            if not a.correct
        ]
        if wrong:
            wrong.sort(key=lambda r: (r["student_id"], r["question_id"]))
            ins = self._insert(ReviewItem).values(wrong)
            r = ReviewItem.__table__.c
            await s.execute(
                ins.on_conflict_do_update(
                    index_elements=[ReviewItem.student_id, ReviewItem.course_id, ReviewItem.question_id],
                    set_={"box": 1, "due_at": ins.excluded.due_at, "lapses": r.lapses + 1, "updated_at": now},
                )
            )
        right = sorted(
            (uid, q.question.id) for q in session.questions for uid, a in q.answers.items() if a.correct
        )
        if right:
            r = ReviewItem.__table__.c
            new_due = case(
                *((r.box == b, now + REVIEW_INTERVALS[min(MAX_BOX, b + 1)]) for b in range(1, MAX_BOX)),
                else_=now + REVIEW_INTERVALS[MAX_BOX],
            )
            for chunk in (right[i:i + 400] for i in range(0, len(right), 400)):
                await s.execute(
                    ReviewItem.__table__.update()
                    .where(
                        r.course_id == session.course_id,
                        tuple_(r.student_id, r.question_id).in_(chunk),
                        r.due_at <= now,
                    )
                    .values(
                        box=case((r.box >= MAX_BOX, MAX_BOX), else_=r.box + 1),
                        due_at=new_due,
                        updated_at=now,
                    )
                )

    # --- leaderboards and stats ------------------------------------------------------------

    async def leaderboard(
        self, guild_id: int, limit: int = 10, *, since: datetime | None = None
    ) -> list[LeaderboardRow]:
        """The guild's top students: all-time totals, or points earned since ``since`` (from the answers;
        streaks are all-time only). Ties share a rank."""
        limit = max(1, min(int(limit), 100))
        async with self._sf() as s:
            if since is None:
                rows = (
                    await s.execute(
                        select(
                            QuizScore.student_id, Student.display_name, QuizScore.total, QuizScore.quizzes,
                            QuizScore.correct, QuizScore.answered, QuizScore.current_streak, QuizScore.best_streak,
                        )
                        .join(Student, Student.id == QuizScore.student_id)
                        .where(QuizScore.guild_id == guild_id)
                        .order_by(QuizScore.total.desc(), QuizScore.correct.desc(), QuizScore.student_id)
                        .limit(limit)
                    )
                ).all()
            else:
                total = func.sum(QuizAnswer.points)
                correct = func.sum(case((QuizAnswer.correct, 1), else_=0))
                agg = (
                    select(
                        QuizAnswer.student_id.label("student_id"),
                        total.label("total"),
                        func.count(func.distinct(QuizAnswer.session_id)).label("quizzes"),
                        correct.label("correct"),
                        func.count().label("answered"),
                    )
                    .where(QuizAnswer.guild_id == guild_id, QuizAnswer.answered_at >= _utc(since))
                    .group_by(QuizAnswer.student_id)
                    .order_by(total.desc(), correct.desc(), QuizAnswer.student_id)
                    .limit(limit)
                    .subquery()
                )
                rows = [
                    (*r, 0, 0)
                    for r in (
                        await s.execute(
                            select(agg.c.student_id, Student.display_name, agg.c.total, agg.c.quizzes,
                                   agg.c.correct, agg.c.answered)
                            .join(Student, Student.id == agg.c.student_id)
                            .order_by(agg.c.total.desc(), agg.c.correct.desc(), agg.c.student_id)
                        )
                    ).all()
                ]
        ranked = rank_rows(rows, key=lambda r: r[2])
        return [
            LeaderboardRow(rank, r[0], r[1], int(r[2] or 0), int(r[3] or 0), int(r[4] or 0), int(r[5] or 0),
                           int(r[6] or 0), int(r[7] or 0))
            for rank, r in ranked
        ]

    async def student_stats(
        self, student_id: int, *, guild_id: int | None = None, course_id: str | None = None,
        now: datetime | None = None,
    ) -> StudentStats:
        """A student's accuracy overall and by topic (every quiz, or one guild's), and review counts."""
        async with self._sf() as s:
            q = (
                select(QuizAnswer.topic, func.count(), func.sum(case((QuizAnswer.correct, 1), else_=0)))
                .where(QuizAnswer.student_id == student_id)
                .group_by(QuizAnswer.topic)
                .order_by(QuizAnswer.topic)
            )
            if guild_id is not None:
                q = q.where(QuizAnswer.guild_id == guild_id)
            topics = [TopicStat(t, int(n), int(c or 0)) for t, n, c in (await s.execute(q)).all()]
            now = _utc(now) if now is not None else datetime.now(UTC)
            rq = select(func.count(), func.sum(case((ReviewItem.due_at <= now, 1), else_=0))).where(
                ReviewItem.student_id == student_id
            )
            if course_id is not None:
                rq = rq.where(ReviewItem.course_id == course_id)
            review = (await s.execute(rq)).one()
        return StudentStats(
            user_id=student_id,
            answered=sum(t.answered for t in topics),
            correct=sum(t.correct for t in topics),
            by_topic=tuple(topics),
            review_total=int(review[0] or 0),
            review_due=int(review[1] or 0),
        )

    async def due_review_items(
        self, student_id: int, course_id: str, now: datetime, limit: int = 25
    ) -> list[ReviewEntry]:
        """The student's review items due at ``now``, most overdue first (lower boxes first on ties)."""
        async with self._sf() as s:
            rows = (
                await s.scalars(
                    select(ReviewItem)
                    .where(and_(ReviewItem.student_id == student_id, ReviewItem.course_id == course_id,
                                ReviewItem.due_at <= _utc(now)))
                    .order_by(ReviewItem.due_at, ReviewItem.box, ReviewItem.question_id)
                    .limit(limit)
                )
            ).all()
            return [self._entry(r) for r in rows]

    async def review_items(self, student_id: int, course_id: str | None = None) -> list[ReviewEntry]:
        async with self._sf() as s:
            q = select(ReviewItem).where(ReviewItem.student_id == student_id)
            if course_id is not None:
                q = q.where(ReviewItem.course_id == course_id)
            rows = (await s.scalars(q.order_by(ReviewItem.due_at, ReviewItem.question_id))).all()
            return [self._entry(r) for r in rows]

    @staticmethod
    def _entry(r: ReviewItem) -> ReviewEntry:
        return ReviewEntry(r.student_id, r.course_id, r.question_id, r.box, _aware(r.due_at), r.lapses)

    async def delete_session(self, session_id: str) -> None:
        """Remove a session that was never started (e.g. its first message could not be posted)."""
        async with self._write() as s:
            await s.execute(
                delete(QuizSessionRow).where(QuizSessionRow.id == session_id, QuizSessionRow.current_index < 0)
            )
