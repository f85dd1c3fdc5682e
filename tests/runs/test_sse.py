"""The events stream: Last-Event-ID, a reader of appended lines that holds partial ones back, resume."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import update

from fluxtrain.errors import InvalidInputError
from fluxtrain.rundir import RunDir
from fluxtrain.runs.db import Database
from fluxtrain.runs.sse import _LineReader, parse_last_event_id, run_events
from fluxtrain.runs.status import run_dir
from fluxtrain.runs.table import Run
from fluxtrain.settings import Settings


@pytest.mark.parametrize(("value", "number"), [(None, 0), ("", 0), ("  ", 0), ("7", 7), (" 12 ", 12)])
def test_last_event_id_is_a_line_number(value: str | None, number: int) -> None:
    assert parse_last_event_id(value) == number


@pytest.mark.parametrize(
    ("value", "needle"), [("abc", "line number"), ("1.5", "line number"), ("-1", "negative")]
)
def test_a_bad_last_event_id_is_refused(value: str, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle):
        parse_last_event_id(value)


def test_line_reader_returns_complete_lines_and_keeps_a_partial_one(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    reader = _LineReader(path)
    assert reader.read() == []
    path.write_bytes(b'{"a": 1}\n{"b": ')
    assert reader.read() == ['{"a": 1}']
    assert reader.read() == []
    with path.open("ab") as handle:
        handle.write(b'2}\n{"c": 3}\n')
    assert reader.read() == ['{"b": 2}', '{"c": 3}']
    with path.open("ab") as handle:
        handle.write('{"d": "\u00e9"}\n'.encode())
    assert reader.read() == ['{"d": "\u00e9"}']


def _stream(
    settings: Settings, db: Database, run_id: str, after: int
) -> list[tuple[str | None, str | None, str]]:
    async def collect() -> list[tuple[str | None, str | None, str]]:
        return [
            (event.id, event.event, str(event.raw_data))
            async for event in run_events(settings=settings, db=db, run_id=run_id, after=after)
        ]

    return asyncio.run(collect())


def test_a_reconnecting_client_resumes_after_the_line_it_saw(
    run_settings: Settings, db: Database, submit: Callable[..., Run]
) -> None:
    run = submit("demo")
    events = RunDir(run_dir(run_settings, run.id)).events
    lines = [json.dumps({"event": "step", "step": n}) for n in range(1, 5)]
    events.write_text("\n".join([lines[0], lines[1], "", lines[2], lines[3]]) + "\n", encoding="utf-8")
    with db.session() as session:
        session.execute(update(Run).where(Run.id == run.id).values(status="succeeded"))

    everything = _stream(run_settings, db, run.id, after=0)
    assert [(i, data) for i, _, data in everything[:-1]] == [
        ("1", lines[0]),
        ("2", lines[1]),
        ("4", lines[2]),
        ("5", lines[3]),
    ]
    assert everything[-1][1] == "status" and json.loads(everything[-1][2])["status"] == "succeeded"

    resumed = _stream(run_settings, db, run.id, after=2)
    assert [(i, data) for i, _, data in resumed[:-1]] == [("4", lines[2]), ("5", lines[3])]
    assert resumed[-1][1] == "status"
