"""The executor against a trainer double: outcomes, cancel, FIFO on one slot, adoption and resume."""

from __future__ import annotations

import os
import shutil
import signal
import time

import psutil
from sqlalchemy import update

from fluxtrain.errors import UnavailableError
from fluxtrain.runs.backend import LaunchSpec
from fluxtrain.runs.executor import Executor, short_error
from fluxtrain.runs.local_backend import LocalBackend, _parse
from fluxtrain.runs.service import cancel_run, get_run
from fluxtrain.runs.status import build_status, run_dir
from fluxtrain.runs.table import Run, utcnow


def _pgid_alive(ref: str) -> bool:
    pgid, _ = _parse(ref)
    return any(
        os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE
        for p in psutil.process_iter()
        if p.pid != os.getpid() and _safe_pgid(p.pid) == pgid
    )


def _safe_pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_run_succeeds_with_progress_and_lora(make_executor, submit, drive, run_settings, db):
    run = submit("demo", max_train_steps=4)
    executor = make_executor()
    done = drive(executor, run.id, lambda r: r.status in ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    status = build_status(run_settings, done)
    assert status.progress.step == 4 and status.progress.total_steps == 4
    assert [o.name for o in status.outputs] == ["demo.safetensors"]
    assert status.started_at is not None and status.finished_at is not None
    assert any("fake trainer demo" in line for line in status.logs)


def test_nonzero_exit_fails_with_last_log_lines(make_executor, submit, drive):
    run = submit("fail")
    done = drive(make_executor(), run.id, lambda r: r.status not in ("queued", "running"))
    assert done.status == "failed"
    assert "the trainer exited with code" in done.error
    assert "boom, out of memory" in done.error


def test_exit_zero_without_final_lora_fails(make_executor, submit, drive):
    run = submit("silent")
    done = drive(make_executor(), run.id, lambda r: r.status not in ("queued", "running"))
    assert done.status == "failed"
    assert "without writing its final LoRA" in done.error


def test_cancel_running_stops_the_process_group(make_executor, submit, drive, run_settings, db):
    run = submit("slow", max_train_steps=50)
    executor = make_executor(cancel_grace=5)
    events = run_dir(run_settings, run.id) / "events.jsonl"
    running = drive(executor, run.id, lambda r: events.is_file() and '"step"' in events.read_text())
    assert _pgid_alive(running.backend_ref)
    cancel_run(db=db, run_id=run.id)
    done = drive(executor, run.id, lambda r: r.status == "canceled", timeout=15)
    assert done.finished_at is not None
    assert not _pgid_alive(running.backend_ref)
    assert '"interrupted"' in events.read_text()


def test_two_runs_on_one_slot_run_one_after_the_other(make_executor, submit, drive, db):
    first = submit("demo", max_train_steps=3)
    second = submit("other", max_train_steps=3)
    executor = make_executor()
    drive(executor, first.id, lambda r: r.status == "running")
    assert get_run(db=db, run_id=second.id).status == "queued"
    done = drive(executor, second.id, lambda r: r.status == "succeeded")
    first_done = get_run(db=db, run_id=first.id)
    assert first_done.status == "succeeded"
    assert done.started_at >= first_done.finished_at


def test_restarted_executor_adopts_a_live_trainer(make_executor, submit, drive, db):
    run = submit("slow", max_train_steps=6)
    first = make_executor()
    running = drive(first, run.id, lambda r: r.backend_ref is not None)
    first.lease.release()
    second = make_executor()
    second.tick()
    assert second.is_leader
    adopted = get_run(db=db, run_id=run.id)
    assert adopted.status == "running" and adopted.backend_ref == running.backend_ref
    done = drive(second, run.id, lambda r: r.status in ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert done.attempts == 1


def test_trainer_killed_with_the_service_resumes_from_state(make_executor, submit, drive, run_settings, db):
    run = submit("slow", max_train_steps=5)
    first = make_executor()
    folder = run_dir(run_settings, run.id)
    running = drive(first, run.id, lambda r: (folder / "state" / "step").exists())
    os.killpg(_parse(running.backend_ref)[0], signal.SIGKILL)
    time.sleep(0.3)
    first.lease.release()
    second = make_executor()
    done = drive(second, run.id, lambda r: r.status in ("succeeded", "failed"), timeout=40)
    assert done.status == "succeeded", done.error
    assert done.attempts == 2
    assert '"resumed_from": 0' not in (folder / "events.jsonl").read_text().split("\n", 1)[1]


def test_lost_trainer_without_state_fails_with_reason(make_executor, submit, drive, run_settings, db):
    run = submit("demo")
    with db.session() as session:
        lost = update(Run).where(Run.id == run.id).values(status="running", backend_ref="999999:1.0")
        session.execute(lost)
    done = drive(make_executor(), run.id, lambda r: r.status != "running")
    assert done.status == "failed"
    assert "lost with the service" in done.error and "no state" in done.error


def test_only_one_executor_holds_the_lease(make_executor):
    first, second = make_executor(), make_executor()
    first.tick()
    second.tick()
    assert first.is_leader and not second.is_leader
    first.stop()
    second.tick()
    assert second.is_leader


def test_queued_run_cancel_is_immediate(make_executor, submit, run_settings, db):
    run = submit("demo")
    canceled = cancel_run(db=db, run_id=run.id)
    assert canceled.status == "canceled"
    make_executor().tick()
    assert get_run(db=db, run_id=run.id).backend_ref is None


def test_cancel_grace_comes_from_the_settings(make_executor, submit, drive, run_settings, db):
    run_settings.cancel_grace_seconds = 0.5
    run = submit("stubborn", max_train_steps=300)
    executor = make_executor()
    assert executor.cancel_grace == 0.5
    events = run_dir(run_settings, run.id) / "events.jsonl"
    running = drive(executor, run.id, lambda r: events.is_file() and '"step"' in events.read_text())
    cancel_run(db=db, run_id=run.id)
    done = drive(executor, run.id, lambda r: r.status == "canceled", timeout=8)
    assert not _pgid_alive(running.backend_ref), "the trainer ignored SIGTERM, so it got SIGKILL"
    assert '"interrupted"' not in events.read_text()
    assert done.finished_at is not None


class FlakyBackend(LocalBackend):
    """The local backend behind a launcher that fails the first `failures` launches with `error`."""

    def __init__(self, entry: tuple[str, ...], failures: int, error: Exception) -> None:
        super().__init__(gpus="", entry=entry)
        self.failures = failures
        self.error = error
        self.launches = 0

    def launch(self, spec: LaunchSpec) -> str:
        self.launches += 1
        if self.launches <= self.failures:
            raise self.error
        return super().launch(spec)


def test_transient_launch_failure_requeues_then_starts(run_settings, db, fake_trainer, submit, drive):
    backend = FlakyBackend((str(fake_trainer),), 2, UnavailableError("the cluster is restarting"))
    executor = Executor(settings=run_settings, db=db, backend=backend, poll_interval=0.05, launch_backoff=1.0)
    run = submit("demo", max_train_steps=2)
    executor.tick()
    waiting = get_run(db=db, run_id=run.id)
    assert waiting.status == "queued" and waiting.attempts == 0 and waiting.started_at is None
    assert waiting.launch_retry_at is not None and waiting.launch_retry_at > time.time()
    shown = build_status(run_settings, waiting)
    assert shown.status == "queued" and shown.error is None
    assert "could not start the trainer (the cluster is restarting); trying again at 20" in shown.waiting
    executor.tick()
    assert backend.launches == 1, "no second try before the backoff has passed"
    done = drive(executor, run.id, lambda r: r.status in ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert backend.launches == 3 and done.attempts == 1
    assert done.launch_retry_at is None and done.launch_failing_since is None
    assert done.launch_error is None and build_status(run_settings, done).waiting is None


def test_waiting_shows_one_short_line_and_only_until_the_retry(run_settings, db, submit) -> None:
    run = submit("demo")
    error = "cluster down: " + "x" * 1000 + "\nTraceback (most recent call last): ..."
    with db.session() as session:
        session.execute(
            update(Run)
            .where(Run.id == run.id)
            .values(launch_error=short_error(RuntimeError(error)), launch_retry_at=time.time() + 30)
        )
    waiting = build_status(run_settings, get_run(db=db, run_id=run.id)).waiting
    assert waiting.startswith("could not start the trainer (cluster down: xxx")
    assert "Traceback" not in waiting and len(waiting) < 400
    with db.session() as session:
        session.execute(update(Run).where(Run.id == run.id).values(launch_retry_at=time.time() - 1))
    assert build_status(run_settings, get_run(db=db, run_id=run.id)).waiting is None


def test_launch_that_stays_unavailable_fails_with_the_reason(run_settings, db, fake_trainer, submit, drive):
    backend = FlakyBackend((str(fake_trainer),), 10_000, ConnectionError("connection refused"))
    executor = Executor(
        settings=run_settings, db=db, backend=backend, launch_retry_for=0.6, launch_backoff=0.1
    )
    run = submit("demo")
    done = drive(executor, run.id, lambda r: r.status == "failed", timeout=10)
    assert "stayed unavailable" in done.error and "connection refused" in done.error
    assert backend.launches >= 3


def test_deterministic_launch_error_fails_at_once(make_executor, submit, run_settings, db):
    run = submit("demo")
    shutil.rmtree(run_dir(run_settings, run.id))
    make_executor().tick()
    failed = get_run(db=db, run_id=run.id)
    assert failed.status == "failed" and failed.launch_retry_at is None
    assert failed.error.startswith("could not start the trainer")


def _claim_without_ref(db, run_id: str) -> None:
    """What a service that died between launching a trainer and saving its reference leaves behind."""
    with db.session() as session:
        session.execute(
            update(Run).where(Run.id == run_id).values(status="running", attempts=1, started_at=utcnow())
        )


def test_unsaved_reference_adopts_the_live_trainer(
    run_settings, db, fake_trainer, submit, drive, make_executor
):
    run = submit("slow", max_train_steps=4)
    _claim_without_ref(db, run.id)
    folder = run_dir(run_settings, run.id)
    ref = LocalBackend(gpus="", entry=(str(fake_trainer),)).launch(
        LaunchSpec(run_id=run.id, run_dir=folder, gpu_ids=[], num_gpus=1)
    )
    executor = make_executor()
    executor.tick()
    adopted = get_run(db=db, run_id=run.id)
    assert adopted.status == "running"
    assert _parse(adopted.backend_ref)[0] == _parse(ref)[0]
    done = drive(executor, run.id, lambda r: r.status in ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert done.attempts == 1
    assert (folder / "events.jsonl").read_text().count('"started"') == 1, "the trainer was not started twice"


def test_unsaved_reference_without_trainer_starts_it(make_executor, submit, drive, db):
    run = submit("demo", max_train_steps=2)
    _claim_without_ref(db, run.id)
    done = drive(make_executor(), run.id, lambda r: r.status in ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert done.attempts == 1


def test_the_trainer_does_not_inherit_the_services_secrets(tmp_path, monkeypatch):
    """It reads run.json, never the settings: the API key and the database URL stay with the service."""
    monkeypatch.setenv("FLUXTRAIN_API_KEY", "sekrit")
    monkeypatch.setenv("FLUXTRAIN_DATABASE_URL", "postgresql://u:pw@db/x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = tmp_path / "dump_env.py"
    entry.write_text(
        "import os, pathlib, sys\n"
        "pathlib.Path(sys.argv[1], 'names').write_text('\\n'.join(sorted(os.environ)))\n"
    )
    folder = tmp_path / "run"
    folder.mkdir()
    ref = LocalBackend(gpus="", entry=(str(entry),)).launch(
        LaunchSpec(run_id="r1", run_dir=folder, gpu_ids=[], num_gpus=1)
    )
    psutil.Process(_parse(ref)[0]).wait(timeout=120)
    names = (folder / "names").read_text().split("\n")
    assert "HF_HUB_OFFLINE" in names and "CUDA_VISIBLE_DEVICES" in names
    assert "FLUXTRAIN_API_KEY" not in names and "FLUXTRAIN_DATABASE_URL" not in names
