"""Start and stop a discord.py client against a FakeDiscord, inside a test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TypeVar

import discord

from tests.fakediscord.server import FakeDiscord

ClientT = TypeVar("ClientT", bound=discord.Client)


@contextlib.asynccontextmanager
async def running_bot(
    fake: FakeDiscord, bot: ClientT, *, token: str | None = None, ready_timeout: float = 10.0
) -> AsyncIterator[ClientT]:
    """Run ``bot`` against ``fake`` until the block exits; yields once the bot is ready.

    The bot must have been built with a small ``guild_ready_timeout`` (e.g. 0.05) or readiness
    waits the default 2 s. If the bot fails to start (bad token, setup_hook error) the exception
    is raised here. On exit the bot is closed and its task awaited.
    """
    with fake.patch_discord():
        task = asyncio.create_task(bot.start(token or fake.token), name="fake-discord-bot")
        try:
            deadline = time.monotonic() + ready_timeout
            while not bot.is_ready():
                if task.done():
                    task.result()  # raises the startup error
                    raise RuntimeError("the bot stopped before it became ready")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the bot was not ready within {ready_timeout}s")
                await asyncio.sleep(0.01)
            yield bot
        finally:
            if not bot.is_closed():
                await bot.close()
            if not task.done():
                try:
                    await asyncio.wait_for(task, 5)
                except (TimeoutError, asyncio.CancelledError):
                    task.cancel()
