"""Shared fixtures: databases (SQLite and PostgreSQL, migrated), a tiny course folder, settings.

PostgreSQL: each test session creates its own database on the server at 127.0.0.1:5432 (trust auth)
and drops it at the end, so parallel runs never share tables. Without a server the PostgreSQL tests
skip with the reason; under CI (CI=true) a missing server is an error, never a skip.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PG_HOST = os.environ.get("TUTORBOT_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TUTORBOT_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TUTORBOT_TEST_PG_USER", "postgres")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = Path(__file__).resolve().parent.parent
SAMPLE_COURSE = ROOT / "courses" / "pretraining-finetuning"


def _pg_reachable() -> bool:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def pg_server_url():
    """Admin URL of a fresh per-session PostgreSQL database (created and dropped here)."""
    if not _pg_reachable():
        msg = f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} (start it, or set TUTORBOT_TEST_PG_HOST/PORT)"
        if IN_CI:
            pytest.fail(f"{msg}; under CI the PostgreSQL tests must run")
        pytest.skip(msg)
    import asyncpg

    name = f"tutorbot_test_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A database URL for each backend: a fresh SQLite file, or the per-session PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    return request.getfixturevalue("pg_server_url")


@pytest.fixture
async def engine(db_url):
    """An async engine on a fully migrated, empty database (tables dropped again afterwards)."""
    from knowledge.store import migrate
    from knowledge.store.db import create_engine

    eng = create_engine(db_url)
    await migrate.downgrade(eng, "base")  # a previous test on the shared PG database may have left tables
    await migrate.upgrade(eng, "head")
    yield eng
    await migrate.downgrade(eng, "base")
    await eng.dispose()


@pytest.fixture
def session_factory(engine):
    from knowledge.store.db import create_session_factory

    return create_session_factory(engine)


@pytest.fixture
def sample_course_dir() -> Path:
    return SAMPLE_COURSE


def write_course(root: Path, files: dict[str, str]) -> Path:
    """Write a course folder from {relative path: content}; returns the folder."""
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content, encoding="utf-8")
    return root


TINY_COURSE = {
    "course.yaml": "id: tiny\ntitle: Tiny Course\ndescription: A course for tests.\n",
    "lessons/01-basics.md": (
        "---\ntitle: Basics\norder: 1\ntags: [intro]\n---\n"
        "# Basics\n\nIntro paragraph about the tiny course.\n\n"
        "## Pre-training\n\nPre-training teaches a model general patterns from a large dataset "
        "before any specific task.\n\n"
        "## Fine-tuning\n\nFine-tuning adapts a pre-trained model to one task with a small dataset "
        "and a low learning rate.\n\n### Freezing layers\n\nFreezing the early layers keeps general "
        "knowledge and reduces overfitting.\n"
    ),
    "lessons/02-lora.txt": "Low-rank adaptation (LoRA) trains small extra matrices instead of all weights.\n",
    "quizzes/basics.yaml": (
        "questions:\n"
        "  - id: q1\n    question: What does pre-training learn?\n"
        "    choices: [General patterns, One task only, Nothing]\n    answer: General patterns\n"
        "    explanation: It learns general patterns from lots of data.\n"
        "    common_mistakes: [Confusing it with fine-tuning]\n    difficulty: easy\n    tags: [pre-training]\n"
        "  - id: q2\n    question: Why use a low learning rate when fine-tuning?\n"
        "    choices: [To keep pre-trained knowledge, To train faster, To use more memory]\n"
        "    answer: To keep pre-trained knowledge\n    explanation: Big steps would overwrite what was learned.\n"
        "    difficulty: medium\n    tags: [fine-tuning]\n"
    ),
    "flashcards/cards.yaml": "cards:\n  - id: c1\n    front: What is LoRA?\n    back: Low-rank adaptation.\n",
}


@pytest.fixture
def tiny_course(tmp_path) -> Path:
    return write_course(tmp_path / "tiny", TINY_COURSE)
