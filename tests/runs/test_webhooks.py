"""Webhook notifications are kept in the run table: sent after a restart, retried, never twice."""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from fluxtrain.errors import InvalidInputError
from fluxtrain.runs.db import Database
from fluxtrain.runs.service import cancel_run, get_run
from fluxtrain.runs.table import Run
from fluxtrain.runs.webhooks import WebhookOutbox, check_webhook
from fluxtrain.settings import Settings


class Listener:
    """A webhook receiver on loopback that answers `codes` in turn (204 once they run out)."""

    def __init__(self, port: int = 0, codes: tuple[int, ...] = ()) -> None:
        self.received: list[dict] = []
        self.codes = list(codes)
        outer = self

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                outer.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(outer.codes.pop(0) if outer.codes else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = HTTPServer(("127.0.0.1", port), Hook)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def loopback(run_settings: Settings) -> Settings:
    run_settings.allow_networks = [ipaddress.ip_network("127.0.0.0/8")]
    return run_settings


@pytest.fixture
def listener() -> Iterator[Callable[..., Listener]]:
    started: list[Listener] = []

    def start(**options: object) -> Listener:
        started.append(Listener(**options))  # type: ignore[arg-type]
        return started[-1]

    yield start
    for item in started:
        item.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _until(check: Callable[[], bool], tick: Callable[[], object], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "never happened"
        tick()
        time.sleep(0.05)


def test_end_notification_owed_while_the_listener_was_down_is_sent_after_a_restart(
    loopback: Settings,
    db: Database,
    submit: Callable[..., Run],
    make_executor: Callable,
    drive: Callable,
    listener: Callable[..., Listener],
) -> None:
    port = _free_port()
    run = submit("demo", max_train_steps=1, webhook=f"http://127.0.0.1:{port}/hook")
    outbox = WebhookOutbox(settings=loopback, db=db, backoff=0.05, timeout=2)
    first = make_executor(webhooks=outbox)
    drive(first, run.id, lambda r: r.status == "succeeded")
    _until(lambda: get_run(db=db, run_id=run.id).webhook_attempts > 0, first.tick)
    first.stop()
    assert get_run(db=db, run_id=run.id).webhook_ended is None

    up = listener(port=port)
    second = make_executor(webhooks=WebhookOutbox(settings=loopback, db=db, backoff=0.05, timeout=2))
    _until(lambda: len(up.received) >= 1, second.tick)
    for _ in range(10):
        second.tick()
        time.sleep(0.05)
    second.stop()
    assert [body["status"] for body in up.received] == ["succeeded"]
    settled = get_run(db=db, run_id=run.id)
    assert (settled.webhook_started, settled.webhook_ended, settled.webhook_attempts) == (
        "skipped",
        "sent",
        0,
    )


def test_server_errors_are_retried_with_backoff_then_sent_once(
    loopback: Settings, db: Database, submit: Callable[..., Run], listener: Callable[..., Listener]
) -> None:
    hook = listener(codes=(503, 500))
    run = submit("demo", webhook=hook.url)
    cancel_run(db=db, run_id=run.id)
    outbox = WebhookOutbox(settings=loopback, db=db, backoff=1.0, timeout=2)
    assert outbox.send_due() == 0
    waiting = get_run(db=db, run_id=run.id)
    assert waiting.webhook_attempts == 1 and waiting.webhook_retry_at is not None
    assert outbox.send_due() == 0, "tried again before its backoff ran out"
    assert len(hook.received) == 1
    _until(lambda: get_run(db=db, run_id=run.id).webhook_ended == "sent", outbox.send_due)
    for _ in range(3):
        outbox.send_due()
    assert [body["status"] for body in hook.received] == ["canceled"] * 3


def test_delivery_gives_up_after_its_tries(
    loopback: Settings, db: Database, submit: Callable[..., Run], listener: Callable[..., Listener]
) -> None:
    hook = listener(codes=(500,) * 10)
    run = submit("demo", webhook=hook.url)
    cancel_run(db=db, run_id=run.id)
    outbox = WebhookOutbox(settings=loopback, db=db, max_attempts=3, backoff=0.0, timeout=2)
    for _ in range(5):
        outbox.send_due()
    assert len(hook.received) == 3
    assert get_run(db=db, run_id=run.id).webhook_ended == "failed"


def test_the_log_shows_no_user_name_password_or_query_of_the_webhook(
    loopback: Settings,
    db: Database,
    submit: Callable[..., Run],
    listener: Callable[..., Listener],
    caplog: pytest.LogCaptureFixture,
) -> None:
    hook = listener(codes=(500,) * 10)
    secret_url = hook.url.replace("http://", "http://hookuser:hunter2-pw@") + "?token=abc#frag"
    run = submit("demo", webhook=secret_url)
    cancel_run(db=db, run_id=run.id)
    outbox = WebhookOutbox(settings=loopback, db=db, max_attempts=2, backoff=0.0, timeout=2)
    with caplog.at_level(logging.INFO, logger="fluxtrain.runs.webhooks"):
        for _ in range(3):
            outbox.send_due()
    assert len(hook.received) == 2
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert f"webhook {hook.url} of run {run.id} failed (HTTP 500)" in logged
    assert f"webhook {hook.url} of run {run.id}: gave up after 2 tries: HTTP 500" in logged
    for secret in ("hookuser", "hunter2", "token=abc", "frag"):
        assert secret not in logged


def test_a_host_name_is_judged_by_its_addresses_before_a_run_exists(run_settings: Settings) -> None:
    with pytest.raises(InvalidInputError, match=r"webhook: refused address (127\.0\.0\.1|::1): loopback"):
        check_webhook("http://localhost:9/hook", run_settings)
    assert check_webhook("http://receiver.invalid/hook", run_settings) == "http://receiver.invalid/hook"


def test_a_receiver_that_never_answers_does_not_hold_up_the_executor(
    loopback: Settings, db: Database, submit: Callable[..., Run], make_executor: Callable
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        run = submit("demo", webhook=f"http://127.0.0.1:{silent.getsockname()[1]}/hook")
        cancel_run(db=db, run_id=run.id)
        executor = make_executor(webhooks=WebhookOutbox(settings=loopback, db=db, timeout=1.5))
        began = time.monotonic()
        executor.tick()
        executor.tick()
        assert time.monotonic() - began < 1.0
        executor.stop()
    assert get_run(db=db, run_id=run.id).webhook_attempts == 1
