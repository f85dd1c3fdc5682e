"""The Ray backend: each run is a job on an existing Ray cluster, through the Ray Jobs API.

With `FLUXTRAIN_EXECUTOR=ray`, `FLUXTRAIN_RAY_ADDRESS` is the cluster's dashboard address
(`http://head:8265`). A run becomes the job `fluxtrain-<run_id>` (a resumed run:
`fluxtrain-<run_id>-2`, `-3`, ...) whose entry point is `accelerate launch -m fluxtrain.training
<run_dir>`, asking Ray for the run's GPUs through `entrypoint_num_gpus`; Ray picks the node and
sets `CUDA_VISIBLE_DEVICES`. Run directories must be on a mount every node sees at the same path
(`FS_PATH` / `MOUNT_PATH`), and the worker nodes need this package at the same interpreter path.

The reference handed to the executor is the submission id, so a restarted service finds the job
again, and launching a run whose job is still alive re-attaches instead of submitting twice.
Status maps onto the job's own: PENDING is waiting (the run shows as queued, with Ray's message:
no free GPU, a runtime environment being set up) and RUNNING is running; SUCCEEDED exits 0 (the
executor then checks the final LoRA); FAILED exits with the driver's code; STOPPED counts as
SIGTERM. A job PENDING longer than FLUXTRAIN_RAY_PENDING_TIMEOUT seconds (0: no limit) is stopped
and its run fails with the reason.
When a job ends its log is copied to the run directory's log file, so it outlives the cluster's history.
`FLUXTRAIN_GPUS` set to an empty value runs every job on CPU workers (the tiny demo).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

from fluxtrain.errors import InvalidInputError, UnavailableError
from fluxtrain.fsutil import atomic_write_text, tail_lines
from fluxtrain.rundir import RunDir
from fluxtrain.runs.backend import LaunchSpec, PollResult, ProcessState
from fluxtrain.runs.local_backend import TRAINER_ENTRY
from fluxtrain.settings import Settings

log = logging.getLogger(__name__)

JOB_PREFIX = "fluxtrain-"
MAX_ATTEMPTS = 100
LOG_MIRROR_SECONDS = 5.0
_CLIENT_ERROR = re.compile(r"status code 4\d\d\b")
FORWARDED_ENV = (
    "MOUNT_PATH",
    "FS_PATH",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "NCCL_DEBUG",
    "NCCL_SOCKET_IFNAME",
)


def submission_ids(run_id: str) -> list[str]:
    """Job ids a run may use, in order: the first start, then one per resume."""
    base = f"{JOB_PREFIX}{run_id}"
    return [base, *(f"{base}-{attempt}" for attempt in range(2, MAX_ATTEMPTS + 1))]


def _stop_marker(run_dir: Path, ref: str) -> Path:
    return run_dir / f".ray-stop-{ref}"


def _timeout_marker(run_dir: Path, ref: str) -> Path:
    """Holds the reason a job was stopped for waiting too long, so every later poll reports it."""
    return run_dir / f".ray-pending-timeout-{ref}"


def _missing(exc: Exception) -> bool:
    return isinstance(exc, RuntimeError) and "status code 404" in str(exc)


def _rejected(exc: Exception) -> bool:
    """True when Ray refused the job itself (a 4xx answer, a bad runtime env): retrying cannot help."""
    return isinstance(exc, ValueError | TypeError) or (
        isinstance(exc, RuntimeError) and _CLIENT_ERROR.search(str(exc)) is not None
    )


class RayBackend:
    """Runs each trainer as a Ray job; Ray's scheduler queues and places them."""

    name = "ray"

    def __init__(
        self,
        settings: Settings,
        *,
        python: str = sys.executable,
        stop_grace_s: int | None = None,
        entry: tuple[str, ...] = TRAINER_ENTRY,
    ) -> None:
        if not settings.ray_address:
            raise InvalidInputError(
                "FLUXTRAIN_EXECUTOR=ray needs FLUXTRAIN_RAY_ADDRESS, the Ray dashboard address "
                "(e.g. http://ray-head:8265)"
            )
        self.address = settings.ray_address
        self.cpu_only = settings.gpus.strip() == ""
        self.python = python
        # Ray reads its SIGTERM -> SIGKILL wait as whole seconds.
        grace = settings.cancel_grace_seconds if stop_grace_s is None else stop_grace_s
        self.stop_grace_s = max(1, math.ceil(grace))
        self.pending_timeout_s = settings.ray_pending_timeout
        self.entry = entry
        self._client: JobSubmissionClient | None = None
        self._lock = threading.Lock()
        self._mirrored_at: dict[str, float] = {}

    @property
    def client(self) -> JobSubmissionClient:
        """The Jobs API client, connected on first use so a cluster that is down delays runs only."""
        with self._lock:
            if self._client is None:
                try:
                    self._client = JobSubmissionClient(self.address)
                except Exception as exc:
                    raise UnavailableError(f"cannot reach the Ray cluster at {self.address}: {exc}") from exc
            return self._client

    def slots(self) -> None:
        return None

    def command(self, spec: LaunchSpec) -> str:
        """The job's shell entry point: `accelerate launch` of the trainer inside the run directory."""
        gpus = 0 if self.cpu_only else spec.num_gpus
        cmd = [self.python, "-m", "accelerate.commands.launch", "--quiet", "--num_machines", "1"]
        cmd += ["--dynamo_backend", "no"]
        if gpus:
            cmd += ["--num_processes", str(gpus)]
            if gpus > 1:
                cmd += ["--multi_gpu"]
        else:
            cmd += ["--cpu", "--num_processes", "1", "--mixed_precision", "no"]
        cmd += [*self.entry, str(spec.run_dir)]
        return f"cd {shlex.quote(str(spec.run_dir))} && exec {shlex.join(cmd)}"

    def runtime_env(self) -> dict[str, dict[str, str]]:
        env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
        env["PYTHONUNBUFFERED"] = "1"
        env["RAY_JOB_STOP_WAIT_TIME_S"] = str(self.stop_grace_s)
        return {"env_vars": env}

    def _info(self, ref: str) -> JobDetails | None:
        try:
            return self.client.get_job_info(ref)
        except UnavailableError:
            raise
        except Exception as exc:
            if _missing(exc):
                return None
            message = f"the Ray cluster at {self.address} gave no status for {ref}: {exc}"
            raise UnavailableError(message) from exc

    def launch(self, spec: LaunchSpec) -> str:
        """Submit the run's next job, or re-attach to one of its jobs that is still alive."""
        for submission_id in submission_ids(spec.run_id):
            info = self._info(submission_id)
            if info is not None:
                if not JobStatus(info.status).is_terminal():
                    log.info("run %s: re-attached to live Ray job %s", spec.run_id, submission_id)
                    return submission_id
                continue
            gpus = 0 if self.cpu_only else spec.num_gpus
            # Job details do not echo the entry point's resources: the metadata keeps the GPU count.
            metadata = {"fluxtrain_run_id": spec.run_id, "run_dir": str(spec.run_dir), "num_gpus": str(gpus)}
            try:
                self.client.submit_job(
                    entrypoint=self.command(spec),
                    submission_id=submission_id,
                    entrypoint_num_gpus=gpus,
                    runtime_env=self.runtime_env(),
                    metadata=metadata,
                )
            except Exception as exc:
                if "already exists" in str(exc):
                    continue
                if _rejected(exc):
                    raise InvalidInputError(f"Ray refused the job for run {spec.run_id}: {exc}") from exc
                raise UnavailableError(f"Ray did not accept the job for run {spec.run_id}: {exc}") from exc
            log.info("run %s: submitted Ray job %s", spec.run_id, submission_id)
            return submission_id
        raise UnavailableError(f"run {spec.run_id} has used all {MAX_ATTEMPTS} Ray job ids")

    def find(self, run_id: str, run_dir: Path) -> str | None:
        """The run's live job, if any; its ids are used in order, so the first unknown one ends the search."""
        for submission_id in submission_ids(run_id):
            info = self._info(submission_id)
            if info is None:
                return None
            if not JobStatus(info.status).is_terminal():
                return submission_id
        return None

    def poll(self, ref: str, run_dir: Path) -> PollResult:
        info = self._info(ref)
        if info is None:
            return PollResult(ProcessState.EXITED)
        status = JobStatus(info.status)
        timed_out = _timeout_marker(run_dir, ref)
        if timed_out.is_file():
            return PollResult(ProcessState.EXITED, message=timed_out.read_text(encoding="utf-8").strip())
        if status is JobStatus.PENDING and _stop_marker(run_dir, ref).exists():
            return PollResult(ProcessState.EXITED, -signal.SIGTERM)
        if status is JobStatus.PENDING:
            return self._pending(ref, run_dir, info)
        if not status.is_terminal():
            if time.monotonic() - self._mirrored_at.get(ref, 0.0) >= LOG_MIRROR_SECONDS:
                self._mirrored_at[ref] = time.monotonic()
                self._keep_log(ref, run_dir, info)
            return PollResult(ProcessState.RUNNING)
        self._mirrored_at.pop(ref, None)
        self._keep_log(ref, run_dir, info)
        if status is JobStatus.SUCCEEDED:
            return PollResult(ProcessState.EXITED, 0)
        if status is JobStatus.STOPPED:
            return PollResult(ProcessState.EXITED, -signal.SIGTERM)
        code = info.driver_exit_code
        return PollResult(ProcessState.EXITED, code if code not in (None, 0) else 1)

    def _pending(self, ref: str, run_dir: Path, info: JobDetails) -> PollResult:
        """A job Ray has not started: waiting with Ray's own message, or stopped once it waited too long."""
        gpus = (info.metadata or {}).get("num_gpus", "0")
        asks = f"it asks for {gpus} GPU{'' if gpus == '1' else 's'}" if gpus != "0" else "it asks for no GPU"
        reason = f"the Ray job {ref} is pending ({asks}): {info.message or 'Job has not started yet.'}"
        waited = time.time() - (info.start_time or 0) / 1000 if info.start_time else 0.0
        if not self.pending_timeout_s or waited <= self.pending_timeout_s:
            return PollResult(ProcessState.WAITING, message=reason)
        failure = (
            f"{reason} It waited {waited:.0f} s, longer than FLUXTRAIN_RAY_PENDING_TIMEOUT "
            f"({self.pending_timeout_s:g} s), and was stopped."
        )
        try:
            self.client.stop_job(ref)
        except Exception as exc:
            if not _missing(exc):
                raise UnavailableError(f"Ray could not stop job {ref}: {exc}") from exc
        if run_dir.is_dir():
            atomic_write_text(_timeout_marker(run_dir, ref), failure + "\n")
        log.warning("run of Ray job %s: %s", ref, failure)
        return PollResult(ProcessState.EXITED, message=failure)

    def _job_lines(self, ref: str, info: JobDetails) -> list[str]:
        lines = self.client.get_job_logs(ref).splitlines()
        if JobStatus(info.status) is JobStatus.FAILED and info.message and not lines:
            lines.append(f"ray: {info.message}")
        return lines

    def _keep_log(self, ref: str, run_dir: Path, info: JobDetails) -> None:
        """Copy the job's log into the run's log file: live (every few seconds) while it runs, so
        /status, /logs and `logs -f` read one file whatever the backend, and once more at the end,
        where it survives the cluster forgetting the job."""
        try:
            lines = self._job_lines(ref, info)
        except Exception as exc:  # the run's outcome does not depend on its log copy
            log.warning("could not fetch the log of Ray job %s: %s", ref, exc)
            return
        if run_dir.is_dir():
            atomic_write_text(RunDir(run_dir).log, "".join(f"{line}\n" for line in lines))

    def cancel(self, ref: str, run_dir: Path, *, force: bool) -> None:
        """Stop the job: Ray sends SIGTERM, then SIGKILL after the grace period set at submission.

        A job still waiting for resources cannot be stopped until Ray places it (the stop waits in
        its supervisor's queue and ends it as soon as it starts), so it is marked stopped here.
        """
        try:
            info = self._info(ref)
            if info is None:
                return
            self.client.stop_job(ref)
        except UnavailableError:
            raise
        except Exception as exc:
            if not _missing(exc):
                raise UnavailableError(f"Ray could not stop job {ref}: {exc}") from exc
            return
        if JobStatus(info.status) is JobStatus.PENDING and run_dir.is_dir():
            atomic_write_text(_stop_marker(run_dir, ref), f"stop requested for Ray job {ref} while pending\n")

    def logs(self, ref: str | None, run_dir: Path, *, tail: int) -> list[str]:
        if ref is not None:
            try:
                info = self._info(ref)
                if info is not None:
                    return self._job_lines(ref, info)[-tail:] if tail > 0 else []
            except Exception as exc:  # fall back to the copy kept in the run directory
                log.warning("could not fetch the log of Ray job %s: %s", ref, exc)
        return tail_lines(RunDir(run_dir).log, tail)
