"""The retrain flow: the dvc.yaml stages as Prefect tasks, then register, gate and roll out.

The DAG is written once, in `dvc.yaml`; this flow reads it and has DVC reproduce each
stage on its own (`dvc repro --single-item`), so DVC decides what is up to date: a
retrain that failed at a late stage resumes there when run again, because the
earlier stages are skipped as unchanged (and registration is idempotent per training
run). Prefect adds retries with backoff on transient errors, logs, the UI and a
global concurrency limit (`dvc-repo`, limit 1) so two flows never touch the DVC
repository at once: a retrain holds it across its whole DAG and the data push, so
another flow's stages never interleave with its own (and one acquisition costs about
2 s of Prefect's lease bookkeeping, paid once rather than per stage).

Warm stages (the default): DVC's Python API decides, restores and records each stage
in this flow's process, and an `attnflow <stage>` command runs as the function it
calls, so torch, transformers, MLflow and DVC are imported once per flow run instead
of once per stage; the data push goes through the same API (`warm=False`: one `dvc`
process per stage and for the push, as on the command line). Under `attnflow up` the
deployment's runs are forked from a standby that has imported them already
(services/warmstart.py), so a run imports them not even once.

The `train` stage goes to the `gpu` work pool when a worker is online there (the
`train-gpu` deployment) and runs here, on the `cpu` pool's worker, otherwise; the
flow logs which. After the DVC stages: the trained model is registered and gated;
the first model becomes champion and is served; a later one becomes challenger and
is rolled out through the canary gateway when the serving stack is up.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task
from prefect.runtime import task_run

from pipelines.errors import TransientError
from pipelines.versioning import load_dag, repro_in_process, repro_stage

DVC_LIMIT = "dvc-repo"
# Stages whose MLflow plots and report a warm retrain draws after registration, beside
# serving or the rollout (`log_artifacts`), which mostly wait on HTTP and the bakes.
DEFERRING_STAGES = ("train", "evaluate")
# The slot is a lease the holder keeps renewing: a flow run killed with its worker
# stops renewing, and the server takes the slot back after this long (Prefect's
# default, 300 s, would hold up the re-run for five minutes).
DVC_LEASE_S = 60  # the least the Prefect server accepts


def retry_on_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry only failures that are worth retrying."""
    try:
        state.result()
    except TransientError:
        return True
    except Exception:
        return False
    return False


def _dvc_slot():
    """The global concurrency slot for the DVC repository (a no-op without a server)."""
    if not os.environ.get("PREFECT_API_URL"):
        return contextlib.nullcontext()
    from prefect.concurrency.sync import concurrency

    return concurrency(DVC_LIMIT, occupy=1, strict=False, lease_duration=DVC_LEASE_S)


@task(
    name="dvc-stage",
    task_run_name="{name}",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_on_transient,
    # No tags: Prefect takes a tag-concurrency lease per tagged task run (an API round
    # trip per stage, renewed while it runs); the flow's `dvc-repo` slot is the guard.
)
def dvc_stage(
    name: str, root: str, warm: bool = True, defer_artifacts: bool = False
) -> dict[str, Any]:
    """Reproduce one dvc.yaml stage (skipped by DVC when nothing it depends on changed).

    `warm`: in this process when the stage's command allows it (see the module doc).
    `defer_artifacts` (warm train and evaluate): their plots and report are left to the
    `artifacts` task. The caller holds the `dvc-repo` slot.
    """
    options = {"defer_artifacts": True} if defer_artifacts and name in DEFERRING_STAGES else {}
    result = (repro_in_process(name, Path(root), **options) if warm else None) or repro_stage(
        name, Path(root)
    )
    result["attempts"] = task_run.run_count
    get_run_logger().info(
        "stage %s %s in %.1fs",
        name,
        "ran" if result["ran"] else "was up to date",
        result["seconds"],
    )
    return result


def gpus_here() -> int:
    """GPUs this worker trains on: `NUM_GPUS`, else what torch sees."""
    if os.environ.get("NUM_GPUS"):
        return int(os.environ["NUM_GPUS"])
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@flow(name="train-stage")
def train_stage(root: str = ".", slot_held: bool = False, warm: bool = True) -> dict[str, Any]:
    """The train stage alone: what the `train-gpu` deployment runs on a gpu worker.

    With more than one GPU the stage runs under torchrun, one DDP process per GPU.
    `slot_held`: the retrain flow that started this run holds the `dvc-repo` slot
    for it (taking it again would wait on itself).
    """
    with contextlib.nullcontext() if slot_held else _dvc_slot():
        gpus = gpus_here()
        if gpus > 1:
            from pipelines.versioning import repro_distributed

            get_run_logger().info("train stage: DDP over %d GPUs (torchrun)", gpus)
            return repro_distributed("train", Path(root), gpus)
        return dvc_stage("train", root, warm)


