"""The Ray backend against a real single-node Ray head started on loopback for this module."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

pytest.importorskip("ray.job_submission", reason="the Ray backend needs the `ray[default]` package")

from ray.job_submission import JobStatus, JobSubmissionClient  # noqa: E402

from fluxtrain.errors import InvalidInputError  # noqa: E402
from fluxtrain.runs.backend import LaunchSpec, ProcessState  # noqa: E402
from fluxtrain.runs.db import Database  # noqa: E402
from fluxtrain.runs.executor import Executor  # noqa: E402
from fluxtrain.runs.ray_backend import RayBackend, submission_ids  # noqa: E402
from fluxtrain.runs.service import cancel_run, get_run, list_runs  # noqa: E402
from fluxtrain.runs.status import build_status  # noqa: E402
from fluxtrain.runs.table import Run  # noqa: E402
from fluxtrain.settings import Settings  # noqa: E402
from tests.training import helpers_runs as helpers  # noqa: E402

SCRIPT = r"""
import os, sys, time, pathlib
run_dir = pathlib.Path(sys.argv[1])
mode = (run_dir / "mode").read_text().strip()
(run_dir / "seen-env.txt").write_text(
    f"cwd={os.getcwd()} unbuffered={os.environ.get('PYTHONUNBUFFERED')} "
    f"grace={os.environ.get('RAY_JOB_STOP_WAIT_TIME_S')}"
)
print(f"trainer started in mode {mode}", flush=True)
if mode == "fail":
    print("RuntimeError: CUDA out of memory", flush=True)
    sys.exit(3)
if mode == "sleep":
    time.sleep(120)
