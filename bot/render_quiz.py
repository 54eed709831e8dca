"""Pure rendering of quizzes, leaderboards, stats and flashcards: domain objects -> embeds and text.

Nothing here talks to Discord; every function is deterministic and tested on its own
(tests/bot/test_e2e_quiz.py, "rendering" section). The rules of ``bot.render`` apply:

- Discord's limits: title 256, description 4096, field name 256 / value 1024, footer 2048, 6000 in
  all the embeds of a message, 25 fields. Long text is trimmed with an ellipsis at a word boundary;
  long lists end in "…and N more".
- No pings: every echoed text (questions, choices, explanations, display names) goes through
  ``render.neutralize``; display names are also markdown-escaped, so a student called
  ``@everyone`` or ``**boss**`` is shown as text. The bot also sends ``allowed_mentions=none``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import discord

from bot.render import (
    DESCRIPTION_LIMIT,
    FIELD_NAME_LIMIT,
    FIELD_VALUE_LIMIT,
    FIELDS_PER_EMBED,
    FOOTER_LIMIT,
    TITLE_LIMIT,
    join_lines,
    neutralize,
    one_line,
    trim,
)
from knowledge.course import Flashcard
from knowledge.quiz import LeaderboardRow, QuestionView, Results, Reveal, StudentStats

QUESTION_COLOR = discord.Color.blurple()
CLOSED_COLOR = discord.Color.dark_grey()
REVEAL_COLOR = discord.Color.green()
RESULTS_COLOR = discord.Color.gold()
CARD_COLOR = discord.Color.teal()
REFUSAL_COLOR = discord.Color.orange()

BUTTON_LABEL_LIMIT = 80  # Discord's limit for a button label
NAME_LIMIT = 40  # display names are cut to this in lists
MEDALS = {1: "🥇", 2: "🥈", 3: "🥉"}

END_REASONS = {
    "completed": "All questions asked.",
    "stopped": "Stopped before the end.",
    "idle": "Nobody answered for several questions in a row, so the quiz ended itself.",
    "restart": "Interrupted by a bot restart; the answers given before it count.",
    "error": "Ended by an error on the bot's side; the answers given before it count.",
    "unreachable": "Ended because the bot could not post in this channel; the answers given count.",
}


# ------------------------------------------------------------------------------------------ text helpers
def name(display_name: str, limit: int = NAME_LIMIT) -> str:
    """A display name as inert text: no pings, no markdown, one line, at most ``limit`` characters."""
    text = one_line(display_name or "") or "someone"
    return discord.utils.escape_markdown(neutralize(trim(text, limit)), as_needed=False)


def safe(text: str, limit: int) -> str:
    """Echoed course text (question, choice, explanation): neutralized and trimmed to ``limit``."""
    return trim(neutralize((text or "").strip()), limit)


def join_inline(items: Sequence[str], limit: int, sep: str = ", ") -> str:
    """Items on one line, as many as fit in ``limit``, then "…and N more"."""
    if len(sep.join(items)) <= limit:
        return sep.join(items)
    out = ""
    for i, item in enumerate(items):
        left = len(items) - i - 1
        candidate = f"{out}{sep}{item}" if out else item
        reserve = len(f"{sep}…and {left} more") if left else 0
        if len(candidate) + reserve > limit:
            more = f"…and {len(items) - i} more"
            return f"{out}{sep}{more}" if out else more
        out = candidate
    return out


def _field(embed: discord.Embed, title: str, value: str, *, inline: bool = False) -> None:
    if len(embed.fields) >= FIELDS_PER_EMBED or not value.strip():
        return
    embed.add_field(name=trim(title, FIELD_NAME_LIMIT), value=trim(value, FIELD_VALUE_LIMIT), inline=inline)


def _pct(x: float) -> str:
    return f"{x:.0%}"


def seconds_left(view: QuestionView, now: datetime) -> int:
    """Whole seconds until the deadline (never negative)."""
    return max(0, int((view.deadline - now).total_seconds() + 0.999))


def button_label(letter: str, text: str) -> str:
    """``"B · Fine-tuning"``: the letter first, within Discord's 80-character label."""
    return trim(f"{letter} · {neutralize(one_line(text))}", BUTTON_LABEL_LIMIT)


