"""Reliability and security tests: a tiny model, one real model service and a gateway.

The model trains in seconds (the serving tests' recipe, one epoch); the service and
the gateway are real processes on 127.0.0.1 whose logs are kept, so tests can read
what an operator would. Every process is stopped when the session ends.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import SyntheticConfig
from pipelines.sequences import SplitData, load_split
from pipelines.train import export_model, train_model
from services.launch import Handle, start_gateway, start_model_service, stop_all, wait_ready
from tests.model.conftest import make_split, small_config

# A fixed salt, so the tests can compute the pseudonyms the services log.
USER_SALT = "reliability-test-salt-" + os.urandom(8).hex()


@dataclass
class TinyModel:
    """A trained model folder and the split it came from."""

    data: SplitData
    folder: Path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    """A one-epoch model on 300 synthetic users (a few seconds)."""
    root = tmp_path_factory.mktemp("reliability-model")
    split = make_split(
        root / "split",
        SyntheticConfig(
            n_users=300, n_items=120, n_topics=5, events_per_user=15, pattern_prob=0.7, seed=3
        ),
    )
    data = load_split(split)
    counts = np.bincount(data.train.items, minlength=data.n_items + 1)[1 : data.n_items + 1]
    ids = data.items.sort_values("item_idx")["item_id"].tolist()
    popular = [ids[i] for i in np.argsort(-counts, kind="stable")[:100]]
    cfg = small_config(**{"train.epochs": 1})
    encoder = train_model(cfg, data, cache_dir=root / "cache").encoder
    folder = export_model(encoder, data, root / "model", {"popular_items": popular})
    return TinyModel(data, folder)


@dataclass
class Stack:
    """A model service and a gateway in front of it."""

    service: Handle
    gateway: Handle
    feedback_log: Path
    log_dir: Path
    admin_token: str

    def logs(self) -> str:
        """Everything both processes have logged so far."""
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))


def _wait_gateway_ready(url: str, timeout: float = 30.0) -> None:
    """The gateway routes once its probe has seen the champion ready (every 0.5 s)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gateway {url} not ready after {timeout} s")


@pytest.fixture(scope="session")
def stack(tiny_model, tmp_path_factory) -> Stack:
    """One model service (the tiny model) and a gateway, started together."""
    root = tmp_path_factory.mktemp("reliability-stack")
    log_dir = root / "logs"
    feedback = root / "feedback" / "events.jsonl"
    token = "admin-" + os.urandom(16).hex()
    env = {
        "BENTOML_HOME": str(root / "bentoml"),
        "ATTNFLOW_USER_SALT": USER_SALT,
        "ATTNFLOW_HASH_USER_IDS": "1",
    }
    handles: list[Handle] = []
    try:
        service = start_model_service(
            tiny_model.folder, feedback_log=feedback, env=env, log_dir=log_dir, wait=False
        )
        handles.append(service)
        gateway = start_gateway(service.url, admin_token=token, env=env, log_dir=log_dir, wait=True)
        handles.append(gateway)
        wait_ready(service, timeout=180)
        _wait_gateway_ready(gateway.url)
        yield Stack(service, gateway, feedback, log_dir, token)
    finally:
        stop_all(handles)
