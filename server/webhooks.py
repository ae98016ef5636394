"""Signed webhook deliveries from a durable outbox (contract §3.5).

A job's terminal transition inserts one outbox row in the same transaction (event id
`<job id>-<status>`, so one delivery per event whatever retries or restarts happen). The row
records the event, not its body: this dispatcher builds the body from the job row when it posts
it, so the store needs no callback into the server, and since a terminal job never changes,
every attempt posts the same bytes. It posts due rows with WaveSpeed's headers, retries failures
with exponential backoff and gives up after `webhook_max_attempts`. Rows live in the store, so
deliveries survive a restart.

Signature: `webhook-signature: v3,<hex>` where hex = HMAC-SHA256(key = the secret without its
`whsec_` prefix, as UTF-8 bytes, msg = "{webhook-id}.{webhook-timestamp}.{raw body}").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from server.predictions import prediction_object
from server.settings import Settings
from server.storage import Storage, open_storage
from server.store import Job, JobStore, WebhookDelivery

log = logging.getLogger("wan_vace.webhooks")


def webhook_secret(store: JobStore) -> str:
    """The server's signing secret, created once and kept in the store."""
    return store.set_setting_if_absent("webhook_secret", "whsec_" + secrets.token_hex(24))


def signature(secret: str, webhook_id: str, timestamp: str, body: bytes) -> str:
    key = secret.removeprefix("whsec_").encode()
    msg = f"{webhook_id}.{timestamp}.".encode() + body
    return "v3," + hmac.new(key, msg, hashlib.sha256).hexdigest()


def webhook_payload_builder(
    settings: Settings, storage: Storage | None = None
) -> Callable[[Job], dict[str, Any]]:
    """The bare prediction object (not wrapped in code/data), URLs on the job's origin, as the
    storage names them (default: the local folder's `/media/` URLs)."""
    storage = storage or open_storage(settings)

    def build(job: Job) -> dict[str, Any]:
        return prediction_object(
            job, settings.public_url or job.base_url, storage=storage, include_input=True,
            base64_outputs=False,
        )  # fmt: skip

    return build


class WebhookDispatcher:
    def __init__(self, settings: Settings, store: JobStore, storage: Storage | None = None):
        self.s = settings
        self.store = store
        self.payload = webhook_payload_builder(settings, storage)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.secret = webhook_secret(self.store)
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=self.s.webhook_timeout + 2)

    def _loop(self) -> None:
        from server.netguard import guarded_client

        # The media fetcher's connect-time guard: loopback, private, link-local and metadata
        # addresses are refused unless WAN_VACE_ALLOW_PRIVATE_URLS is on, after DNS too.
        with guarded_client(
            allow_private=self.s.allow_private_urls, timeout=self.s.webhook_timeout
        ) as client:
            while not self._stop.wait(0.25):
                try:
                    due = self.store.due_webhooks(time.time(), lease_seconds=self.s.webhook_timeout + 5)
                except Exception:
                    log.exception("webhook outbox unavailable")
                    continue
                for d in due:
                    if self._stop.is_set():
                        break  # the rest stay claimed until their lease runs out, then retry
                    # One bad row must not hold up the others claimed with it.
                    try:
                        self._deliver(client, d)
                    except Exception:
                        log.exception("webhook %s: the delivery attempt failed unexpectedly", d.event_id)

    def _body(self, d: WebhookDelivery) -> bytes | None:
        """The event's body, or None after giving up on an event that has no job to describe."""
        if d.body is not None:  # stored by a release that built bodies at the transition
            return d.body.encode()
        job = self.store.get(d.job_id)
        if job is None or job.status.value != d.status:
            now = f"is {job.status.value}, not {d.status}" if job else "does not exist"
            err = f"job {d.job_id} {now}: nothing to deliver"
            log.warning("webhook %s: %s; giving up", d.event_id, err)
            self.store.webhook_attempted(d.event_id, delivered=False, error=err, next_attempt_at=None)
            return None
        return json.dumps(self.payload(job), separators=(",", ":")).encode()

    def _deliver(self, client: httpx.Client, d: WebhookDelivery) -> None:
        body = self._body(d)
        if body is None:
            return
        ts = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "webhook-id": d.event_id,
            "webhook-timestamp": ts,
            "webhook-signature": signature(self.secret, d.event_id, ts, body),
            "User-Agent": "wan-vace-webhooks/1",
        }
        from server.netguard import AddressRefused

        try:
            r = client.post(d.url, content=body, headers=headers)
            ok, err = 200 <= r.status_code < 300, f"receiver answered {r.status_code}"
        except AddressRefused as e:
            msg = f"{e}; set WAN_VACE_ALLOW_PRIVATE_URLS=true to allow it"
            log.warning("webhook %s refused: %s", d.event_id, msg)
            self.store.webhook_attempted(d.event_id, delivered=False, error=msg, next_attempt_at=None)
            return
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as e:
            # Permanent: no retry can deliver to this URL.
            log.warning("webhook %s: invalid URL %r (%s); giving up", d.event_id, d.url, e)
            self.store.webhook_attempted(
                d.event_id, delivered=False, error=f"invalid URL: {e}", next_attempt_at=None
            )
            return
        except Exception as e:  # httpx.HTTPError and anything unexpected: an attempt that failed
            ok, err = False, f"{type(e).__name__}: {e}"
        attempts = d.attempts + 1
        if ok:
            self.store.webhook_attempted(d.event_id, delivered=True, error="", next_attempt_at=None)
            log.info("webhook %s delivered after %d attempt(s)", d.event_id, attempts)
            return
        if attempts >= self.s.webhook_max_attempts:
            log.warning("webhook %s: giving up after %d attempts (%s)", d.event_id, attempts, err)
            self.store.webhook_attempted(d.event_id, delivered=False, error=err, next_attempt_at=None)
            return
        delay = self.s.webhook_backoff * 2 ** (attempts - 1)
        log.info("webhook %s attempt %d failed (%s); retry in %.1f s", d.event_id, attempts, err, delay)
        self.store.webhook_attempted(d.event_id, delivered=False, error=err, next_attempt_at=time.time() + delay)
