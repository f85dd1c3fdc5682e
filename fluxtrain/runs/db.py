"""The database behind the run table: one engine per URL, schema brought up to date by Alembic."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from fluxtrain.errors import UnavailableError
from fluxtrain.settings import Settings

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


@dataclass(frozen=True)
class Database:
    engine: Engine
    sessions: sessionmaker[Session]

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self.sessions.begin() as session:
            yield session


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite files get WAL mode so readers never block the executor."""
    if url.startswith("sqlite"):
        database = url.split("///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def upgrade(engine: Engine) -> None:
    """Apply every Alembic migration shipped in the package to `engine`'s database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


_databases: dict[str, Database] = {}
_lock = threading.Lock()


def unreachable_reason(exc: Exception) -> str:
    """The driver's own first line of a connection failure (never the password, which is not in it)."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__


def get_database(settings: Settings) -> Database:
    """The process-wide database for the settings' URL, migrated on first use."""
    url = settings.resolved_database_url
    with _lock:
        database = _databases.get(url)
        if database is None:
            engine = make_engine(url)
            try:
                upgrade(engine)
            except (OperationalError, InterfaceError) as exc:
                engine.dispose()
                shown = make_url(url).render_as_string(hide_password=True)
                reason = unreachable_reason(exc)
                message = f"cannot reach the database at {shown} (FLUXTRAIN_DATABASE_URL): {reason}"
                raise UnavailableError(message) from exc
            database = Database(engine, sessionmaker(engine, expire_on_commit=False))
            _databases[url] = database
        return database
