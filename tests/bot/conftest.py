"""Fixtures for the Discord layer: a running fake Discord server and bots started against it.

    async def test_something(fake_discord, run_bot):
        bot = make_my_bot()                      # any discord.Client; use guild_ready_timeout=0.05
        async with run_bot(bot):
            it = await fake_discord.slash("ask", question="hi", user="alice")
            reply = await it.reply()

Any ERROR logged (by discord.py, the bot, the core or the fake server) fails the test, since
discord.py only *logs* exceptions raised in commands, views and event handlers. A test that
provokes one on purpose marks itself ``@pytest.mark.allow_error_logs``.
"""

from __future__ import annotations

import logging

import pytest

from tests.fakediscord import FakeDiscord, running_bot

WATCHED_LOGGERS = ("discord", "bot", "knowledge", "tests.fakediscord", "aiohttp", "asyncio")


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_error_logs: the test provokes ERROR log records on purpose")


class _ErrorCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "root" or record.name.split(".")[0] in WATCHED_LOGGERS:
            self.records.append(record)


@pytest.fixture(autouse=True)
def fail_on_error_logs(request):
    """Fail the test if anything logged at ERROR or above while it ran (setup, call and teardown)."""
    collector = _ErrorCollector()
    root = logging.getLogger()
    root.addHandler(collector)
    try:
        yield collector
    finally:
        root.removeHandler(collector)
    if collector.records and request.node.get_closest_marker("allow_error_logs") is None:
        lines = []
        for r in collector.records:
            line = f"{r.levelname} {r.name}: {r.getMessage()}"
            if r.exc_info and r.exc_info[1] is not None:
                line += f" [{type(r.exc_info[1]).__name__}: {r.exc_info[1]}]"
            lines.append(line)
        pytest.fail("the test logged errors:\n  " + "\n  ".join(lines), pytrace=False)


@pytest.fixture
async def fake_discord():
    """A started FakeDiscord with discord.py pointed at it (restored afterwards)."""
    fake = FakeDiscord()
    await fake.start()
    try:
        with fake.patch_discord():
            yield fake
    finally:
        await fake.stop()


@pytest.fixture
def run_bot(fake_discord):
    """``async with run_bot(bot) as bot:`` runs the bot against ``fake_discord`` until the block ends."""

    def _run(bot, **kw):
        return running_bot(fake_discord, bot, **kw)

    return _run