# ------------------------------------------------------------------------------------------ questions
def question_embed(
    view: QuestionView,
    *,
    now: datetime,
    answered: int = 0,
    closed: bool = False,
    resumed: bool = False,
    allow_change: bool = True,
    review: bool = False,
) -> discord.Embed:
    """Question N of M with its lettered choices and the countdown (edited in place while it runs).

    The countdown line carries Discord's relative timestamp (``<t:…:R>``), which every client
    counts down by itself, plus the seconds left and the number of answers at the last edit.
    """
    kind = "Review question" if review else "Question"
    title = f"{kind} {view.number}/{view.total}"
    choices = "\n".join(f"**{letter}.** {safe(text, 300)}" for letter, text in view.choices)
    room = DESCRIPTION_LIMIT - len(choices) - 2
    description = f"{safe(view.text, max(room, 100))}\n\n{choices}"
    embed = discord.Embed(
        title=trim(title, TITLE_LIMIT),
        description=trim(description, DESCRIPTION_LIMIT),
        color=CLOSED_COLOR if closed else QUESTION_COLOR,
    )
    who = "answer" if answered == 1 else "answers"
    if closed:
        status = f"⏱️ Time is up · {answered} {who}"
    else:
        left = seconds_left(view, now)
        status = f"⏳ Ends {discord.utils.format_dt(view.deadline, 'R')} · {left} s left · {answered} {who}"
    if resumed and not closed:
        status += "\n🔁 Resumed after a bot restart: earlier answers still count."
    _field(embed, "Time", status)
    rules = "one answer each; click again to change it" if allow_change else "one answer each, final"
    footer = f"{view.difficulty} · {view.topic} · {view.seconds} s · {rules}"
    embed.set_footer(text=trim(neutralize(footer), FOOTER_LIMIT))
    return embed


# ------------------------------------------------------------------------------------------ reveal
def reveal_embed(reveal: Reveal, *, idle_limit: int | None = None) -> discord.Embed:
    """The answer: right letter and text, explanation, common mistakes, who picked what, who got it."""
    title = f"Question {reveal.number}/{reveal.total}: the answer is {reveal.correct_letter}"
    head = f"**{reveal.correct_letter}. {safe(reveal.correct_text, 500)}**"
    # 1500 + 500 here, 1024 for the explanation, 600 for the mistakes, 1024 for the names: < 6000
    embed = discord.Embed(
        title=trim(title, TITLE_LIMIT),
        description=f"{safe(reveal.question, 1500)}\n\n{head}",
        color=REVEAL_COLOR,
    )
    _field(embed, "Explanation", safe(reveal.explanation, FIELD_VALUE_LIMIT))
    if reveal.common_mistakes:
        lines = [f"• {safe(m, 300)}" for m in reveal.common_mistakes]
        _field(embed, "Common mistakes", join_lines(lines, 600))
    counts = " · ".join(
        (
            f"**{letter} {reveal.counts.get(letter, 0)}** ✅"
            if letter == reveal.correct_letter
            else f"{letter} {reveal.counts.get(letter, 0)}"
        )
        for letter, _ in reveal.choices
    )
    _field(embed, f"Answers ({reveal.answered})", counts)
    if reveal.correct_users:
        right = [f"{name(n)} (+{pts})" for _uid, n, pts in reveal.correct_users]
        _field(embed, "Got it right (fastest first)", join_inline(right, FIELD_VALUE_LIMIT))
    else:
        _field(embed, "Got it right", "Nobody this time.")
    if reveal.session_over:
        footer = END_REASONS.get(reveal.end_reason or "completed", "The quiz is over.")
        if reveal.end_reason == "idle" and idle_limit:
            footer = f"No answers for {idle_limit} questions in a row, so the quiz ends here."
        elif reveal.end_reason is None:
            footer = "That was the last question. Results next."
    else:
        footer = "Next question in a few seconds…"
    embed.set_footer(text=trim(footer, FOOTER_LIMIT))
    return embed


# ------------------------------------------------------------------------------------------ results
def result_lines(results: Results) -> list[str]:
    lines = []
    for row in results.rows:
        medal = MEDALS.get(row.rank, f"**{row.rank}.**")
        lines.append(
            f"{medal} {name(row.display_name)}: **{row.points}** pts · {row.correct}/{row.asked} right · "
            f"avg {row.avg_seconds:.1f} s"
        )
    return lines


def leaderboard_lines(rows: Sequence[LeaderboardRow], *, period: bool = False) -> list[str]:
    lines = []
    for row in rows:
        medal = MEDALS.get(row.rank, f"**{row.rank}.**")
        quizzes = f"{row.quizzes} quiz" + ("" if row.quizzes == 1 else "zes")
        line = (
            f"{medal} {name(row.display_name)}: **{row.total}** pts · {quizzes} · {_pct(row.accuracy)} right"
        )
        if not period and row.best_streak:
            line += f" · best streak {row.best_streak}"
        lines.append(line)
    return lines


