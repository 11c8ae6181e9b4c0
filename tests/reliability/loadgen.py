"""An open-loop load generator, run in its own process by the soak test.

Why a process of its own: the soak test also runs the rollout flow, in a thread of
the pytest process. Starting a Prefect flow holds the GIL for long enough to delay
an asyncio loop in the same process by half a second, and the delay then shows up
as an uneven request rate that the platform never caused. In a separate process
the generator keeps its schedule, so the rate check judges the gateway, not pytest.

    python -m tests.reliability.loadgen URL USERS_JSON SECONDS RATE OUT_JSON

It prints `started <unix time>` once the first request is due, then writes every
outcome to OUT_JSON when the last answer is in. A request with no answer within
10 s, waiting for a connection included, counts as failed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp


class OpenLoop:
    """Send `rate` requests/s on a fixed schedule, whatever the answers take; keep outcomes."""

    def __init__(self, url: str, users: list[str], seconds: float, rate: int):
        self.url, self.users, self.seconds, self.rate = url, users, seconds, rate
        self.outcomes: list[tuple[float, str, str, object]] = []  # (t, kind, user, status)
        self.feedback_ids: list[str] = []
        self.started = 0.0
        self.sent_at: list[float] = []  # when each request really left, s from the start

    async def _one(self, http: aiohttp.ClientSession, i: int, t: float) -> None:
        self.sent_at.append(time.monotonic() - self.started)
        user = self.users[i % len(self.users)]
        try:
            if i % 10 == 9:
                eid = f"soak-{i}"
                self.feedback_ids.append(eid)
                body = {
                    "events": [{"user_id": user, "item_id": "1", "event": "click", "event_id": eid}]
                }
                path, kind = "/feedback", "feedback"
            else:
                body, path, kind = {"user_id": user, "k": 10}, "/recommend", "recommend"
            async with http.post(f"{self.url}{path}", json=body) as r:
                await r.read()
                self.outcomes.append((t, kind, user, r.status))
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.outcomes.append((t, "error", user, type(exc).__name__))

    async def run(self) -> None:
        """Send every request at its due time and wait for all the answers."""
        # aiohttp rather than httpx: httpx's pool spends time per queued request, so a
        # backlog of a few thousand made the generator itself the bottleneck
        connector = aiohttp.TCPConnector(limit=64)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            self.started = time.monotonic()
            print(f"started {time.time()}", flush=True)
            tasks, n = [], int(self.seconds * self.rate)
            for i in range(n):
                due = self.started + i / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self._one(http, i, due - self.started)))
            await asyncio.gather(*tasks)

    def report(self) -> dict[str, object]:
        """What the soak test judges, as plain JSON."""
        return {
            "outcomes": self.outcomes,
            "feedback_ids": self.feedback_ids,
            "sent_at": self.sent_at,
        }


def per_window(sent_at: list[float], total_s: float, seconds: float = 10.0) -> list[int]:
    """Requests really sent in each full window of `seconds`."""
    n = int(total_s // seconds)
    counts = [0] * n
    for t in sent_at:
        if int(t // seconds) < n:
            counts[int(t // seconds)] += 1
    return counts


def main(argv: list[str]) -> None:
    url, users_path, seconds, rate, out = argv
    users = json.loads(Path(users_path).read_text())
    load = OpenLoop(url, users, float(seconds), int(rate))
    asyncio.run(load.run())
    Path(out).write_text(json.dumps(load.report()))


if __name__ == "__main__":
    main(sys.argv[1:])
