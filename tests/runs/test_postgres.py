"""FLUXTRAIN_DATABASE_URL=postgresql+psycopg://... against a real PostgreSQL server started here.

Migrations, two service processes sharing one database (one executor lease, runs seen and
cancelled across them, a takeover when the lease holder is killed), and a database that is
unreachable at start or goes away mid-run. The services are real `uvicorn` processes whose
executor launches the runs layer's trainer double.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import select, text

from fluxtrain.runs.db import MIGRATIONS_DIR, get_database, make_engine, upgrade
from fluxtrain.runs.lease import DatabaseLease
from fluxtrain.runs.table import Base, Lease, Run
from fluxtrain.settings import Settings
from tests.runs.conftest import FAKE_TRAINER
from tests.runs.postgres_server import PostgresServer, free_port, server_bin_dir
from tests.runs.service_doubles import write_trainable_dataset
from tests.service_process import wait_healthy

pytestmark = [pytest.mark.timeout(240), pytest.mark.e2e]
BIN_DIR = server_bin_dir()
if BIN_DIR is None:
    pytest.skip("no PostgreSQL server (initdb): apt-get install postgresql", allow_module_level=True)
LEASE_TTL = 15.0
SERVICE = textwrap.dedent(
    """
    import sys
    import uvicorn
    from fluxtrain.runs import executor
    from fluxtrain.runs.local_backend import LocalBackend

    executor.make_backend = lambda settings: LocalBackend(gpus="", entry=(sys.argv[1],))
    uvicorn.run("fluxtrain.api.app:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[2]))
    """
)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    assert BIN_DIR is not None
    server = PostgresServer(BIN_DIR)
    server.init()
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def database_url(postgres: PostgresServer) -> str:
    return postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")


def test_migrations_build_the_models_and_run_twice_as_a_no_op(database_url: str) -> None:
    engine = make_engine(database_url)
    upgrade(engine)
    upgrade(engine)
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    with engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == head
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        assert connection.scalar(text("select version()")).startswith("PostgreSQL")
    engine.dispose()


class Service:
    """One service replica: a real process on its own port and process group, sharing root and database."""

    def __init__(self, root: Path, database_url: str, name: str) -> None:
        self.root, self.database_url, self.name = root, database_url, name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (self.root / "service.py").write_text(SERVICE)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXTRAIN_")}
        env.update(
            MOUNT_PATH=str(self.root / "data"),
            FS_PATH=str(self.root / "models"),
            FLUXTRAIN_DATABASE_URL=self.database_url,
            CUDA_VISIBLE_DEVICES="",
        )
        script, trainer = self.root / "service.py", self.root / "trainer.py"
        command = [sys.executable, str(script), str(trainer), str(self.port)]
        with (self.root / f"{self.name}.log").open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.root, env=env, stdout=log, stderr=log, start_new_session=True
            )
        wait_healthy(self.url, self.root / f"{self.name}.log", timeout=90)

    def kill(self) -> None:
        """SIGKILL the replica's whole process group (its trainers run in sessions of their own)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)

    def train(self, **body: object) -> str:
        response = httpx.post(f"{self.url}/train", json={"dataset": "demo", **body}, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["run_id"]

    def ended(self, run_id: str) -> dict | None:
        body = self.status(run_id)
        return None if body["status"] in ("queued", "running") else body

    def status(self, run_id: str) -> dict:
        response = httpx.get(f"{self.url}/status/{run_id}", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()


def _wait(what: Callable[[], object], timeout: float = 60, every: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")


def _events(settings: Settings, run_id: str) -> list[dict]:
    path = settings.runs_dir / run_id / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture
def replicas(tmp_path: Path, database_url: str) -> Iterator[tuple[Settings, Callable[[str], Service]]]:
    from fluxtrain.training.tiny import write_tiny_flux_files

    settings = Settings(
        mount_path=tmp_path / "data", fs_path=tmp_path / "models", database_url=database_url, _env_file=None
    )
    (tmp_path / "trainer.py").write_text(FAKE_TRAINER)
    settings.datasets_dir.mkdir(parents=True)
    write_trainable_dataset(settings, "demo")
    write_tiny_flux_files(settings.models_root)
    started: list[Service] = []

    def start(name: str) -> Service:
        service = Service(tmp_path, database_url, name)
        service.start()
        started.append(service)
        return service

    yield settings, start
    for service in started:
        service.stop()
    db = get_database(settings)
    with db.session() as session:
        refs = [run.backend_ref for run in session.scalars(select(Run)) if run.backend_ref]
    for ref in refs:
        try:
            os.killpg(int(ref.split(":")[0]), signal.SIGKILL)
        except ProcessLookupError:
            continue
    db.engine.dispose()


def _lease_pid(settings: Settings) -> int | None:
    with get_database(settings).session() as session:
        lease = session.scalar(select(Lease).where(Lease.name == "executor"))
    return int(lease.owner.split("|")[1]) if lease is not None and lease.expires_at > time.time() else None


def _run(settings: Settings, run_id: str) -> Run:
    with get_database(settings).session() as session:
        run = session.get(Run, run_id)
    assert run is not None
    return run


def test_two_replicas_share_runs_and_the_survivor_adopts_the_killed_leaders_run(replicas) -> None:
    settings, start = replicas
    first, second = start("first"), start("second")
    pids = {first.process.pid: first, second.process.pid: second}  # type: ignore[union-attr]
    leader_pid = _wait(lambda: _lease_pid(settings))
    assert leader_pid in pids
    time.sleep(2.5)  # both executors have ticked a few times: the lease has not moved
    assert _lease_pid(settings) == leader_pid
    leader = pids[leader_pid]  # type: ignore[index]
    follower = second if leader is first else first
    with get_database(settings).session() as session:
        assert session.scalar(text("select count(*) from leases")) == 1

    long_run = follower.train(output_name="slow-pg", max_train_steps=40)
    queued = leader.train(output_name="queued-pg", max_train_steps=3)
    _wait(lambda: leader.status(long_run)["progress"]["step"] >= 2)
    assert follower.status(long_run)["status"] == "running"
    assert follower.status(queued)["status"] == "queued"
    cancel = httpx.post(f"{follower.url}/runs/{queued}/cancel", timeout=10)
    assert cancel.status_code == 200, cancel.text
    assert leader.status(queued)["status"] == "canceled"
    ref = _run(settings, long_run).backend_ref
    assert ref is not None

    killed_at = time.monotonic()
    leader.kill()
    new_leader = _wait(lambda: _lease_pid(settings) == follower.process.pid, timeout=LEASE_TTL + 5)  # type: ignore[union-attr]
    assert new_leader and time.monotonic() - killed_at <= LEASE_TTL
    done = _wait(lambda: follower.ended(long_run), 60)
    assert done["status"] == "succeeded", done  # type: ignore[index]
    run = _run(settings, long_run)
    assert run.attempts == 1 and run.backend_ref == ref
    assert [e["event"] for e in _events(settings, long_run)].count("started") == 1
    assert _events(settings, queued) == []


def test_lease_is_held_by_exactly_one_of_many_contenders(database_url: str, tmp_path: Path) -> None:
    settings = Settings(mount_path=tmp_path, database_url=database_url, _env_file=None)
    db = get_database(settings)
    leases = [DatabaseLease(db, ttl=LEASE_TTL) for _ in range(5)]
    assert [lease.acquire() for lease in leases].count(True) == 1
    holder = next(lease for lease in leases if lease.acquire())
    holder.release()
    assert [lease.acquire() for lease in leases if lease is not holder].count(True) == 1
    db.engine.dispose()


def test_serve_with_an_unreachable_database_exits_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXTRAIN_")}
    env.update(
        FLUXTRAIN_DATABASE_URL=f"postgresql+psycopg://fluxtrain:s3cret@127.0.0.1:{closed}/runs",
        MOUNT_PATH=str(tmp_path / "data"),
    )
    cli = [sys.executable, "-c", "from fluxtrain.cli.main import app; app()", "serve"]
    done = subprocess.run(cli, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"cannot reach the database at postgresql+psycopg://fluxtrain:***@127.0.0.1:{closed}/runs" in (
        done.stderr
    )
    assert "Connection refused" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout and "s3cret" not in done.stderr + done.stdout


def test_database_gone_mid_run_loses_no_run(tmp_path: Path) -> None:
    assert BIN_DIR is not None
    server = PostgresServer(BIN_DIR)
    try:
        server.init()
        server.start()
        url = server.create_database("runs")
        from fluxtrain.training.tiny import write_tiny_flux_files

        settings = Settings(
            mount_path=tmp_path / "data", fs_path=tmp_path / "models", database_url=url, _env_file=None
        )
        (tmp_path / "trainer.py").write_text(FAKE_TRAINER)
        settings.datasets_dir.mkdir(parents=True)
        write_trainable_dataset(settings, "demo")
        write_tiny_flux_files(settings.models_root)
        service = Service(tmp_path, url, "only")
        service.start()
        try:
            run_id = service.train(output_name="slow-outage", max_train_steps=25)
            _wait(lambda: service.status(run_id)["progress"]["step"] >= 2)
            server.stop()
            down = httpx.get(f"{service.url}/status/{run_id}", timeout=30)
            assert down.status_code == 503
            assert down.json()["detail"].startswith("the run database is unreachable right now")
            time.sleep(3)  # several executor ticks against a dead database
            assert service.process is not None and service.process.poll() is None
            server.start()
            done = _wait(lambda: service.ended(run_id), 90)
            assert done["status"] == "succeeded", done  # type: ignore[index]
            steps = [e["step"] for e in _events(settings, run_id) if e["event"] == "step"]
            assert steps == list(range(1, 26))
            assert [e["event"] for e in _events(settings, run_id)].count("started") == 1
        finally:
            service.stop()
            get_database(settings).engine.dispose()
    finally:
        server.destroy()
