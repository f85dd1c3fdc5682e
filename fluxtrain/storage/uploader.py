"""Copying a run's checkpoints, final LoRA and samples to S3 / GCS as they appear.

A run's files go to `<prefix>/<run_id>/<path in run dir>`, e.g.
`s3://bucket/prefix/<run_id>/output/mylora-000001.safetensors`. Only finished files are sent:
every regular file under `output/` and `samples/` whose path has no part starting with '.'
(the trainer writes to hidden temporary names and renames). A file whose size or mtime changed
since its upload is sent again. Local files are never deleted or modified here; a file the trainer
deleted on purpose (`keep_best_only` removes the other epoch checkpoints) is listed in
`RunDir.removed`, and its remote copy is deleted too. A file that merely vanished keeps its copy:
the remote store is where a lost local run dir is recovered from.

Two files in the run dir record what was sent, both written atomically (temp file + rename):

`RunDir.uploads`, the one the runs layer reads to fill `outputs[].url` (a flat map from the
file's path inside the run dir, '/'-separated, to its remote URL; absent until the first upload):

    {
      "output/mylora-000001.safetensors": "s3://bucket/prefix/<run_id>/output/mylora-000001.safetensors",
      "samples/000010-0.png": "s3://bucket/prefix/<run_id>/samples/000010-0.png"
    }

`RunDir.upload_state`, this module's own bookkeeping (what size/mtime was sent, failures and
when to try again; Unix times):

    {
      "version": 1,
      "uploaded": {"output/mylora-000001.safetensors": {"url": "s3://...", "size": 1234,
                   "mtime_ns": 1732540000000000000, "uploaded_at": 1732540001.25}},
      "failed": {"samples/000010-0.png": {"attempts": 2, "error": "EndpointConnectionError: ...",
                 "last_attempt_at": 1732540001.25, "next_attempt_at": 1732540005.25}}
    }

A file leaves `failed` once uploaded.

Each outcome is also appended to the run's events (`fluxtrain.rundir`), as the trainer's are:

    {"event": "upload", "time": 1732540001.25, "file": "output/mylora.safetensors",
     "url": "s3://...", "size": 1234}
    {"event": "upload_failed", "time": 1732540001.25, "file": "output/mylora.safetensors",
     "error": "...", "attempts": 2, "retry_in": 4.0}

(`retry_in` is null when no further try is planned: the final sync gave up.) A remote copy deleted
after its file was removed on purpose, or a deletion that failed and is tried on the next pass:

    {"event": "upload_removed", "time": 1732540001.25, "file": "output/mylora-000001.safetensors",
     "url": "s3://..."}
    {"event": "upload_remove_failed", "time": 1732540001.25, "file": "output/mylora-000001.safetensors",
     "url": "s3://...", "error": "..."}

Use `sync_once` on every executor tick, or an `ArtifactSync` thread per run, and `final_sync`
(or `ArtifactSync.stop()`) when the run ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from fluxtrain.errors import FluxtrainError
from fluxtrain.fsutil import atomic_write_json
from fluxtrain.rundir import RunDir, append_event
from fluxtrain.storage.remote import RemoteStore

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500
MAX_RETRY_DELAY_S = 300.0

_locks_guard = threading.Lock()
_locks: dict[Path, threading.Lock] = {}


class UploadError(FluxtrainError):
    """An artifact could not be copied to the remote store after every attempt."""


class UploadedFile(BaseModel):
    url: str
    size: int
    mtime_ns: int
    uploaded_at: float


class FailedUpload(BaseModel):
    attempts: int
    error: str
    last_attempt_at: float
    next_attempt_at: float


class UploadState(BaseModel):
    version: int = 1
    uploaded: dict[str, UploadedFile] = Field(default_factory=dict)
    failed: dict[str, FailedUpload] = Field(default_factory=dict)


class SyncReport(BaseModel):
    uploaded: list[str] = Field(default_factory=list)
    failed: list[str] = Field(default_factory=list)
    pending: list[str] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)
    remove_failed: list[str] = Field(default_factory=list)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def upload_file(
    *,
    store: RemoteStore,
    local_path: Path,
    key: str,
    attempts: int = 3,
    backoff_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Copy one file to the store, retrying with doubling delays; a network blip must not lose it."""
    remote_path = store.path(key)
    last: BaseException | None = None
    for attempt in range(1, attempts + 1):
        if not local_path.is_file():
            raise UploadError(f"{local_path} no longer exists; nothing to upload")
        try:
            store.fs.put_file(str(local_path), remote_path)
            return store.url(key)
        except Exception as exc:  # every library and network error is worth another try
            last = exc
            logger.warning(
                "upload of %s to %s failed (attempt %d/%d): %s",
                local_path.name,
                store.url(key),
                attempt,
                attempts,
                _short(exc),
            )
            if attempt < attempts:
                sleep(backoff_s * 2 ** (attempt - 1))
    raise UploadError(f"upload of {local_path.name} to {store.url(key)} failed: {_short(last)}") from last


