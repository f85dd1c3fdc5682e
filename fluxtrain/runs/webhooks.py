"""POST a run's status to its webhook when it starts and when it ends, surviving restarts.

What was delivered is kept in the run table (`webhook_started`, `webhook_ended`), so a
notification owed when the service died is sent by the next executor. The executor's loop only
hands owed notifications to one background sender, so a slow or dead receiver never holds a run
up; each failed try is followed by a longer wait, up to a bounded number of tries. A `started`
notification still owed when the run has already ended is superseded by the `ended` one (both
would carry the same final status). Delivery is at least once: a service killed between a
receiver's answer and the row update sends that notification again.

The URL goes through the same address checks as image downloads, so a webhook cannot reach
the service's own network unless FLUXTRAIN_ALLOW_NETWORKS lets it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import urllib.parse

from sqlalchemy import and_, or_, select, update

from fluxtrain.datasets.addresses import parse_ip
from fluxtrain.datasets.fetch import (
    AddressRefusedError,
    FetchError,
    check_resolved_host,
    check_url,
    make_client,
    post_bytes,
)
from fluxtrain.errors import InvalidInputError
from fluxtrain.runs.db import Database
from fluxtrain.runs.status import build_status
from fluxtrain.runs.table import TERMINAL_STATUSES, Run
from fluxtrain.settings import Settings

log = logging.getLogger(__name__)
WEBHOOK_TIMEOUT = 10.0
RETRYABLE_STATUS = frozenset({408, 425, 429})
BATCH = 50


def check_webhook(url: str, settings: Settings) -> str:
    """Refuse a webhook URL before a run exists when its scheme or address is not allowed.

    A host name is resolved now too, so `localhost` is a 422 rather than eight refused deliveries;
    one that does not resolve yet is let through: each delivery resolves and judges it again."""
    try:
        parsed = check_url(url, settings.allow_networks)
    except FetchError as exc:
        raise InvalidInputError(f"webhook: {exc}") from exc
    if parse_ip(parsed.host) is not None:
        return url
    try:
        check_resolved_host(parsed.raw_host.decode("ascii"), settings.allow_networks)
    except AddressRefusedError as exc:
        raise InvalidInputError(f"webhook: {exc}") from exc
    except FetchError:
        return url
    return url


async def _post(url: str, body: str, settings: Settings, timeout: float) -> str | None:
    async with make_client(
        allow=settings.allow_networks, concurrency=1, ca_bundle=settings.ca_bundle
    ) as client:
        status = await post_bytes(
            client,
            url,
            allow=settings.allow_networks,
            body=body.encode("utf-8"),
            headers={"Content-Type": "application/json"},
            timeout=timeout,
        )
    if status >= 500 or status in RETRYABLE_STATUS:
        return f"HTTP {status}"
    return None


def post_status(url: str, body: str, settings: Settings, *, timeout: float = WEBHOOK_TIMEOUT) -> str | None:
    """One delivery try: None once the receiver took it (or refused it for good), else why it failed."""
    try:
        return asyncio.run(_post(url, body, settings, timeout))
    except Exception as exc:  # noqa: BLE001 - any failure is a reason to try again later
        return str(exc) or type(exc).__name__


def _shown(url: str, reason: str) -> tuple[str, str]:
    """The URL and a failure's reason as the log may show them: a user name, password, query or
    fragment can carry the receiver's secret, so none of them is written."""
    parts = urllib.parse.urlsplit(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    shown = urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
    return shown, reason.replace(userinfo, "***") if userinfo else reason


def _owed() -> object:
    started = and_(
        Run.webhook_started.is_(None),
        Run.status == "running",
        Run.backend_ref.is_not(None),
        Run.backend_waiting.is_(None),
    )
    ended = and_(Run.webhook_ended.is_(None), Run.status.in_(TERMINAL_STATUSES))
    return and_(Run.webhook.is_not(None), or_(started, ended))


class WebhookOutbox:
    """Sends the notifications the run table says are owed, one background sender at a time."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        max_attempts: int = 8,
        backoff: float = 2.0,
        max_delay: float = 300.0,
        timeout: float = WEBHOOK_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.db = db
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_delay = max_delay
        self.timeout = timeout
        self._thread: threading.Thread | None = None

    def due(self, now: float) -> list[Run]:
        """Runs with a notification owed whose next try is not in the future, oldest first."""
        query = (
            select(Run)
            .where(_owed(), or_(Run.webhook_retry_at.is_(None), Run.webhook_retry_at <= now))
            .order_by(Run.created_at, Run.id)
            .limit(BATCH)
        )
        with self.db.session() as session:
            return list(session.scalars(query))

    def pump(self) -> threading.Thread | None:
        """Called from the executor's loop: start the sender when something is owed and none runs."""
        if self._thread is not None and self._thread.is_alive():
            return None
        if not self.due(time.time()):
            return None
        self._thread = threading.Thread(target=self._send_due, name="fluxtrain-webhooks", daemon=True)
        self._thread.start()
        return self._thread

    def wait(self, timeout: float | None = None) -> None:
        """Let a try in flight finish, so a following executor does not send the same one again."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _send_due(self) -> None:
        try:
            self.send_due()
        except Exception:  # noqa: BLE001 - the next pump tries again
            log.exception("webhook sender failed")

    def send_due(self) -> int:
        """One try for every notification due now; returns how many were delivered."""
        delivered = 0
        for run in self.due(time.time()):
            delivered += self._send_one(run)
        return delivered

    def _send_one(self, run: Run) -> bool:
        owed = "webhook_ended" if run.status in TERMINAL_STATUSES else "webhook_started"
        body = build_status(self.settings, run).model_dump_json()
        reason = post_status(str(run.webhook), body, self.settings, timeout=self.timeout)
        if reason is None:
            self._settle(run, owed, "sent")
            return True
        attempts = run.webhook_attempts + 1
        safe_url, reason = _shown(str(run.webhook), reason)
        if attempts >= self.max_attempts:
            log.warning(
                "webhook %s of run %s: gave up after %d tries: %s", safe_url, run.id, attempts, reason
            )
            self._settle(run, owed, "failed")
            return False
        delay = min(self.backoff * 2 ** (attempts - 1), self.max_delay)
        log.info("webhook %s of run %s failed (%s); trying again in %.1f s", safe_url, run.id, reason, delay)
        self._update(run, owed, webhook_attempts=attempts, webhook_retry_at=time.time() + delay)
        return False

    def _settle(self, run: Run, owed: str, outcome: str) -> None:
        values: dict[str, object] = {owed: outcome, "webhook_attempts": 0, "webhook_retry_at": None}
        if owed == "webhook_ended" and run.webhook_started is None:
            values["webhook_started"] = "skipped"
        self._update(run, owed, **values)

    def _update(self, run: Run, owed: str, **values: object) -> None:
        """Change the row only while that notification is still owed, so nothing is settled twice."""
        with self.db.session() as session:
            still_owed = getattr(Run, owed).is_(None)
            session.execute(update(Run).where(Run.id == run.id, still_owed).values(**values))
