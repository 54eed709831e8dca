"""The real TutorBot against the fake Discord server: asking, feedback, admin, limits, failures.

Assertions are on the REST payloads the bot sent. The happy paths run the real Tutor (sample
course, real MiniLM, extractive answers: ``real_tutor``); timing and failure cases use the scripted
``StandInTutor``. The database is a migrated SQLite.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time

import discord
import pytest
from sqlalchemy import delete, select

from bot import errors
from bot.client import TokenError, run_bot
from knowledge.generation import GenerationError
from knowledge.store.db import create_engine, create_session_factory
from knowledge.store.qa_models import AnswerLog, Feedback
from tests.bot.conftest import StandInRuntime, StandInTutor

EPHEMERAL = 64
NO_MENTIONS = {"parse": []}


def pings_nobody(allowed_mentions: dict | None) -> bool:
    """Empty ``allowed_mentions``: nothing parsed, no users or roles listed, no reply ping."""
    am = allowed_mentions or {}
    return (
        am.get("parse") == [] and not am.get("users") and not am.get("roles") and not am.get("replied_user")
    )


def buttons(payload: dict) -> list[dict]:
    return [c for row in payload.get("components", []) for c in row.get("components", [])]


def all_text(payload: dict) -> str:
    parts = [payload.get("content") or ""]
    for e in payload.get("embeds", []):
        parts += [e.get("title") or "", e.get("description") or "", (e.get("footer") or {}).get("text", "")]
        parts += [f"{f['name']} {f['value']}" for f in e.get("fields", [])]
    return "\n".join(parts)


async def rows(session_factory, model):
    async with session_factory() as s:
        return list((await s.scalars(select(model).order_by(model.id))).all())


# ------------------------------------------------------------------------------------------ /ask
async def test_ask_defers_then_answers_with_sources_and_feedback_buttons(
    fake_discord, run_bot, make_tutor_bot, bot_session_factory, real_tutor
):
    async with run_bot(make_tutor_bot(tutor=real_tutor)):
        t0 = time.monotonic()
        it = await fake_discord.slash("ask", question="What is pre-training?", user="alice")
        deferral = await it.callback()
        assert deferral.json["type"] == 5  # deferred: "TutorBot is thinking..."
        assert deferral.time - t0 < 1.0  # well inside Discord's 3 s
        assert not (deferral.json.get("data") or {}).get("flags", 0) & EPHEMERAL

        reply = await it.reply(timeout=15)
        assert reply["allowed_mentions"] == NO_MENTIONS
        embed = reply["embeds"][0]
        assert "What is pre-training?" in embed["title"]
        assert "general patterns" in embed["description"]  # from the course, extractively
        sources = next(f for f in embed["fields"] if f["name"] == "Sources")["value"].splitlines()
        assert sources and all(
            line.startswith(f"{i}. ") and " > " in line for i, line in enumerate(sources, 1)
        )
        (answer,) = await rows(bot_session_factory, AnswerLog)
        assert [b["custom_id"] for b in buttons(reply)] == [f"fb:{answer.id}:up", f"fb:{answer.id}:down"]
        # the follow-up filled the "thinking" message, which carries the buttons
        assert fake_discord.components_of(it.original)[0]["custom_id"] == f"fb:{answer.id}:up"

    assert answer.question == "What is pre-training?" and answer.user_id == fake_discord.users["alice"].id
    assert answer.guild_id == fake_discord.guild.id and answer.course_id == "pretraining-finetuning"
    assert answer.answered and answer.mode == "extractive"
    assert [f"{s['title']} > {s['section']}" for s in answer.sources][: len(sources)] == [
        line.split(". ", 1)[1] for line in sources
    ]
    assert answer.latency_ms > 0  # measured by the bot, queue and generation included


async def test_an_off_topic_question_is_declined_honestly(fake_discord, run_bot, make_tutor_bot, real_tutor):
    async with run_bot(make_tutor_bot(tutor=real_tutor)):
        it = await fake_discord.slash("ask", question="What is the capital of France?")
        embed = (await it.reply(timeout=15))["embeds"][0]
        assert "doesn't cover" in embed["description"]
        assert "doesn't cover" in embed["footer"]["text"]


async def test_private_ask_is_ephemeral(fake_discord, run_bot, make_tutor_bot):
    async with run_bot(make_tutor_bot()):
        it = await fake_discord.slash("ask", question="Secret question", private=True)
        assert (await it.callback()).json["data"]["flags"] & EPHEMERAL
        reply = await it.reply()
        assert reply["flags"] & EPHEMERAL
        assert it.original["flags"] & EPHEMERAL


@pytest.mark.parametrize("tutor_kind", ["real", "echoing"])
async def test_everyone_in_a_question_never_pings(
    fake_discord, run_bot, make_tutor_bot, real_tutor, tutor_kind
):
    nasty = "@everyone @here <@123456789012345678> <@&223456789012345678> what is LoRA?"
    tutor = real_tutor if tutor_kind == "real" else StandInTutor()  # the stand-in echoes mentions back
    async with run_bot(make_tutor_bot(tutor=tutor)):
        it = await fake_discord.slash("ask", question=nasty)
        reply = await it.reply(timeout=15)
        assert reply["allowed_mentions"] == NO_MENTIONS
        text = all_text(reply)
        assert "@everyone" not in text and "@here" not in text
        assert "<@123456789012345678>" not in text and "<@&223456789012345678>" not in text

        msg = await fake_discord.send_message(f"{fake_discord.bot_user.mention} {nasty}", user="bob")
        rec = await msg.reply()
        assert pings_nobody(rec.json["allowed_mentions"])
        assert "@everyone" not in all_text(rec.json)
        # every message the bot sent carried empty allowed_mentions
        sent = fake_discord.find(
            predicate=lambda r: (
                r.method in ("POST", "PATCH")
                and isinstance(r.json, dict)
                and ("content" in r.json or "embeds" in r.json)
            )
        )
        assert sent and all(pings_nobody(r.json.get("allowed_mentions")) for r in sent)


async def test_rate_limit_gives_a_friendly_wait_message(fake_discord, run_bot, make_tutor_bot, make_settings):
    tutor = StandInTutor()
    bot = make_tutor_bot(tutor=tutor, settings=make_settings(user_rate=2, channel_rate=3, rate_window_s=60))
    async with run_bot(bot):
        for q in ("one", "two"):
            await (await fake_discord.slash("ask", question=q, user="alice")).reply()
        it = await fake_discord.slash("ask", question="three", user="alice")
        refusal = await it.callback()
        assert refusal.json["type"] == 4  # answered at once, not deferred
        assert refusal.json["data"]["flags"] & EPHEMERAL
        assert "try again in" in refusal.json["data"]["content"]
        assert (
            "59 seconds" in refusal.json["data"]["content"] or "1 minute" in refusal.json["data"]["content"]
        )
        # bob may still ask once, then the channel's limit (3) is reached for him too
        await (await fake_discord.slash("ask", question="four", user="bob")).reply()
        it = await fake_discord.slash("ask", question="five", user="bob")
        assert "This channel" in (await it.callback()).json["data"]["content"]
        # another channel is unaffected
        await (await fake_discord.slash("ask", question="six", user="bob", channel="questions")).reply()
        # mentions count too, and get the message as a reply
        msg = await fake_discord.send_message(f"{fake_discord.bot_user.mention} seven", user="alice")
        assert "try again in" in (await msg.reply()).json["content"]
        spam = await fake_discord.send_message(f"{fake_discord.bot_user.mention} eight", user="alice")
        await fake_discord.assert_no_request("POST", r"/messages$", after=spam.start)  # told once is enough
    assert tutor.questions == ["one", "two", "four", "six"]


async def test_concurrent_generations_are_capped_and_queued(
    fake_discord, run_bot, make_tutor_bot, make_settings
):
    tutor = StandInTutor(delay=0.15)
    settings = make_settings(max_concurrent_generations=2, user_rate=10, channel_rate=10)
    async with run_bot(make_tutor_bot(tutor=tutor, settings=settings)):
        handles = [
            await fake_discord.slash("ask", question=f"q{i}", user=u)
            for i, u in enumerate(["alice", "bob", "carol", "alice", "bob"])
        ]
        for h in handles:
            assert (await h.callback()).json["type"] == 5  # everyone is told "thinking" at once
        for h in handles:
            assert (await h.reply(timeout=5))["embeds"]
    assert tutor.max_active == 2
    assert sorted(tutor.questions) == [f"q{i}" for i in range(5)]


async def test_recent_exchanges_are_passed_as_history(fake_discord, run_bot, make_tutor_bot):
    tutor = StandInTutor()
    async with run_bot(make_tutor_bot(tutor=tutor)):
        await (await fake_discord.slash("ask", question="What is pre-training?", user="alice")).reply()
        await (await fake_discord.slash("ask", question="and why is that useful?", user="alice")).reply()
        await (await fake_discord.slash("ask", question="unrelated", user="bob")).reply()
        await (await fake_discord.slash("ask", question="elsewhere", user="alice", channel="quiz")).reply()
    assert tutor.histories[0] == ()
    first, reply = tutor.histories[1]
    assert (first.role, first.content) == ("user", "What is pre-training?")
    assert reply.role == "assistant" and reply.content.startswith("Pre-training teaches")
    assert tutor.histories[2] == () and tutor.histories[3] == ()  # other student; other channel


# ------------------------------------------------------------------------------------------ feedback
async def test_feedback_votes_and_comment_are_stored_and_survive_a_restart(
    fake_discord, run_bot, make_tutor_bot, bot_session_factory, real_tutor
):
    async with run_bot(make_tutor_bot(tutor=real_tutor)):
        it = await fake_discord.slash("ask", question="What is fine-tuning?", user="alice")
        await it.reply(timeout=15)
        answer_msg = it.original

        up = await fake_discord.click(answer_msg, label="Helpful", user="bob")
        thanks = await up.callback()
        assert thanks.json["type"] == 4 and thanks.json["data"]["flags"] & EPHEMERAL
        assert thanks.json["data"]["allowed_mentions"] == NO_MENTIONS

        down = await fake_discord.click(answer_msg, label="Not helpful", user="carol")
        modal = await down.modal()
        assert modal.title == "What was wrong?"
        done = await fake_discord.submit_modal(
            modal, {"What was wrong? (optional)": "It cited the wrong lesson"}
        )
        assert "Thanks" in (await done.reply())["content"]

    votes = {(f.user_id, f.vote, f.comment) for f in await rows(bot_session_factory, Feedback)}
    assert votes == {
        (fake_discord.users["bob"].id, 1, None),
        (fake_discord.users["carol"].id, -1, "It cited the wrong lesson"),
    }

    # a new process: the buttons on the old message still work (DynamicItem, no stored view)
    async with run_bot(make_tutor_bot(tutor=real_tutor)):
        again = await fake_discord.click(answer_msg, label="Not helpful", user="bob")  # bob changes his mind
        await again.modal()
    bob = [f for f in await rows(bot_session_factory, Feedback) if f.user_id == fake_discord.users["bob"].id]
    assert [f.vote for f in bob] == [-1]


async def test_click_on_a_vanished_answer_is_explained(
    fake_discord, run_bot, make_tutor_bot, bot_session_factory
):
    async with run_bot(make_tutor_bot()):
        it = await fake_discord.slash("ask", question="q")
        await it.reply()
        async with bot_session_factory() as s:  # a maintainer purged the answer log meanwhile
            await s.execute(delete(AnswerLog))
            await s.commit()
        stale = await fake_discord.click(it.original, label="Helpful")
        reply = await stale.reply()
        assert "no longer available" in reply["content"] and reply["flags"] & EPHEMERAL


# ------------------------------------------------------------------------------------------ mentions, DMs
async def test_mentions_and_dms_are_answered(
    fake_discord, run_bot, make_tutor_bot, real_tutor, bot_session_factory
):
    async with run_bot(make_tutor_bot(tutor=real_tutor)):
        mark = fake_discord.mark()
        await fake_discord.send_message("chatting about pre-training without the bot", user="bob")
        msg = await fake_discord.send_message(
            f"hey {fake_discord.bot_user.mention} what is pre-training?", user="alice"
        )
        rec = await msg.reply(referencing=True, timeout=15)
        await msg.typing()  # the "thinking" state of a mention
        assert pings_nobody(rec.json["allowed_mentions"])
        embed = rec.json["embeds"][0]
        assert "general patterns" in embed["description"]
        assert embed["fields"][0]["name"] == "Sources"
        assert buttons(rec.json)[0]["custom_id"].startswith("fb:")
        assert len(fake_discord.find("POST", r"/channels/\d+/messages$", after=mark)) == 1

        dm = await fake_discord.send_dm("why use a low learning rate when fine-tuning?", user="carol")
        rec = await dm.reply(timeout=15)
        assert rec.json["embeds"][0]["fields"][0]["name"] == "Sources"

        empty = await fake_discord.send_message(fake_discord.bot_user.mention, user="alice")
        assert "Ask me something" in (await empty.reply()).json["content"]
    stored = await rows(bot_session_factory, AnswerLog)
    assert [(a.question, a.guild_id is None) for a in stored] == [
        ("hey what is pre-training?", False),
        ("why use a low learning rate when fine-tuning?", True),
    ]


async def test_thanks_in_a_dm_gets_a_short_reply_and_the_next_follow_up_still_follows_the_question(
    fake_discord, run_bot, make_tutor_bot, real_tutor
):
    async with run_bot(make_tutor_bot(tutor=real_tutor)):
        first = await (await fake_discord.send_dm("why fine-tune with a small learning rate?", user="bob")).reply(
            timeout=15
        )
        assert first.json["embeds"][0]["fields"][0]["name"] == "Sources"
        thanks = await (await fake_discord.send_dm("thanks!", user="bob")).reply(timeout=15)
        # a line of text, not another lecture on learning rates: no embed, no sources, nothing to rate
        assert thanks.json["content"].startswith("You're welcome")
        assert not thanks.json.get("embeds") and not buttons(thanks.json)
        # declined on its own (test_tutor); here it follows the question from before the thanks
        follow = await (await fake_discord.send_dm("how small are we talking", user="bob")).reply(timeout=15)
        embed = follow.json["embeds"][0]
        assert embed["fields"][0]["name"] == "Sources"
        assert "learning rate" in embed["description"].lower()


async def test_mention_answering_follows_guild_config(fake_discord, run_bot, make_tutor_bot):
    tutor = StandInTutor()
    async with run_bot(make_tutor_bot(tutor=tutor)):
        it = await fake_discord.slash("tutor config", add_channel="questions", user="mod")
        shown = await it.reply()
        assert "Tutor settings updated" in shown["embeds"][0]["title"]
        assert f"<#{fake_discord.guild.channel('questions').id}>" in all_text(shown)

        elsewhere = await fake_discord.send_message(f"{fake_discord.bot_user.mention} q1", channel="general")
        assert "I answer mentions in" in (await elsewhere.reply()).json["content"]
        here = await fake_discord.send_message(f"{fake_discord.bot_user.mention} q2", channel="questions")
        assert (await here.reply()).json["embeds"]

        await (await fake_discord.slash("tutor config", mention_answering=False, user="owner")).reply()
        mark = fake_discord.mark()
        await fake_discord.send_message(f"{fake_discord.bot_user.mention} q3", channel="questions")
        await fake_discord.assert_no_request("POST", r"/messages$", after=mark)
        # /ask keeps working everywhere
        assert (await (await fake_discord.slash("ask", question="q4", channel="general")).reply())["embeds"]
    assert tutor.questions == ["q2", "q4"]


async def test_minimum_intents_are_identified(fake_discord, run_bot, make_tutor_bot, make_settings, caplog):
    caplog.set_level(logging.DEBUG)
    privileged = discord.Intents(members=True, presences=True, message_content=True).value
    async with run_bot(make_tutor_bot()):
        ident = await fake_discord.wait_for_identify()
        await (await fake_discord.slash("ask", question="q")).reply()
    assert ident["token"] == fake_discord.token
    assert not any(fake_discord.token in r.getMessage() for r in caplog.records)  # even at DEBUG
    assert ident["intents"] == discord.Intents(guilds=True, guild_messages=True, dm_messages=True).value
    assert ident["intents"] & privileged == 0
    assert ident["shard"] == [0, 1]

    settings = make_settings(answer_on_mention=False, answer_in_dms=False)
    async with run_bot(make_tutor_bot(settings=settings)):
        ident = await fake_discord.wait_for_identify(2)
    assert ident["intents"] == discord.Intents(guilds=True).value


async def test_shards_split_guilds_and_keep_serving(fake_discord, run_bot, make_tutor_bot, make_settings):
    bot = make_tutor_bot(settings=make_settings(shard_count=2))

    async def no_identify_wait(shard_id, *, initial=False):  # Discord's 5 s between IDENTIFYs
        return None

    bot.before_identify_hook = no_identify_wait
    async with run_bot(bot):
        await fake_discord.wait_for_identify(2)
        assert sorted(tuple(i["shard"]) for i in fake_discord.identifies) == [(0, 2), (1, 2)]
        guild = bot.get_guild(fake_discord.guild.id)
        assert guild is not None and guild.shard_id == (fake_discord.guild.id >> 22) % 2
        assert (await (await fake_discord.slash("ask", question="q")).reply())["embeds"]
        # a gateway drop: the shards resume and the bot keeps answering
        await fake_discord.disconnect()
        await asyncio.sleep(0.3)
        assert (await (await fake_discord.slash("ask", question="after a drop")).reply(timeout=10))["embeds"]


async def test_commands_sync_to_the_dev_guild(fake_discord, run_bot, make_tutor_bot, make_settings):
    settings = make_settings(dev_guild_id=fake_discord.guild.id)
    async with run_bot(make_tutor_bot(settings=settings)):
        names = {c["name"] for c in fake_discord.commands[fake_discord.guild.id]}
        assert {"ask", "tutor"} <= names
        assert fake_discord.commands.get(None) is None  # nothing global
        it = await fake_discord.slash("ask", question="q")
        assert (await it.reply())["embeds"]


# ------------------------------------------------------------------------------------------ admin
async def test_admin_commands_need_manage_server_or_the_admin_role(
    fake_discord, run_bot, make_tutor_bot, make_settings, caplog
):
    runtime = StandInRuntime()
    settings = make_settings(admin_role="Tutor Admin")
    caplog.set_level(logging.INFO, logger="bot.audit")
    async with run_bot(make_tutor_bot(settings=settings, runtime=runtime)):
        refused = await fake_discord.slash("tutor reindex", user="alice")
        cb = await refused.callback()
        assert cb.json["type"] == 4 and cb.json["data"]["flags"] & EPHEMERAL
        assert "Manage Server" in cb.json["data"]["content"] and "Tutor Admin" in cb.json["data"]["content"]
        assert runtime.calls == []

        for who in ("mod", "ta", "owner"):  # Manage Server, the admin role, the owner
            it = await fake_discord.slash("tutor reindex", user=who)
            assert (await it.callback()).json["type"] == 5
            assert "42 chunks" in (await it.reply())["content"]
        assert runtime.calls == ["reindex"] * 3

        it = await fake_discord.slash("tutor reload-model", user="mod")
        assert "model v3 loaded" in (await it.reply())["content"]

        it = await fake_discord.slash("tutor status", user="ta")
        status = all_text(await it.reply())
        for expected in (
            "Tiny Course",
            "Index 42 chunks",
            "Model v3",
            "Uptime",
            "Database ok",
            "Answer latency",
        ):
            assert expected in status

        denied = await fake_discord.slash("tutor config", mention_answering=False, user="bob")
        assert "Manage Server" in (await denied.callback()).json["data"]["content"]

    audit = [r.getMessage() for r in caplog.records if r.name == "bot.audit"]
    alice = fake_discord.users["alice"].id
    assert any("refused /tutor reindex" in m and str(alice) in m for m in audit)
    assert any("/tutor reindex by mod" in m and "done" in m for m in audit)
    assert any("/tutor reload-model by mod" in m for m in audit)


async def test_a_failing_reindex_reports_why(fake_discord, run_bot, make_tutor_bot):
    from knowledge.course import CourseError

    class Broken(StandInRuntime):
        def reindex(self) -> str:
            raise CourseError("courses/x", ["lessons/03.md: front matter is not valid YAML"])

    async with run_bot(make_tutor_bot(runtime=Broken())):
        it = await fake_discord.slash("tutor reindex", user="owner")
        assert "front matter is not valid YAML" in (await it.reply())["content"]


async def test_admin_commands_drive_the_real_runtime(fake_discord, run_bot, make_tutor_bot, real_runtime):
    async with run_bot(make_tutor_bot(tutor=real_runtime.tutor, runtime=real_runtime)):
        it = await fake_discord.slash("tutor status", user="owner")
        status = all_text(await it.reply(timeout=15))
        assert "Pre-training and Fine-tuning (`pretraining-finetuning`)" in status
        assert "chunks" in status and "Model extractive" in status
        it = await fake_discord.slash("tutor reindex", user="owner")
        done = (await it.reply(timeout=60))["content"]
        assert "The index already matches the course (" in done  # nothing changed since it was built
        # answers keep flowing on the new index
        assert (await (await fake_discord.slash("ask", question="What is LoRA?")).reply(timeout=15))["embeds"]


# ------------------------------------------------------------------------------------------ failures
async def test_discord_429_is_retried_and_the_bot_keeps_serving(fake_discord, run_bot, make_tutor_bot):
    async with run_bot(make_tutor_bot()):
        fake_discord.fail("POST", r"^/webhooks/\d+/[^/]+$", 429, retry_after=0.2)
        fake_discord.fail("POST", r"/callback$", 429, retry_after=0.1)
        it = await fake_discord.slash("ask", question="q1")
        reply = await it.reply()
        assert reply["embeds"]
        assert [r.status for r in it.requests() if r.path.endswith("/callback")] == [429, 200]
        assert [r.status for r in it.requests() if r.path.startswith("/webhooks/")] == [429, 200]

        msg = await fake_discord.send_message(f"{fake_discord.bot_user.mention} q2")
        fake_discord.fail("POST", r"^/channels/\d+/messages$", 429, retry_after=0.1)
        assert (await msg.reply()).json["embeds"]
        again = await fake_discord.slash("ask", question="q3")
        assert (await again.reply())["embeds"]

        # a 500 is retried by discord.py after a second; the follow-up still arrives
        fake_discord.fail("POST", r"^/webhooks/\d+/[^/]+$", 500)
        late = await fake_discord.slash("ask", question="q4")
        assert (await late.reply(timeout=10))["embeds"]
        assert [r.status for r in late.requests() if r.path.startswith("/webhooks/")] == [500, 200]


async def test_missing_permissions_are_respected_and_the_bot_keeps_serving(
    fake_discord, run_bot, make_tutor_bot, caplog
):
    tutor = StandInTutor()
    async with run_bot(make_tutor_bot(tutor=tutor)):
        # a channel where the bot may not write (a member overwrite): it doesn't even try
        muted = await fake_discord.send_message(
            f"{fake_discord.bot_user.mention} q1", channel="announcements"
        )
        await fake_discord.assert_no_request("POST", rf"/channels/{muted.channel.id}/", after=muted.start)
        # Discord refuses anyway (permissions changed meanwhile): logged, no retry, no crash
        fake_discord.fail("POST", r"^/channels/\d+/messages$", 403, code=50013, message="Missing Permissions")
        refused = await fake_discord.send_message(f"{fake_discord.bot_user.mention} q2", channel="general")
        await fake_discord.wait_for("POST", rf"/channels/{refused.channel.id}/messages$", status=403)
        await fake_discord.assert_no_request("POST", r"/messages$", ok=True, after=refused.start)
        ok = await fake_discord.send_message(f"{fake_discord.bot_user.mention} q3", channel="general")
        assert (await ok.reply()).json["embeds"]
    assert tutor.questions == ["q2", "q3"]
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("bot")
    ]
    assert any("Forbidden" in w and "50013" in w for w in warnings)


async def test_unknown_interaction_is_logged_not_crashed(fake_discord, run_bot, make_tutor_bot, caplog):
    async with run_bot(make_tutor_bot()):
        fake_discord.fail("POST", r"/callback$", 404, code=10062, message="Unknown interaction")
        it = await fake_discord.slash("ask", question="too late")
        await fake_discord.wait_for("POST", r"/callback$", status=404)
        await fake_discord.assert_no_request("POST", r"^/webhooks/", after=it.start)
        assert (await (await fake_discord.slash("ask", question="next")).reply())["embeds"]
    assert any("10062" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_database_going_away_mid_command(
    fake_discord, run_bot, make_tutor_bot, bot_session_factory, tmp_path
):
    """Answers still arrive (without feedback buttons), votes and config say the database is down,
    nothing logs an ERROR, and everything works again once the database is back."""
    gone_dir = tmp_path / "gone"
    dead_engine = create_engine(f"sqlite+aiosqlite:///{gone_dir / 'x.db'}")
    gone_dir.rmdir()
    dead = create_session_factory(dead_engine)
    current = {"factory": bot_session_factory}

    def sessions():
        return current["factory"]()

    try:
        async with run_bot(make_tutor_bot(session_factory=sessions)):
            first = await fake_discord.slash("ask", question="before")
            await first.reply()

            current["factory"] = dead
            it = await fake_discord.slash("ask", question="during")
            reply = await it.reply()
            assert reply["embeds"][0]["description"].startswith("Pre-training")
            assert errors.ANSWER_NOT_SAVED in all_text(reply)
            assert not buttons(reply)

            vote = await fake_discord.click(first.original, label="Helpful", user="bob")
            assert "database is unavailable" in (await vote.reply())["content"]
            cfg = await fake_discord.slash("tutor config", mention_answering=False, user="owner")
            assert "database is unavailable" in (await cfg.reply())["content"]
            status = await fake_discord.slash("tutor status", user="owner")
            assert "unreachable" in all_text(await status.reply())
            mention = await fake_discord.send_message(f"{fake_discord.bot_user.mention} mention during")
            assert errors.ANSWER_NOT_SAVED in all_text((await mention.reply()).json)

            current["factory"] = bot_session_factory
            after = await fake_discord.slash("ask", question="after")
            assert buttons(await after.reply())
        assert [a.question for a in await rows(bot_session_factory, AnswerLog)] == ["before", "after"]
    finally:
        await dead_engine.dispose()


async def test_core_failures_reply_clearly(fake_discord, run_bot, make_tutor_bot):
    async with run_bot(make_tutor_bot(tutor=StandInTutor(error=GenerationError("model crashed")))):
        it = await fake_discord.slash("ask", question="q")
        assert "answer model failed" in (await it.reply())["content"]


@pytest.mark.allow_error_logs
async def test_a_bug_gets_a_generic_reply_and_an_error_log(fake_discord, run_bot, make_tutor_bot, caplog):
    async with run_bot(make_tutor_bot(tutor=StandInTutor(error=ZeroDivisionError("oops")))):
        it = await fake_discord.slash("ask", question="q")
        assert "Something went wrong" in (await it.reply())["content"]
        assert (await (await fake_discord.slash("tutor config", user="owner")).reply())[
            "embeds"
        ]  # still serving
    bug = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "bot.errors"]
    assert bug and "/ask" in bug[0].getMessage() and isinstance(bug[0].exc_info[1], ZeroDivisionError)


# ------------------------------------------------------------------------------------------ run_bot
async def test_run_bot_fails_fast_on_a_missing_or_rejected_token(
    fake_discord, make_settings, bot_session_factory, caplog
):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TokenError, match="DISCORD_TOKEN is not set"):
        await run_bot(make_settings(DISCORD_TOKEN=None), StandInTutor(), None, bot_session_factory, None)
    secret = "MTIzNDU2Nzg5.rejected.token-value"
    t0 = time.monotonic()
    with pytest.raises(TokenError, match="rejected") as err:
        await run_bot(
            make_settings(DISCORD_TOKEN=secret),
            StandInTutor(),
            None,
            bot_session_factory,
            None,
            install_signal_handlers=False,
        )
    assert time.monotonic() - t0 < 5
    assert secret not in str(err.value) and err.value.__cause__ is None
    assert not any(secret in r.getMessage() for r in caplog.records)


async def test_sigterm_finishes_answers_in_flight_then_closes(
    fake_discord, make_settings, bot_session_factory
):
    gate = threading.Event()
    tutor = StandInTutor(gate=gate)
    task = asyncio.create_task(
        run_bot(make_settings(), tutor, None, bot_session_factory, None, guild_ready_timeout=0.05)
    )
    try:
        await fake_discord.wait_for_identify()
        it = await fake_discord.slash("ask", question="in flight")
        assert (await it.callback()).json["type"] == 5
        while not tutor.questions:
            await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # run_bot's handler turns it into a graceful stop
        await asyncio.sleep(0.1)
        late = await fake_discord.slash("ask", question="too late")
        assert "restarting" in (await late.reply())["content"]
        assert not task.done()
        gate.set()
        assert (await it.reply())["embeds"]  # the answer in flight was delivered
        await asyncio.wait_for(task, 5)  # and then the bot closed
    finally:
        gate.set()
        if not task.done():
            task.cancel()
    assert tutor.questions == ["in flight"]
