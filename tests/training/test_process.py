"""The trainer as the runs layer starts it: a process on a run directory, stopped and resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from fluxtrain.rundir import read_events
from fluxtrain.training.config import load_config
from fluxtrain.training.trainer import StopFlag, Trainer
from tests.training import helpers_runs as helpers

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TOTAL = 120


def _trainer(*args: str) -> list[str]:
    return [sys.executable, "-m", "fluxtrain.training", *args]


def _wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e["step"] >= step for e in helpers.step_events(run)):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


def test_sigterm_saves_state_and_restart_resumes_with_the_same_rng(tiny_models: Path, tmp_path: Path) -> None:
    toml = helpers.make_dataset(tmp_path / "data", flip_aug=True)
    fields = {"max_train_steps": TOTAL, "caption_dropout_rate": 0.3, "save_every_n_epochs": 1000}
    run = helpers.make_run(
        tmp_path / "run", models=tiny_models, toml=toml, cache=tmp_path / "cache", **fields
    )
    process = subprocess.Popen(_trainer(str(run)), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for_step(run, 3, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output.decode()
    interrupted = [e for e in read_events(run / "events.jsonl") if e["event"] == "interrupted"]
    assert len(interrupted) == 1
    saved = interrupted[0]["step"]
    assert 3 <= saved < TOTAL
    assert not (run / "output" / "tiny.safetensors").exists()

    before = len(helpers.step_events(run))
    restart = subprocess.run(_trainer(str(run)), env=ENV, capture_output=True, timeout=300)
    assert restart.returncode == 0, restart.stdout.decode() + restart.stderr.decode()
    resumed = helpers.step_events(run)[before:]
    assert resumed[0]["step"] == saved + 1
    assert resumed[-1]["step"] == TOTAL
    assert (run / "output" / "tiny.safetensors").is_file()
    assert read_events(run / "events.jsonl")[-1]["event"] == "finished"

    # An uninterrupted run draws the same numbers: identical losses after the resume point.
    straight = helpers.make_run(
        tmp_path / "straight", models=tiny_models, toml=toml, cache=tmp_path / "cache", **fields
    )
    Trainer(straight, load_config(straight / "run.json"), stop=StopFlag()).run()
    reference = {e["step"]: e["loss"] for e in helpers.step_events(straight)}
    for event in resumed[:5]:
        assert abs(event["loss"] - reference[event["step"]]) < 1e-5


def test_bad_run_json_fails_fast_naming_the_field(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"output_name": "x", "network_dim": 0}), encoding="utf-8")
    result = subprocess.run(_trainer(str(run)), env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "network_dim" in result.stderr
    error = read_events(run / "events.jsonl")[-1]
    assert error["event"] == "error" and "network_dim" in error["message"]

    (run / "run.json").write_text("{not json", encoding="utf-8")
    result = subprocess.run(_trainer(str(run)), env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not valid JSON" in result.stderr


def test_accelerate_launch_on_the_cpu(tiny_models: Path, tmp_path: Path) -> None:
    toml = helpers.make_dataset(tmp_path / "data")
    run = helpers.make_run(
        tmp_path / "run", models=tiny_models, toml=toml, cache=tmp_path / "cache", max_train_steps=3
    )
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate if accelerate.exists() else shutil.which("accelerate")),
        "launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "fluxtrain.training",
        str(run),
    ]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (run / "output" / "tiny.safetensors").is_file()
    events = read_events(run / "events.jsonl")
    assert events[0]["num_processes"] == 1 and events[-1]["event"] == "finished"


def test_data_parallel_over_two_cpu_processes(tiny_models: Path, tmp_path: Path) -> None:
    """`accelerate launch --multi_gpu` on a host without GPUs: two processes averaging gradients over gloo."""
    toml = helpers.make_dataset(tmp_path / "data")
    run = helpers.make_run(
        tmp_path / "run",
        models=tiny_models,
        toml=toml,
        cache=tmp_path / "cache",
        max_train_epochs=2,
        save_every_n_epochs=1,
        gradient_checkpointing=True,
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        "-m",
        "fluxtrain.training",
        str(run),
    ]
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    # Two batches an epoch, one per process: two epochs are two steps.
    events = read_events(run / "events.jsonl")
    assert [e["event"] for e in events] == ["started", "caching", "step", "checkpoint", "step", "finished"]
    assert events[0]["num_processes"] == 2 and events[0]["steps_per_epoch"] == 1
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]
    outputs = sorted(p.name for p in (run / "output").iterdir())
    assert outputs == ["tiny-000001.safetensors", "tiny.safetensors"]
    assert sorted(p.name for p in (run / "state").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert not (run / "state.tmp").exists() and not (run / "state.old").exists()
    assert "LoRA weights identical on all 2 processes" in result.stdout
    assert "data parallel over the LoRA only" in result.stdout
    assert result.stdout.count("finished: ") == 1


REPO = Path(__file__).resolve().parents[2]


def _sigterm_after(event: str, run: Path) -> subprocess.CompletedProcess:
    """The trainer process, sent SIGTERM by itself right after writing `event` (`step:N` for step N)."""
    command = [sys.executable, "-m", "tests.training.sigterm_after", event, str(run)]
    return subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout + result.stderr


def test_stop_on_an_epochs_last_step_keeps_that_epochs_checkpoint(tiny_models: Path, tmp_path: Path) -> None:
    toml = helpers.make_dataset(tmp_path / "data")
    run = helpers.make_run(
        tmp_path / "run",
        models=tiny_models,
        toml=toml,
        cache=tmp_path / "cache",
        max_train_epochs=4,
        save_every_n_epochs=1,
    )
    # Two images, one a step: step 4 ends epoch 2.
    _ok(_sigterm_after("step:4", run))
    events = read_events(run / "events.jsonl")
    assert events[0]["steps_per_epoch"] == 2
    assert events[-1]["event"] == "interrupted" and (events[-1]["step"], events[-1]["epoch"]) == (4, 2)
    assert [e["epoch"] for e in events if e["event"] == "checkpoint"] == [1, 2]

    # Stopped again before the first step of the resumed run: the saved step and state are reported.
    _ok(_sigterm_after("started", run))
    events = read_events(run / "events.jsonl")
    assert events[-1]["event"] == "interrupted" and events[-1]["step"] == 4
    assert events[-1]["state"] == str(run / "state")

    _ok(subprocess.run(_trainer(str(run)), env=ENV, capture_output=True, text=True, timeout=300))
    events = read_events(run / "events.jsonl")
    assert events[-1]["event"] == "finished" and events[-1]["step"] == 8
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 9))
    assert [e["epoch"] for e in events if e["event"] == "checkpoint"] == [1, 2, 3]
    outputs = sorted(p.name for p in (run / "output").iterdir())
    assert outputs == [f"tiny-00000{n}.safetensors" for n in (1, 2, 3)] + ["tiny.safetensors"]


def test_sigterm_before_the_first_step_exits_promptly_and_restarts(tiny_models: Path, tmp_path: Path) -> None:
    toml = helpers.make_dataset(tmp_path / "data")
    run = helpers.make_run(
        tmp_path / "run", models=tiny_models, toml=toml, cache=tmp_path / "cache", max_train_steps=3
    )
    result = _sigterm_after("started", run)
    _ok(result)
    assert "run interrupted" in result.stdout
    events = read_events(run / "events.jsonl")
    assert [e["event"] for e in events] == ["started", "interrupted"]
    assert events[-1]["step"] == 0 and "state" not in events[-1]
    assert not (run / "state").exists() and not (run / "output").exists()

    _ok(subprocess.run(_trainer(str(run)), env=ENV, capture_output=True, text=True, timeout=300))
    events = read_events(run / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    assert events[-1]["event"] == "finished" and (run / "output" / "tiny.safetensors").is_file()


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has its own SIGTERM handler in place (Linux's SigCgt mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (signal.SIGTERM - 1) & 1)


def test_sigterm_during_start_up_imports_exits_0(tiny_models: Path, tmp_path: Path) -> None:
    toml = helpers.make_dataset(tmp_path / "data")
    run = helpers.make_run(
        tmp_path / "run", models=tiny_models, toml=toml, cache=tmp_path / "cache", max_train_steps=3
    )
    process = subprocess.Popen(_trainer(str(run)), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not _catches_sigterm(process.pid):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.005)
    maps = Path(f"/proc/{process.pid}/maps").read_text()
    assert "libtorch" not in maps, "the handler should be in place before torch is imported"
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output.decode()
    events = read_events(run / "events.jsonl")
    assert [e["event"] for e in events] == ["started", "interrupted"]
    assert not (run / "output").exists()


def test_trainer_stops_gracefully_when_its_launcher_dies(tiny_models: Path, tmp_path: Path) -> None:
    """A SIGKILLed parent (a launcher killed alone) turns into SIGTERM for the trainer: state, exit 0."""
    toml = helpers.make_dataset(tmp_path / "data")
    run = helpers.make_run(
        tmp_path / "run", models=tiny_models, toml=toml, cache=tmp_path / "cache", max_train_steps=TOTAL
    )
    trainer = " ".join(_trainer(str(run)))
    launched = {**ENV, "ACCELERATE_MIXED_PRECISION": "no"}  # what `accelerate launch` sets for its child
    launcher = subprocess.Popen(["bash", "-c", f"{trainer}; true"], env=launched, stdout=subprocess.DEVNULL)
    _wait_for_step(run, 2, launcher)
    launcher.kill()
    launcher.wait(timeout=10)
    deadline = time.monotonic() + 120
    while not any(e["event"] == "interrupted" for e in read_events(run / "events.jsonl")):
        assert time.monotonic() < deadline, "the orphaned trainer kept training"
        time.sleep(0.1)
    interrupted = read_events(run / "events.jsonl")[-1]
    assert interrupted["event"] == "interrupted" and interrupted["step"] < TOTAL
    assert (run / "state").is_dir()


def test_a_trainer_started_by_hand_outlives_its_shell(tiny_models: Path, tmp_path: Path) -> None:
    toml = helpers.make_dataset(tmp_path / "data")
    run = helpers.make_run(
        tmp_path / "run", models=tiny_models, toml=toml, cache=tmp_path / "cache", max_train_steps=4
    )
    trainer = " ".join(_trainer(str(run)))
    shell = subprocess.run(["bash", "-c", f"nohup {trainer} >/dev/null 2>&1 & sleep 1; exit 0"], env=ENV)
    assert shell.returncode == 0
    deadline = time.monotonic() + 120
    while not (events := read_events(run / "events.jsonl")) or events[-1]["event"] not in (
        "finished",
        "interrupted",
    ):
        assert time.monotonic() < deadline, "the trainer neither finished nor stopped"
        time.sleep(0.1)
    assert events[-1]["event"] == "finished"


LATE_SIGTERM = """
import os, runpy, signal, sys, time

class SigtermAtShutdown:
    def __del__(self):  # runs while the interpreter tears its modules down, as torch's teardown does
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)

holder = type(sys)("holder")
holder.late = SigtermAtShutdown()
sys.modules["holder"] = holder
sys.argv = ["fluxtrain.training", sys.argv[1]]
runpy.run_module("fluxtrain.training", run_name="__main__", alter_sys=True)
"""


def test_a_sigterm_while_the_ended_trainer_shuts_down_keeps_its_exit_status(tmp_path: Path) -> None:
    """Python restores the default SIGTERM action at shutdown: a finished run must not die with 143."""
    command = [sys.executable, "-c", LATE_SIGTERM, str(tmp_path / "no-such-run")]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr)  # main's own status: no run directory
    assert "does not exist" in result.stderr
