"""Migrations run up and down on SQLite and PostgreSQL, and match the models exactly."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from knowledge.store import migrate
from knowledge.store.db import create_engine
from knowledge.store.models import Base


async def test_upgrade_creates_every_table_and_downgrade_removes_them(db_url):
    eng = create_engine(db_url)
    try:
        await migrate.downgrade(eng, "base")
        await migrate.upgrade(eng, "head")
        assert await migrate.current_revision(eng) == migrate.head_revision()
        async with eng.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        assert set(Base.metadata.tables) <= tables
        await migrate.downgrade(eng, "base")
        async with eng.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        assert not (set(Base.metadata.tables) & tables)
        assert await migrate.current_revision(eng) is None
    finally:
        await eng.dispose()


async def test_models_and_migrations_have_not_drifted(engine):
    async with engine.connect() as conn:
        diff = await conn.run_sync(
            lambda c: compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata)
        )
    assert diff == [], f"models differ from migrations; run alembic revision --autogenerate: {diff}"
