"""The canary gateway: sticky, weighted, ready-aware routing to champion and challenger.

Open-source BentoML has no canary routing, so this is a small raw-ASGI app (run by
uvicorn; no framework in the request path) in front of two model services:

    python -m services.gateway --port 8080 --champion http://127.0.0.1:3000 \\
        [--challenger http://127.0.0.1:3001 --weight 10]

Routing. `POST /recommend` and `POST /similar` go to the challenger iff
`blake2b(salt + key) mod 10000 < weight * 100`, where key is the request's `user_id`
(so a user stays on one variant at a fixed weight) or, for a request without one,
the raw request body (identical anonymous requests land on the same variant, and
the split holds for anonymous traffic too). `salt` is `serve.canary_salt`. The
response carries `X-Attnflow-Variant` and the model service echoes the same variant
in its JSON `variant` field (the gateway tells it in that request header).

Readiness and failover. Each upstream's /readyz is probed every
`serve.health_interval_s`; a variant that is not ready gets no traffic. A request
whose upstream fails (connection error, timeout after `serve.upstream_timeout_s`,
5xx) is retried once on the other variant if that one is ready, and the failure is
counted against the variant that failed. A connection error is first retried once on
a fresh connection (a stale keep-alive connection looks like a dead process); if that
fails too the upstream is marked not ready at once, so a dead challenger costs at
most the requests in flight when it died, and those are retried. 4xx answers are the
client's and pass through.

Feedback. `POST /feedback` goes to the champion (failing over to the challenger on a
connection error; both append to the same durable log). Events without a `variant`
get the one their user is assigned at the current weight, events without an
`event_id` get one (so a retry cannot write them twice), and impressions and clicks
are counted per variant (an `event_id` already counted is not counted again).

Metrics. `GET /metrics` (Prometheus, monotonic since start): requests, errors and
latency by variant, retries, feedback events by variant and type, weight, backend
readiness. `GET /admin/state` reports the *window* since the last
`POST /admin/reset-stats`: requests, errors, p50/p90/p99 latency, impressions, clicks per
variant; that is what a rollout step judges.

Admin (bearer token from `ATTNFLOW_ADMIN_TOKEN`; without it the admin API is shut):
`GET /admin/state`, `POST /admin/backends {"champion": url, "challenger": url|null}`,
`POST /admin/weight {"weight": 0..100}`, `POST /admin/abort` (weight 0, challenger
removed), `POST /admin/reset-stats`. Each answers with the new state.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import logging
import math
import os
import sys
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from pipelines.config import ServeConfig, load_config
from pipelines.errors import AttnflowError
from pipelines.privacy import redact, user_ref

log = logging.getLogger("attnflow.gateway")

CHAMPION, CHALLENGER = "champion", "challenger"
ROUTED = {"/recommend", "/similar"}
ADMIN_TOKEN_ENV = "ATTNFLOW_ADMIN_TOKEN"
JSON = [(b"content-type", b"application/json")]


def serve_config() -> ServeConfig:
    """The `serve` section: params.yaml (`ATTNFLOW_PARAMS`) with `ATTNFLOW_SET` overrides."""
    overrides = [o.strip() for o in os.environ.get("ATTNFLOW_SET", "").split(";") if o.strip()]
    return load_config(os.environ.get("ATTNFLOW_PARAMS", "params.yaml"), overrides).serve


@dataclass
class Backend:
    """One upstream model service and what the probes know about it."""

    url: str
    ready: bool = False
    version: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


class LatencySketch:
    """Latencies in log-spaced buckets (2% wide): quantiles in O(buckets), any count.

    Sorting every sample of a long bake on each /admin/state call would stall the
    event loop that serves requests; a quantile read from buckets is within 2%.
    """

    GROWTH = 1.02
    FLOOR_MS = 0.01
    SIZE = 800  # up to 0.01 ms x 1.02^800: about 80 s

    def __init__(self) -> None:
        self.counts = [0] * self.SIZE
        self.n = 0
        self._log_growth = math.log(self.GROWTH)

    def add(self, ms: float) -> None:
        """Record one latency in milliseconds."""
        i = 0 if ms <= self.FLOOR_MS else int(math.log(ms / self.FLOOR_MS) / self._log_growth) + 1
        self.counts[min(i, self.SIZE - 1)] += 1
        self.n += 1

    def quantile(self, q: float) -> float | None:
        """The upper edge of the bucket holding quantile `q` (None without samples)."""
        if not self.n:
            return None
        rank, seen = max(1, math.ceil(q * self.n)), 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return round(self.FLOOR_MS * self.GROWTH**i, 3)
        return None  # unreachable: the counts sum to n


class Window:
    """Per-variant counts since the last reset (what a rollout step is judged on)."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency = LatencySketch()
        self.impressions = 0
        self.clicks = 0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "p50_ms": self.latency.quantile(0.50),
            "p90_ms": self.latency.quantile(0.90),
            "p99_ms": self.latency.quantile(0.99),
            "impressions": self.impressions,
            "clicks": self.clicks,
        }