def load_state(run_dir: Path) -> UploadState:
    """What this module sent and what failed; absent or unreadable means nothing was sent yet."""
    path = RunDir(run_dir).upload_state
    try:
        return UploadState.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return UploadState()
    except (ValidationError, ValueError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return UploadState()


def _save_state(run_dir: Path, state: UploadState) -> None:
    files = RunDir(run_dir)
    atomic_write_json(files.upload_state, state.model_dump(mode="json"))
    atomic_write_json(files.uploads, {key: record.url for key, record in state.uploaded.items()})


def remote_url(run_dir: Path, relpath: str) -> str | None:
    """The remote URL of `relpath` (e.g. 'output/x.safetensors') once uploaded, else None."""
    return RunDir(run_dir).uploaded_urls().get(relpath)


def _append_event(run_dir: Path, event: str, **fields: object) -> None:
    append_event(RunDir(run_dir).events, event, **fields)


def _finished_files(run_dir: Path) -> Iterator[tuple[str, Path]]:
    for root in RunDir(run_dir).artifact_dirs:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if not name.startswith(".") and path.is_file() and not path.is_symlink():
                    yield path.relative_to(run_dir).as_posix(), path


def _run_lock(run_dir: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(run_dir.resolve(), threading.Lock())


def _retry_delay(attempts: int, backoff_s: float) -> float:
    return min(backoff_s * 2**attempts, MAX_RETRY_DELAY_S)


def sync_once(
    *,
    store: RemoteStore,
    run_dir: Path,
    force: bool = False,
    give_up: bool = False,
    attempts: int = 2,
    backoff_s: float = 1.0,
    until: float | None = None,
) -> SyncReport:
    """Upload every finished artifact not yet sent; failures wait for a later pass, with backoff.

    `force` ignores the backoff, `give_up` marks failures as final, and files not yet tried when
    the Unix time `until` passes are left pending.
    """
    report = SyncReport()
    with _run_lock(run_dir):
        state = load_state(run_dir)
        run_id = run_dir.name
        for relpath, path in _finished_files(run_dir):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            done = state.uploaded.get(relpath)
            if done and done.size == stat.st_size and done.mtime_ns == stat.st_mtime_ns:
                continue
            failed = state.failed.get(relpath)
            now = time.time()
            waiting = failed is not None and not force and now < failed.next_attempt_at
            if waiting or (until is not None and now >= until):
                report.pending.append(relpath)
                continue
            try:
                url = upload_file(
                    store=store,
                    local_path=path,
                    key=f"{run_id}/{relpath}",
                    attempts=attempts,
                    backoff_s=backoff_s,
                )
            except UploadError as exc:
                tries = (failed.attempts if failed else 0) + 1
                delay = _retry_delay(tries, backoff_s)
                state.failed[relpath] = FailedUpload(
                    attempts=tries, error=exc.message, last_attempt_at=now, next_attempt_at=now + delay
                )
                _save_state(run_dir, state)
                _append_event(
                    run_dir,
                    "upload_failed",
                    file=relpath,
                    error=exc.message,
                    attempts=tries,
                    retry_in=None if give_up else delay,
                )
                report.failed.append(relpath)
                continue
            state.failed.pop(relpath, None)
            state.uploaded[relpath] = UploadedFile(
                url=url, size=stat.st_size, mtime_ns=stat.st_mtime_ns, uploaded_at=time.time()
            )
            _save_state(run_dir, state)
            _append_event(run_dir, "upload", file=relpath, url=url, size=stat.st_size)
            report.uploaded.append(relpath)
        _remove_deleted(store, run_dir, state, report)
    return report


def _remove_deleted(store: RemoteStore, run_dir: Path, state: UploadState, report: SyncReport) -> None:
    """Delete the remote copies of files the trainer removed on purpose (and that are still gone);
    a failure waits for the next pass."""
    removed = {key for key in RunDir(run_dir).removed_keys() if not (run_dir / key).exists()}
    stale = removed & state.failed.keys()  # nothing is left to send
    for relpath in stale:
        del state.failed[relpath]
    if stale:
        _save_state(run_dir, state)
    for relpath in sorted(removed & state.uploaded.keys()):
        url = state.uploaded[relpath].url
        try:
            with contextlib.suppress(FileNotFoundError):
                store.fs.rm_file(store.path(f"{run_dir.name}/{relpath}"))
        except Exception as exc:  # every library and network error is worth another pass
            logger.warning("deleting %s failed: %s", url, _short(exc))
            _append_event(run_dir, "upload_remove_failed", file=relpath, url=url, error=_short(exc))
            report.remove_failed.append(relpath)
            continue
        del state.uploaded[relpath]
        _save_state(run_dir, state)
        _append_event(run_dir, "upload_removed", file=relpath, url=url)
        report.removed.append(relpath)


def final_sync(
    *,
    store: RemoteStore,
    run_dir: Path,
    passes: int = 4,
    backoff_s: float = 1.0,
    deadline_s: float = 300.0,
    sleep: Callable[[float], None] = time.sleep,
) -> SyncReport:
    """At run end, try every unsent artifact a few more times within a deadline, then say what is left."""
    until = time.time() + deadline_s
    total = SyncReport()
    for number in range(1, passes + 1):
        last = number == passes
        report = sync_once(
            store=store, run_dir=run_dir, force=True, give_up=last, backoff_s=backoff_s, until=until
        )
        total.uploaded.extend(report.uploaded)
        total.removed.extend(report.removed)
        total.failed, total.pending, total.remove_failed = report.failed, report.pending, report.remove_failed
        if not (report.failed or report.pending or report.remove_failed):
            break
        remaining = until - time.time()
        if last or remaining <= 0:
            # the last pass already marked its failures final; what was never tried still needs saying
            left = report.pending if last else [*report.failed, *report.pending]
            _give_up(run_dir, left, deadline_s)
            break
        sleep(min(_retry_delay(number, backoff_s), remaining))
    return total


def _give_up(run_dir: Path, relpaths: list[str], deadline_s: float) -> None:
    state = load_state(run_dir)
    for relpath in relpaths:
        failed = state.failed.get(relpath)
        error = f"not uploaded: the final upload ran out of its {deadline_s:g} s"
        if failed is not None:
            error = f"{error}; last error: {failed.error}"
        _append_event(
            run_dir,
            "upload_failed",
            file=relpath,
            error=error,
            attempts=failed.attempts if failed else 0,
            retry_in=None,
        )


class ArtifactSync:
    """A background thread for one run that uploads artifacts as they appear and once more at the end."""

    def __init__(self, *, store: RemoteStore, run_dir: Path, interval_s: float = 5.0) -> None:
        self.store = store
        self.run_dir = run_dir
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"artifact-sync-{run_dir.name}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                sync_once(store=self.store, run_dir=self.run_dir)
            except Exception:  # a broken pass must not end the watcher; the next one retries
                logger.exception("artifact sync of %s failed", self.run_dir)
            self._stop.wait(self.interval_s)

    def start(self) -> ArtifactSync:
        self._thread.start()
        return self

    def stop(self, *, final: bool = True) -> SyncReport:
        """Stop watching and, unless told otherwise, upload whatever is still unsent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return final_sync(store=self.store, run_dir=self.run_dir) if final else SyncReport()

    def __enter__(self) -> ArtifactSync:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
