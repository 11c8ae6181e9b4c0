"""MLflow registry webhooks: signature and replay checks, and what a delivery asks for.

MLflow signs each delivery with HMAC-SHA256 over ``<delivery id>.<timestamp>.<body>``
(header `X-MLflow-Signature: v1,<base64>`), with `X-MLflow-Delivery-Id` and
`X-MLflow-Timestamp`. A delivery is accepted only with a valid signature, a
timestamp within `tolerance_s` of now, and a delivery id not seen before (replays
are refused). Deliveries are best-effort and carry no previous alias, which is why
a reconciler also polls the aliases.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import AttnflowError

SECRET_ENV = "ATTNFLOW_WEBHOOK_SECRET"
SIGNATURE_HEADER = "x-mlflow-signature"
TIMESTAMP_HEADER = "x-mlflow-timestamp"
DELIVERY_HEADER = "x-mlflow-delivery-id"


class WebhookRejected(AttnflowError):
    """A delivery failed verification (bad signature, stale, replayed, malformed)."""


@dataclass
class AliasEvent:
    """An alias set or removed in the registry."""

    name: str
    alias: str
    version: str | None
    action: str  # "created" | "deleted"
    delivery_id: str


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The signature MLflow sends for this delivery."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class ReplayGuard:
    """Delivery ids seen recently, persisted so a restart does not reopen the window."""

    def __init__(self, path: Path | None = None, max_entries: int = 10_000):
        self.path = path
        self.max_entries = max_entries
        self.seen: OrderedDict[str, float] = OrderedDict()
        if path is not None and path.exists():
            try:
                self.seen.update(json.loads(path.read_text()))
            except (json.JSONDecodeError, TypeError):
                self.seen.clear()

    def check_and_add(self, delivery_id: str, now: float) -> bool:
        """True if the id is new (and now remembered), False for a replay."""
        if delivery_id in self.seen:
            return False
        self.seen[delivery_id] = now
        while len(self.seen) > self.max_entries:
            self.seen.popitem(last=False)
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)  # a receiver started before the stack
            tmp.write_text(json.dumps(self.seen))
            tmp.replace(self.path)
        return True


def verify(
    secret: str,
    headers: dict[str, str],
    body: bytes,
    guard: ReplayGuard,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> dict[str, Any]:
    """The delivery's payload if it is authentic, fresh and new; `WebhookRejected` if not."""
    if not secret:
        raise WebhookRejected("no webhook secret configured; refusing unsigned deliveries")
    h = {k.lower(): v for k, v in headers.items()}
    signature, ts, delivery = (
        h.get(SIGNATURE_HEADER),
        h.get(TIMESTAMP_HEADER),
        h.get(DELIVERY_HEADER),
    )
    if not signature or not ts or not delivery:
        raise WebhookRejected("missing signature, timestamp or delivery id header")
    expected = sign(secret, delivery, ts, body)
    if not hmac.compare_digest(expected, signature):
        raise WebhookRejected("bad signature")
    now = time.time() if now is None else now
    try:
        age = abs(now - int(ts))
    except ValueError:
        raise WebhookRejected("timestamp is not a number") from None
    if age > tolerance_s:
        raise WebhookRejected(f"timestamp is {age:.0f}s away from now (max {tolerance_s:.0f}s)")
    if not guard.check_and_add(delivery, now):
        raise WebhookRejected(f"delivery {delivery} was already received (replay)")
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        raise WebhookRejected("body is not JSON") from None


def alias_event(payload: dict[str, Any], delivery_id: str) -> AliasEvent | None:
    """The alias change a payload describes, or None for other registry events."""
    if payload.get("entity") != "model_version_alias":
        return None
    data = payload.get("data") or {}
    if not data.get("name") or not data.get("alias"):
        raise WebhookRejected("alias event without name or alias")
    return AliasEvent(
        name=str(data["name"]),
        alias=str(data["alias"]),
        version=str(data["version"]) if data.get("version") else None,
        action=str(payload.get("action")),
        delivery_id=delivery_id,
    )
