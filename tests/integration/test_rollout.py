"""Rollouts end to end: a real MLflow server, real BentoML model services, the real gateway.

The platform fixture trains two small models on synthetic data through the real
train stage, registers them through the MLflow server (the first becomes champion,
the second challenger), and starts the gateway and the champion's model service.
Broken versions are registered without gates, as ops can do by moving an alias in
the MLflow UI. While every rollout runs, a user load goes through the gateway: no
request may fail, whatever the challenger does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from pipelines import baselines, evaluate, train
from pipelines.config import load_config
from pipelines.model import load_arrays, load_extra, save_model
from pipelines.registry import (
    CHALLENGER,
    CHAMPION,
    aliases,
    get_alias,
    read_history,
    register,
    register_candidate,
)
from pipelines.rollout import RolloutBusy, RolloutFailed, rollout_holder, rollout_lock
from services.launch import free_port, spawn
from services.stack import MLFLOW_WEBHOOK_ENV, SPARE, LocalStack, register_webhook
from tests.code.test_rollout_wait import hold_rollout_lock
from tests.conftest import QUICK_ROLLOUT, REPO, spawn_mlflow, venv_env
from tests.model.conftest import make_split

pytestmark = pytest.mark.timeout(1200)

SECRET = "e2e-webhook-secret"
TOKEN = "e2e-admin-token"


def _wait(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


class Load:
    """User traffic through the gateway; records every status it got back."""

    def __init__(self, url: str, users: list[str]):
        self.url, self.users, self.statuses = url, users, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            i = 0
            while not self._stop.is_set():
                user = self.users[i % len(self.users)]
                try:
                    r = http.post(f"{self.url}/recommend", json={"user_id": user, "k": 5})
                    self.statuses.append(r.status_code)
                except httpx.HTTPError as exc:
                    self.statuses.append(type(exc).__name__)
                i += 1
                time.sleep(0.02)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    root = tmp_path_factory.mktemp("platform")
    mp = pytest.MonkeyPatch()
    mlflow_port, gateway_port, webhook_port = free_port(), free_port(), free_port()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"].update(hidden=32, layers=2, heads=2, max_len=20, dropout=0.1)
    params["train"].update(epochs=3, batch_size=32, lr=0.005, patience=10, threads=1)
    params["serve"].update(
        gateway_port=gateway_port, webhook_port=webhook_port, mlflow_port=mlflow_port
    )
    params["rollout"].update(
        **QUICK_ROLLOUT, min_agreement=0.15, max_p99_ratio=1.5, p99_slack_ms=60
    )
    params["ingest"]["dataset"] = "synthetic"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    from pipelines.config import SyntheticConfig

    make_split(
        root / "data" / "split",
        SyntheticConfig(
            n_users=300, n_items=120, n_topics=5, events_per_user=15, pattern_prob=0.7, seed=21
        ),
    )
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    for k, v in {
        "ATTNFLOW_STATE_DIR": str(root / ".attnflow"),
        "MLFLOW_TRACKING_URI": mlflow_url,
        "ATTNFLOW_ADMIN_TOKEN": TOKEN,
        "ATTNFLOW_WEBHOOK_SECRET": SECRET,
        "ATTNFLOW_ROOT": str(root),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }.items():
        mp.setenv(k, v)
    server = spawn_mlflow(
        root, mlflow_port, env={**MLFLOW_WEBHOOK_ENV, "MLFLOW_WEBHOOK_CACHE_TTL": "1"}
    )
    stack = LocalStack(root)
    try:
        _wait(f"{mlflow_url}/health")
        versions = {}
        for name, seed in (("v_good_1", 42), ("v_good_2", 5)):
            cfg = load_config(root / "params.yaml", [f"train.seed={seed}"])
            train.run(cfg, root)
            baselines.run(cfg, root)
            evaluate.run(cfg, root)
            versions[name] = register_candidate(cfg, root)["version"]
        stack.ensure_serving()
        _wait(f"{stack.gateway_url()}/readyz")
        yield {
            "root": root,
            "stack": stack,
            "versions": versions,
            "mlflow": mlflow_url,
            "users": json.loads((root / "models/attnflow/users.json").read_text())[:50],
        }
    finally:
        stack.down()
        server.stop()
        mp.undo()


def _register_folder(root: Path, folder: Path) -> str:
    """Register a model folder as a new version with no gates (as an ops alias move may)."""
    from pipelines.tracking import client, experiment_id, log_trained_model

    mlc = client(root)
    run = mlc.create_run(experiment_id(mlc, root), run_name="ungated")
    summary = {"best_metric": 0.0, "train_seconds": 0.0, "sequences_per_s": 0.0, "epochs_run": 0}
    uri = log_trained_model(root, run.info.run_id, folder, [{"epoch": 1, "loss": 1.0}], summary)
    return register(uri, run.info.run_id, {"note": "registered without gates (test)"}, root)


def _variant_folder(root: Path, name: str, mutate) -> Path:
    src = root / "models" / "attnflow"
    extra = {n: load_extra(src, n) for n in ("items", "users", "lineage")}
    arrays = load_arrays(src)
    from pipelines.model import load_model

    encoder = load_model(src)
    mutate(encoder, arrays)
    return save_model(encoder, root / "variants" / name, extra=extra, arrays=arrays)


def _wait_for_rollout_to_finish(root: Path, timeout: float = 120) -> None:
    from pipelines.registry import state_dir

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with rollout_lock(state_dir(root), "probe"):
                return
        except RolloutBusy:
            time.sleep(0.5)
    raise TimeoutError("the rollout did not finish")


def _rollout(root: Path, version: str):
    from flows.rollout import rollout

    return rollout(version=version, root=str(root), actor="test")


def test_good_challenger_is_promoted_with_zero_failed_requests(platform):
    root, stack, v = platform["root"], platform["stack"], platform["versions"]
    assert aliases(root=root) == {CHAMPION: v["v_good_1"], CHALLENGER: v["v_good_2"]}
    spare = stack.served()[SPARE]["pid"]  # started warm by `ensure_serving`
    with Load(stack.gateway_url(), platform["users"]) as load:
        report = _rollout(root, v["v_good_2"])
    assert report["status"] == "promoted", report
    assert [s["weight"] for s in report["steps"]] == [50, 100]
    assert load.statuses and set(load.statuses) == {200}, set(load.statuses)
    assert aliases(root=root) == {CHAMPION: v["v_good_2"]}
    # the challenger was the warm spare, and the next spare is warming
    assert stack.served()[CHAMPION]["pid"] == spare
    assert stack.served()[SPARE]["pid"] != spare and stack.served()[SPARE]["version"] is None
    served = stack.served()
    assert served[CHAMPION]["version"] == v["v_good_2"]
    assert served["standby"]["version"] == v["v_good_1"]
    moves = [(m.alias, m.previous, m.version) for m in read_history(root)]
    assert (CHAMPION, v["v_good_1"], v["v_good_2"]) in moves


def test_rollback_serves_the_previous_champion_again(platform):
    root, stack, v = platform["root"], platform["stack"], platform["versions"]
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "attnflow"), "rollback"],
        cwd=root,
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert get_alias(CHAMPION, root=root) == v["v_good_1"]
    state = httpx.get(
        f"{stack.gateway_url()}/admin/state", headers={"Authorization": f"Bearer {TOKEN}"}
    ).json()
    assert state["backends"][CHAMPION]["url"] == stack.served()[CHAMPION]["url"]
    assert stack.served()[CHAMPION]["version"] == v["v_good_1"]
    r = httpx.post(
        f"{stack.gateway_url()}/recommend", json={"user_id": platform["users"][0], "k": 3}
    )
    assert r.status_code == 200 and r.json()["model_version"] == v["v_good_1"]


def _rolled_back(platform, version: str, reason: str) -> None:
    root, stack = platform["root"], platform["stack"]
    before = aliases(root=root)
    with (
        Load(stack.gateway_url(), platform["users"]) as load,
        pytest.raises(RolloutFailed, match=reason),
    ):
        _rollout(root, version)
    assert set(load.statuses) == {200}, set(load.statuses)
    assert aliases(root=root) == before  # the aliases are as they were
    from pipelines.tracking import client

    tags = client(root).get_model_version("attnflow", version).tags
    assert (
        tags["rollout.status"] == "rolled_back" and reason.split("|")[0] in tags["rollout.reason"]
    )
    assert CHALLENGER not in stack.served()
    state = httpx.get(
        f"{stack.gateway_url()}/admin/state", headers={"Authorization": f"Bearer {TOKEN}"}
    ).json()
    assert state["weight"] == 0 and state["backends"][CHALLENGER] is None


def test_random_weights_challenger_is_rolled_back_for_disagreeing(platform):
    from pipelines.sequences import load_split
    from pipelines.train import build_encoder

    root = platform["root"]
    cfg = load_config(root / "params.yaml")
    data = load_split(root / "data" / "split")
    random = build_encoder(cfg, data, root / "cache")

    def scramble(encoder, arrays):
        encoder.load_state_dict(random.state_dict())

    version = _register_folder(root, _variant_folder(root, "random", scramble))
    _rolled_back(platform, version, "agreement")


def test_challenger_that_raises_is_rolled_back_for_errors(platform):
    root = platform["root"]

    def corrupt_most_histories(encoder, arrays):
        # every user but the first (the service's smoke check) points past the item
        # table: the service gets ready, then fails most requests
        offsets = arrays["hist_offsets"]
        arrays["hist_items"][offsets[1] :] = 10**6

    version = _register_folder(root, _variant_folder(root, "raises", corrupt_most_histories))
    _rolled_back(platform, version, "error_rate|output_sanity")


def test_slow_challenger_is_rolled_back_for_latency(platform, monkeypatch):
    root = platform["root"]
    version = _register_folder(root, _variant_folder(root, "slow", lambda e, a: None))
    stack = LocalStack(root)
    # A service reads the delay when it starts: this challenger starts cold, not as the
    # warm spare started before; the spare the rollout starts after it has the delay too.
    with monkeypatch.context() as mp:
        mp.setenv("ATTNFLOW_TEST_DELAY_MS", "400")  # inherited by the challenger only
        stack.stop_role(SPARE)
        _rolled_back(platform, version, "tail_latency")
        stack.stop_role(SPARE)
    stack.ensure_spare()


def test_a_second_rollout_while_one_runs_is_refused(platform):
    from pipelines.registry import state_dir

    root = platform["root"]
    with (
        rollout_lock(state_dir(root), "held by this test"),
        pytest.raises(RolloutBusy, match="already running"),
    ):
        _rollout(root, platform["versions"]["v_good_2"])
    with rollout_lock(state_dir(root), "held by this test"):
        assert "held by this test" in rollout_holder(state_dir(root))
    assert rollout_holder(state_dir(root)) is None
    # A run for the very version being rolled out (the webhook of the alias that the
    # retrain flow set, while that flow rolls it out) ends at once, without failing.
    version = platform["versions"]["v_good_2"]
    with rollout_lock(state_dir(root), version):
        report = _rollout(root, version)
    assert report["status"] == "started elsewhere" and f"version {version}," in report["detail"]
    # With `follow` (the retrain flow's), it waits for that other run and ends as it did:
    # with its report when it promoted, with its failure when it rolled back ...
    from flows.rollout import rollout

    state = state_dir(root)
    promoted = {"version": version, "status": "promoted", "steps": [{"weight": 50}]}
    other = hold_rollout_lock(state, version, 1.0, promoted)
    report = rollout(version=version, root=str(root), actor="test", follow=True)
    other.join()
    assert report["status"] == "promoted" and report["ran_in"] == "another flow run"
    assert report["steps"] == [{"weight": 50}]
    failed = {"version": version, "status": "rolled back", "reason": "weight 50%: p99_latency"}
    other = hold_rollout_lock(state, version, 1.0, failed)
    with pytest.raises(RolloutFailed, match="rolled back: weight 50%: p99_latency"):
        rollout(version=version, root=str(root), actor="test", follow=True)
    other.join()
    # ... and when it died without a report, it rolls the version out itself (here the
    # served champion's version, so that this rollout leaves everything as it was)
    champion = platform["stack"].served()[CHAMPION]["version"]
    other = hold_rollout_lock(state, champion, 1.0, None)
    report = rollout(version=champion, root=str(root), actor="test", follow=True)
    other.join()
    assert report == {"status": "already champion", "version": champion}
    # and through the CLI: exit code 5, one line
    with rollout_lock(state_dir(root), "held by this test"):
        proc = subprocess.run(
            [
                str(Path(sys.executable).parent / "attnflow"),
                "rollout",
                "--version",
                platform["versions"]["v_good_2"],
            ],
            cwd=root,
            env=venv_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 5 and "error: a rollout is already running" in proc.stderr


def test_malformed_requests_through_the_gateway_get_4xx(platform):
    url = platform["stack"].gateway_url()
    cases = [
        {"k": 5},
        {"user_id": "u1", "history": ["i1"], "k": 5},
        {"user_id": 5, "k": "ten"},
        {"history": ["i1"] * 10_000, "k": 5},
        {"user_id": "nobody-like-this", "k": 5},
        {"history": ["i1"], "k": 10**6},
    ]
    for body in cases:
        r = httpx.post(f"{url}/recommend", json=body)
        assert 400 <= r.status_code < 500, (body, r.status_code)
    r = httpx.post(
        f"{url}/recommend", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert 400 <= r.status_code < 500


def test_alias_moved_through_the_mlflow_rest_api_starts_a_rollout(platform):
    """What the MLflow UI does: POST an alias; the webhook reaches the receiver; a rollout runs."""
    root, stack = platform["root"], platform["stack"]
    receiver = spawn(
        "webhook",
        [
            sys.executable,
            "-m",
            "services.webhook",
            "--host",
            "127.0.0.1",
            "--port",
            str(stack.cfg.serve.webhook_port),
        ],
        stack.cfg.serve.webhook_port,
        env={},
        log_dir=root / "logs",
    )
    try:
        _wait(f"http://127.0.0.1:{stack.cfg.serve.webhook_port}/livez")
        register_webhook(root, f"http://127.0.0.1:{stack.cfg.serve.webhook_port}/webhook", SECRET)
        cfg = load_config(root / "params.yaml", ["train.seed=9"])
        train.run(cfg, root)
        from pipelines.registry import lineage_tags

        lineage = load_extra(root / "models/attnflow", "lineage")
        trained = json.loads((root / "reports/train.json").read_text())
        version = register(
            trained["model_uri"], trained["mlflow_run_id"], lineage_tags(lineage, None), root
        )
        champion_before = get_alias(CHAMPION, root=root)
        r = httpx.post(
            f"{platform['mlflow']}/api/2.0/mlflow/registered-models/alias",
            json={"name": "attnflow", "alias": CHALLENGER, "version": version},
        )
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and get_alias(CHAMPION, root=root) == champion_before:
            time.sleep(1)
        log = root / ".attnflow" / "run" / f"rollout-v{version}.log"
        assert get_alias(CHAMPION, root=root) == version, (
            log.read_text()[-3000:] if log.exists() else "no rollout log"
        )
        _wait_for_rollout_to_finish(root)
        assert stack.served()[CHAMPION]["version"] == version
        actors = [
            m.actor for m in read_history(root) if m.alias == CHAMPION and m.version == version
        ]
        assert actors and "webhook" in actors[-1]
        # The promotion's own champion move is delivered too; the receiver starts nothing.
        echo = f"alias champion -> v{version}: already the served champion, ignored"
        deadline = time.monotonic() + 30
        while echo not in receiver.log_tail(200):
            assert time.monotonic() < deadline, receiver.log_tail(20)
            time.sleep(0.5)
        assert receiver.log_tail(200).count(f"-> v{version}: rollout started") == 1
    finally:
        receiver.stop()


def test_registry_reads_over_rest_agree_with_the_mlflow_client(platform):
    """The reconciler reads aliases and tags over REST; they must be what MLflow says."""
    from mlflow import MlflowClient

    from pipelines.registry import aliases, model_name, version_tags

    root, mlc = platform["root"], MlflowClient(platform["mlflow"])
    expected = {a: str(v) for a, v in mlc.get_registered_model(model_name()).aliases.items()}
    assert CHAMPION in expected
    assert aliases(root=root) == expected
    for version in platform["versions"].values():
        tags = version_tags(version, root=root)
        assert "git_commit" in tags
        assert tags == dict(mlc.get_model_version(model_name(), version).tags)
    assert version_tags("9999", root=root) == {}
    assert aliases("no-such-model", root=root) == {}


def test_reconciler_catches_a_lost_webhook(platform):
    """No receiver is listening: the alias move is lost, and the reconcile flow catches it."""
    from flows.reconcile import reconcile

    root, stack = platform["root"], platform["stack"]
    cfg = load_config(root / "params.yaml", ["train.seed=13"])
    train.run(cfg, root)
    from pipelines.registry import lineage_tags

    lineage = load_extra(root / "models/attnflow", "lineage")
    trained = json.loads((root / "reports/train.json").read_text())
    version = register(
        trained["model_uri"], trained["mlflow_run_id"], lineage_tags(lineage, None), root
    )
    r = httpx.post(
        f"{platform['mlflow']}/api/2.0/mlflow/registered-models/alias",
        json={"name": "attnflow", "alias": CHALLENGER, "version": version},
    )
    assert r.status_code == 200
    time.sleep(2)
    assert stack.served()[CHAMPION]["version"] != version  # nothing heard the move
    out = reconcile(root=str(root))
    assert out["action"] == "rollout" and out.get("version") == version, out
    assert out["status"] == "promoted"
    assert get_alias(CHAMPION, root=root) == version
    again = reconcile(root=str(root))
    assert again["action"] == "none"
