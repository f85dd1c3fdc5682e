"""Fixtures for the runs layer: a data root with a dataset TOML and model files, and a trainer double.

The double stands in for the trainer process only (executor unit tests); the end-to-end tests
run the real trainer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fluxtrain.runs.db import Database, get_database
from fluxtrain.runs.executor import Executor
from fluxtrain.runs.local_backend import LocalBackend
from fluxtrain.runs.schemas import TrainRequest
from fluxtrain.runs.service import create_run, get_run
from fluxtrain.runs.table import Run
from fluxtrain.settings import Settings
from fluxtrain.training.tiny import write_tiny_flux_files
from tests.runs.service_doubles import write_trainable_dataset

FAKE_TRAINER = r"""
import json, signal, sys, time, pathlib
run_dir = pathlib.Path(sys.argv[1])
cfg = json.loads((run_dir / "run.json").read_text())
name, steps = cfg["output_name"], cfg.get("max_train_steps") or 3
log = (run_dir / "events.jsonl").open("a")
def emit(kind, **fields):
    log.write(json.dumps({"event": kind, **fields}) + "\n")
    log.flush()
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
if name.startswith("stubborn"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
state = run_dir / "state"
start = int((state / "step").read_text()) if (state / "step").exists() else 0
emit("started", total_steps=steps, total_epochs=1, resumed_from=start)
print(f"fake trainer {name} from step {start}", flush=True)
if name.startswith("fail"):
    print("RuntimeError: boom, out of memory", flush=True)
    sys.exit(3)
if name.startswith("silent"):
    sys.exit(0)
delay = 0.4 if name.startswith("slow") else 0.1 if name.startswith("stubborn") else 0.05
for step in range(start + 1, steps + 1):
    if stop:
        emit("interrupted", step=step - 1)
        sys.exit(0)
    time.sleep(delay)
    eta = (steps - step) * delay
    emit("step", step=step, epoch=1, loss=1.0 / step, lr=1e-4, it_per_s=1 / delay, eta_seconds=eta)
    state.mkdir(exist_ok=True)
    (state / "step").write_text(str(step))
out = run_dir / "output"
out.mkdir(exist_ok=True)
(out / f"{name}.safetensors").write_bytes(b"lora")
emit("finished", step=steps, epoch=1)
"""


@pytest.fixture
def run_settings(settings: Settings) -> Settings:
    """Settings whose data root holds dataset TOMLs and whose models root holds the four files."""
    settings.datasets_dir.mkdir(parents=True, exist_ok=True)
    for name in ("demo", "fail", "silent", "slow", "slow2", "other", "stubborn"):
        write_trainable_dataset(settings, name)
    settings.models_root.mkdir(parents=True, exist_ok=True)
    write_tiny_flux_files(settings.models_root)
    return settings


@pytest.fixture
def fake_trainer(tmp_path: Path) -> Path:
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    return path


@pytest.fixture
def db(run_settings: Settings) -> Database:
    return get_database(run_settings)


@pytest.fixture
def make_executor(run_settings: Settings, db: Database, fake_trainer: Path) -> Callable[..., Executor]:
    def make(**options: object) -> Executor:
        backend = LocalBackend(gpus="", entry=(str(fake_trainer),))
        return Executor(settings=run_settings, db=db, backend=backend, poll_interval=0.05, **options)

    return make


@pytest.fixture
def submit(run_settings: Settings, db: Database) -> Callable[..., Run]:
    def submit_run(output_name: str, **fields: object) -> Run:
        request = TrainRequest(output_name=output_name, **fields)
        return create_run(settings=run_settings, db=db, request=request)

    return submit_run


@pytest.fixture
def drive(db: Database) -> Callable[..., Run]:
    return lambda executor, run_id, until, timeout=30: _drive(executor, db, run_id, until, timeout)


def _drive(
    executor: Executor, db: Database, run_id: str, until: Callable[[Run], bool], timeout: float
) -> Run:
    """Tick the executor until the run satisfies `until`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        executor.tick()
        run = get_run(db=db, run_id=run_id)
        if until(run):
            return run
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} never got there; last status {get_run(db=db, run_id=run_id).status}")