def results_embeds(
    results: Results, *, title: str | None = None, note: str | None = None
) -> list[discord.Embed]:
    """The results table, then the guild leaderboard (if any): two embeds, well within 6000."""
    head = title or ("Review results" if results.kind == "review" else "Quiz results")
    embed = discord.Embed(title=trim(f"🏁 {head}", TITLE_LIMIT), color=RESULTS_COLOR)
    lines = result_lines(results)
    body = join_lines(lines, 3000) if lines else "Nobody answered."
    intro = [f"{results.asked} of {results.total} questions asked."]
    if results.end_reason and results.end_reason != "completed":
        intro.append(END_REASONS.get(results.end_reason, f"Ended: {results.end_reason}."))
    if note:
        intro.append(safe(note, 300))
    embed.description = trim(" ".join(intro) + "\n\n" + body, DESCRIPTION_LIMIT)
    embed.set_footer(text="100 points per right answer + up to 50 for speed. Scores are saved.")
    embeds = [embed]
    if results.leaderboard:
        embeds.append(leaderboard_embed(results.leaderboard))
    return embeds


def leaderboard_embed(rows: Sequence[LeaderboardRow], *, period: str | None = None) -> discord.Embed:
    """The guild's leaderboard (all time, or ``period`` e.g. "this week")."""
    title = "🏆 Leaderboard" + (f" ({period})" if period else "")
    embed = discord.Embed(title=title, color=RESULTS_COLOR)
    lines = leaderboard_lines(rows, period=period is not None)
    embed.description = (
        join_lines(lines, 2000) if lines else "No quiz scores yet. Start one with `/quiz start`."
    )
    return embed


# ------------------------------------------------------------------------------------------ stats
def stats_embed(stats: StudentStats, display_name: str) -> discord.Embed:
    """A student's accuracy overall and by topic, weakest topics and review items due."""
    embed = discord.Embed(
        title=trim(f"📊 Quiz stats for {name(display_name)}", TITLE_LIMIT), color=QUESTION_COLOR
    )
    if not stats.answered:
        embed.description = "No quiz answers yet. Join a `/quiz start` or try `/flashcard`."
    else:
        embed.description = f"**{stats.correct}/{stats.answered}** right overall ({_pct(stats.accuracy)})."
        lines = [
            f"`{safe(t.topic, 40)}`: {t.correct}/{t.answered} ({_pct(t.accuracy)})"
            for t in sorted(stats.by_topic, key=lambda t: (-t.answered, t.topic))
        ]
        _field(embed, "By topic", join_lines(lines, FIELD_VALUE_LIMIT))
        weak = [t for t in stats.weakest(3) if t.accuracy < 1.0]
        if weak:
            _field(embed, "To practise", ", ".join(f"`{safe(t.topic, 40)}`" for t in weak))
    if stats.review_total:
        due = (
            f"**{stats.review_due}** due now: `/quiz review` to practise them."
            if stats.review_due
            else "None due right now; missed questions come back after 1, 3, 7, 14, 30 days."
        )
        _field(embed, f"Spaced review ({stats.review_total} questions)", due)
    return embed


# ------------------------------------------------------------------------------------------ flashcards
def card_embed(card: Flashcard, *, flipped: bool = False) -> discord.Embed:
    """A flashcard: the front, and the back once flipped."""
    embed = discord.Embed(
        title="🃏 Flashcard" + (" (flipped)" if flipped else ""),
        description=safe(card.front, DESCRIPTION_LIMIT - 1200),
        color=CARD_COLOR,
    )
    if flipped:
        _field(embed, "Answer", safe(card.back, FIELD_VALUE_LIMIT))
    else:
        embed.set_footer(text="Think of the answer, then flip the card.")
    if card.tags and flipped:
        embed.set_footer(text=trim(neutralize("Topics: " + ", ".join(card.tags)), FOOTER_LIMIT))
    return embed


# ------------------------------------------------------------------------------------------ short replies
def announcement(
    *,
    questions: int,
    seconds: int,
    difficulty: str | None,
    tags: Sequence[str],
    starter: str,
    review: bool = False,
) -> discord.Embed:
    """The reply to /quiz start (or /quiz review): what is about to happen."""
    what = "Review quiz" if review else "Quiz"
    q = f"{questions} question" + ("" if questions == 1 else "s")
    parts = [f"{q}, {seconds} s each"]
    if difficulty:
        parts.append(f"difficulty {difficulty}")
    if tags:
        parts.append("topics " + ", ".join(f"`{safe(t, 40)}`" for t in tags))
    text = " · ".join(parts)
    if review:
        text += "\nOnly you see this review. Questions you miss come back on a schedule."
    else:
        text += f"\nStarted by {name(starter)}. Click a letter to answer; the first question is coming up."
    return discord.Embed(
        title=f"🎯 {what} starting", description=trim(text, DESCRIPTION_LIMIT), color=QUESTION_COLOR
    )


def ack_text(ok: bool, message: str) -> str:
    """The ephemeral reply to a click: "✅ Recorded B." / "⏱️ Time is up for this question."."""
    prefix = "✅" if ok else ("⏱️" if "Time is up" in message else "⚠️")
    return trim(neutralize(f"{prefix} {message}"), 2000)
