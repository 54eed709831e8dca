"""Maintainers: ``/tutor reindex``, ``/tutor reload-model``, ``/tutor status``, ``/tutor config``.

Allowed for members with Manage Server (or Administrator) or the role named in
``settings.admin_role`` (a role name or id). Everyone else is refused with a short reply. Every
admin action is logged with who did what, where, and how it ended.

The commands are visible to everyone on purpose: Discord's ``default_permissions`` would hide them
from members who only have the admin role. Servers can restrict them further in
Server Settings > Integrations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import discord
from discord import app_commands
from discord.ext import commands

from bot import errors, render
from knowledge.store.db import DatabaseError, redact_url

if TYPE_CHECKING:
    from bot.client import TutorBot

log = logging.getLogger(__name__)
audit = logging.getLogger("bot.audit")


@runtime_checkable
class TutorRuntime(Protocol):
    """What the admin commands need from the running tutor (``bot.runtime.TutorRuntime`` fits).

    The methods block (seconds to minutes) and are called in a worker thread. They swap what the
    live ``Tutor`` uses in place (a new index or answer model), so answers keep flowing meanwhile,
    and raise with a readable message when they fail (the previous index or model stays in use).
    Return values are shown to the admin: ``reindex`` a str or the new index (its manifest's
    chunk count is shown), ``reload_model`` a str (the model's name), ``status`` a mapping or a
    dataclass of label -> value.
    """

    def reindex(self) -> object: ...

    def reload_model(self) -> object: ...

    def status(self) -> object: ...


def summarize(result: object) -> str:
    """One line for the admin about what a runtime action returned."""
    if result is None:
        return ""
    if isinstance(result, str):
        return result
    manifest = getattr(result, "manifest", None)
    if manifest is not None and hasattr(manifest, "chunk_count"):
        kind = getattr(manifest, "index_type", None)
        if getattr(result, "up_to_date", False) is True:
            return f"The index already matches the course ({manifest.chunk_count} chunks); nothing to rebuild."
        return f"{manifest.chunk_count} chunks indexed" + (f" ({kind})" if kind else "") + "."
    return str(result)


def runtime_rows(status: object) -> dict[str, object]:
    """``TutorRuntime.status()`` (a mapping or a dataclass) as label -> value rows."""
    if status is None:
        return {}
    if dataclasses.is_dataclass(status) and not isinstance(status, type):
        data = dataclasses.asdict(status)
    elif isinstance(status, Mapping):
        data = dict(status)
    else:
        return {"Runtime": status}
    data.update(data.pop("extra", None) or {})
    rows: dict[str, object] = {}
    if "course_title" in data or "course_id" in data:
        rows["Course"] = f"{data.pop('course_title', '?')} (`{data.pop('course_id', '?')}`)"
    if "index_chunks" in data:
        kind = data.pop("index_type", None)
        rows["Index"] = f"{data.pop('index_chunks')} chunks" + (f" ({kind})" if kind else "")
    data.pop("uptime_s", None)  # the bot reports its own uptime
    for key, value in data.items():
        label = key.replace("_", " ").capitalize() if key.islower() else key
        rows[label] = value
    return rows


def is_admin(user: discord.abc.User, permissions: discord.Permissions, admin_role: str | None) -> bool:
    if permissions.manage_guild or permissions.administrator:
        return True
    if admin_role and isinstance(user, discord.Member):
        wanted = admin_role.strip().lstrip("@")
        return any(r.name == wanted or str(r.id) == wanted for r in user.roles)
    return False


def format_duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m"
    return f"{m}m {s}s"


def _who(interaction: discord.Interaction) -> str:
    return f"{interaction.user} ({interaction.user.id}) in guild {interaction.guild_id}"


@app_commands.guild_only()
class AdminCog(commands.GroupCog, group_name="tutor", group_description="Maintain the course tutor (admins)"):
    def __init__(self, bot: TutorBot) -> None:
        self.bot = bot
        self._busy: dict[str, asyncio.Lock] = {"reindex": asyncio.Lock(), "reload-model": asyncio.Lock()}
        self._watcher: asyncio.Task | None = None
        super().__init__()

    async def cog_load(self) -> None:
        interval = getattr(self.bot.settings, "model_check_s", 0)
        runtime = self.bot.runtime
        if interval and runtime is not None and hasattr(runtime, "reload_if_changed"):
            self._watcher = asyncio.create_task(self._watch_model(runtime, interval), name="model-watcher")

    async def cog_unload(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def _watch_model(self, runtime: object, interval: float) -> None:
        """Pick up a promoted or rolled-back model without a restart; answers in flight finish on
        the old one (the runtime swaps the generator; it does not interrupt calls)."""
        while True:
            await asyncio.sleep(interval)
            async with self._busy["reload-model"]:
                try:
                    name = await asyncio.to_thread(runtime.reload_if_changed)  # type: ignore[attr-defined]
                except Exception as exc:  # keep serving on the current model
                    log.warning("model check failed; still serving the current model: %s", exc)
                    continue
            if name:
                audit.info("switched to model %s after a registry change", name)

    async def interaction_check(self, interaction: discord.Interaction) -> bool:  # type: ignore[override]
        if interaction.guild is None:
            raise app_commands.NoPrivateMessage()
        if is_admin(interaction.user, interaction.permissions, self.bot.settings.admin_role):
            return True
        name = interaction.command.qualified_name if interaction.command else "?"
        audit.info("refused /%s to %s: not an admin", name, _who(interaction))
        raise errors.NotAdmin(self.bot.settings.admin_role)

    # ------------------------------------------------------------------ long actions
    async def _long_action(self, interaction: discord.Interaction, action: str, method: str) -> None:
        runtime = self.bot.runtime
        if runtime is None:
            await interaction.response.send_message(
                f"`/tutor {action}` isn't available in this deployment.", ephemeral=True
            )
            return
        lock = self._busy[action]
        if lock.locked():
            await interaction.response.send_message(
                f"A `{action}` is already running; wait for it to finish.", ephemeral=True
            )
            return
        async with lock:
            await interaction.response.defer(thinking=True, ephemeral=True)
            audit.info("/tutor %s started by %s", action, _who(interaction))
            t0 = time.monotonic()
            try:
                summary = summarize(await asyncio.to_thread(getattr(runtime, method)))
            except Exception as exc:
                # The admin gets the reason either way; an unexpected kind is also logged as a bug.
                took = time.monotonic() - t0
                if errors.classify(exc).level >= logging.ERROR:
                    log.error("/tutor %s by %s crashed after %.1f s", action, _who(interaction), took, exc_info=exc)
                else:
                    audit.warning("/tutor %s by %s failed after %.1f s: %s", action, _who(interaction), took, exc)
                detail = str(exc).strip() or type(exc).__name__
                await interaction.followup.send(render.notice(f"❌ `{action}` failed: {detail}"), ephemeral=True)
                return
            took = time.monotonic() - t0
            audit.info("/tutor %s by %s done in %.1f s: %s", action, _who(interaction), took, summary)
            await interaction.followup.send(
                render.notice(f"✅ `{action}` done in {took:.1f} s. {summary or ''}"), ephemeral=True
            )

    @app_commands.command(
        name="reindex", description="Rebuild the search index from the course folder (no downtime)"
    )
    async def reindex(self, interaction: discord.Interaction) -> None:
        await self._long_action(interaction, "reindex", "reindex")

    @app_commands.command(
        name="reload-model", description="Load the current answer model (after fine-tuning)"
    )
    async def reload_model(self, interaction: discord.Interaction) -> None:
        await self._long_action(interaction, "reload-model", "reload_model")

    # ------------------------------------------------------------------ status
    @app_commands.command(name="status", description="Course, index, model, uptime, answer latency, database")
    async def status(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True, ephemeral=True)
        bot = self.bot
        rows: dict[str, object] = {}
        course = getattr(bot.tutor, "course", None)
        if course is not None:
            rows["Course"] = f"{getattr(course, 'title', '?')} (`{getattr(course, 'id', '?')}`)"
        if bot.runtime is not None:
            try:
                rows.update(runtime_rows(await asyncio.to_thread(bot.runtime.status)))
            except Exception as exc:
                log.warning("runtime status failed: %s", exc)
                rows["Runtime"] = f"unavailable ({type(exc).__name__})"
        rows["Uptime"] = format_duration(time.monotonic() - bot.started_monotonic)
        shard_ids = bot.shard_ids if bot.shard_ids is not None else list(range(bot.shard_count or 1))
        rows["Shards"] = f"{', '.join(map(str, shard_ids))} of {bot.shard_count or 1}"
        rows["Servers"] = len(bot.guilds)
        latency = bot.latency
        rows["Gateway latency"] = (
            "-" if latency != latency or latency == float("inf") else f"{latency * 1000:.0f} ms"
        )
        runner = bot.runner
        rows["Answering now"] = f"{runner.running} (+{runner.queued} queued, cap {runner.max_concurrent})"
        try:
            stats = await bot.qa.latency_stats()
            total = await bot.qa.count_answers()
            if stats.count:
                rows["Answer latency"] = (
                    f"p50 {stats.p50_ms:.0f} ms · p90 {stats.p90_ms:.0f} ms · "
                    f"p99 {stats.p99_ms:.0f} ms (last {stats.count})"
                )
            else:
                rows["Answer latency"] = "no answers yet"
            rows["Answers stored"] = total
            rows["Database"] = f"ok · {redact_url(bot.settings.resolved_database_url)}"
        except DatabaseError as exc:
            rows["Database"] = f"⚠️ unreachable ({exc})"
        audit.info("/tutor status by %s", _who(interaction))
        await interaction.followup.send(embed=render.table_embed("Tutor status", rows), ephemeral=True)

    # ------------------------------------------------------------------ config
    @app_commands.command(name="config", description="Show or change where and how the tutor answers here")
    @app_commands.describe(
        mention_answering="Answer when someone mentions the bot",
        add_channel="Answer mentions in this channel (once any is listed, only listed channels)",
        remove_channel="Stop answering mentions in this channel",
        all_channels="Forget the channel list: answer mentions in every channel",
        quiz_questions="Default number of questions per quiz",
        quiz_seconds="Default seconds per quiz question",
    )
    async def config(
        self,
        interaction: discord.Interaction,
        mention_answering: bool | None = None,
        add_channel: discord.TextChannel | None = None,
        remove_channel: discord.TextChannel | None = None,
        all_channels: bool = False,
        quiz_questions: app_commands.Range[int, 1, 25] | None = None,
        quiz_seconds: app_commands.Range[int, 10, 120] | None = None,
    ) -> None:
        await interaction.response.defer(thinking=True, ephemeral=True)
        bot = self.bot
        guild_id = interaction.guild_id
        assert guild_id is not None  # guild_only
        changes: dict = {}
        if mention_answering is not None:
            changes["answer_on_mention"] = mention_answering
        if all_channels:
            changes["answer_channels"] = []
        if add_channel is not None:
            changes["add_channels"] = [add_channel.id]
        if remove_channel is not None:
            changes["remove_channels"] = [remove_channel.id]
        if quiz_questions is not None:
            changes["quiz_questions"] = quiz_questions
        if quiz_seconds is not None:
            changes["quiz_seconds"] = quiz_seconds
        default = bot.settings.answer_on_mention
        if changes:
            cfg = await bot.qa.update_guild_config(guild_id, default_answer_on_mention=default, **changes)
            audit.info("/tutor config by %s changed %s", _who(interaction), changes)
        else:
            cfg = await bot.qa.get_guild_config(guild_id, default_answer_on_mention=default)
        s = bot.settings
        rows: dict[str, object] = {
            "Mention answering": ("on" if cfg.answer_on_mention else "off")
            + ("" if s.answer_on_mention else " (disabled for this deployment)"),
            "Answer channels": ", ".join(f"<#{c}>" for c in cfg.answer_channels) or "every channel",
            "Quiz questions": cfg.quiz_questions or f"{s.quiz_questions} (default)",
            "Quiz seconds": cfg.quiz_seconds or f"{s.quiz_seconds} (default)",
        }
        title = "Tutor settings updated" if changes else "Tutor settings"
        await interaction.followup.send(embed=render.table_embed(title, rows), ephemeral=True)


async def setup(bot: TutorBot) -> None:
    await bot.add_cog(AdminCog(bot))
