"""Signed webhook deliveries from a durable outbox (contract §3.5).

A job's terminal transition inserts one outbox row in the same transaction (event id
`<job id>-<status>`, so one delivery per event whatever retries or restarts happen). The row
records the event, not its body: this dispatcher builds the body from the job row when it posts
it, so the store needs no callback into the server, and since a terminal job never changes,
every attempt posts the same bytes. Rows live in the store, so deliveries survive a restart.

Delivery:
- Each due row is claimed on its own (`JobStore.due_webhooks`: a claim token and an expiry per
  row), and the claim is renewed while the row is being sent, so any number of dispatchers
  (several servers on one data dir) never post one event twice while its claim is held. Only
  the holder records the result (a compare-and-set on the token). A dispatcher that crashed
  mid-send leaves a claim that runs out; another then sends the event again: at-least-once, a
  duplicate only after a crash between the receiver's 2xx and the record.
- Sends run on a small pool of threads (`pool_size`, 8), at most `per_host` (2) at once to one
  receiver origin (scheme, host, port), and only as many rows are claimed as can be sent at
  once: a slow or hanging receiver holds up only its own events.
- Retries follow the documented schedule exactly: attempt n failed -> attempt n+1 at
  `webhook_backoff` x 2^(n-1) seconds after attempt n ended; the dispatcher wakes for that time
  rather than for its next poll. It gives up after `webhook_max_attempts` attempts.
- Final answers end a delivery at once (given up, the status recorded): every 4xx except 408
  Request Timeout, 425 Too Early and 429 Too Many Requests, which ask the sender to try again
  later. 2xx is delivered; 5xx, the three above, other codes (3xx: redirects are not followed),
  timeouts and connection errors are retried.

Signature: `webhook-signature: v3,<hex>` where hex = HMAC-SHA256(key = the secret without its
`whsec_` prefix, as UTF-8 bytes, msg = "{webhook-id}.{webhook-timestamp}.{raw body}").
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import logging
import queue
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx

from server.predictions import prediction_object
from server.settings import Settings
from server.storage import Storage, open_storage
from server.store import Job, JobStore, WebhookDelivery

log = logging.getLogger("wan_vace.webhooks")

# 4xx answers that ask the sender to try again later; every other 4xx is final.
RETRIED_4XX = frozenset({408, 425, 429})


def webhook_secret(store: JobStore) -> str:
    """The server's signing secret, created once and kept in the store."""
    return store.set_setting_if_absent("webhook_secret", "whsec_" + secrets.token_hex(24))


def signature(secret: str, webhook_id: str, timestamp: str, body: bytes) -> str:
    key = secret.removeprefix("whsec_").encode()
    msg = f"{webhook_id}.{timestamp}.".encode() + body
    return "v3," + hmac.new(key, msg, hashlib.sha256).hexdigest()


def is_final(status_code: int) -> bool:
    """True for a receiver's answer that no retry can change (see the module docstring)."""
    return 400 <= status_code < 500 and status_code not in RETRIED_4XX


def retry_delay(settings: Settings, attempts: int) -> float:
    """Seconds from the end of failed attempt number `attempts` (1, 2, ...) to the next one."""
    return settings.webhook_backoff * 2 ** (attempts - 1)


