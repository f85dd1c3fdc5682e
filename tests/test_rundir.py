"""The run directory's names, the event writer and the event readers."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import pytest

from fluxtrain.rundir import (
    EventWriter,
    RunDir,
    append_event,
    checkpoint_name,
    contact_sheet_name,
    first_event,
    parse_checkpoint_name,
    parse_sample_name,
    read_events,
    recent_events,
    rejected_lora,
    sample_name,
)


def test_paths_of_a_run_directory(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "abc")
    assert run.id == "abc"
    assert run.config == tmp_path / "abc" / "run.json"
    assert run.events.name == "events.jsonl"
    assert run.log.name == "train.log"
    assert (run.output.name, run.samples.name, run.state.name) == ("output", "samples", "state")
    assert (run.uploads.name, run.upload_state.name) == ("uploads.json", "uploads-state.json")
    assert run.checkpoint("lora", 3) == run.output / "lora-000003.safetensors"
    assert run.key(run.checkpoint("lora", None)) == "output/lora.safetensors"
    assert not run.root.exists()


@pytest.mark.parametrize(
    ("epoch", "name"), [(1, "my-lora-000001.safetensors"), (None, "my-lora.safetensors")]
)
def test_checkpoint_name_round_trips(epoch: int | None, name: str) -> None:
    assert checkpoint_name("my-lora", epoch) == name
    assert parse_checkpoint_name(name, "my-lora") == epoch


@pytest.mark.parametrize(
    "name",
    ["other-000001.safetensors", "my-lora-01.safetensors", "lora-000001.pt", ".my-lora-000001.safetensors"],
)
def test_parse_checkpoint_name_refuses_other_files(name: str) -> None:
    assert parse_checkpoint_name(name, "my-lora") is None


def test_sample_name_round_trips() -> None:
    assert sample_name("x", step=10, index=2) == "x_000010_02.png"
    assert parse_sample_name("x_000010_02.png", "x") == (10, 2)
    assert parse_sample_name("y_000010_02.png", "x") is None
    assert parse_sample_name("x_000010_02.jpg", "x") is None


def test_writer_appends_complete_lines_with_event_and_time(tmp_path: Path) -> None:
    path = tmp_path / "run" / "events.jsonl"
    with EventWriter(path) as events:
        events.emit("step", loss=float("nan"), eta=float("inf"), where=tmp_path, sizes=(1, 2))
    append_event(path, "upload", file="output/x.safetensors")
    lines = path.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    assert list(first)[:2] == ["event", "time"]
    assert first["loss"] is None and first["eta"] is None
    assert first["where"] == str(tmp_path) and first["sizes"] == [1, 2]
    assert [e["event"] for e in read_events(path)] == ["step", "upload"]


def test_disabled_writer_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    events = EventWriter(path, enabled=False)
    events.emit("started")
    events.close()
    assert not path.exists()


def _append_many(path: str, tag: int) -> None:
    for number in range(200):
        append_event(Path(path), "tick", tag=tag, number=number, pad="x" * 3000)


def test_writers_in_threads_and_processes_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_append_many, args=(str(path), tag)) for tag in (1, 2)]
    threads = [threading.Thread(target=_append_many, args=(str(path), tag)) for tag in (3, 4)]
    for worker in [*processes, *threads]:
        worker.start()
    for worker in [*processes, *threads]:
        worker.join()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 800
    assert all(json.loads(line)["event"] == "tick" for line in lines)


def test_readers_skip_partial_and_foreign_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    append_event(path, "started", total_steps=4)
    for step in range(1, 5):
        append_event(path, "step", step=step)
    with path.open("a", encoding="utf-8") as handle:
        handle.write('["not an event"]\n{"event": "fin')
    assert [e["event"] for e in read_events(path)] == ["started", *["step"] * 4]
    assert [e["step"] for e in recent_events(path, 4)] == [3, 4]
    assert first_event(path, "started") == read_events(path)[0]
    assert first_event(path, "step", scan=1) is None
    assert first_event(path, "finished") is None


def test_readers_of_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    assert read_events(path) == [] and recent_events(path) == [] and first_event(path, "started") is None


def test_lora_files_and_uploaded_urls(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.lora_files() == [] and run.uploaded_urls() == {}
    run.output.mkdir()
    for name in ("a.safetensors", ".a.safetensors.tmp", ".b.safetensors", "notes.txt"):
        (run.output / name).write_bytes(b"x")
    assert [p.name for p in run.lora_files()] == ["a.safetensors"]
    run.uploads.write_text(json.dumps({"output/a.safetensors": "s3://b/a", "bad": 3}), encoding="utf-8")
    assert run.uploaded_urls() == {"output/a.safetensors": "s3://b/a"}
    run.uploads.write_text("{broken", encoding="utf-8")
    assert run.uploaded_urls() == {}


def test_the_contact_sheet_and_a_rejected_lora_are_never_taken_for_a_sample_or_a_lora(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert run.contact_sheet("x") == run.samples / "x-grid.jpg" == run.samples / contact_sheet_name("x")
    for name in ("x", "x_000010_02", "x-grid"):
        assert parse_sample_name(contact_sheet_name(name), name) is None
        assert parse_sample_name(contact_sheet_name(name), "x") is None
    final = run.checkpoint("x", None)
    final.parent.mkdir(parents=True)
    rejected_lora(final).write_bytes(b"bad")
    assert rejected_lora(final).name == ".x.safetensors.rejected" and run.lora_files() == []
