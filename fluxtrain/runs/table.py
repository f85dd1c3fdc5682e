"""The run table (the truth about every run) and the executor's lease, as SQLAlchemy 2 ORM models."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Dialect, Float, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

RUN_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})


WEBHOOK_DONE = ("sent", "skipped", "failed")
"""How a webhook notification was settled: delivered, superseded by the run's end, or given up on."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """An aware UTC datetime; a naive one is taken to be UTC already (that is how it was stored)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back aware, also from SQLite (which keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        return None if value is None else as_utc(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    output_name: Mapped[str] = mapped_column(String(100))
    dataset: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    gpus: Mapped[int] = mapped_column(Integer, default=1)
    webhook: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    backend: Mapped[str | None] = mapped_column(String(16), nullable=True)
    backend_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    gpu_ids: Mapped[str | None] = mapped_column(String(200), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    launch_retry_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Unix time before which a queued run whose launch failed transiently is not tried again."""
    launch_failing_since: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Unix time of the first transient launch failure in a row; launches give up after a while."""
    launch_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    """The last transient launch failure in a row, shown by /status while the run waits."""
    backend_waiting: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Why the backend holds a launched run before starting it (Ray's own words); None once it runs.
    The API shows such a run as queued, with this as its `waiting`."""
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True, nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    webhook_started: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """None while the `started` notification is owed, else one of WEBHOOK_DONE."""
    webhook_ended: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """None while the `ended` notification is owed, else one of WEBHOOK_DONE."""
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    """Failed tries of the notification now owed; reset when it is settled."""
    webhook_retry_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Unix time before which the owed notification is not tried again."""


class Lease(Base):
    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[float] = mapped_column(Float)
