"""The executor: starts queued runs FIFO as devices free up, watches them, and settles how they end.

It runs in one thread of one process (whoever holds the database lease) and keeps nothing a
restart could lose: every decision is read back from the run table and the run directory.
A run the backend accepted but holds (WAITING: a Ray job with no free GPU) keeps the backend's
message in the row, is shown queued, and counts as started only once the backend starts it.
On taking the lease it looks at every run marked running: a live trainer is adopted; a dead
one that ended while nobody watched is settled from what it left behind, and one killed with
the service is resumed from its saved state (or failed when it saved none). A run whose trainer
reference was never saved (the service died right after launching) is looked up by the backend
and adopted, or started again when its trainer never got going.
A launch that fails because the backend is briefly unreachable puts the run back in the queue,
tried again with growing delays for a bounded time; any other launch error fails it at once.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from sqlalchemy import select, update

from fluxtrain.errors import UnavailableError
from fluxtrain.rundir import RunDir, first_event, recent_events
from fluxtrain.runs.backend import LaunchSpec, PollResult, ProcessState, TrainerBackend
from fluxtrain.runs.db import Database, get_database
from fluxtrain.runs.lease import DatabaseLease
from fluxtrain.runs.local_backend import LocalBackend
from fluxtrain.runs.status import last_event, run_dir
from fluxtrain.runs.table import Run, utcnow
from fluxtrain.runs.webhooks import WebhookOutbox
from fluxtrain.settings import Settings
from fluxtrain.storage.remote import RemoteStore, open_remote
from fluxtrain.storage.uploader import ArtifactSync, final_sync

log = logging.getLogger(__name__)
ERROR_LOG_LINES = 20
CPU_SLOT = "cpu"
TRANSIENT_LAUNCH_ERRORS: tuple[type[BaseException], ...] = (UnavailableError, ConnectionError, TimeoutError)
MAX_LAUNCH_DELAY_S = 60.0
LAUNCH_ERROR_CHARS = 300


def make_backend(settings: Settings) -> TrainerBackend:
    """The backend FLUXTRAIN_EXECUTOR names: `local` (process groups here) or `ray` (Ray jobs)."""
    if settings.executor == "ray":
        try:
            from fluxtrain.runs.ray_backend import RayBackend  # type: ignore[import-not-found]
        except ImportError as exc:
            raise UnavailableError(f"the Ray executor is not available: {exc}") from exc
        return RayBackend(settings)
    return LocalBackend(gpus=settings.gpus)


def _has_state(folder: Path) -> bool:
    state = RunDir(folder).state
    return state.is_dir() and any(state.iterdir())


def _never_started(folder: Path) -> bool:
    """True when no trainer ever got going in the run dir: no start event, no state, no LoRA."""
    run = RunDir(folder)
    return first_event(run.events, "started") is None and not _has_state(folder) and not run.lora_files()


def _waiting(run: Run, now: float) -> bool:
    return run.launch_retry_at is not None and now < run.launch_retry_at


class Executor:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        backend: TrainerBackend,
        poll_interval: float = 1.0,
        lease_ttl: float = 15.0,
        cancel_grace: float | None = None,
        max_attempts: int = 3,
        store: RemoteStore | None = None,
        launch_retry_for: float = 600.0,
        launch_backoff: float = 2.0,
        sync_interval: float = 5.0,
        webhooks: WebhookOutbox | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.backend = backend
        self.poll_interval = poll_interval
        self.cancel_grace = settings.cancel_grace_seconds if cancel_grace is None else cancel_grace
        self.max_attempts = max_attempts
        self.store = store
        self.launch_retry_for = launch_retry_for
        self.launch_backoff = launch_backoff
        self.sync_interval = sync_interval
        self.lease = DatabaseLease(db, ttl=lease_ttl)
        self.webhooks = webhooks or WebhookOutbox(settings=settings, db=db)
        self._syncs: dict[str, ArtifactSync] = {}
        self._settling: set[str] = set()
        self._leader = False
        self._terminated: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        return self._leader

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fluxtrain-executor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; trainers keep running and the next executor adopts them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.webhooks.wait(timeout=self.webhooks.timeout + 5)
        if self._leader:
            self.lease.release()
            self._leader = False

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the service must outlive any one bad tick
                log.exception("executor tick failed")
            self._stop.wait(self.poll_interval)

    def tick(self) -> None:
        """One pass: hold the lease, settle runs that ended, send cancels, start what fits, notify."""
        if not self.lease.acquire():
            self._leader = False
            return
        if not self._leader:
            # Leader only once recovery went through: a backend that fails it gets it again next tick.
            self._recover()
            self._leader = True
        self._watch()
        self._start_queued()
        self.webhooks.pump()

    def _runs(self, status: str) -> list[Run]:
        with self.db.session() as session:
            return list(
                session.scalars(select(Run).where(Run.status == status).order_by(Run.created_at, Run.id))
            )

    def _recover(self) -> None:
        for run in self._runs("running"):
            if run.id in self._settling:
                continue
            folder = run_dir(self.settings, run.id)
            if run.backend_ref is None:
                self._recover_unsaved(run, folder)
                continue
            result = self.backend.poll(run.backend_ref, folder)
            if result.state is not ProcessState.EXITED:
                log.info("adopted run %s (still %s)", run.id, result.state.value)
            else:
                self._settle(run, result, lost=True)

    def _recover_unsaved(self, run: Run, folder: Path) -> None:
        """A run claimed by a service that died before it saved the trainer's reference."""
        ref = self.backend.find(run.id, folder)
        if ref is not None:
            with self.db.session() as session:
                session.execute(
                    update(Run).where(Run.id == run.id, Run.status == "running").values(backend_ref=ref)
                )
            log.info("adopted run %s (found its trainer %s)", run.id, ref)
        elif _never_started(folder):
            log.info("run %s: its trainer never started; queued again", run.id)
            started_at = None if run.attempts <= 1 else run.started_at
            self._requeue(run, attempts=max(0, run.attempts - 1), started_at=started_at)
        else:
            self._settle(run, PollResult(ProcessState.EXITED), lost=True)

    def _requeue(self, run: Run, **values: object) -> None:
        with self.db.session() as session:
            session.execute(
                update(Run)
                .where(Run.id == run.id, Run.status == "running")
                .values(status="queued", backend_ref=None, gpu_ids=None, backend_waiting=None, **values)
            )

    def _watch(self) -> None:
        for run in self._runs("running"):
            if run.backend_ref is None or run.id in self._settling:
                continue
            folder = run_dir(self.settings, run.id)
            if self.store is not None and run.id not in self._syncs:
                sync = ArtifactSync(store=self.store, run_dir=folder, interval_s=self.sync_interval)
                self._syncs[run.id] = sync.start()
            result = self.backend.poll(run.backend_ref, folder)
            if result.state is ProcessState.EXITED:
                self._settle(run, result, lost=False)
                continue
            self._note_start(run, result)
            if run.cancel_requested_at is not None:
                if run.id not in self._terminated:
                    self.backend.cancel(run.backend_ref, folder, force=False)
                    self._terminated.add(run.id)
                elif time.time() - run.cancel_requested_at > self.cancel_grace:
                    self.backend.cancel(run.backend_ref, folder, force=True)

    def _note_start(self, run: Run, result: PollResult) -> None:
        """Keep the backend's waiting message in the row; stamp `started_at` once the trainer runs."""
        waiting = None
        if result.state is ProcessState.WAITING:
            waiting = result.message or "waiting for the backend to start the trainer"
        if waiting == run.backend_waiting and (waiting is not None or run.started_at is not None):
            return
        values: dict[str, object] = {"backend_waiting": waiting}
        if waiting is None:
            values["started_at"] = run.started_at or utcnow()
        with self.db.session() as session:
            session.execute(update(Run).where(Run.id == run.id, Run.status == "running").values(**values))

    def _log_tail(self, run: Run, folder: Path) -> list[str]:
        return self.backend.logs(run.backend_ref, folder, tail=ERROR_LOG_LINES)

    def _settle(self, run: Run, result: PollResult, *, lost: bool) -> None:
        """Decide how a trainer that is no longer running ended, from what it left behind."""
        folder = run_dir(self.settings, run.id)
        self._terminated.discard(run.id)
        events = recent_events(RunDir(folder).events)
        ended = last_event(events, "finished", "interrupted", "error", "started")
        kind = ended["event"] if ended else None
        code = result.returncode
        has_final = RunDir(folder).checkpoint(run.output_name, None).is_file()
        if run.cancel_requested_at is not None:
            self._complete(run, "canceled", None)
        elif result.message is not None:
            self._complete(run, "failed", self._error(run, folder, result.message, None))
        elif kind == "interrupted" and not has_final:
            self._resume(run, folder, "the trainer was interrupted")
        elif code not in (None, 0):
            reason = (
                f"the trainer exited with code {code}"
                if code > 0
                else f"the trainer was killed by signal {-code}"
            )
            self._complete(run, "failed", self._error(run, folder, reason, ended))
        elif has_final and kind != "error":
            self._complete(run, "succeeded", None)
        elif lost and kind not in ("error", "finished"):
            self._resume(run, folder, "the trainer was lost with the service")
        elif kind == "error":
            self._complete(run, "failed", self._error(run, folder, "the trainer reported an error", ended))
        else:
            reason = "the trainer exited without writing its final LoRA"
            self._complete(run, "failed", self._error(run, folder, reason, ended))

    def _error(self, run: Run, folder: Path, reason: str, ended: dict | None) -> str:
        message = ended.get("message") or ended.get("error") if ended and ended["event"] == "error" else None
        lines = self._log_tail(run, folder)
        head = f"{reason}: {message}" if message else reason
        return "\n".join([head, *lines]) if lines else head

    def _complete(self, run: Run, status: str, error: str | None) -> None:
        """Upload what is left (in the background, the run stays running until then), then finish."""
        sync = self._syncs.pop(run.id, None)
        store = self.store
        if store is None:
            self._finish(run, status, error)
            return
        self._settling.add(run.id)

        def upload_then_finish() -> None:
            try:
                if sync is not None:
                    sync.stop(final=True)
                else:
                    final_sync(store=store, run_dir=run_dir(self.settings, run.id))
            except Exception:  # noqa: BLE001 - a failed upload is reported in events, never fails the run
                log.exception("final upload of run %s failed", run.id)
            finally:
                self._finish(run, status, error)
                self._settling.discard(run.id)

        threading.Thread(target=upload_then_finish, name=f"finish-{run.id}", daemon=True).start()

    def _resume(self, run: Run, folder: Path, reason: str) -> None:
        sync = self._syncs.pop(run.id, None)
        if sync is not None:
            sync.stop(final=False)
        if not _has_state(folder):
            self._complete(
                run, "failed", self._error(run, folder, f"{reason} and had saved no state to resume", None)
            )
        elif run.attempts >= self.max_attempts:
            self._complete(
                run,
                "failed",
                self._error(run, folder, f"{reason}; gave up after {run.attempts} starts", None),
            )
        else:
            log.info("run %s: %s; queued again to resume from its saved state", run.id, reason)
            self._requeue(run)

    def _finish(self, run: Run, status: str, error: str | None) -> None:
        with self.db.session() as session:
            session.execute(
                update(Run)
                .where(Run.id == run.id, Run.status == "running")
                .values(status=status, error=error, finished_at=utcnow(), backend_waiting=None)
            )
        log.info("run %s %s", run.id, status)

    def _start_queued(self) -> None:
        queued = self._runs("queued")
        if not queued:
            return
        now = time.time()
        slots = self.backend.slots()
        if slots is None:
            for run in queued:
                if not _waiting(run, now):
                    self._launch(run, [])
            return
        busy = {gpu for run in self._runs("running") for gpu in (run.gpu_ids or "").split(",") if gpu}
        free = [slot for slot in slots if slot not in busy]
        for run in queued:
            need = 1 if slots == [CPU_SLOT] else run.gpus
            if need > len(slots):
                error = f"the run needs {need} GPUs and this host has {len(slots)}"
                self._claim(run, [])
                self._finish(run, "failed", error)
                continue
            if need > len(free) or _waiting(run, now):
                break  # FIFO: a run waiting for a device or for its next launch try keeps its place
            taken, free = free[:need], free[need:]
            self._launch(run, taken)

    def _claim(self, run: Run, slots: list[str]) -> bool:
        with self.db.session() as session:
            return bool(
                session.execute(
                    update(Run)
                    .where(Run.id == run.id, Run.status == "queued")
                    .values(
                        status="running",
                        gpu_ids=",".join(slots) or None,
                        attempts=run.attempts + 1,
                        backend=self.backend.name,
                        backend_ref=None,
                    )
                ).rowcount
            )

    def _launch(self, run: Run, slots: list[str]) -> None:
        if not self._claim(run, slots):
            return
        folder = run_dir(self.settings, run.id)
        gpu_ids = [slot for slot in slots if slot != CPU_SLOT]
        # A backend that schedules by itself (no slots handed out) is asked for the run's own count.
        num_gpus = len(gpu_ids) if slots else run.gpus
        try:
            ref = self.backend.launch(
                LaunchSpec(run_id=run.id, run_dir=folder, gpu_ids=gpu_ids, num_gpus=max(1, num_gpus))
            )
        except TRANSIENT_LAUNCH_ERRORS as exc:
            self._launch_later(run, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a launch failure fails the run, not the service
            log.exception("could not start run %s", run.id)
            self._finish(run, "failed", f"could not start the trainer: {exc}")
            return
        with self.db.session() as session:
            session.execute(
                update(Run)
                .where(Run.id == run.id)
                .values(backend_ref=ref, launch_retry_at=None, launch_failing_since=None, launch_error=None)
            )
        try:
            first = self.backend.poll(ref, folder)
        except TRANSIENT_LAUNCH_ERRORS:
            first = PollResult(ProcessState.RUNNING)
        self._note_start(run, first)
        log.info("started run %s (attempt %d)", run.id, run.attempts + 1)

    def _launch_later(self, run: Run, exc: BaseException) -> None:
        """Back to the queue after a transient launch failure; the delay doubles, up to a deadline."""
        now = time.time()
        since = run.launch_failing_since or now
        if now - since >= self.launch_retry_for:
            reason = (
                f"could not start the trainer: the backend stayed unavailable for {now - since:.0f} s "
                f"(gave up after {self.launch_retry_for:g} s); last error: {exc}"
            )
            log.error("run %s: %s", run.id, reason)
            self._finish(run, "failed", reason)
            return
        delay = min(max(now - since, self.launch_backoff), MAX_LAUNCH_DELAY_S)
        log.warning("run %s: could not start the trainer (%s); trying again in %.0f s", run.id, exc, delay)
        self._requeue(
            run,
            attempts=run.attempts,
            started_at=run.started_at,
            launch_retry_at=now + delay,
            launch_failing_since=since,
            launch_error=short_error(exc),
        )


def short_error(exc: BaseException, limit: int = LAUNCH_ERROR_CHARS) -> str:
    """A launch error as one short line: backends may put whole tracebacks in their messages."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def start_executor(settings: Settings) -> Executor:
    """The executor the service runs in its lifespan; only the lease holder does any work."""
    executor = Executor(
        settings=settings,
        db=get_database(settings),
        backend=make_backend(settings),
        store=open_remote(settings),
    )
    executor.start()
    return executor
