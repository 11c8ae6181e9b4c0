"""Security: admin and webhook endpoints need a token or signature, user ids reach logs,
metrics and MLflow only as keyed hashes, registry artifacts are never unpickled, and
secrets come only from the environment."""

from __future__ import annotations

import io
import json
import os
import pickletools
import re
import subprocess
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from pipelines.privacy import hash_user
from tests.reliability.conftest import USER_SALT

REPO = Path(__file__).resolve().parents[2]
HTTP = httpx.Client(timeout=30, trust_env=False)
TOKEN = os.urandom(4).hex()  # makes this run's user ids unique: no chance match in old logs


def _distinctive_users(n: int, tag: str) -> list[str]:
    """User ids that look like personal data and occur nowhere by chance."""
    return [f"{tag}.{i}.{TOKEN}@example.org" for i in range(n)]


# --- admin API and webhooks: a token or a signature, compared in constant time ---------------


def test_admin_api_refuses_without_the_token_and_never_logs_it(stack):
    gw = stack.gateway.url
    before = HTTP.get(
        gw + "/admin/state", headers={"Authorization": f"Bearer {stack.admin_token}"}
    ).json()
    almost = stack.admin_token[:-1] + ("0" if stack.admin_token[-1] != "0" else "1")
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {almost}"},  # one character off
        {"Authorization": f"Basic {stack.admin_token}"},  # right secret, wrong scheme
        {"Authorization": f"Bearer {stack.admin_token} x"},
        {"X-Admin-Token": stack.admin_token},
    ):
        assert HTTP.get(gw + "/admin/state", headers=headers).status_code == 401, headers
        r = HTTP.post(gw + "/admin/weight", json={"weight": 100}, headers=headers)
        assert r.status_code == 401, headers
        assert HTTP.post(gw + "/admin/abort", headers=headers).status_code == 401, headers
    after = HTTP.get(gw + "/admin/state", headers={"Authorization": f"Bearer {stack.admin_token}"})
    assert after.status_code == 200 and after.json()["weight"] == before["weight"]
    assert stack.admin_token not in stack.logs()


