"""Run endpoints through the HTTP API; the executor runs a trainer double (tests/runs has the real one)."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fluxtrain.api.app import create_app
from fluxtrain.settings import Settings
from tests.runs.service_doubles import use_trainer_double

TRAINER = textwrap.dedent(
    """
    import json, sys, time, pathlib
    run_dir = pathlib.Path(sys.argv[1])
    cfg = json.loads((run_dir / "run.json").read_text())
    steps = cfg.get("max_train_steps") or 3
    with (run_dir / "events.jsonl").open("a") as log:
        log.write(json.dumps({"event": "started", "total_steps": steps}) + "\\n")
        for step in range(1, steps + 1):
            time.sleep(0.05)
            log.write(json.dumps({"event": "step", "step": step, "epoch": 1, "loss": 0.5}) + "\\n")
            log.flush()
        out = run_dir / "output"
        out.mkdir()
        (out / (cfg["output_name"] + ".safetensors")).write_bytes(b"lora")
        samples = run_dir / "samples"
        samples.mkdir()
        (samples / "000001-0.png").write_bytes(b"png")
        log.write(json.dumps({"event": "finished", "step": steps, "epoch": 1}) + "\\n")
    print("trainer done", flush=True)
    """
)


@pytest.fixture
def api(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    use_trainer_double(settings, monkeypatch, script=tmp_path / "trainer_double.py", source=TRAINER)
    with TestClient(create_app(settings)) as client:
        client.app.state.executor.poll_interval = 0.1
        yield client


def _wait(client: TestClient, run_id: str, statuses: set[str], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/status/{run_id}").json()
        if body["status"] in statuses:
            return body
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} stayed {body['status']}")


def _runs_dir_entries(settings: Settings) -> list[str]:
    return sorted(p.name for p in settings.runs_dir.iterdir()) if settings.runs_dir.is_dir() else []


def test_train_runs_to_success_with_status_artifacts_and_events(api: TestClient, settings: Settings) -> None:
    response = api.post("/train", json={"output_name": "demo", "max_train_steps": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["message"] == "Training started"
    run_id = body["run_id"]
    done = _wait(api, run_id, {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    assert set(done) == {
        "run_id",
        "status",
        "logs",
        "progress",
        "outputs",
        "error",
        "waiting",
        "warnings",
        "created_at",
        "started_at",
        "finished_at",
        "best_checkpoint",
    }
    assert set(done["progress"]) == {
        "step",
        "total_steps",
        "epoch",
        "total_epochs",
        "loss",
        "it_per_s",
        "eta_seconds",
        "validation_loss",
    }
    assert done["progress"]["step"] == 4 and done["progress"]["total_steps"] == 4
    assert [o["name"] for o in done["outputs"]] == ["demo.safetensors"]
    assert done["outputs"][0]["url"] is None
    assert "trainer done" in done["logs"]

    run_config = json.loads((settings.runs_dir / run_id / "run.json").read_text())
    assert run_config["dataset_config"] == str(settings.datasets_dir / "demo.toml")
    assert run_config["pretrained_model"] == "flux1-dev.sft"

    with api.stream("GET", f"/runs/{run_id}/events") as stream:
        text = "".join(stream.iter_text())
    ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
    assert ids == list(range(1, 7))
    steps = [json.loads(line[6:])["step"] for line in text.splitlines() if '"event": "step"' in line]
    assert steps == [1, 2, 3, 4]
    assert "event: status" in text and '"succeeded"' in text.split("event: status", 1)[1]
    with api.stream("GET", f"/runs/{run_id}/events", headers={"Last-Event-ID": "4"}) as stream:
        resumed = "".join(stream.iter_text())
    assert [int(line[4:]) for line in resumed.splitlines() if line.startswith("id: ")] == [5, 6]

    files = api.get(f"/runs/{run_id}/artifacts").json()["files"]
    kinds = {(f["name"], f["kind"]) for f in files}
    assert kinds == {("demo.safetensors", "lora"), ("000001-0.png", "sample")}
    assert api.get(f"/runs/{run_id}/artifacts/demo.safetensors").content == b"lora"
    assert api.get(f"/runs/{run_id}/artifacts/run.json").status_code == 404
    assert api.get(f"/runs/{run_id}/artifacts/..%2Frun.json").status_code in (404, 422)

    logs = api.get(f"/runs/{run_id}/logs", params={"tail": 1}).json()
    assert logs["lines"] == ["trainer done"]
    follow = api.get(f"/runs/{run_id}/logs", params={"offset": logs["next_offset"]}).json()
    assert follow["lines"] == [] and follow["next_offset"] == logs["next_offset"]

    listed = api.get("/runs", params={"status": "succeeded"}).json()["runs"]
    assert [r["run_id"] for r in listed] == [run_id]
    assert api.get("/runs", params={"status": "queued"}).json()["runs"] == []
    assert api.post(f"/runs/{run_id}/cancel").status_code == 409


@pytest.mark.parametrize(
    ("body", "code", "needle"),
    [
        ({"output_name": "missing"}, 404, "missing.toml"),
        ({"output_name": "demo", "dataset": "nope"}, 404, "nope.toml"),
        ({"output_name": "demo", "ae": "vae/ae.sft"}, 404, "vae/ae.sft"),
        ({"output_name": "demo", "clip_l": "../outside.safetensors"}, 422, "leaves the models folder"),
        ({"output_name": "demo", "t5xxl": "/etc/passwd"}, 422, "relative"),
        ({"output_name": "demo", "learning_rate": -1}, 422, "learning_rate"),
        ({"output_name": "demo", "network_dim": 0}, 422, "network_dim"),
        ({"output_name": "demo", "gpus": 0}, 422, "gpus"),
        ({"output_name": "demo", "pretrained_model": "tokenizers"}, 422, "pretrained_model: 'tokenizers'"),
        ({"output_name": "demo", "pretrained_model": "ae.sft"}, 422, "no FLUX transformer weights"),
        ({"output_name": "../demo"}, 422, "output_name"),
        ({"output_name": "demo", "no_such_field": 1}, 422, "no_such_field"),
        ({"output_name": "demo", "webhook": "ftp://example.com/hook"}, 422, "webhook"),
        ({"output_name": "demo", "webhook": "http://169.254.169.254/hook"}, 422, "webhook"),
        ({"output_name": "demo", "webhook": "http://localhost:9/hook"}, 422, "webhook: refused address"),
        ({"output_name": "demo", "mixed_precision": "fp16"}, 422, "mixed_precision"),
        ({}, 422, "output_name"),
    ],
)
def test_bad_requests_create_no_run_and_no_folder(
    api: TestClient, settings: Settings, body: dict, code: int, needle: str
) -> None:
    response = api.post("/train", json=body)
    assert response.status_code == code, response.text
    assert needle in response.text
    if code == 404 and "models" not in needle:
        assert str(settings.datasets_dir) in response.text or str(settings.models_root) in response.text
    assert api.get("/runs").json()["runs"] == []
    assert _runs_dir_entries(settings) == []


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(api: TestClient, number: str) -> None:
    body = '{"output_name": "demo", "learning_rate": ' + number + "}"
    response = api.post("/train", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert "learning_rate" in response.text and "finite number" in response.text
    assert api.get("/runs").json()["runs"] == []


def test_missing_model_names_the_file_and_the_folder(api: TestClient, settings: Settings) -> None:
    (settings.models_root / "ae.sft").unlink()
    response = api.post("/train", json={"output_name": "demo"})
    assert response.status_code == 404
    assert "ae.sft" in response.json()["detail"] and str(settings.models_root) in response.json()["detail"]


def test_idempotency_key_starts_one_run(api: TestClient, settings: Settings) -> None:
    headers = {"Idempotency-Key": "abc-123"}
    first = api.post("/train", json={"output_name": "demo", "max_train_steps": 2}, headers=headers)
    second = api.post("/train", json={"output_name": "demo", "max_train_steps": 2}, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.json()["run_id"] == second.json()["run_id"]
    clash = api.post("/train", json={"output_name": "demo", "max_train_steps": 3}, headers=headers)
    assert clash.status_code == 409
    assert len(api.get("/runs").json()["runs"]) == 1
    assert _runs_dir_entries(settings) == [first.json()["run_id"]]


def test_unknown_run_is_404_everywhere(api: TestClient) -> None:
    for path in ("/status/nope", "/runs/nope/logs", "/runs/nope/events", "/runs/nope/artifacts"):
        assert api.get(path).status_code == 404, path
    assert api.post("/runs/nope/cancel").status_code == 404


def test_bad_last_event_id_is_422(api: TestClient) -> None:
    run_id = api.post("/train", json={"output_name": "demo", "max_train_steps": 1}).json()["run_id"]
    assert api.get(f"/runs/{run_id}/events", headers={"Last-Event-ID": "x"}).status_code == 422


def test_list_filters_and_limit_are_checked(api: TestClient) -> None:
    assert api.get("/runs", params={"status": "bogus"}).status_code == 422
    assert api.get("/runs", params={"limit": 0}).status_code == 422


def test_webhook_gets_the_status_at_start_and_end(api: TestClient, settings: Settings) -> None:
    import ipaddress
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.allow_networks = [ipaddress.ip_network("127.0.0.0/8")]
    hook = f"http://127.0.0.1:{server.server_port}/hook"
    try:
        body = {"output_name": "demo", "max_train_steps": 1, "webhook": hook}
        _wait(api, api.post("/train", json=body).json()["run_id"], {"succeeded"})
        deadline = time.monotonic() + 10
        while len(received) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.shutdown()
    assert [body["status"] for body in received] == ["running", "succeeded"]
    assert received[1]["outputs"][0]["name"] == "demo.safetensors"


UPLOADING_TRAINER = textwrap.dedent(
    """
    import json, sys, time, pathlib
    run_dir = pathlib.Path(sys.argv[1])
    name = json.loads((run_dir / "run.json").read_text())["output_name"]
    out = run_dir / "output"
    out.mkdir()
    def emit(record):
        with (run_dir / "events.jsonl").open("a") as log:
            log.write(json.dumps(record) + "\\n")
    emit({"event": "started", "total_steps": 2, "total_epochs": 2})
    (out / (name + "-000001.safetensors")).write_bytes(b"epoch one")
    emit({"event": "step", "step": 1, "epoch": 1, "loss": 0.5})
    deadline = time.monotonic() + 60
    while not (run_dir / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    (out / (name + ".safetensors")).write_bytes(b"final lora")
    emit({"event": "finished", "step": 2, "epoch": 2})
    """
)


@pytest.fixture
def s3_api(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, object]]:
    """The service with artifacts going to a moto S3 server on loopback whose bucket does not exist yet."""
    pytest.importorskip("moto.server", reason="the S3 check needs moto[server]")
    import socket

    from moto.server import ThreadedMotoServer

    from fluxtrain.storage.remote import open_remote

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    use_trainer_double(
        settings, monkeypatch, script=tmp_path / "uploading_trainer.py", source=UPLOADING_TRAINER
    )
    settings.cloud_storage_type = "S3"
    settings.storage_url = "s3://artifacts/runs"
    try:
        httpx.post(f"http://127.0.0.1:{port}/moto-api/reset", timeout=10).raise_for_status()
        with TestClient(create_app(settings)) as client:
            client.app.state.executor.poll_interval = 0.1
            client.app.state.executor.sync_interval = 0.2
            yield client, open_remote(settings)
    finally:
        server.stop()


def test_artifacts_upload_to_s3_and_the_run_ends_after_the_final_upload(
    s3_api: tuple[TestClient, object], settings: Settings
) -> None:
    api, store = s3_api
    run_id = api.post("/train", json={"output_name": "demo"}).json()["run_id"]
    folder = settings.runs_dir / run_id
    events = folder / "events.jsonl"
    deadline = time.monotonic() + 30
    while not (events.is_file() and '"upload_failed"' in events.read_text()):
        assert time.monotonic() < deadline, "the checkpoint upload never failed"
        time.sleep(0.1)
    assert api.get(f"/status/{run_id}").json()["outputs"][0]["url"] is None
    store.fs.mkdir("artifacts")  # type: ignore[attr-defined]
    (folder / "go").touch()

    done = _wait(api, run_id, {"succeeded", "failed", "canceled"})
    assert done["status"] == "succeeded", done["error"]
    prefix = f"s3://artifacts/runs/{run_id}/output"
    assert [(o["name"], o["url"]) for o in done["outputs"]] == [
        ("demo-000001.safetensors", f"{prefix}/demo-000001.safetensors"),
        ("demo.safetensors", f"{prefix}/demo.safetensors"),
    ], "the run is only reported finished once its final LoRA is uploaded"
    uploaded = store.fs.cat_file(f"artifacts/runs/{run_id}/output/demo.safetensors")  # type: ignore[attr-defined]
    assert uploaded == b"final lora"

    with api.stream("GET", f"/runs/{run_id}/events") as stream:
        text = "".join(stream.iter_text())
    records = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    kinds = [(r.get("event"), r.get("file")) for r in records[:-1]]
    checkpoint = "output/demo-000001.safetensors"
    assert kinds.index(("upload_failed", checkpoint)) < kinds.index(("upload", checkpoint))
    assert kinds.index(("upload", "output/demo.safetensors")) > kinds.index(("finished", None))
    final = text.split("event: status", 1)[1]
    assert f"{prefix}/demo.safetensors" in final and '"succeeded"' in final


def test_query_and_header_bounds_are_422(api: TestClient) -> None:
    run_id = api.post("/train", json={"output_name": "demo", "max_train_steps": 1}).json()["run_id"]
    for params in ({"tail": 0}, {"tail": 10_001}, {"tail": "x"}, {"offset": -1}):
        assert api.get(f"/runs/{run_id}/logs", params=params).status_code == 422, params
    assert api.get(f"/runs/{run_id}/logs", params={"tail": 10_000}).status_code == 200
    for params in ({"limit": 1001}, {"limit": "x"}, {"status": "Running"}):
        assert api.get("/runs", params=params).status_code == 422, params
    assert api.get(f"/runs/{run_id}/events", headers={"Last-Event-ID": "-1"}).status_code == 422


def test_runs_list_is_newest_first_and_limited(api: TestClient) -> None:
    first = api.post("/train", json={"output_name": "demo", "max_train_steps": 1}).json()["run_id"]
    second = api.post("/train", json={"output_name": "demo", "max_train_steps": 1}).json()["run_id"]
    assert [r["run_id"] for r in api.get("/runs").json()["runs"]] == [second, first]
    assert [r["run_id"] for r in api.get("/runs", params={"limit": 1}).json()["runs"]] == [second]
    _wait(api, second, {"succeeded"})


@pytest.mark.parametrize(
    "name", ["..%2Frun.json", "..%2frun.json", "%2e%2e%2frun.json", "..%5crun.json", "output%2Fdemo.lora"]
)
def test_artifact_names_that_leave_the_folder_are_422(api: TestClient, name: str) -> None:
    run_id = api.post("/train", json={"output_name": "demo", "max_train_steps": 1}).json()["run_id"]
    response = api.get(f"/runs/{run_id}/artifacts/{name}")
    assert response.status_code == 422, response.text
    assert "artifact name" in response.json()["detail"]


def test_log_follow_gets_the_unterminated_last_line_once_the_run_ended(
    api: TestClient, settings: Settings
) -> None:
    run_id = api.post("/train", json={"output_name": "demo", "max_train_steps": 1}).json()["run_id"]
    _wait(api, run_id, {"succeeded"})
    offset = api.get(f"/runs/{run_id}/logs").json()["next_offset"]
    with (settings.runs_dir / run_id / "train.log").open("a") as log:
        log.write("Killed")
    follow = api.get(f"/runs/{run_id}/logs", params={"offset": offset}).json()
    assert follow["lines"] == ["Killed"] and follow["next_offset"] == offset + len("Killed")


def test_contact_sheet_is_404_for_an_unknown_run_409_without_samples_then_listed(
    api: TestClient, settings: Settings
) -> None:
    assert api.post("/runs/nope/contact-sheet").status_code == 404
    run_id = api.post("/train", json={"output_name": "demo", "max_train_steps": 1}).json()["run_id"]
    _wait(api, run_id, {"succeeded"})
    refused = api.post(f"/runs/{run_id}/contact-sheet")  # the double's 000001-0.png is no sample name
    assert refused.status_code == 409 and "no samples" in refused.json()["detail"]
    samples = settings.runs_dir / run_id / "samples"
    for step in (1, 2):
        Image.new("RGB", (32, 32), (step * 100, 0, 0)).save(samples / f"demo_{step:06d}_00.png")
    made = api.post(f"/runs/{run_id}/contact-sheet")
    assert made.status_code == 200, made.text
    assert made.json()["name"] == "demo-grid.jpg" and made.json()["kind"] == "contact_sheet"
    files = {f["name"]: f["kind"] for f in api.get(f"/runs/{run_id}/artifacts").json()["files"]}
    assert files["demo-grid.jpg"] == "contact_sheet" and files["demo_000002_00.png"] == "sample"
    sheet = api.get(f"/runs/{run_id}/artifacts/demo-grid.jpg")
    assert sheet.status_code == 200 and sheet.content[:2] == b"\xff\xd8"
    assert made.json()["size"] == len(sheet.content)
