"""The local backend: the trainer as `accelerate launch` in its own process group on this machine.

A reference is `"<pgid>:<start time>"`: the group id (the launcher's pid, it leads its own
session) and the leader's start time. A process counts as part of the run only when it is in
that group, started no earlier, and names the run directory on its command line, so a recycled
pid never passes for a live trainer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from fluxtrain.fsutil import tail_lines
from fluxtrain.rundir import RunDir
from fluxtrain.runs.backend import LaunchSpec, PollResult, ProcessState
from fluxtrain.settings import child_environment

TRAINER_ENTRY = ("-m", "fluxtrain.training")


def visible_gpus(setting: str) -> list[str]:
    """GPU ids runs may use: `auto` is every CUDA device this process sees, else the listed ids."""
    if setting.strip().lower() != "auto":
        return [part.strip() for part in setting.split(",") if part.strip()]
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None:
        return [part.strip() for part in inherited.split(",") if part.strip() and part.strip() != "-1"]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


class LocalBackend:
    """Runs each trainer as `accelerate launch` in a new session, logging to the run's log file."""

    name = "local"

    def __init__(self, *, gpus: str = "auto", entry: tuple[str, ...] = TRAINER_ENTRY) -> None:
        self._gpu_setting = gpus
        self._entry = entry
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._slots: list[str] | None = None

    def slots(self) -> list[str]:
        if self._slots is None:
            self._slots = visible_gpus(self._gpu_setting) or ["cpu"]
        return self._slots

    def command(self, spec: LaunchSpec) -> list[str]:
        """`accelerate launch` through this interpreter, so no PATH lookup is needed."""
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_machines", "1"]
        cmd += ["--dynamo_backend", "no"]
        if spec.gpu_ids:
            cmd += ["--num_processes", str(len(spec.gpu_ids))]
            if len(spec.gpu_ids) > 1:
                cmd += ["--multi_gpu"]
        else:
            cmd += ["--cpu", "--num_processes", "1", "--mixed_precision", "no"]
        return [*cmd, *self._entry, str(spec.run_dir)]

    def launch(self, spec: LaunchSpec) -> str:
        env = child_environment()
        env["CUDA_VISIBLE_DEVICES"] = ",".join(spec.gpu_ids) if spec.gpu_ids else ""
        env["PYTHONUNBUFFERED"] = "1"
        with RunDir(spec.run_dir).log.open("ab") as log:
            process = subprocess.Popen(
                self.command(spec),
                cwd=spec.run_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._children[process.pid] = process
        try:
            started = psutil.Process(process.pid).create_time()
        except psutil.NoSuchProcess:
            started = 0.0
        return f"{process.pid}:{started!r}"

    def _members(self, ref: str, run_dir: Path) -> list[psutil.Process]:
        pgid, started = _parse(ref)
        marker = str(run_dir)
        members = []
        for process in psutil.process_iter(["pid", "create_time", "status", "cmdline"]):
            try:
                if os.getpgid(process.pid) != pgid:
                    continue
            except (ProcessLookupError, PermissionError):
                continue
            info = process.info
            if info["status"] == psutil.STATUS_ZOMBIE or (info["create_time"] or 0) + 0.01 < started:
                continue
            if any(marker in part for part in info["cmdline"] or ()):
                members.append(process)
        return members

    def find(self, run_id: str, run_dir: Path) -> str | None:
        """A trainer of this run in a process group of its own, found by the run dir on its command line."""
        marker = str(run_dir)
        own_group = os.getpgrp()
        groups: dict[int, float] = {}
        for process in psutil.process_iter(["pid", "create_time", "status", "cmdline"]):
            info = process.info
            if info["status"] == psutil.STATUS_ZOMBIE or marker not in (info["cmdline"] or ()):
                continue
            try:
                pgid = os.getpgid(process.pid)
            except (ProcessLookupError, PermissionError):
                continue
            if pgid != own_group:
                started = info["create_time"] or 0.0
                groups[pgid] = min(groups.get(pgid, started), started)
        if not groups:
            return None
        pgid, started = min(groups.items(), key=lambda item: item[1])
        return f"{pgid}:{started!r}"

    def poll(self, ref: str, run_dir: Path) -> PollResult:
        pgid, _ = _parse(ref)
        child = self._children.get(pgid)
        returncode = child.poll() if child is not None else None
        if self._members(ref, run_dir):
            return PollResult(ProcessState.RUNNING)
        if child is not None:
            if returncode is None:
                returncode = child.wait()
            del self._children[pgid]
        return PollResult(ProcessState.EXITED, returncode)

    def cancel(self, ref: str, run_dir: Path, *, force: bool) -> None:
        pgid, _ = _parse(ref)
        if not self._members(ref, run_dir):
            return
        try:
            os.killpg(pgid, signal.SIGKILL if force else signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return

    def logs(self, ref: str | None, run_dir: Path, *, tail: int) -> list[str]:
        return tail_lines(RunDir(run_dir).log, tail)


def _parse(ref: str) -> tuple[int, float]:
    pid, _, started = ref.partition(":")
    return int(pid), float(started or 0.0)