print("trainer done", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_head(head: subprocess.Popen[bytes], temp_dir: str) -> None:
    """Stop the head we started: SIGTERM its leader, then kill whatever of ours is left, by pid."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait(timeout=10)
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        if temp_dir in cmdline or _in_group(process, head.pid):
            with contextlib.suppress(psutil.Error):
                process.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _in_group(process: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(process.pid) == pgid
    except OSError:
        return False


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A single-node Ray head (1 CPU, no GPU) on loopback with its dashboard (the Jobs API)."""
    temp_dir = tempfile.mkdtemp(prefix="ftray-", dir="/tmp")
    dashboard = _free_port()
    env = dict(
        os.environ,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    ray_cli = str(Path(sys.executable).with_name("ray"))
    command = [
        ray_cli,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={_free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--include-dashboard=true",
        "--num-cpus=1",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    with open(Path(temp_dir) / "head.log", "wb") as head_log:
        head = subprocess.Popen(
            command,
            env=env,
            stdout=head_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    try:
        # The dashboard answers before its job agent registers ("No available agent to submit
        # job"), so the head counts as up once a trivial job has been accepted and has finished.
        while True:
            try:
                client = JobSubmissionClient(address)
                probe = client.submit_job(entrypoint="true")
                while client.get_job_status(probe) not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the probe job did not finish")
                    time.sleep(0.2)
                break
            except Exception:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((Path(temp_dir) / "head.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield address
    finally:
        _stop_head(head, temp_dir)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "trainer_double.py"
    path.write_text(SCRIPT)
    return path


@pytest.fixture
def make_backend(settings: Settings, ray_address: str, script: Path) -> Callable[..., RayBackend]:
    def make(*, gpus: str = "", **options: object) -> RayBackend:
        configured = settings.model_copy(update={"ray_address": ray_address, "gpus": gpus})
        return RayBackend(configured, entry=(str(script),), **options)

    return make


def _spec(tmp_path: Path, run_id: str, mode: str, *, num_gpus: int = 1) -> LaunchSpec:
    run_dir = tmp_path / "runs" / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "mode").write_text(mode)
    return LaunchSpec(run_id=run_id, run_dir=run_dir, gpu_ids=[], num_gpus=num_gpus)


def _wait(
    backend: RayBackend, ref: str, run_dir: Path, *, timeout: float = 60
) -> tuple[ProcessState, int | None]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = backend.poll(ref, run_dir)
        if result.state is ProcessState.EXITED:
            return result.state, result.returncode
        time.sleep(0.2)
    raise AssertionError(f"Ray job {ref} did not end within {timeout}s")


def test_backend_needs_an_address(settings: Settings) -> None:
    with pytest.raises(InvalidInputError, match="FLUXTRAIN_RAY_ADDRESS"):
        RayBackend(settings.model_copy(update={"executor": "ray"}))


def test_entry_point_is_accelerate_launch_of_the_trainer(settings: Settings, tmp_path: Path) -> None:
    spec = LaunchSpec(run_id="abc", run_dir=tmp_path / "run dir", gpu_ids=[], num_gpus=2)
    gpu = RayBackend(settings.model_copy(update={"ray_address": "http://127.0.0.1:1"}), python="/opt/py")
    quoted_dir = f"'{tmp_path / 'run dir'}'"
    assert gpu.command(spec) == (
        f"cd {quoted_dir} && exec /opt/py -m accelerate.commands.launch --quiet --num_machines 1 "
        f"--dynamo_backend no --num_processes 2 --multi_gpu -m fluxtrain.training {quoted_dir}"
    )
    cpu = RayBackend(settings.model_copy(update={"ray_address": "http://127.0.0.1:1", "gpus": ""}))
    assert "--cpu --num_processes 1 --mixed_precision no -m fluxtrain.training" in cpu.command(spec)
    assert gpu.slots() is None
    assert submission_ids("abc")[:3] == ["fluxtrain-abc", "fluxtrain-abc-2", "fluxtrain-abc-3"]


def test_stop_grace_comes_from_the_settings(settings: Settings) -> None:
    configured = settings.model_copy(
        update={"ray_address": "http://127.0.0.1:1", "cancel_grace_seconds": 7.2}
    )
    assert RayBackend(configured).runtime_env()["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "8"
    overridden = RayBackend(configured, stop_grace_s=3)
    assert overridden.runtime_env()["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "3"


def test_unreachable_cluster_requeues_the_run_then_fails_it_with_the_reason(
    run_settings: Settings, db: Database, submit: Callable[..., Run], drive: Callable[..., Run]
) -> None:
    closed = f"http://127.0.0.1:{_free_port()}"
    configured = run_settings.model_copy(update={"executor": "ray", "ray_address": closed, "gpus": ""})
    executor = Executor(
        settings=configured, db=db, backend=RayBackend(configured), launch_retry_for=1.0, launch_backoff=0.2
    )
    run = submit("demo")
    executor.tick()
    waiting = drive(executor, run.id, lambda r: r.status != "running")
    assert waiting.status == "queued" and waiting.launch_failing_since is not None
    done = drive(executor, run.id, lambda r: r.status == "failed", timeout=30)
    assert "stayed unavailable" in done.error and "cannot reach the Ray cluster" in done.error


def test_job_runs_to_success_with_logs_and_a_kept_log_copy(
    make_backend: Callable[..., RayBackend], tmp_path: Path, ray_address: str
) -> None:
    backend = make_backend(stop_grace_s=7)
    spec = _spec(tmp_path, "run-ok", "ok")
    ref = backend.launch(spec)
    assert ref == "fluxtrain-run-ok"
    assert _wait(backend, ref, spec.run_dir) == (ProcessState.EXITED, 0)

    info = JobSubmissionClient(ray_address).get_job_info(ref)
    assert info.status == JobStatus.SUCCEEDED
    assert info.entrypoint == backend.command(spec)
    assert info.metadata == {"fluxtrain_run_id": "run-ok", "run_dir": str(spec.run_dir), "num_gpus": "0"}
    assert (spec.run_dir / "seen-env.txt").read_text() == f"cwd={spec.run_dir} unbuffered=1 grace=7"
    assert backend.logs(ref, spec.run_dir, tail=2)[-1] == "trainer done"
    assert "trainer started in mode ok" in (spec.run_dir / "train.log").read_text()

    again = backend.launch(spec)
    assert again == "fluxtrain-run-ok-2", "a resumed run gets the next job id, not a clash"
    assert _wait(backend, again, spec.run_dir) == (ProcessState.EXITED, 0)


def test_failed_job_reports_its_exit_code_and_last_lines(
    make_backend: Callable[..., RayBackend], tmp_path: Path
) -> None:
    backend = make_backend()
    spec = _spec(tmp_path, "run-fail", "fail")
    ref = backend.launch(spec)
    assert _wait(backend, ref, spec.run_dir) == (ProcessState.EXITED, 1), "accelerate launch exits 1"
    assert "RuntimeError: CUDA out of memory" in backend.logs(ref, spec.run_dir, tail=5)


def test_restarted_service_reattaches_and_cancel_stops_the_job(
    make_backend: Callable[..., RayBackend], tmp_path: Path, ray_address: str
) -> None:
    spec = _spec(tmp_path, "run-long", "sleep")
    ref = make_backend().launch(spec)
    restarted = make_backend()
    assert restarted.find("run-long", spec.run_dir) == ref, "a restarted service finds the live job"
    assert restarted.launch(spec) == ref, "launching a live run again must not submit a second job"
    deadline = time.monotonic() + 60
    while "trainer started in mode sleep" not in restarted.logs(ref, spec.run_dir, tail=10):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)
    assert restarted.poll(ref, spec.run_dir).state is ProcessState.RUNNING

    started = time.monotonic()
    restarted.cancel(ref, spec.run_dir, force=False)
    assert _wait(restarted, ref, spec.run_dir, timeout=30) == (ProcessState.EXITED, -signal.SIGTERM)
    assert time.monotonic() - started < 30
    assert JobSubmissionClient(ray_address).get_job_status(ref) == JobStatus.STOPPED
    assert restarted.find("run-long", spec.run_dir) is None, "a stopped job is not adopted"
    assert [job.submission_id for job in JobSubmissionClient(ray_address).list_jobs()].count(ref) == 1
    leftovers = [
        p for p in psutil.process_iter(["cmdline"]) if str(spec.run_dir) in " ".join(p.info["cmdline"] or ())
    ]
    assert leftovers == [], "stopping the job leaves no trainer process behind"


def test_gpu_run_waits_in_rays_queue_until_canceled(
    make_backend: Callable[..., RayBackend], tmp_path: Path, ray_address: str
) -> None:
    backend = make_backend(gpus="auto")
    spec = _spec(tmp_path, "run-gpu", "ok", num_gpus=2)
    ref = backend.launch(spec)
    client = JobSubmissionClient(ray_address)
    assert "--num_processes 2 --multi_gpu" in client.get_job_info(ref).entrypoint
    time.sleep(1.0)
    assert client.get_job_status(ref) == JobStatus.PENDING, "no node has 2 GPUs, so Ray holds the job"
    waiting = backend.poll(ref, spec.run_dir)
    assert waiting.state is ProcessState.WAITING
    assert waiting.message is not None and waiting.message.startswith(
        f"the Ray job {ref} is pending (it asks for 2 GPUs): Job has not started yet."
    )
    assert "waiting for resources" in waiting.message
    backend.cancel(ref, spec.run_dir, force=False)
    result = backend.poll(ref, spec.run_dir)
    assert (result.state, result.returncode) == (ProcessState.EXITED, -signal.SIGTERM)
    assert not (spec.run_dir / "seen-env.txt").exists(), "the trainer never started"


def _ray_executor(settings: Settings, db: Database, ray_address: str, trainer: Path, **update: object):
    configured = settings.model_copy(
        update={"executor": "ray", "ray_address": ray_address, "gpus": "auto", **update}
    )
    backend = RayBackend(configured, entry=(str(trainer),))
    return configured, Executor(settings=configured, db=db, backend=backend, poll_interval=0.05)


def test_run_asking_a_gpuless_head_for_a_gpu_is_queued_with_rays_message_until_canceled(
    run_settings: Settings,
    db: Database,
    ray_address: str,
    fake_trainer: Path,
    submit: Callable[..., Run],
    drive: Callable[..., Run],
) -> None:
    configured, executor = _ray_executor(run_settings, db, ray_address, fake_trainer)
    run = submit("demo", max_train_steps=3)
    held = drive(executor, run.id, lambda r: r.backend_ref is not None)
    ref = held.backend_ref
    assert ref == f"fluxtrain-{run.id}"
    time.sleep(1.5)
    for _ in range(5):
        executor.tick()
    held = get_run(db=db, run_id=run.id)
    status = build_status(configured, held)
    assert status.status == "queued" and status.started_at is None
    assert status.waiting is not None
    assert status.waiting.startswith(f"the Ray job {ref} is pending (it asks for 1 GPU): ")
    assert "waiting for resources (CPUs, GPUs, memory, custom resources)" in status.waiting
    assert [r.id for r in list_runs(db=db, status="queued")] == [run.id]
    assert list_runs(db=db, status="running") == []
    client = JobSubmissionClient(ray_address)
    assert client.get_job_status(ref) == JobStatus.PENDING

    cancel_run(db=db, run_id=run.id)
    done = drive(executor, run.id, lambda r: r.status not in ("queued", "running"), timeout=30)
    assert done.status == "canceled" and done.started_at is None and done.backend_waiting is None
    assert client.get_job_status(ref) in (JobStatus.PENDING, JobStatus.STOPPED), "never started"
    assert not (configured.runs_dir / run.id / "events.jsonl").exists(), "the trainer never ran"


def test_run_pending_longer_than_the_timeout_is_stopped_and_failed_with_the_reason(
    run_settings: Settings,
    db: Database,
    ray_address: str,
    fake_trainer: Path,
    submit: Callable[..., Run],
    drive: Callable[..., Run],
) -> None:
    configured, executor = _ray_executor(run_settings, db, ray_address, fake_trainer, ray_pending_timeout=2.0)
    run = submit("demo", max_train_steps=3)
    drive(executor, run.id, lambda r: r.backend_waiting is not None)
    done = drive(executor, run.id, lambda r: r.status not in ("queued", "running"), timeout=30)
    assert done.status == "failed" and done.started_at is None
    assert done.error.startswith(f"the Ray job fluxtrain-{run.id} is pending (it asks for 1 GPU): ")
    assert "longer than FLUXTRAIN_RAY_PENDING_TIMEOUT (2 s), and was stopped." in done.error
    assert build_status(configured, done).waiting is None


def test_unknown_job_counts_as_lost_and_logs_fall_back_to_the_run_dir(
    make_backend: Callable[..., RayBackend], tmp_path: Path
) -> None:
    backend = make_backend()
    spec = _spec(tmp_path, "run-gone", "ok")
    (spec.run_dir / "train.log").write_text("line one\nline two\n")
    result = backend.poll("fluxtrain-never-submitted", spec.run_dir)
    assert (result.state, result.returncode) == (ProcessState.EXITED, None)
    assert backend.logs("fluxtrain-never-submitted", spec.run_dir, tail=1) == ["line two"]
    backend.cancel("fluxtrain-never-submitted", spec.run_dir, force=False)


def test_executor_drives_runs_on_ray_to_the_end(
    run_settings: Settings,
    db: Database,
    ray_address: str,
    fake_trainer: Path,
    submit: Callable[..., Run],
    drive: Callable[..., Run],
) -> None:
    configured = run_settings.model_copy(update={"executor": "ray", "ray_address": ray_address, "gpus": ""})
    backend = RayBackend(configured, entry=(str(fake_trainer),))
    executor = Executor(settings=configured, db=db, backend=backend, poll_interval=0.05)
    good = submit("demo", max_train_steps=3)
    bad = submit("fail")
    done = drive(executor, good.id, lambda r: r.status not in ("queued", "running"), timeout=90)
    failed = drive(executor, bad.id, lambda r: r.status not in ("queued", "running"), timeout=90)
    assert done.status == "succeeded", done.error
    assert done.backend_ref == f"fluxtrain-{good.id}"
    assert failed.status == "failed"
    assert "exited with code 1" in failed.error and "boom, out of memory" in failed.error


def test_real_trainer_runs_as_a_ray_job_on_tiny_models(
    settings: Settings, ray_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fluxtrain.training.tiny import write_tiny_flux_files

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    models = tmp_path / "models"
    write_tiny_flux_files(models)
    toml = helpers.make_dataset(tmp_path / "data")
    run_dir = helpers.make_run(
        tmp_path / "runs" / "real", models=models, toml=toml, cache=tmp_path / "cache", max_train_steps=4
    )
    backend = RayBackend(settings.model_copy(update={"ray_address": ray_address, "gpus": ""}))
    ref = backend.launch(LaunchSpec(run_id="real", run_dir=run_dir, gpu_ids=[], num_gpus=1))
    assert _wait(backend, ref, run_dir, timeout=240) == (ProcessState.EXITED, 0), backend.logs(
        ref, run_dir, tail=30
    )
    assert (run_dir / "output" / "tiny.safetensors").is_file()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4]
    assert events[-1]["event"] == "finished"
    assert "step 4/4" in (run_dir / "train.log").read_text(), "the job's log is kept in the run dir"


def test_ray_run_uploads_its_lora_to_s3_and_status_shows_the_url(
    run_settings: Settings,
    db: Database,
    ray_address: str,
    fake_trainer: Path,
    tmp_path: Path,
    submit: Callable[..., Run],
    drive: Callable[..., Run],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("moto.server", reason="the S3 check needs moto[server]")
    from moto.server import ThreadedMotoServer

    from fluxtrain.runs.status import build_status
    from fluxtrain.storage.remote import open_remote

    endpoint = f"http://127.0.0.1:{_free_port()}"
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(endpoint.rsplit(":", 1)[1]), verbose=False)
    server.start()
    try:
        httpx.post(f"{endpoint}/moto-api/reset", timeout=10).raise_for_status()
        configured = run_settings.model_copy(
            update={
                "executor": "ray",
                "ray_address": ray_address,
                "gpus": "",
                "cloud_storage_type": "S3",
                "storage_url": "s3://ray-artifacts/loras",
            }
        )
        store = open_remote(configured)
        assert store is not None
        store.fs.mkdir("ray-artifacts")
        backend = RayBackend(configured, entry=(str(fake_trainer),))
        executor = Executor(settings=configured, db=db, backend=backend, poll_interval=0.05, store=store)
        run = submit("demo", max_train_steps=2)
        done = drive(executor, run.id, lambda r: r.status not in ("queued", "running"), timeout=90)
        assert done.status == "succeeded", done.error
        outputs = build_status(configured, done).outputs
        assert [(o.name, o.url) for o in outputs] == [
            ("demo.safetensors", f"s3://ray-artifacts/loras/{run.id}/output/demo.safetensors")
        ]
        assert store.fs.cat_file(f"ray-artifacts/loras/{run.id}/output/demo.safetensors") == b"lora"
    finally:
        server.stop()


def test_running_job_log_is_mirrored_into_train_log(
    make_backend: Callable[..., RayBackend], tmp_path: Path
) -> None:
    backend = make_backend()
    spec = _spec(tmp_path, "run-live-log", "sleep")
    ref = backend.launch(spec)
    try:
        log_file = spec.run_dir / "train.log"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # WAITING for the first moments (Ray sets the job's runtime environment up), then RUNNING.
            assert backend.poll(ref, spec.run_dir).state is not ProcessState.EXITED
            if log_file.is_file() and "trainer started in mode sleep" in log_file.read_text():
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the running job's log never reached train.log")
    finally:
        backend.cancel(ref, spec.run_dir, force=True)
