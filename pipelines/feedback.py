"""Served feedback: a durable, append-only log of canonical attention events.

The model service appends what users did with its recommendations (impressions,
clicks, views, purchases, ...) to one JSON-lines file; `attnflow ingest` reads it
back into the canonical events table (`ingest.feedback_log`). Each line is one event:

    {"user_id": "u1", "item_id": "i9", "ts": "2024-05-01T12:00:00.000000+00:00",
     "event": "click", "value": null, "dwell_s": 4.2, "variant": "challenger",
     "event_id": "4f0c..."}

Guarantees, and why:

- durable: a batch is written with one `write` on an `O_APPEND` descriptor under an
  exclusive `flock` (several service processes may share the file) and `fsync`ed
  before the call returns, so an acknowledged event survives a crash;
- all or nothing: if the write fails part-way (disk full), the file is truncated
  back to its size before the batch, so a failed batch leaves no torn line and the
  earlier events stay intact; the caller gets `FeedbackLogUnavailable` (the service
  answers 503);
- idempotent on `event_id` within a process: clients retry, and a retried batch must
  not count twice. The ids of recently written events are kept in a bounded set
  (oldest forgotten first); events without an id get a fresh one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.errors import AttnflowError

log = logging.getLogger(__name__)

# The canonical event types (README, "Canonical attention events").
EVENT_TYPES = frozenset(
    {"view", "click", "rate", "tag", "comment", "purchase", "cart", "share", "impression"}
)
LOG_COLUMNS = ["user_id", "item_id", "ts", "event", "value", "dwell_s", "variant", "event_id"]


class FeedbackLogUnavailable(AttnflowError):
    """The feedback log cannot be written (disk full, read-only, permissions)."""


class FeedbackEvent(BaseModel):
    """One event as a client reports it; `ts` and `event_id` are filled in when absent."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=256)
    item_id: str = Field(min_length=1, max_length=256)
    event: str
    ts: datetime | None = None
    value: float | None = Field(None, allow_inf_nan=False)
    dwell_s: float | None = Field(None, ge=0, allow_inf_nan=False)
    event_id: str | None = Field(None, min_length=1, max_length=128)
    variant: str | None = Field(None, max_length=64)

    @field_validator("event")
    @classmethod
    def _canonical_event(cls, v: str) -> str:
        if v not in EVENT_TYPES:
            raise ValueError(f"must be one of {sorted(EVENT_TYPES)}")
        return v

    @field_validator("ts")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        # A naive time is ambiguous; canonical events are UTC, so naive means UTC.
        if v is not None and v.tzinfo is None:
            v = v.replace(tzinfo=UTC)
        return v

    def record(self) -> dict[str, Any]:
        """The canonical log record (UTC ISO time, an event id always present)."""
        ts = (self.ts or datetime.now(UTC)).astimezone(UTC)
        return {
            "user_id": self.user_id,
            "item_id": self.item_id,
            "ts": ts.isoformat(timespec="microseconds"),
            "event": self.event,
            "value": self.value,
            "dwell_s": self.dwell_s,
            "variant": self.variant,
            "event_id": self.event_id or uuid.uuid4().hex,
        }


@dataclass
class AppendResult:
    """What one append did: events written and retried events skipped."""

    written: int
    duplicates: int


class FeedbackLog:
    """An append-only JSON-lines feedback log (one per file; thread-safe).

    `recent_ids` bounds the memory spent on idempotency: an event id is recognised
    as a duplicate while it is among the last `recent_ids` ids written.
    """

    def __init__(self, path: Path | str, recent_ids: int = 100_000):
        self.path = Path(path)
        self.recent_ids = recent_ids
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._offset = 0  # how far into the file this process has read event ids
        self._lock = threading.Lock()

    def append(self, events: Iterable[FeedbackEvent | dict[str, Any]]) -> AppendResult:
        """Write the events durably (fsync) as one batch; duplicates by event_id are skipped.

        Duplicates are recognised across processes too: every model service (and each
        of its workers) appends to the same file, and the gateway may retry an event
        on the champion after the challenger wrote it and died before answering. Under
        the file lock, each writer first reads the ids the others appended since it
        last looked.

        Raises `FeedbackLogUnavailable` when nothing could be written; the log is then
        exactly as it was before the call. Raises `pydantic.ValidationError` for an
        event that is not a valid `FeedbackEvent` (nothing is written then either).
        """
        records = [
            (e if isinstance(e, FeedbackEvent) else FeedbackEvent.model_validate(e)).record()
            for e in events
        ]
        with self._lock:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # other service processes append to this file
                self._catch_up(fd)
                fresh, batch_ids = [], set()
                for rec in records:
                    eid = rec["event_id"]
                    if eid in self._seen or eid in batch_ids:
                        continue
                    batch_ids.add(eid)
                    fresh.append(rec)
                if fresh:
                    data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in fresh)
                    self._write(fd, data.encode("utf-8"))
                    self._remember(batch_ids)
                self._offset = os.fstat(fd).st_size
            finally:
                os.close(fd)  # also releases the flock
        return AppendResult(written=len(fresh), duplicates=len(records) - len(fresh))

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self._unavailable(exc) from None

    def _catch_up(self, fd: int) -> None:
        """Learn the event ids appended (by anyone) since this process last read the file."""
        size = os.fstat(fd).st_size
        if size < self._offset:  # the log was replaced or truncated: read it afresh
            self._offset = 0
        if size == self._offset:
            return
        with os.fdopen(os.dup(fd), "rb") as fh:
            fh.seek(self._offset)
            ids = []
            for line in fh:
                try:
                    ids.append(json.loads(line)["event_id"])
                except (ValueError, KeyError, TypeError):
                    continue  # not ours to judge here; ingest validates the log
        self._remember(ids)
        self._offset = size

    def _remember(self, ids: Iterable[str]) -> None:
        for eid in ids:
            self._seen[eid] = None
            self._seen.move_to_end(eid)
        while len(self._seen) > self.recent_ids:
            self._seen.popitem(last=False)

    def _write(self, fd: int, data: bytes) -> None:
        """Append `data` and fsync, or leave the file as it was (never a torn line)."""
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, start)
                os.fsync(fd)
            except OSError:
                log.error("could not roll back a partial write to %s", self.path)
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: OSError) -> FeedbackLogUnavailable:
        reason = {
            errno.ENOSPC: "the disk is full",
            errno.EDQUOT: "the disk quota is exhausted",
            errno.EFBIG: "the file reached its size limit",
            errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
            errno.EISDIR: "it is a folder",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        return FeedbackLogUnavailable(f"feedback log {self.path} cannot be written: {reason}")


def iter_log(path: Path | str) -> Iterator[dict[str, Any]]:
    """Every record of a feedback log, oldest first; unreadable lines are skipped.

    A torn last line can only come from a crash of the machine mid-write (a failed
    write is rolled back); it is skipped with a warning rather than failing ingest.
    """
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping an unreadable line", path, n)
                continue
            if isinstance(rec, dict):
                yield rec


def read_log(path: Path | str):
    """The feedback log as a DataFrame with the log's columns (None when empty or absent).

    `pipelines.ingest.read_feedback` keeps the canonical columns of this frame; the
    extra `variant` and `event_id` columns are for canary analysis.
    """
    import pandas as pd

    records = list(iter_log(path))
    if not records:
        return None
    return pd.DataFrame.from_records(records, columns=LOG_COLUMNS)
