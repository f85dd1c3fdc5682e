"""A lease row in the database, so one process among all API workers and hosts runs the executor.

The holder renews it on every tick; another process takes it over once it expires, or at once
when the holder ran on the same host and its process is gone (a crashed or restarted service).
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import psutil
from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from fluxtrain.runs.db import Database
from fluxtrain.runs.table import Lease


def make_owner() -> str:
    """An identity no other process, here or on another host, will ever share."""
    started = psutil.Process().create_time()
    return f"{socket.gethostname()}|{os.getpid()}|{started!r}|{uuid.uuid4().hex[:8]}"


def owner_is_gone(owner: str) -> bool:
    """True when `owner` ran on this host and that exact process no longer exists."""
    parts = owner.split("|")
    if len(parts) != 4 or parts[0] != socket.gethostname():
        return False
    try:
        pid, started = int(parts[1]), float(parts[2])
        process = psutil.Process(pid)
        return abs(process.create_time() - started) > 0.01 or process.status() == psutil.STATUS_ZOMBIE
    except (ValueError, psutil.NoSuchProcess):
        return True
    except psutil.Error:
        return False


class DatabaseLease:
    def __init__(self, db: Database, *, name: str = "executor", ttl: float = 15.0) -> None:
        self.db = db
        self.name = name
        self.ttl = ttl
        self.owner = make_owner()

    def acquire(self) -> bool:
        """Take or renew the lease; False while another live process holds it."""
        now = time.time()
        try:
            with self.db.session() as session:
                current = session.scalar(select(Lease).where(Lease.name == self.name))
                if current is None:
                    session.add(Lease(name=self.name, owner=self.owner, expires_at=now + self.ttl))
                    return True
                holder = current.owner
            takeover = [Lease.owner == self.owner, Lease.expires_at < now]
            if holder != self.owner and owner_is_gone(holder):
                takeover.append(Lease.owner == holder)
            with self.db.session() as session:
                won = session.execute(
                    update(Lease)
                    .where(Lease.name == self.name, or_(*takeover))
                    .values(owner=self.owner, expires_at=now + self.ttl)
                ).rowcount
            return bool(won)
        except (IntegrityError, OperationalError):
            return False

    def release(self) -> None:
        """Let the next process take over at once instead of waiting for the expiry."""
        try:
            with self.db.session() as session:
                session.execute(
                    update(Lease)
                    .where(Lease.name == self.name, Lease.owner == self.owner)
                    .values(expires_at=0.0)
                )
        except OperationalError:
            return
