"""The run table (the truth about every run) and the executor's lease, as SQLAlchemy 2 ORM models."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, Float, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

RUN_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})


def utcnow() -> datetime:
    return datetime.now(UTC)


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
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    backend: Mapped[str | None] = mapped_column(String(16), nullable=True)
    backend_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    gpu_ids: Mapped[str | None] = mapped_column(String(200), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    launch_retry_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Unix time before which a queued run whose launch failed transiently is not tried again."""
    launch_failing_since: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Unix time of the first transient launch failure in a row; launches give up after a while."""
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True, nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Lease(Base):
    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[float] = mapped_column(Float)
