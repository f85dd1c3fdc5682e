"""POST a run's status to its webhook when it starts and when it ends.

The URL goes through the same address checks as image downloads, so a webhook cannot reach
the service's own network unless FLUXTRAIN_ALLOW_NETWORKS lets it.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from fluxtrain.datasets.fetch import FetchError, check_url, make_client
from fluxtrain.errors import InvalidInputError
from fluxtrain.runs.schemas import RunStatusOut
from fluxtrain.settings import Settings

log = logging.getLogger(__name__)
WEBHOOK_TIMEOUT = 10.0
WEBHOOK_ATTEMPTS = 3


def check_webhook(url: str, settings: Settings) -> str:
    """Refuse a webhook URL before a run exists when its scheme or literal address is not allowed."""
    try:
        check_url(url, settings.allow_networks)
    except FetchError as exc:
        raise InvalidInputError(f"webhook: {exc}") from exc
    return url


async def _post(url: str, body: str, settings: Settings) -> None:
    async with make_client(
        allow=settings.allow_networks, concurrency=1, timeout=WEBHOOK_TIMEOUT, ca_bundle=settings.ca_bundle
    ) as client:
        for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
            try:
                response = await client.post(
                    str(check_url(url, settings.allow_networks)),
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
            except Exception as exc:  # noqa: BLE001 - any failure is retried, then logged
                reason = str(exc) or type(exc).__name__
            else:
                if response.status_code < 500:
                    return
                reason = f"HTTP {response.status_code}"
            if attempt < WEBHOOK_ATTEMPTS:
                await asyncio.sleep(attempt)
        log.warning("webhook for run %s failed: %s", url.split("?", 1)[0], reason)


def send_webhook(url: str, status: RunStatusOut, settings: Settings) -> None:
    """Deliver one notification, retrying server errors; never raises."""
    try:
        asyncio.run(_post(url, status.model_dump_json(), settings))
    except Exception:  # noqa: BLE001 - a webhook must never take the executor down
        log.exception("webhook delivery crashed")


def notify(url: str | None, status: RunStatusOut, settings: Settings) -> threading.Thread | None:
    """Send the notification in the background so a slow receiver never holds up a run."""
    if not url:
        return None
    thread = threading.Thread(target=send_webhook, args=(url, status, settings), daemon=True)
    thread.start()
    return thread