def gpu_worker_online() -> bool:
    """Whether the `gpu` work pool has a worker online (False without a Prefect server)."""
    if not os.environ.get("PREFECT_API_URL"):
        return False
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            workers = client.read_workers_for_work_pool("gpu")
    except Exception:  # no such pool, server unreachable: train here
        return False
    return any(str(getattr(w, "status", "")).upper().endswith("ONLINE") for w in workers)


def run_train(root: str, warm: bool = True) -> dict[str, Any]:
    """Route the train stage: the gpu pool when a worker is online there, else here."""
    log = get_run_logger()
    if gpu_worker_online():
        from prefect.deployments import run_deployment

        log.info("train stage -> gpu work pool (a gpu worker is online)")
        run = run_deployment(
            "train-stage/train-gpu", parameters={"root": root, "slot_held": True, "warm": warm}
        )
        if not run.state.is_completed():
            raise RuntimeError(f"train on the gpu pool ended {run.state.name}")
        result = run.state.result()
        return {**result, "pool": "gpu"}
    log.info("train stage -> cpu (no gpu worker online)")
    return {**dvc_stage("train", root, warm, defer_artifacts=warm), "pool": "cpu"}


@task(
    name="register",
    retries=2,
    retry_delay_seconds=[5, 20],
    # A model that failed its gates fails them again: only an unreachable registry is
    # worth another attempt.
    retry_condition_fn=retry_on_transient,
)
def register_task(root: str) -> dict[str, Any]:
    """Register and gate the trained model (once per training run).

    A training run registered before is not registered again; if its version failed
    its gates then and ops gave it no alias since, this fails the same way (a re-run
    does not turn a rejected model into a completed retrain).
    """
    import json

    from pipelines.config import load_config
    from pipelines.gates import GateFailed
    from pipelines.registry import register_candidate, registered_version_of_run

    cfg = load_config(Path(root) / "params.yaml")
    trained = json.loads((Path(root) / cfg.paths.reports_dir / "train.json").read_text())
    existing = registered_version_of_run(trained["mlflow_run_id"], Path(root))
    if existing and existing.get("gate_passed") == "false" and not existing.get("alias"):
        raise GateFailed(
            f"version {existing['version']} (run {trained['mlflow_run_id']}) failed its gates "
            "when it was registered; train another model to go on"
        )
    if existing is not None:
        get_run_logger().info(
            "run %s is already registered as v%s", trained["mlflow_run_id"], existing["version"]
        )
        return {**existing, "new": False}
    out = register_candidate(cfg, Path(root), actor="retrain flow")
    get_run_logger().info("v%s registered -> %s", out["version"], out["alias"])
    return {**out, "new": True}


@task(name="artifacts")
def log_artifacts(root: str) -> list[str]:
    """The model run's plots and evaluation report that the warm stages left for later.

    A failure is logged, never fatal: the model and its metrics are in MLflow already.
    """
    from pipelines.config import load_config
    from pipelines.tracking import log_deferred_artifacts

    try:
        logged = log_deferred_artifacts(load_config(Path(root) / "params.yaml"), Path(root))
    except Exception as exc:
        get_run_logger().warning("plots and evaluation report not logged to MLflow: %s", exc)
        return []
    if logged:
        get_run_logger().info("logged to the model's MLflow run: %s", ", ".join(logged))
    return logged


@task(name="push-data")
def push_data(root: str, warm: bool = True) -> dict[str, Any]:
    """Push this data version to the DVC remote (a failure is reported, never fatal).

    `warm`: through DVC's API in this process; else a `dvc push` process.
    The caller holds the `dvc-repo` slot.
    """
    from pipelines.errors import AttnflowError
    from pipelines.versioning import data_command, push_in_process

    try:
        out = push_in_process(Path(root)) if warm else data_command("push", Path(root))
    except AttnflowError as exc:
        get_run_logger().warning("data version not pushed: %s", exc)
        return {"pushed": False, "error": str(exc)}
    get_run_logger().info("data pushed to the DVC remote: %s", out.splitlines()[-1:])
    return {"pushed": True}