def test_tokens_and_signatures_are_compared_in_constant_time(monkeypatch):
    """Both checks go through hmac.compare_digest (a `==` would leak the match length)."""
    import hmac

    from pipelines import webhooks
    from services.gateway import Gateway

    calls: list[tuple[bytes | str, bytes | str]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    gateway = object.__new__(Gateway)  # only the token check, no event loop or sockets
    gateway.admin_token = b"the-token"
    scope = {"headers": [(b"authorization", b"Bearer the-token")]}
    assert gateway._authorised(scope) is True
    assert not gateway._authorised({"headers": [(b"authorization", b"Bearer nope")]})
    assert len(calls) == 2

    body, ts = b"{}", "1700000000"
    headers = {
        "X-MLflow-Delivery-Id": "d1",
        "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": webhooks.sign("s3cret", "d1", ts, body),
    }
    webhooks.verify("s3cret", headers, body, webhooks.ReplayGuard(), now=1700000000)
    assert len(calls) == 3
    # No secret configured: nothing is accepted, signed or not.
    with pytest.raises(webhooks.WebhookRejected, match="no webhook secret"):
        webhooks.verify("", headers, body, webhooks.ReplayGuard(), now=1700000000)


# --- user ids: pseudonyms in logs and metrics -------------------------------------------------


class _FailingChallenger(BaseHTTPRequestHandler):
    """A ready challenger whose every recommendation fails with the raw user id in its error
    (what a careless upstream does): the gateway retries on the champion and logs the user."""

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._reply(200 if self.path == "/readyz" else 404, {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/info":
            return self._reply(200, {"version": "fake", "variant": "challenger"})
        self._reply(500, {"error": f"no model for user {body.get('user_id')}"})

    def log_message(self, *args) -> None:
        """Quiet: the test reads the gateway's log, not this one's."""


def test_raw_user_ids_reach_no_log_or_metric_but_their_pseudonyms_do(stack):
    users = _distinctive_users(6, "carol")
    fake = ThreadingHTTPServer(("127.0.0.1", 0), _FailingChallenger)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    admin = {"Authorization": f"Bearer {stack.admin_token}"}
    gw, svc = stack.gateway.url, stack.service.url
    try:
        r = HTTP.post(
            gw + "/admin/backends",
            json={"champion": svc, "challenger": f"http://127.0.0.1:{fake.server_port}"},
            headers=admin,
        )
        assert r.status_code == 200, r.text
        assert HTTP.post(gw + "/admin/weight", json={"weight": 100}, headers=admin).is_success
        for user in users:
            # Unknown to the model: the challenger fails (5xx quoting the id), the
            # champion answers 404; and straight to the service.
            assert HTTP.post(gw + "/recommend", json={"user_id": user}).status_code == 404
            assert HTTP.post(svc + "/recommend", json={"user_id": user}).status_code == 404
            r = HTTP.post(
                gw + "/feedback",
                json={"events": [{"user_id": user, "item_id": "i1", "event": "impression"}]},
            )
            assert r.status_code == 200, r.text
    finally:
        HTTP.post(gw + "/admin/abort", headers=admin)
        fake.shutdown()
        fake.server_close()
    text = stack.logs()
    metrics = HTTP.get(gw + "/metrics").text + HTTP.get(svc + "/metrics").text
    for user in users:
        assert user not in text, f"raw user id {user!r} in the service/gateway logs"
        assert user not in metrics, f"raw user id {user!r} in /metrics"
        assert hash_user(user, USER_SALT) in text, f"no pseudonym for {user!r} in the logs"
    # The feedback log is data (what the next model learns from): raw ids belong there.
    feedback = stack.feedback_log.read_text()
    assert all(user in feedback for user in users)


# --- user ids and pickles in MLflow -----------------------------------------------------------


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A one-epoch training and evaluation on users with personal-looking ids, tracked in
    MLflow (SQLite store, local artifacts) and registered; the heatmap rows it drew."""
    from pipelines import baselines, evaluate, plots, train
    from pipelines.config import SplitConfig, SyntheticConfig
    from pipelines.model import load_extra
    from pipelines.registry import lineage_tags, register
    from pipelines.split import build_sequences, leave_one_out, split_meta, write_split
    from pipelines.synthetic import generate
    from tests.model.conftest import small_config

    root = tmp_path_factory.mktemp("tracked")
    events, items = generate(
        SyntheticConfig(n_users=200, n_items=80, n_topics=4, events_per_user=12, seed=5)
    )
    raw = sorted(events["user_id"].unique())
    users = dict(zip(raw, _distinctive_users(len(raw), "dana"), strict=True))
    events["user_id"] = events["user_id"].map(users)
    seq, umap, imap = build_sequences(
        events, items, SplitConfig(min_user_events=1, min_item_events=1, repeat_policy="keep_all")
    )
    splits = leave_one_out(seq)
    write_split(
        root / "data/split", splits, umap, imap, split_meta("synthetic", seq, umap, imap, splits)
    )
    drawn: list[dict] = []
    real_heatmap = plots.attention_heatmap

    def capture(rows, path):
        drawn.extend(rows)
        return real_heatmap(rows, path)

    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("ATTNFLOW_MLFLOW_ARTIFACTS", (root / "artifacts").as_uri())
    mp.setenv("ATTNFLOW_USER_SALT", USER_SALT)
    mp.setenv("ATTNFLOW_MODEL_NAME", "attnflow-security-test")
    mp.setattr(plots, "attention_heatmap", capture)
    try:
        cfg = small_config(**{"train.epochs": 1, "ingest.dataset": "synthetic"})
        summary = train.run(cfg, root)
        baselines.run(cfg, root)
        evaluate.run(cfg, root)
        lineage = load_extra(root / "models/attnflow", "lineage")
        version = register(
            summary["model_uri"], summary["mlflow_run_id"], lineage_tags(lineage, None), root
        )
        yield {
            "root": root,
            "summary": summary,
            "users": list(users.values()),
            "drawn": drawn,
            "version": version,
        }
    finally:
        mp.undo()


# The one place raw user ids may be in MLflow: the model's user index, which serving needs
# to look up a known user's history. It is model data, like the event tables, not telemetry.
USER_INDEX = "users.json"


def test_mlflow_holds_user_ids_only_in_the_models_user_index(tracked):
    from mlflow import MlflowClient

    root, users = tracked["root"], tracked["users"]
    client = MlflowClient()
    run = client.get_run(tracked["summary"]["mlflow_run_id"])
    mv = client.get_model_version("attnflow-security-test", tracked["version"])
    texts = {
        "params": json.dumps(run.data.params),
        "metrics": json.dumps(run.data.metrics),
        "tags": json.dumps(run.data.tags),
        "run name": run.info.run_name or "",
        "model version": json.dumps({"tags": mv.tags, "description": mv.description}),
    }
    for where, text in texts.items():
        leaked = [u for u in users if u in text]
        assert not leaked, f"raw user ids in MLflow {where}: {leaked[:3]}"
    # Every byte MLflow stored (the SQLite store and every artifact, images included).
    stored = [root / "mlflow.db", *sorted((root / "artifacts").rglob("*"))]
    index_files = []
    for path in stored:
        if not path.is_file():
            continue
        data = path.read_bytes()
        hits = [u for u in users if u.encode() in data]
        if path.name == USER_INDEX:
            assert hits, f"{path}: the search finds no user id even where they are"
            index_files.append(path)
            continue
        assert not hits, f"raw user ids in {path.relative_to(root)}: {hits[:3]}"
    assert index_files, "the model's user index was not found: the exception above is stale"
    # The heatmap logged with the run names its sample users by pseudonym.
    assert tracked["drawn"], "no attention heatmap was drawn"
    pseudonyms = {hash_user(u, USER_SALT) for u in users}
    assert {row["user"] for row in tracked["drawn"]} <= pseudonyms


def _is_pickle(data: bytes) -> bool:
    """Whether `data` is a pickle stream (parsed opcode by opcode, never executed)."""
    if data[:1] != b"\x80" or data[1:2] not in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return False
    try:
        ops = list(pickletools.genops(io.BytesIO(data)))
    except Exception:
        return False
    return bool(ops) and ops[-1][0].name == "STOP"


def test_registered_model_loads_with_pickle_disabled_and_no_artifact_is_a_pickle(
    tracked, monkeypatch
):
    import _pickle
    import pickle

    import cloudpickle
    import mlflow
    import pandas as pd
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("a registry artifact was unpickled")

    class NoUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    for module in (pickle, _pickle, cloudpickle):
        for name in ("load", "loads"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    uri = f"models:/attnflow-security-test/{tracked['version']}"
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(pd.DataFrame({"history": ["i1 i2 i3"], "k": [3]}))
    assert len(out["items"][0].split()) == 3

    local = Path(mlflow.artifacts.download_artifacts(uri))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert not path.name.endswith((".pkl", ".pickle", ".joblib", ".pt", ".pth")), path
        data = path.read_bytes()
        assert not _is_pickle(data), f"{path.name} is a pickle"
        if zipfile.is_zipfile(path):  # torch.save's format: a zip holding data.pkl
            names = zipfile.ZipFile(path).namelist()
            assert not [n for n in names if n.endswith(".pkl")], path


def test_pickle_detector_recognises_a_pickle_and_not_safetensors(tracked):
    import pickle

    assert _is_pickle(pickle.dumps({"a": [1, 2]}, protocol=4))
    weights = tracked["root"] / "models/attnflow/weights.safetensors"
    assert not _is_pickle(weights.read_bytes())


# --- secrets only from the environment --------------------------------------------------------

# What a secret looks like in a file: provider key formats, key blocks, and a literal
# assigned to a secret-named key (code, YAML, .env).
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(
        r"aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}\b", re.IGNORECASE
    ),
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
    "Slack token": re.compile(r"\bxox[baprs]-[A-Za-z0-9-]{10,}"),
    "secret literal": re.compile(
        r"(?i)\b[\w.-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key)[\w.-]*"
        r"['\"]?\s*[:=]\s*(?P<quote>['\"]?)(?P<value>[^\s'\"$<>{}(),]{8,})"
    ),
    "credentials in a URL": re.compile(r"://[^\s:/@'\"]+:(?P<value>[^\s@/'\"$]{4,})@"),
}
# Values that say they are not a secret: documented placeholders and test-only fakes.
PLACEHOLDER = re.compile(r"(?i)change-me|example|placeholder|dummy|fake|test|e2e|xxx|redacted")
# USER:PASS, POSTGRES_PASSWORD: names written in capitals stand for a value, they are not one.
TEMPLATE_NAME = re.compile(r"[A-Z][A-Z_]*")
SECRET_WORD = re.compile(r"(?i)secret|token|passw|api_?key|access_?key")
# An unquoted dotted name in code (`token = os.environ.get(...)`) is a reference, not a value.
CODE_REFERENCE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def find_secrets(name: str, text: str) -> list[str]:
    """`name:line: kind: text` for each secret-looking literal in a file's text."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for kind, pattern in SECRET_PATTERNS.items():
            for m in pattern.finditer(line):
                value = m.groupdict().get("value")
                if value is not None and (
                    PLACEHOLDER.search(value)
                    or SECRET_WORD.search(value)
                    or TEMPLATE_NAME.fullmatch(value)
                ):
                    continue  # a placeholder, or the name of a secret (an env var, a k8s Secret)
                if (
                    kind == "secret literal"
                    and not m.group("quote")
                    and CODE_REFERENCE.fullmatch(value or "")
                ):
                    continue
                found.append(f"{name}:{n}: {kind}: {line.strip()[:120]}")
    return found


def test_secret_scanner_finds_planted_secrets():
    planted = "\n".join(
        [
            "aws_access_key_id = AKIA" + "Q3EGRIXDSWPZ7VNA",
            "-----BEGIN RSA " + "PRIVATE KEY-----",
            "api_" + "key: 'sk_live_9f8e7d6c5b4a3210'",
            'ADMIN_TOKEN="Zx81' + 'kQp0vN3mLw7Rt"',
            "url = postgresql://mlflow:" + "hunter2hunter2@db:5432/mlflow",
        ]
    )
    assert len(find_secrets("planted", planted)) == 5
    harmless = "\n".join(
        [
            "token = os.environ.get(ADMIN_TOKEN_ENV)",
            "admin_token=self.secrets()",
            "POSTGRES_PASSWORD=change-me-postgres-password",
            "password: ${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in infra/.env}",
        ]
    )
    assert find_secrets("harmless", harmless) == []


def test_no_tracked_file_holds_a_secret():
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    found: list[str] = []
    for rel in filter(None, (p.decode() for p in listed)):
        path = REPO / rel
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        data = path.read_bytes()
        if b"\0" in data[:4096]:
            continue  # binary
        found += find_secrets(rel, data.decode("utf-8", errors="replace"))
    assert not found, "secret-looking literals:\n" + "\n".join(found)


# A key named for a secret (`admin_token`, `db.password`), not one that merely contains the
# word (`model.text.max_tokens` counts tokenizer tokens).
SECRET_KEY = re.compile(
    r"(?i)(?:^|[._])(?:secret|token|passw(?:or)?d|api_?key|credentials?|private_?key|access_?key)"
    r"(?=$|[._])"
)


def test_config_has_no_secret_fields():
    """Secrets are read from the environment only (ATTNFLOW_ADMIN_TOKEN,
    ATTNFLOW_WEBHOOK_SECRET, ATTNFLOW_USER_SALT, AWS_*...), never from params.yaml.

    The one exception is by design: the embedded one-machine stack (`attnflow up`), run
    with none set, generates random local-only ones into `<state>/run/secrets.json`
    (mode 0600, never tracked; `services.stack.Stack.secrets`) so its processes agree.
    """
    import yaml

    from pipelines.config import Config

    def keys(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield f"{prefix}{k}"
                yield from keys(v, f"{prefix}{k}.")

    def fields(model, prefix=""):
        for name, info in model.model_fields.items():
            yield f"{prefix}{name}"
            sub = info.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                yield from fields(sub, f"{prefix}{name}.")

    names = [*keys(yaml.safe_load((REPO / "params.yaml").read_text())), *fields(Config)]
    assert names and not [n for n in names if SECRET_KEY.search(n)]
    assert not re.search(r"://[^\s/@]+:[^\s/@]+@", (REPO / "params.yaml").read_text())


def test_the_local_stack_writes_down_only_the_secrets_it_generated(tmp_path, monkeypatch):
    """An operator's secret (from the environment) never lands on disk; generated ones do,
    mode 0600, and stay the same for the next process of the stack."""
    import shutil

    from services.stack import SECRET_ENVS, Stack

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.setenv("ATTNFLOW_STATE_DIR", str(tmp_path / ".attnflow"))
    for name in SECRET_ENVS:
        monkeypatch.delenv(name, raising=False)
    operator = "operator-token-" + os.urandom(8).hex()
    monkeypatch.setenv("ATTNFLOW_ADMIN_TOKEN", operator)
    first = Stack(tmp_path).secrets()
    assert first["ATTNFLOW_ADMIN_TOKEN"] == operator
    path = tmp_path / ".attnflow" / "run" / "secrets.json"
    stored = json.loads(path.read_text())
    assert "ATTNFLOW_ADMIN_TOKEN" not in stored and operator not in path.read_text()
    assert set(stored) == set(SECRET_ENVS) - {"ATTNFLOW_ADMIN_TOKEN"}
    assert path.stat().st_mode & 0o777 == 0o600
    assert {k: v for k, v in Stack(tmp_path).secrets().items() if k in stored} == stored
