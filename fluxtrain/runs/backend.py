"""How the executor talks to whatever runs the trainer: a local process group or a Ray job.

`launch` returns a reference the executor keeps in the run row (`backend_ref`) and hands back to
`poll`, `cancel` and `logs`, also after a service restart, so it identifies the job on its own
(a process group and its start time, a Ray job id). A run whose reference was never saved (the
service died between launching and storing it) is looked up with `find`. A launch that fails
with `UnavailableError`, `ConnectionError` or `TimeoutError` is taken as transient and tried
again later; any other error fails the run. `slots()` returning None means the backend queues by
itself (Ray's scheduler): the executor then submits every queued run at once.
A launched trainer the backend has not started yet (a Ray job waiting for a GPU) polls as
WAITING with the backend's message: the run shows as queued with that message until it starts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class ProcessState(enum.Enum):
    WAITING = "waiting"
    """Accepted but not started: the backend waits for resources (a Ray job PENDING)."""
    RUNNING = "running"
    EXITED = "exited"


@dataclass(frozen=True)
class PollResult:
    state: ProcessState
    returncode: int | None = None
    """Exit status when the backend knows it (its own child, a Ray job); None when it does not."""
    message: str | None = None
    """WAITING: what it waits for, in the backend's own words. EXITED: set only when the backend
    itself ended the trainer (it waited too long), and then the reason the run fails with."""


@dataclass(frozen=True)
class LaunchSpec:
    run_id: str
    run_dir: Path
    gpu_ids: list[str]
    """Devices reserved for the run (empty on a CPU-only host or when the backend places it)."""
    num_gpus: int


class TrainerBackend(Protocol):
    name: str

    def slots(self) -> list[str] | None:
        """Device ids runs are placed on (["cpu"] without a GPU); None when the backend queues itself."""
        ...

    def launch(self, spec: LaunchSpec) -> str:
        """Start the trainer on `spec.run_dir` and return a reference that survives a restart."""
        ...

    def find(self, run_id: str, run_dir: Path) -> str | None:
        """The reference of a live trainer of this run, for a run whose reference was never saved."""
        ...

    def poll(self, ref: str, run_dir: Path) -> PollResult:
        """Whether the trainer behind `ref` still waits to start, runs, or has ended."""
        ...

    def cancel(self, ref: str, run_dir: Path, *, force: bool) -> None:
        """Ask the trainer to stop (it saves its state); `force` kills it outright."""
        ...

    def logs(self, ref: str | None, run_dir: Path, *, tail: int) -> list[str]:
        """The last `tail` lines of the trainer's human log."""
        ...
