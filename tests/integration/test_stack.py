"""The platform as a service: `attnflow up` on PostgreSQL and S3, retrains through deployments.

One real scaled-out run on this machine: a PostgreSQL server from Debian's packages
(started here) holds both the MLflow and the Prefect databases; an S3 endpoint
(moto's server mode) holds the MLflow artifacts and the DVC remote. `LocalStack.up`
starts MLflow and Prefect on them, the work pools and deployments of prefect.yaml, a
`cpu` worker, the webhook receiver and the gateway. The test then triggers the
`retrain` deployment through the Prefect server's API, twice: the first run's model
becomes champion and is served, the second is registered, gated and rolled out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from pipelines.config import load_config
from services.launch import free_port, session_nice, spawn
from tests.conftest import QUICK_ROLLOUT, copy_repo, restored_environ, small_stack_params

PG_BIN = Path("/usr/lib/postgresql/15/bin")
pytestmark = pytest.mark.timeout(1800)


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root: use the postgres account Debian's package created
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth, user postgres)."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
        self.dir = Path(tempfile.mkdtemp(prefix="attnflow-pg-"))
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"

        def run(*cmd: str) -> None:
            subprocess.run(_as_postgres(list(cmd)), check=True, capture_output=True, text=True)

        run(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
        run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(self.dir / "log"),
            "-w",
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1",
            "start",
        )
        self.data = data
        for db in ("mlflow", "prefect"):
            self.sql(f"CREATE DATABASE {db}")

    def sql(self, query: str, db: str = "postgres") -> str:
        out = subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                db,
                "-tAc",
                query,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()

    def url(self, driver: str, db: str) -> str:
        return f"postgresql+{driver}://postgres@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory, mirror):
    from services.stack import LocalStack

    clone = copy_repo(tmp_path_factory.mktemp("scaled"))
    params = small_stack_params(clone, epochs=3, lr=0.005, patience=10)
    params["rollout"].update(**QUICK_ROLLOUT, min_agreement=0.1, p99_slack_ms=60)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    pg = Postgres()
    s3_port = free_port()
    s3 = spawn(
        "s3",
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
        s3_port,
        log_dir=clone / "logs",
    )
    s3_url = f"http://127.0.0.1:{s3_port}"
    environ = restored_environ()
    environ.__enter__()
    mp = pytest.MonkeyPatch()
    env = {
        "AWS_ACCESS_KEY_ID": "attnflow-test",
        "AWS_SECRET_ACCESS_KEY": "attnflow-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": s3_url,
        "ATTNFLOW_MLFLOW_BACKEND_URI": pg.url("psycopg2", "mlflow"),
        "ATTNFLOW_MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow-artifacts",
        "PREFECT_API_DATABASE_CONNECTION_URL": pg.url("asyncpg", "prefect"),
        "ATTNFLOW_DVC_REMOTE": "s3://dvc/attnflow",
        "ATTNFLOW_S3_ENDPOINT_URL": s3_url,
        "ATTNFLOW_STATE_DIR": str(clone / ".attnflow"),
    }
    for k, v in env.items():
        mp.setenv(k, v)
    for k in (
        "MLFLOW_TRACKING_URI",
        "PREFECT_API_URL",
        "ATTNFLOW_ADMIN_TOKEN",
        "ATTNFLOW_WEBHOOK_SECRET",
    ):
        mp.delenv(k, raising=False)
    stack = LocalStack(clone)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(s3_url, timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        import boto3

        client = boto3.client("s3", endpoint_url=s3_url)
        for bucket in ("mlflow-artifacts", "dvc"):
            client.create_bucket(Bucket=bucket)
        stack.up()
        yield {"clone": clone, "stack": stack, "pg": pg, "s3": client}
    finally:
        stack.down()
        s3.stop()
        pg.stop()
        mp.undo()
        environ.__exit__(None, None, None)


def _run_retrain(clone: Path) -> object:
    from prefect.deployments import run_deployment

    from services.stack import prefect_api

    with prefect_api():  # earlier tests in this process may have frozen Prefect's settings
        run = run_deployment("retrain/retrain", parameters={"root": str(clone)}, timeout=1500)
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
    return run


# PostgreSQL, moto, both servers and two retrains: about 4.5 minutes on 2 cores.
@pytest.mark.slow
def test_retrain_deployment_on_postgres_and_s3_serves_then_rolls_out(scaled):
    from pipelines.registry import CHAMPION, get_alias, read_history

    clone, stack, pg, s3 = scaled["clone"], scaled["stack"], scaled["pg"], scaled["s3"]
    if session_nice(os.getpid()) is not None:  # autogroup scheduling: sessions share the CPU
        # the control plane yields to training: the servers', the webhook's and the
        # worker's sessions; the standby, which forks the retrain and rollout runs, does not
        nice = load_config(clone / "params.yaml").serve.control_plane_nice
        for name in ("mlflow", "prefect", "webhook", "worker-cpu"):
            assert session_nice(stack.component(name)["pid"]) == nice, name
        assert session_nice(stack.component("warmstart")["pid"]) == 0
    _run_retrain(clone)
    v1 = get_alias(CHAMPION, root=clone)
    assert v1 == "1"
    assert stack.served()[CHAMPION]["version"] == v1
    # the registry lives in PostgreSQL, the artifacts and the data versions in S3
    assert pg.sql("SELECT count(*) FROM model_versions", db="mlflow") == "1"
    assert s3.list_objects_v2(Bucket="mlflow-artifacts").get("KeyCount", 0) > 0
    assert s3.list_objects_v2(Bucket="dvc").get("KeyCount", 0) > 0

    # a new training (another seed) through the same deployment: registered and rolled out
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["train"]["seed"] = 7
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run_retrain(clone)
    v2 = get_alias(CHAMPION, root=clone)
    assert v2 == "2", [m.__dict__ for m in read_history(clone)]
    assert stack.served()[CHAMPION]["version"] == "2"
    assert stack.served()["standby"]["version"] == "1"
    moves = [(m.alias, m.previous, m.version, m.actor) for m in read_history(clone)]
    assert ("champion", "1", "2", "retrain flow") in moves
    assert pg.sql("SELECT count(*) FROM model_versions", db="mlflow") == "2"
    runs = pg.sql(
        "SELECT count(*) FROM flow_run fr JOIN deployment d ON fr.deployment_id = d.id "
        "WHERE d.name = 'retrain' AND fr.state_type = 'COMPLETED'",
        db="prefect",
    )
    assert int(runs) == 2
    report = json.loads(sorted((clone / ".attnflow" / "rollouts").glob("*.json"))[-1].read_text())
    assert report["status"] == "promoted" and report["version"] == "2"
    r = httpx.post(
        f"{stack.gateway_url()}/recommend",
        json={"user_id": "u1", "k": 5, "explain": True},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["model_version"] == "2"
    # both runs were forked from the warm-start standby (prefect.yaml's front), not cold
    # (so were any rollout runs the webhook of the new `challenger` alias started)
    retrain_runs = pg.sql(
        "SELECT fr.id FROM flow_run fr JOIN deployment d ON fr.deployment_id = d.id "
        "WHERE d.name = 'retrain' AND fr.state_type = 'COMPLETED'",
        db="prefect",
    ).split()
    standby_log = Path(stack.component("warmstart")["log"]).read_text()
    assert len(retrain_runs) == 2
    for run in retrain_runs:
        assert f"(flow run {run})" in standby_log, standby_log
