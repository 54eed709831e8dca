"""The fake Discord server works end to end with an unmodified discord.py client.

A minimal ``commands.Bot`` (no tutorbot code) is run against it: a slash command that replies with
a button, a deferred command with a follow-up, a message handler, a button view, a modal, a DM,
failure injection (429 retried, 403 surfaced) and the IDENTIFY payload.
"""

from __future__ import annotations

import asyncio

import discord
import pytest
from discord import app_commands
from discord.ext import commands

from tests.fakediscord import FakeDiscord, running_bot


class Counter(discord.ui.DynamicItem[discord.ui.Button], template=r"count:(?P<n>\d+)"):
    def __init__(self, n: int) -> None:
        super().__init__(discord.ui.Button(label=f"count {n}", custom_id=f"count:{n}"))
        self.n = n

    @classmethod
    async def from_custom_id(cls, interaction, item, match):
        return cls(int(match["n"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        self.n += 1
        self.item.label = f"count {self.n}"
        self.custom_id = f"count:{self.n}"
        await interaction.response.edit_message(view=self.view)


class Why(discord.ui.Modal, title="Why?"):
    reason = discord.ui.TextInput(label="Reason", required=False)

    def __init__(self, bot: SmokeBot) -> None:
        super().__init__()
        self.bot = bot

    async def on_submit(self, interaction: discord.Interaction) -> None:
        self.bot.seen.append(("modal", self.reason.value))
        await interaction.response.send_message("noted", ephemeral=True)


class SmokeBot(commands.Bot):
    def __init__(self, **kw):
        intents = discord.Intents.none()
        intents.guilds = True
        intents.guild_messages = True
        intents.dm_messages = True
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            guild_ready_timeout=0.05,
            **kw,
        )
        self.seen: list[tuple] = []

    async def setup_hook(self) -> None:
        self.add_dynamic_items(Counter)

        @self.tree.command(name="hello", description="Say hello")
        @app_commands.describe(name="Who to greet", shout="Upper case")
        async def hello(interaction: discord.Interaction, name: str, shout: bool = False) -> None:
            text = f"hello {name}"
            view = discord.ui.View(timeout=None)
            view.add_item(Counter(0))
            await interaction.response.send_message(text.upper() if shout else text, view=view)

        @self.tree.command(name="slow", description="Deferred")
        async def slow(interaction: discord.Interaction) -> None:
            await interaction.response.defer(thinking=True)
            await asyncio.sleep(0.01)
            await interaction.followup.send("done", embed=discord.Embed(title="t", description="d"))

        @self.tree.command(name="why", description="Modal")
        async def why(interaction: discord.Interaction) -> None:
            await interaction.response.send_modal(Why(self))

        await self.tree.sync()

    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot:
            return
        self.seen.append(("message", message.content, message.guild is None))
        if self.user in message.mentions or message.guild is None:
            await message.reply("pong @everyone", mention_author=False)


async def test_login_identify_ready_and_sync(fake_discord, run_bot):
    bot = SmokeBot()
    async with run_bot(bot):
        ident = await fake_discord.wait_for_identify()
        assert ident["token"] == fake_discord.token
        assert ident["intents"] == bot.intents.value
        assert "shard" not in ident  # a plain Bot is unsharded
        assert bot.application_id == fake_discord.application_id
        guild = bot.get_guild(fake_discord.guild.id)
        assert guild is not None and guild.get_channel(fake_discord.guild.channel("general").id) is not None
        assert [c["name"] for c in fake_discord.commands[None]] == ["hello", "slow", "why"]
        # heartbeats are answered, so the latency is finite
        for _ in range(100):
            if bot.latency != float("inf"):
                break
            await asyncio.sleep(0.01)
        assert bot.latency < 1


async def test_slash_reply_button_click_and_deferred_followup(fake_discord, run_bot):
    async with run_bot(SmokeBot()):
        it = await fake_discord.slash("hello", name="Ada", shout=True, user="alice")
        cb = await it.callback()
        assert cb.json["type"] == 4
        assert cb.json["data"]["content"] == "HELLO ADA"
        assert cb.json["data"]["allowed_mentions"] == {"parse": []}
        assert cb.query.get("with_response") in ("1", "true")

        click = await fake_discord.click(it.original, "count:0", user="bob")
        upd = await click.callback()
        assert upd.json["type"] == 7
        assert fake_discord.components_of(fake_discord.message(it.original_id))[0]["custom_id"] == "count:1"

        general = fake_discord.messages_in("general")
        assert [m["content"] for m in general] == ["HELLO ADA"]

        slow = await fake_discord.slash("slow")
        assert (await slow.callback()).json["type"] == 5
        reply = await slow.reply()
        assert reply["content"] == "done" and reply["embeds"][0]["title"] == "t"
        assert slow.original["content"] == "done"  # the follow-up filled the "thinking" message


async def test_modal_round_trip(fake_discord, run_bot):
    bot = SmokeBot()
    async with run_bot(bot):
        it = await fake_discord.slash("why", user="carol")
        modal = await it.modal()
        assert modal.title == "Why?"
        sub = await fake_discord.submit_modal(modal, {"Reason": "too long"})
        reply = await sub.reply()
        assert reply["content"] == "noted" and reply["flags"] & 64
        assert ("modal", "too long") in bot.seen


async def test_messages_mentions_and_dms(fake_discord, run_bot):
    bot = SmokeBot()
    async with run_bot(bot):
        await fake_discord.send_message("just chatting", user="bob")
        msg = await fake_discord.send_message(f"{fake_discord.bot_user.mention} ping", user="alice")
        rec = await msg.reply(referencing=True)
        assert rec.json["content"] == "pong @everyone"
        assert rec.json["allowed_mentions"]["parse"] == []
        dm = await fake_discord.send_dm("hi in private", user="carol")
        await dm.reply()
        assert ("message", "just chatting", False) in bot.seen
        assert ("message", "hi in private", True) in bot.seen


async def test_429_is_retried_and_403_surfaces(fake_discord, run_bot):
    bot = SmokeBot()
    async with run_bot(bot):
        channel = bot.get_channel(fake_discord.guild.channel("general").id)
        fake_discord.fail("POST", r"/channels/\d+/messages$", 429, retry_after=0.05)
        mark = fake_discord.mark()
        sent = await channel.send("after a rate limit")
        assert sent.content == "after a rate limit"
        statuses = [r.status for r in fake_discord.find("POST", r"/channels/\d+/messages$", after=mark)]
        assert statuses == [429, 200]

        readonly = bot.get_channel(fake_discord.guild.channel("announcements").id)
        with pytest.raises(discord.Forbidden) as err:
            await readonly.send("nope")
        assert err.value.code == 50013

        fake_discord.fail("POST", r"/channels/\d+/messages$", 404, code=10003, message="Unknown Channel")
        with pytest.raises(discord.NotFound):
            await channel.send("gone")


async def test_wrong_token_is_rejected():
    async with FakeDiscord() as fake:
        with pytest.raises(discord.LoginFailure):
            async with running_bot(fake, SmokeBot(), token="wrong"):
                pass


async def test_unknown_interaction_and_stale_button(fake_discord, run_bot):
    async with run_bot(SmokeBot()):
        it = await fake_discord.slash("hello", name="x")
        await it.callback()
        # A click on a button the message does not have: discord.py finds no item and ignores it.
        stale = await fake_discord.click(it.original, "count:999", check=False)
        await fake_discord.assert_no_request(path=stale.token, after=stale.start)