class UpstreamFailed(Exception):
    """The upstream did not answer usefully (connection, timeout, 5xx)."""

    def __init__(self, kind: str, detail: str, status: int = 502, body: bytes | None = None):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.status = status  # what the client gets if no other variant can answer
        self.body = body


class Gateway:
    """The ASGI app. One instance per process; all state lives in the event loop."""

    def __init__(
        self,
        champion: str,
        challenger: str | None = None,
        weight: int = 0,
        cfg: ServeConfig | None = None,
        admin_token: str | None = None,
    ):
        self.cfg = cfg or ServeConfig()
        self.salt = self.cfg.canary_salt.encode()
        self.backends: dict[str, Backend | None] = {
            CHAMPION: Backend(champion.rstrip("/")),
            CHALLENGER: Backend(challenger.rstrip("/")) if challenger else None,
        }
        self.weight = _check_weight(weight)
        self.admin_token = admin_token.encode() if admin_token else None
        self.window = {CHAMPION: Window(), CHALLENGER: Window()}
        self.counted_ids: OrderedDict[str, None] = OrderedDict()  # feedback already counted
        self.session: aiohttp.ClientSession | None = None
        self.probe_task: asyncio.Task[None] | None = None
        self._metrics()

    # --- metrics ---------------------------------------------------------------------------

    def _metrics(self) -> None:
        disable_created_metrics()  # *_created series only double the scrape
        self.registry = CollectorRegistry()
        r = self.registry
        self.m_requests = Counter(
            "attnflow_gateway_requests", "Requests by variant", ["variant", "route"], registry=r
        )
        self.m_errors = Counter(
            "attnflow_gateway_errors",
            "Upstream failures by variant (retried on the other variant when it is ready)",
            ["variant", "kind"],
            registry=r,
        )
        self.m_latency = Histogram(
            "attnflow_gateway_request_duration_seconds",
            "Latency through the gateway by the variant that answered",
            ["variant"],
            buckets=(0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.m_feedback = Counter(
            "attnflow_gateway_feedback_events",
            "Feedback events by variant and event type (impressions, clicks, ...)",
            ["variant", "event"],
            registry=r,
        )
        self.m_retries = Counter(
            "attnflow_gateway_retries",
            "Requests retried after a failure",
            ["from_variant"],
            registry=r,
        )
        self.m_weight = Gauge(
            "attnflow_gateway_challenger_weight", "Challenger traffic share, %", registry=r
        )
        self.m_ready = Gauge(
            "attnflow_gateway_backend_ready", "1 if the variant is ready", ["variant"], registry=r
        )
        self.m_weight.set(self.weight)
        for v in (CHAMPION, CHALLENGER):  # every per-variant series exists from the start
            for route in (*ROUTED, "/feedback"):
                self.m_requests.labels(v, route)
            for kind in ("connection", "timeout", "http_5xx"):
                self.m_errors.labels(v, kind)
            for event in ("impression", "click"):
                self.m_feedback.labels(v, event)
            self.m_retries.labels(v)
            self.m_ready.labels(v).set(0)
        # Labelled children looked up once: the request path only increments.
        self._lat = {v: self.m_latency.labels(v) for v in (CHAMPION, CHALLENGER)}

    # --- routing ----------------------------------------------------------------------------

    def assign(self, key: bytes) -> str:
        """The variant for a routing key at the current weight (ignores readiness)."""
        if self.weight <= 0 or self.backends[CHALLENGER] is None:
            return CHAMPION
        if self.weight >= 100:
            return CHALLENGER
        h = int.from_bytes(hashlib.blake2b(self.salt + key, digest_size=8).digest(), "big")
        return CHALLENGER if h % 10000 < self.weight * 100 else CHAMPION

    def _order(self, first: str) -> list[str]:
        """`first`, then the other variant, keeping only ready ones."""
        other = CHALLENGER if first == CHAMPION else CHAMPION
        out = []
        for v in (first, other):
            b = self.backends[v]
            if b is not None and b.ready:
                out.append(v)
        return out

    async def _forward(self, variant: str, path: str, body: bytes) -> tuple[int, bytes]:
        backend = self.backends[variant]
        assert backend is not None and self.session is not None
        try:
            async with self.session.post(
                backend.url + path,
                data=body,
                headers={"Content-Type": "application/json", "X-Attnflow-Variant": variant},
            ) as resp:
                data = await resp.read()
                status = resp.status
        except (aiohttp.ClientConnectionError, ConnectionError) as exc:
            if isinstance(exc, aiohttp.ServerTimeoutError):
                raise UpstreamFailed("timeout", str(exc), 504) from None
            raise UpstreamFailed("connection", str(exc) or type(exc).__name__) from None
        except TimeoutError:
            detail = f"no answer in {self.cfg.upstream_timeout_s} s"
            raise UpstreamFailed("timeout", detail, 504) from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailed("client", str(exc)) from None
        if status >= 500:
            detail = f"{status} {data[:200].decode(errors='replace')}"
            raise UpstreamFailed("http_5xx", detail, status, data)
        return status, data

    async def _forward_once_more(self, variant: str, path: str, body: bytes) -> tuple[int, bytes]:
        """`_forward`, with one more try on a fresh connection after a connection error.

        A pooled keep-alive connection the upstream has just closed fails like a dead
        process; one retry tells the two apart, so a live champion is never taken out
        of rotation by a stale connection. A dead process refuses the retry at once.
        """
        backend = self.backends[variant]
        try:
            return await self._forward(variant, path, body)
        except UpstreamFailed as exc:
            if exc.kind != "connection" or self.backends[variant] is not backend:
                raise
            log.info("%s %s: %s; retrying once on a new connection", variant, path, exc)
        try:
            return await self._forward(variant, path, body)
        except UpstreamFailed as exc:
            if exc.kind == "connection" and self.backends[variant] is backend:
                # Dead or restarting: out of rotation now, not at the next probe.
                assert backend is not None
                backend.ready = False
                self.m_ready.labels(variant).set(0)
            raise

    async def _routed(self, path: str, body: bytes, send: Any) -> None:
        start = time.perf_counter()
        key, user = body, None
        try:
            parsed = orjson.loads(body)
            if isinstance(parsed, dict) and isinstance(parsed.get("user_id"), str):
                user = parsed["user_id"]
                key = user.encode()
        except orjson.JSONDecodeError:
            pass  # the model service answers 400; route it like any anonymous request
        order = self._order(self.assign(key))
        if not order:
            return await _reply(send, 503, _err("no model service is ready"))
        last: UpstreamFailed | None = None
        for n, variant in enumerate(order):
            self.m_requests.labels(variant, path).inc()
            win = self.window[variant]
            win.requests += 1
            try:
                status, data = await self._forward_once_more(variant, path, body)
            except UpstreamFailed as exc:
                win.errors += 1
                self.m_errors.labels(variant, exc.kind).inc()
                # Only a keyed hash of the user id reaches the log (pipelines.privacy);
                # an upstream's error text may quote the raw id, so it is redacted too.
                why = redact(str(exc), [user])
                if n + 1 < len(order):
                    self.m_retries.labels(variant).inc()
                    log.warning(
                        "%s %s failed for user %s (%s); trying the other variant",
                        variant,
                        path,
                        user_ref(user),
                        why,
                    )
                else:
                    log.warning("%s %s failed for user %s (%s)", variant, path, user_ref(user), why)
                last = exc
                continue
            elapsed = time.perf_counter() - start
            win.latency.add(1000 * elapsed)
            self._lat[variant].observe(elapsed)
            return await _reply(send, status, data, variant)
        assert last is not None
        # Nobody could answer: the last upstream's own 5xx (e.g. 503 overloaded) if it
        # gave one, else 502 (connection) or 504 (timeout).
        body = last.body or _err(f"every ready model service failed: {last}")
        return await _reply(send, last.status, body)

    # --- feedback ---------------------------------------------------------------------------

    async def _feedback(self, body: bytes, send: Any) -> None:
        try:
            parsed = orjson.loads(body)
            events = parsed.get("events") if isinstance(parsed, dict) else None
        except orjson.JSONDecodeError:
            events = None
        if isinstance(events, list):
            for ev in events:
                if not isinstance(ev, dict):
                    continue
                uid = ev.get("user_id")
                if ev.get("variant") is None and isinstance(uid, str):
                    ev["variant"] = self.assign(uid.encode())
                if ev.get("event_id") is None:
                    # an id of our own makes the gateway's retry below idempotent too
                    ev["event_id"] = uuid.uuid4().hex
            body = orjson.dumps(parsed)
        order = [v for v in (CHAMPION, CHALLENGER) if self.backends[v] is not None]
        last: UpstreamFailed | None = None
        for variant in order:
            self.m_requests.labels(variant, "/feedback").inc()
            try:
                status, data = await self._forward_once_more(variant, "/feedback", body)
            except UpstreamFailed as exc:
                self.m_errors.labels(variant, exc.kind).inc()
                last = exc
                if exc.kind == "connection":  # nothing was written: the other may take it
                    continue
                # 5xx (log unwritable) or timeout: the other writes the same log; say so.
                body = exc.body or _err(f"feedback not accepted: {exc}")
                return await _reply(send, exc.status, body, variant)
            if status < 300 and isinstance(events, list):
                self._count_feedback(events)
            return await _reply(send, status, data, variant)
        return await _reply(send, 502, _err(f"no model service took the feedback: {last}"))

    def _count_feedback(self, events: list[Any]) -> None:
        for ev in events:
            if not isinstance(ev, dict):
                continue
            eid = ev.get("event_id")
            if isinstance(eid, str):
                if eid in self.counted_ids:
                    continue  # a retried event, already counted
                self.counted_ids[eid] = None
                if len(self.counted_ids) > 100_000:
                    self.counted_ids.popitem(last=False)
            variant, event = ev.get("variant"), ev.get("event")
            if variant not in self.window or not isinstance(event, str):
                continue
            self.m_feedback.labels(variant, event).inc()
            if event == "impression":
                self.window[variant].impressions += 1
            elif event == "click":
                self.window[variant].clicks += 1

    # --- health -----------------------------------------------------------------------------

    async def _check(self, backend: Backend) -> bool:
        """Whether `backend` answers /readyz 200; fetches its /info once it does."""
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=max(1.0, 2 * self.cfg.health_interval_s))
        try:
            async with self.session.get(backend.url + "/readyz", timeout=timeout) as resp:
                ready = resp.status == 200
            if ready and not backend.info:
                async with self.session.post(
                    backend.url + "/info",
                    data=b"{}",
                    timeout=timeout,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    if resp.status == 200:
                        backend.info = await resp.json()
                        backend.version = backend.info.get("version")
        except (aiohttp.ClientError, TimeoutError, ConnectionError, ValueError):
            return False
        return ready

    async def _probe(self, variant: str, backend: Backend) -> None:
        ready = await self._check(backend)
        if self.backends.get(variant) is not backend:
            return  # replaced by /admin/backends while probing
        if ready != backend.ready:
            log.info("%s (%s) is %s", variant, backend.url, "ready" if ready else "NOT ready")
        backend.ready = ready
        self.m_ready.labels(variant).set(int(ready))

    async def probe_all(self) -> None:
        """Probe every configured upstream once."""
        await asyncio.gather(
            *(self._probe(v, b) for v, b in list(self.backends.items()) if b is not None)
        )

    async def _probe_loop(self) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception:  # a probe bug must not stop the probing
                log.exception("readiness probe failed")
            await asyncio.sleep(self.cfg.health_interval_s)

    # --- admin ------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Weight, backends and the window stats (the body of GET /admin/state)."""

        def backend(b: Backend | None) -> dict[str, Any] | None:
            return None if b is None else {"url": b.url, "ready": b.ready, "version": b.version}

        return {
            "weight": self.weight,
            "backends": {v: backend(b) for v, b in self.backends.items()},
            "stats": {v: w.summary() for v, w in self.window.items()},
        }

    def _authorised(self, scope: dict[str, Any]) -> bool:
        if self.admin_token is None:
            return False
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    token.strip(), self.admin_token
                )
        return False

    async def _admin(self, scope: dict[str, Any], body: bytes, send: Any) -> None:
        if not self._authorised(scope):
            why = "bearer token required" if self.admin_token else f"set {ADMIN_TOKEN_ENV}"
            return await _reply(
                send, 401, _err(f"admin API: {why}"), extra=[(b"www-authenticate", b"Bearer")]
            )
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/admin/state":
            return await _reply(send, 200, orjson.dumps(self.state()))
        if method != "POST":
            return await _reply(send, 405, _err(f"{method} {path} not allowed"))
        try:
            data = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError as exc:
            return await _reply(send, 400, _err(f"body is not JSON: {exc}"))
        if not isinstance(data, dict):
            return await _reply(send, 400, _err("body must be a JSON object"))
        try:
            if path == "/admin/weight":
                self.weight = _check_weight(data.get("weight"))
                self.m_weight.set(self.weight)
                log.info("challenger weight -> %d%%", self.weight)
            elif path == "/admin/backends":
                await self._set_backends(data)
            elif path == "/admin/abort":
                self.weight = 0
                self.m_weight.set(0)
                self.backends[CHALLENGER] = None
                self.m_ready.labels(CHALLENGER).set(0)
                log.warning("canary aborted: weight 0, challenger removed")
            elif path == "/admin/reset-stats":
                self.window = {CHAMPION: Window(), CHALLENGER: Window()}
            else:
                return await _reply(send, 404, _err(f"no admin endpoint {path}"))
        except ValueError as exc:
            return await _reply(send, 400, _err(str(exc)))
        return await _reply(send, 200, orjson.dumps(self.state()))

    async def _set_backends(self, data: dict[str, Any]) -> None:
        champion, challenger = data.get("champion"), data.get("challenger")
        if not _is_url(champion):
            raise ValueError("champion: an http:// URL is required")
        if challenger is not None and not _is_url(challenger):
            raise ValueError("challenger: an http:// URL or null")
        new = {
            CHAMPION: self._keep_or_new(CHAMPION, champion),
            CHALLENGER: self._keep_or_new(CHALLENGER, challenger) if challenger else None,
        }
        # Probe the new ones before they take traffic: a swap never routes to the unknown.
        await asyncio.gather(*(self._probe_new(b) for b in new.values() if b is not None))
        self.backends = new
        for v, b in new.items():
            self.m_ready.labels(v).set(int(b is not None and b.ready))
        log.info("backends -> champion %s, challenger %s", champion, challenger)

    def _keep_or_new(self, variant: str, url: str) -> Backend:
        url = url.rstrip("/")
        for b in self.backends.values():
            if b is not None and b.url == url:
                return Backend(url, b.ready, b.version, b.info)  # known: keep what we know
        return Backend(url)

    async def _probe_new(self, backend: Backend) -> None:
        backend.ready = await self._check(backend)

    # --- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "POST":
            body = await _read_body(receive, self.cfg.max_body_bytes)
            if body is None:
                return await _reply(send, 413, _err(f"body over {self.cfg.max_body_bytes} bytes"))
            if path in ROUTED:
                return await self._routed(path, body, send)
            if path == "/feedback":
                return await self._feedback(body, send)
            if path.startswith("/admin/"):
                return await self._admin(scope, body, send)
        elif method == "GET":
            if path == "/livez":
                return await _reply(send, 200, b'{"live":true}')
            if path == "/readyz":
                champ = self.backends[CHAMPION]
                ok = champ is not None and champ.ready
                return await _reply(send, 200 if ok else 503, orjson.dumps({"ready": ok}))
            if path == "/metrics":
                return await _reply(
                    send,
                    200,
                    generate_latest(self.registry),
                    headers=[(b"content-type", b"text/plain; version=0.0.4")],
                )
            if path.startswith("/admin/"):
                return await self._admin(scope, b"", send)
        return await _reply(send, 404, _err(f"no route {method} {path}"))

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        """Open the upstream connection pool, probe once, and start probing."""
        self.session = aiohttp.ClientSession(
            # Idle connections are dropped before uvicorn's 5 s keep-alive closes them upstream.
            connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=4),
            timeout=aiohttp.ClientTimeout(total=self.cfg.upstream_timeout_s),
            skip_auto_headers={"User-Agent"},
        )
        await self.probe_all()
        self.probe_task = asyncio.get_running_loop().create_task(self._probe_loop())

    async def shutdown(self) -> None:
        """Stop probing and close the connection pool."""
        if self.probe_task is not None:
            self.probe_task.cancel()
        if self.session is not None:
            await self.session.close()