@task(name="rollout")
def rollout_task(version: str, root: str) -> dict[str, Any]:
    """Canary `version` from this run (see `flows.rollout.rollout`, with `follow`).

    A task, not a subflow: a subflow run costs this run about a second at each end (its
    API round trips, and Prefect joining its heartbeat thread, which sleeps in 1 s steps);
    the `rollout` deployment's runs, such as the one the challenger's webhook starts, are
    flow runs of their own.
    """
    from flows.rollout import rollout

    return rollout.fn(version=version, root=root, actor="retrain flow", follow=True)


@task(name="serve-champion")
def serve_champion(root: str) -> dict[str, Any] | None:
    """Make the serving stack serve the `champion` version (when the stack is up)."""
    from services.stack import LocalStack

    stack = LocalStack(Path(root))
    if not stack.is_up():
        get_run_logger().info("the serving stack is not up; `attnflow up` serves the champion")
        return None
    return stack.ensure_serving(progress=get_run_logger().info)


def _apply_run_params(root: Path, dataset: str | None, data_since: str | None) -> None:
    """Write the run's dataset / data-since into params.yaml (DVC tracks them there)."""
    if dataset is None and data_since is None:
        return
    import yaml

    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    if dataset is not None:
        params["ingest"]["dataset"] = dataset
    if data_since is not None:
        params["ingest"]["since"] = data_since
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    get_run_logger().info(
        "params.yaml: ingest.dataset=%s ingest.since=%s",
        params["ingest"]["dataset"],
        params["ingest"].get("since"),
    )


@flow(name="retrain")
def retrain(
    root: str = ".",
    stages: list[str] | None = None,
    dataset: str | None = None,
    data_since: str | None = None,
    reason: str | None = None,
    deploy: bool = True,
    warm: bool = True,
) -> dict[str, Any]:
    """Run the dvc.yaml stages (all, or only `stages`); then register, gate, serve, roll out.

    `warm`: run the stages in this process (see the module doc); False: `dvc repro`.
    """
    log = get_run_logger()
    # The stages' own lines (data checks, epochs, gates) at INFO: a worker started with
    # PREFECT_LOGGING_EXTRA_LOGGERS=pipelines (`attnflow up` does) puts them in this log.
    logging.getLogger("pipelines").setLevel(logging.INFO)
    root_path = Path(root).resolve()
    if reason:
        log.info("retrain because: %s", reason)
    _apply_run_params(root_path, dataset, data_since)
    dag = load_dag(root_path / "dvc.yaml")
    selected = [s for s in dag if stages is None or s.name in stages]
    results = []
    push = stages is None and deploy
    with _dvc_slot():
        for stage in selected:
            if stage.name == "train":
                results.append(run_train(str(root_path), warm))
            else:
                results.append(dvc_stage(stage.name, str(root_path), warm, defer_artifacts=warm))
        pushed = push_data(str(root_path), warm) if push else None
    out: dict[str, Any] = {"stages": results}
    deferred = warm and any(s.name in DEFERRING_STAGES for s in selected)
    if push:
        out["data"] = pushed
        try:
            out["registered"] = register_task(str(root_path))
        except Exception:
            if deferred:  # a model that failed its gates gets its plots too
                log_artifacts(str(root_path))
            raise
    # Drawn in a thread of this run while the model is served or rolled out (waits on
    # HTTP and bakes), not beside the gates, whose scoring it would slow.
    artifacts = log_artifacts.submit(str(root_path)) if deferred else None
    try:
        if push:
            out.update(_deploy(root_path, out["registered"]))
    finally:
        if artifacts is not None:
            out["artifacts"] = artifacts.result()
    return out


def _deploy(root_path: Path, reg: dict[str, Any]) -> dict[str, Any]:
    """Serve the registered model (the first champion) or roll it out (a challenger)."""
    log = get_run_logger()
    out: dict[str, Any] = {}
    if reg.get("alias") == "champion":
        served = serve_champion(str(root_path))
        out["served"] = served["version"] if served else None
    elif reg.get("alias") == "challenger" and reg.get("new"):
        from services.stack import LocalStack

        if LocalStack(root_path).is_up():
            from pipelines.rollout import RolloutBusy

            try:
                # `follow`: the webhook of the `challenger` alias set above starts a rollout
                # run of this version too; if that run takes the lock first, this flow
                # waits for it, so that it still ends with the rollout's outcome
                out["rollout"] = rollout_task(reg["version"], str(root_path))
            except RolloutBusy as exc:
                # another version's rollout is running: the reconciler starts this one after
                log.info("v%s: %s", reg["version"], exc)
                out["rollout"] = {"status": "waiting for another rollout", "detail": str(exc)}
        else:
            log.info(
                "v%s is challenger; the stack is not up, so no rollout now "
                "(the reconciler starts it once the stack runs)",
                reg["version"],
            )
    return out
