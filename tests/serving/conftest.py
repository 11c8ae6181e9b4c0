"""Real model services and a real gateway on 127.0.0.1, shared by the serving tests.

One session trains a tiny model (seconds) and starts, in parallel:

- `champion`: the trained model;
- `challenger`: an untrained (random-weights) export of the same data;
- `broken`: a model whose saved user histories point past the item table, so its
  smoke recommendation fails: alive, never ready;
- `slow`: the trained model with the fault-injection hook `ATTNFLOW_TEST_DELAY_MS`;
- `victim`: another random-weights challenger, for the test that SIGKILLs one.

Every process is stopped (its whole process group) when the session ends.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from pipelines.config import SyntheticConfig
from pipelines.model import load_arrays, load_extra, save_model
from pipelines.sequences import SplitData, load_split
from pipelines.train import build_encoder, export_model, train_model
from services.launch import Handle, start_model_service, stop_all, wait_ready_or_relaunch
from tests.model.conftest import make_split, small_config

SLOW_MS = 1500  # the slow service's injected delay; tests give the gateway a shorter timeout
# One pooled client for every test: a fresh httpx client per call costs ~30 ms (TLS setup).
HTTP = httpx.Client(timeout=30, trust_env=False)


@dataclass
class Models:
    """Model folders for the serving tests."""

    data: SplitData
    trained: Path
    random: Path
    broken: Path


def _popular(data: SplitData) -> list[str]:
    counts = np.bincount(data.train.items, minlength=data.n_items + 1)[1 : data.n_items + 1]
    ids = data.items.sort_values("item_idx")["item_id"].tolist()
    return [ids[i] for i in np.argsort(-counts, kind="stable")[:100]]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    """A tiny trained model, a random-weights one and a broken one (seconds)."""
    root = tmp_path_factory.mktemp("serving-models")
    split = make_split(
        root / "split",
        SyntheticConfig(
            n_users=300, n_items=120, n_topics=5, events_per_user=15, pattern_prob=0.7, seed=3
        ),
    )
    data = load_split(split)
    cfg = small_config(**{"train.epochs": 2})
    lineage = {"popular_items": _popular(data)}
    trained = export_model(
        train_model(cfg, data, cache_dir=root / "cache").encoder, data, root / "trained", lineage
    )
    random = export_model(build_encoder(cfg, data, root / "cache"), data, root / "random", lineage)
    # Broken: histories that index past the item table; loading works (the manifest is
    # consistent), scoring a known user fails.
    arrays = load_arrays(trained)
    arrays["hist_items"] = np.full_like(arrays["hist_items"], data.n_catalog + 1000)
    extra = {name: load_extra(trained, name) for name in ("items", "users", "lineage")}
    from pipelines.model import load_model

    broken = save_model(load_model(trained), root / "broken", extra=extra, arrays=arrays)
    return Models(data, trained, random, broken)


@dataclass
class Services:
    """Running model services and where their feedback goes."""

    champion: Handle
    challenger: Handle
    broken: Handle
    slow: Handle
    victim: Handle  # a challenger that one test kills
    feedback_link: Path  # the champion's log lives under this symlink (re-pointed by tests)
    feedback_real: Path
    log_dir: Path

    @property
    def champion_log(self) -> Path:
        return self.feedback_real / "events.jsonl"


@pytest.fixture(scope="session")
def services(models, tmp_path_factory) -> Services:
    """Four model services started in parallel, stopped at the end of the session."""
    root = tmp_path_factory.mktemp("serving")
    log_dir = root / "logs"
    real = root / "feedback-real"
    real.mkdir()
    link = root / "feedback"
    link.symlink_to(real)
    env = {"BENTOML_HOME": str(root / "bentoml")}
    handles: list[Handle] = []
    again: dict[int, Callable[[], Handle]] = {}  # port -> start that service again
    try:

        def start(source: Path, variant: str, log: Path, extra: dict[str, str]) -> Handle:
            h = start_model_service(
                source,
                variant=variant,
                feedback_log=log,
                env={**env, **extra},
                log_dir=log_dir,
                wait=False,
            )
            handles.append(h)
            again[h.port] = lambda: start(source, variant, log, extra)
            return h

        champion = start(models.trained, "champion", link / "events.jsonl", {})
        challenger = start(models.random, "challenger", root / "challenger.jsonl", {})
        broken = start(models.broken, "challenger", root / "broken.jsonl", {})
        slow = start(
            models.trained,
            "challenger",
            root / "slow.jsonl",
            {"ATTNFLOW_TEST_DELAY_MS": str(SLOW_MS)},
        )
        victim = start(models.random, "challenger", root / "victim.jsonl", {})
        champion, challenger, slow, victim = (
            # a port free when picked can be taken by a neighbour starting at the same time
            wait_ready_or_relaunch(h, again[h.port], timeout=180)
            for h in (champion, challenger, slow, victim)
        )
        yield Services(champion, challenger, broken, slow, victim, link, real, log_dir)
    finally:
        stop_all(handles)


@pytest.fixture(scope="session")
def admin_token() -> str:
    """The gateway's admin token in these tests."""
    return os.environ.get("ATTNFLOW_TEST_ADMIN_TOKEN", "test-token-" + os.urandom(8).hex())


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the Prometheus samples `name` whose labels include `labels` (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{(.*)\}})? (\S+)$", line)
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


@pytest.fixture(scope="session", autouse=True)
def _close_http():
    yield
    HTTP.close()
