"""The executor lease: one holder at a time, taken over on expiry or when its process is gone."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import psutil
import pytest
from sqlalchemy import select

from fluxtrain.runs.db import Database, get_database
from fluxtrain.runs.lease import DatabaseLease, make_owner, owner_is_gone
from fluxtrain.runs.table import Lease
from fluxtrain.settings import Settings


@pytest.fixture
def database(settings: Settings) -> Database:
    return get_database(settings)


def _holder(db: Database) -> str | None:
    with db.session() as session:
        lease = session.scalar(select(Lease).where(Lease.name == "executor"))
    return lease.owner if lease else None


def test_two_holders_never_hold_it_at_once(database: Database) -> None:
    first, second = DatabaseLease(database, ttl=30), DatabaseLease(database, ttl=30)
    assert first.owner != second.owner
    assert first.acquire() is True
    assert second.acquire() is False
    assert first.acquire() is True, "the holder renews its own lease"
    assert _holder(database) == first.owner


def test_an_expired_lease_is_taken_over(database: Database) -> None:
    first, second = DatabaseLease(database, ttl=0.3), DatabaseLease(database, ttl=30)
    assert first.acquire()
    assert not second.acquire()
    time.sleep(0.4)
    assert second.acquire()
    assert not first.acquire(), "the old holder lost it and must not take it back"
    assert _holder(database) == second.owner


def test_released_lease_goes_to_the_next_at_once(database: Database) -> None:
    first, second = DatabaseLease(database, ttl=30), DatabaseLease(database, ttl=30)
    assert first.acquire()
    first.release()
    assert second.acquire()


def _dead_owner() -> str:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(child.pid).create_time()
    child.wait()
    return f"{socket.gethostname()}|{child.pid}|{started!r}|deadbeef"


def test_a_holder_whose_process_is_gone_on_this_host_is_taken_over_before_expiry(database: Database) -> None:
    gone = DatabaseLease(database, ttl=3600)
    gone.owner = _dead_owner()
    assert owner_is_gone(gone.owner)
    assert gone.acquire()
    assert DatabaseLease(database, ttl=30).acquire()


def test_a_live_holder_or_one_on_another_host_is_not_taken_over(database: Database) -> None:
    elsewhere = DatabaseLease(database, ttl=3600)
    elsewhere.owner = "some-other-host|1|0.0|cafecafe"
    assert not owner_is_gone(elsewhere.owner)
    assert not owner_is_gone(make_owner())
    assert elsewhere.acquire()
    assert not DatabaseLease(database, ttl=30).acquire()
