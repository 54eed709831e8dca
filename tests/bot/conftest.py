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


# ----------------------------------------------------------------------------- the tutorbot under test
@pytest.fixture(scope="session")
def real_runtime(tmp_path_factory):
    """The real ``bot.runtime.TutorRuntime``: the sample course, its index built with the real
    MiniLM, extractive answers (no answer model). Built once per test session (it is the slow part)."""
    from bot.config import Settings
    from bot.runtime import TutorRuntime
    from tests.conftest import SAMPLE_COURSE

    settings = Settings(
        _env_file=None,
        course_dir=SAMPLE_COURSE,
        data_dir=tmp_path_factory.mktemp("tutor-data"),
        answer_mode="extractive",
    )
    runtime = TutorRuntime(settings, progress=lambda _msg: None)
    yield runtime
    runtime.close()


@pytest.fixture
def real_tutor(real_runtime):
    """The real ``knowledge.tutor.Tutor`` of ``real_runtime``."""
    return real_runtime.tutor


class StandInTutor:
    """A scripted tutor for fault injection: same ``answer``/``course`` surface as
    ``knowledge.tutor.Tutor``, canned answers citing "Basics > Pre-training". It echoes the raw
    question into the answer (the worst case for mentions: the real Tutor strips them), and can
    be slowed, gated (a threading.Event) or made to raise. Tests of the happy path use
    ``real_tutor``; this one serves timing, concurrency and failure cases.
    """

    def __init__(self, *, delay: float = 0.0, error: BaseException | None = None, gate=None) -> None:
        import threading
        from types import SimpleNamespace

        self.course = SimpleNamespace(id="tiny", title="Tiny Course")
        self.delay = delay
        self.error = error
        self.gate = gate  # a threading.Event the answer waits for
        self.questions: list[str] = []
        self.histories: list[tuple] = []  # the history passed with each question
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def answer(self, question, *, history=()):
        import time

        from knowledge.tutor import Answer, SourceRef

        with self._lock:
            self.questions.append(question)
            self.histories.append(tuple(history))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                self.gate.wait(10)
            if self.delay:
                time.sleep(self.delay)
            if self.error is not None:
                raise self.error
            return Answer(
                question=question,
                text=f"Pre-training teaches a model general patterns first. (You asked: {question})",
                answered=True,
                confidence=0.8,
                sources=(
                    SourceRef(
                        "lessons/01-basics.md", "Basics", "Pre-training", 0.9, "Pre-training teaches..."
                    ),
                    SourceRef("lessons/01-basics.md", "Basics", "Fine-tuning", 0.5, "Fine-tuning adapts..."),
                ),
                mode="extractive",
                latency_ms=5.0,
            )
        finally:
            with self._lock:
                self.active -= 1


class StandInRuntime:
    """A TutorRuntime that records calls (the real one is built in the composition root)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def reindex(self) -> str:
        self.calls.append("reindex")
        return "42 chunks from 5 lessons"

    def reload_model(self) -> str:
        self.calls.append("reload_model")
        return "model v3 loaded"

    def status(self) -> dict:
        self.calls.append("status")
        return {"Index": "42 chunks", "Model": "v3"}


@pytest.fixture
async def bot_engine(tmp_path):
    """A migrated SQLite database for the bot (the e2e tests run on SQLite only, for speed;
    tests/knowledge/test_qa_repo.py covers both databases)."""
    from knowledge.store import migrate
    from knowledge.store.db import create_engine

    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    await migrate.upgrade(engine, "head")
    yield engine
    await engine.dispose()


@pytest.fixture
def bot_session_factory(bot_engine):
    from knowledge.store.db import create_session_factory

    return create_session_factory(bot_engine)


@pytest.fixture
def make_settings(tmp_path, fake_discord):
    """``make_settings(user_rate=2, DEV_GUILD_ID=...)``: Settings for a test (no .env, no environment)."""
    from bot.config import Settings

    def _make(**overrides):
        values = {"DISCORD_TOKEN": fake_discord.token, "data_dir": tmp_path, "answer_mode": "extractive"}
        aliases = {
            "discord_token": "DISCORD_TOKEN",
            "dev_guild_id": "DEV_GUILD_ID",
            "shard_count": "SHARD_COUNT",
            "shard_ids": "SHARD_IDS",
            "database_url": "DATABASE_URL",
        }
        for k, v in overrides.items():
            values[aliases.get(k, k)] = v
        return Settings(_env_file=None, **values)

    return _make


@pytest.fixture
def make_tutor_bot(make_settings, bot_session_factory):
    """``make_tutor_bot(tutor=..., settings=..., quiz_service=..., runtime=...)`` -> a TutorBot
    wired to the test database, with a stand-in tutor unless one is given."""
    from bot.client import TutorBot

    def _make(*, tutor=None, settings=None, session_factory=None, **kw):
        kw.setdefault("guild_ready_timeout", 0.05)
        return TutorBot(
            settings=settings or make_settings(),
            tutor=tutor or StandInTutor(),
            session_factory=session_factory or bot_session_factory,
            **kw,
        )

    return _make
