"""bot.client.main(settings): the composition bot.__main__ runs, end to end against the fake Discord."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from bot.client import main
from knowledge.store import migrate
from knowledge.store.db import create_engine


async def test_main_runs_the_bot_until_sigterm(fake_discord, make_settings, real_runtime, tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'main.db'}"
    engine = create_engine(url)
    await migrate.upgrade(engine, "head")
    await engine.dispose()
    settings = make_settings(
        course_dir=real_runtime.settings.course_dir,
        data_dir=real_runtime.settings.data_dir,  # the index built by real_runtime is reused
        database_url=url,
    )
    task = asyncio.create_task(main(settings))
    try:
        await fake_discord.wait_for_identify(timeout=60)
        it = await fake_discord.slash("ask", question="What is fine-tuning?")
        reply = await it.reply(timeout=15)
        assert reply["embeds"][0]["fields"][0]["name"] == "Sources"
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(task, 10) == 0
    finally:
        if not task.done():
            task.cancel()


@pytest.mark.allow_error_logs  # main reports refusals as one ERROR line each
async def test_main_refuses_an_unmigrated_database_or_no_token(make_settings, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="bot.client")
    settings = make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    assert await main(settings) == 2
    assert any("tutorbot db upgrade" in r.getMessage() for r in caplog.records)
    assert await main(make_settings(DISCORD_TOKEN=None)) == 2
    assert any("DISCORD_TOKEN is not set" in r.getMessage() for r in caplog.records)