# --- small helpers -------------------------------------------------------------------------


def _check_weight(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise ValueError(f"weight: an integer from 0 to 100, got {value!r}")
    return value


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _err(message: str) -> bytes:
    return orjson.dumps({"error": message})


async def _read_body(receive: Any, limit: int) -> bytes | None:
    """The request body, or None when it is over `limit` bytes."""
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not msg.get("more_body", False):
            break
    return b"".join(chunks)


async def _reply(
    send: Any,
    status: int,
    body: bytes,
    variant: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    hdrs = list(headers or JSON)
    hdrs.append((b"content-length", str(len(body)).encode()))
    if variant is not None:
        hdrs.append((b"x-attnflow-variant", variant.encode()))
    if extra:
        hdrs.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    """`python -m services.gateway --champion URL [--challenger URL --weight N]`."""
    import uvicorn

    try:
        cfg = serve_config()
    except AttnflowError as exc:  # one line and exit 2, as every attnflow command does
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default=cfg.host)
    p.add_argument("--port", type=int, default=cfg.gateway_port)
    p.add_argument("--champion", default=f"http://{cfg.host}:{cfg.champion_port}")
    p.add_argument("--challenger", default=None)
    p.add_argument("--weight", type=int, default=0)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    try:
        _check_weight(args.weight)
    except ValueError as exc:
        p.error(str(exc))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    token = os.environ.get(ADMIN_TOKEN_ENV) or None
    if token is None:
        log.warning("%s is not set: the admin API refuses every call", ADMIN_TOKEN_ENV)
    app = Gateway(args.champion, args.challenger, args.weight, cfg, token)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        lifespan="on",
        access_log=False,  # per-request logging would cost more than the routing
        proxy_headers=False,  # nothing in front of it rewrites client addresses
        server_header=False,
        date_header=False,
        log_level=args.log_level,
        loop="auto",  # uvloop and httptools when installed
        http="auto",
    )


if __name__ == "__main__":
    main()
