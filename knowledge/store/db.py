"""Engine and session factory. All SQL lives in knowledge.store; callers get repositories."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


class DatabaseError(RuntimeError):
    """The database cannot be reached or is not at the expected schema."""


def create_engine(url: str, *, echo: bool = False) -> AsyncEngine:
    """Create an async engine. SQLite gets WAL, foreign keys and a busy timeout; its folder is created."""
    parsed = parse_url(url)
    kwargs: dict = {"echo": echo}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=20)
    try:
        engine = create_async_engine(url, **kwargs)
    except (sa_exc.ArgumentError, ImportError) as exc:  # an unknown dialect or driver
        raise DatabaseError(f"cannot use the database URL {redact_url(url)}: {exc}; {_URL_HINT}") from exc
    if parsed.get_backend_name() == "sqlite":
        folder = Path(parsed.database).parent if parsed.database and parsed.database != ":memory:" else None

        @event.listens_for(engine.sync_engine, "do_connect")
        def _folder_exists(_dialect, _record, _cargs, _cparams):
            # A folder that went away after start-up fails here, before aiosqlite starts a worker
            # thread for the connection: after a failed connect aiosqlite queues the thread's stop
            # without waiting for it, and when the event loop closes first (a CLI command's
            # asyncio.run ending on the error) the thread dies with "Event loop is closed"
            # (omnilib/aiosqlite#241).
            if folder is not None and not folder.is_dir():
                raise sqlite3.OperationalError(f"unable to open database file: the folder {folder} does not exist")

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            if parsed.database and parsed.database != ":memory:":
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    return engine


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


_URL_HINT = ("set TUTORBOT_DATABASE_URL to e.g. sqlite+aiosqlite:///data/tutorbot.db "
             "or postgresql+asyncpg://user:password@host:5432/dbname")


def parse_url(url: str):
    """The parsed URL; DatabaseError (naming the setting) when it is not one."""
    try:
        return make_url(url)
    except sa_exc.ArgumentError as exc:
        raise DatabaseError(f"{redact_url(url)!r} is not a database URL; {_URL_HINT}") from exc


def redact_url(url: str) -> str:
    """The URL with any password hidden, for logs and status output (an unparsable one shown as a
    placeholder, since it may hold a password in a shape we cannot find)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return "(unparsable URL)" if "@" in url or ":" in url else url


def is_unavailable(exc: BaseException) -> bool:
    """True when an exception means the database is gone or unusable (not a bug in a query)."""
    if isinstance(exc, (sa_exc.IntegrityError, sa_exc.DataError, sa_exc.ProgrammingError)):
        return False
    if isinstance(exc, sa_exc.DBAPIError):
        # OperationalError, InterfaceError, DatabaseError ("file is not a database"), invalidated connections
        return True
    return isinstance(exc, (OSError, TimeoutError, sa_exc.TimeoutError))


def guarded(factory: async_sessionmaker[AsyncSession]) -> Callable[[], contextlib.AbstractAsyncContextManager[AsyncSession]]:
    """A session factory whose sessions raise ``DatabaseError`` when the database is unavailable."""

    @contextlib.asynccontextmanager
    async def session() -> AsyncIterator[AsyncSession]:
        try:
            async with factory() as s:
                yield s
        except BaseException as exc:
            if is_unavailable(exc):
                raise DatabaseError(f"database unavailable ({type(exc).__name__})") from exc
            raise

    return session