def receiver_origin(url: str) -> str:
    """The unit `per_host` limits: scheme, host and port of the URL (the URL itself if invalid)."""
    try:
        u = httpx.URL(url)
        port = u.port or {"http": 80, "https": 443}.get(u.scheme)
        return f"{u.scheme}://{u.host}:{port}"
    except httpx.InvalidURL:
        return url


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
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        storage: Storage | None = None,
        *,
        pool_size: int = 8,
        per_host: int = 2,
        claim_seconds: float | None = None,
        poll_interval: float = 0.25,
    ):
        self.s = settings
        self.store = store
        self.payload = webhook_payload_builder(settings, storage)
        self.pool_size = pool_size
        self.per_host = per_host
        # A claim outlives a stalled store write or two; it is renewed every third of it while
        # its row is being sent, so its length only bounds how long a crashed dispatcher's
        # events wait before another dispatcher takes them over.
        self.claim_seconds = claim_seconds or max(30.0, 3 * settings.webhook_timeout)
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._wake = threading.Event()  # a send ended: a slot is free, maybe a retry is due
        self._lock = threading.Lock()
        self._in_flight: dict[str, WebhookDelivery] = {}  # event id -> its claimed delivery
        self._busy: Counter[str] = Counter()  # sends in flight per receiver origin
        self._retries: list[float] = []  # heap of the retry times this dispatcher set
        self._sends: queue.SimpleQueue[WebhookDelivery | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._senders: list[threading.Thread] = []

    def start(self) -> None:
        self.secret = webhook_secret(self.store)
        # Daemon threads: a receiver that never answers cannot hold up the process's exit.
        self._senders = [
            threading.Thread(target=self._send_loop, name=f"webhook-send-{i}", daemon=True)
            for i in range(self.pool_size)
        ]
        for t in self._senders:
            t.start()
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming and let the sends in flight end (up to `webhook_timeout` + 2 s), their
        results recorded. A send still running after that keeps its claim until it runs out;
        then another dispatcher (or this server, restarted) sends the event again."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=5)
        for _ in self._senders:
            self._sends.put(None)
        deadline = time.monotonic() + self.s.webhook_timeout + 2
        for t in self._senders:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    # The claiming loop -----------------------------------------------------------------------
    def _loop(self) -> None:
        renew_every = self.claim_seconds / 3
        renewed = time.monotonic()
        while not self._stop.is_set():
            self._wake.clear()  # whatever set it before now, the claim below sees
            now = time.time()
            try:
                self._claim(now)
            except Exception:
                log.exception("webhook outbox unavailable")
            with self._lock:
                while self._retries and self._retries[0] <= now:
                    heapq.heappop(self._retries)  # due by `now`: claimed above if a slot was free
                next_retry = self._retries[0] if self._retries else None
            if time.monotonic() - renewed >= renew_every:
                renewed = time.monotonic()
                try:
                    self._renew()
                except Exception:
                    log.exception("webhook outbox unavailable: claims not renewed")
            wait = min(self.poll_interval, renewed + renew_every - time.monotonic())
            if next_retry is not None:
                wait = min(wait, next_retry - time.time())
            self._wake.wait(max(0.0, wait))

    def _claim(self, now: float) -> None:
        """Claim as many due rows as there are free senders, passing over receivers that
        already have `per_host` sends in flight, and hand them to the senders."""
        with self._lock:
            free = self.pool_size - len(self._in_flight)
            busy = Counter(self._busy)
        if free <= 0:
            return

        def accept(d: WebhookDelivery) -> bool:
            origin = receiver_origin(d.url)
            if busy[origin] >= self.per_host:
                return False
            busy[origin] += 1
            return True

        for d in self.store.due_webhooks(now, limit=free, lease_seconds=self.claim_seconds, accept=accept):
            with self._lock:
                self._in_flight[d.event_id] = d
                self._busy[receiver_origin(d.url)] += 1
            self._sends.put(d)

    def _renew(self) -> None:
        with self._lock:
            claims = {e: d.claim for e, d in self._in_flight.items()}
        held = self.store.renew_webhook_claims(claims, self.claim_seconds)
        for event_id in claims.keys() - held:
            with self._lock:
                sending = event_id in self._in_flight
            if sending:  # the claim ran out before this renewal (a stalled store?)
                log.warning("webhook %s: the claim was lost while sending; it may be sent twice", event_id)

    # Senders ---------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        from server.netguard import guarded_client

        # The media fetcher's connect-time guard: loopback, private, link-local and metadata
        # addresses are refused unless WAN_VACE_ALLOW_PRIVATE_URLS is on, after DNS too. A
        # client per sender: a guarded client makes one connection at a time.
        with guarded_client(
            allow_private=self.s.allow_private_urls, timeout=self.s.webhook_timeout
        ) as client:
            while (d := self._sends.get()) is not None:
                self._send(client, d)

    def _send(self, client: httpx.Client, d: WebhookDelivery) -> None:
        try:
            self._deliver(client, d)
        except Exception:  # e.g. the store unavailable: the claim runs out, then a retry
            log.exception("webhook %s: the delivery attempt failed unexpectedly", d.event_id)
        finally:
            with self._lock:
                self._in_flight.pop(d.event_id, None)
                origin = receiver_origin(d.url)
                self._busy[origin] -= 1
                if self._busy[origin] <= 0:
                    del self._busy[origin]
            self._wake.set()

    def _record(
        self,
        d: WebhookDelivery,
        *,
        delivered: bool,
        error: str,
        next_attempt_at: float | None,
        status_code: int | None = None,
    ) -> bool:
        ok = self.store.webhook_attempted(
            d.event_id, claim=d.claim, delivered=delivered, error=error,
            next_attempt_at=next_attempt_at, status_code=status_code,
        )  # fmt: skip
        if not ok:
            log.warning(
                "webhook %s: another dispatcher took the claim over; this attempt's result "
                "(%s) is not recorded", d.event_id, "delivered" if delivered else error,
            )  # fmt: skip
        return ok

    def _body(self, d: WebhookDelivery) -> bytes | None:
        """The event's body, or None after giving up on an event that has no job to describe."""
        if d.body is not None:  # stored by a release that built bodies at the transition
            return d.body.encode()
        job = self.store.get(d.job_id)
        if job is None or job.status.value != d.status:
            now = f"is {job.status.value}, not {d.status}" if job else "does not exist"
            err = f"job {d.job_id} {now}: nothing to deliver"
            log.warning("webhook %s: %s; giving up", d.event_id, err)
            self._record(d, delivered=False, error=err, next_attempt_at=None)
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

        code: int | None = None
        err = ""
        try:
            # Streamed and left unread: only the status matters, and an endless answer body
            # cannot hold a sender.
            with client.stream("POST", d.url, content=body, headers=headers) as r:
                code = r.status_code
        except AddressRefused as e:
            msg = f"{e}; set WAN_VACE_ALLOW_PRIVATE_URLS=true to allow it"
            log.warning("webhook %s refused: %s", d.event_id, msg)
            self._record(d, delivered=False, error=msg, next_attempt_at=None)
            return
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as e:
            # Permanent: no retry can deliver to this URL.
            log.warning("webhook %s: invalid URL %r (%s); giving up", d.event_id, d.url, e)
            self._record(d, delivered=False, error=f"invalid URL: {e}", next_attempt_at=None)
            return
        except Exception as e:  # httpx.HTTPError (timeouts, connection errors) and the unexpected
            err = f"{type(e).__name__}: {e}"
        attempts = d.attempts + 1
        if code is not None:
            if 200 <= code < 300:
                self._record(d, delivered=True, error="", next_attempt_at=None, status_code=code)
                log.info("webhook %s delivered after %d attempt(s)", d.event_id, attempts)
                return
            err = f"receiver answered {code}"
            if is_final(code):
                err += " (final: a 4xx other than 408, 425 or 429 is not retried)"
                log.warning("webhook %s: %s; giving up after %d attempt(s)", d.event_id, err, attempts)
                self._record(d, delivered=False, error=err, next_attempt_at=None, status_code=code)
                return
        if attempts >= self.s.webhook_max_attempts:
            log.warning("webhook %s: giving up after %d attempts (%s)", d.event_id, attempts, err)
            self._record(d, delivered=False, error=err, next_attempt_at=None, status_code=code)
            return
        delay = retry_delay(self.s, attempts)
        at = time.time() + delay  # from the end of this attempt
        log.info("webhook %s attempt %d failed (%s); retry in %.1f s", d.event_id, attempts, err, delay)
        if self._record(d, delivered=False, error=err, next_attempt_at=at, status_code=code):
            with self._lock:
                heapq.heappush(self._retries, at)
