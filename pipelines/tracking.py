"""MLflow tracking: one run per training, with lineage, curves, plots and the model.

The tracking URI is `MLFLOW_TRACKING_URI` (a server, for example from `attnflow up`)
or, by default, a SQLite file in `.attnflow/` with artifacts beside it. MLflow's
active run is thread-local, so everything here passes `run_id` explicitly and uses
`MlflowClient`; the only active-run block is the one `log_model` needs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.config import Config

log = logging.getLogger(__name__)

EXPERIMENT = "attnflow"
ARTIFACTS_ENV = "ATTNFLOW_MLFLOW_ARTIFACTS"


def tracking_uri(root: Path = Path(".")) -> str:
    """`MLFLOW_TRACKING_URI`, or the local SQLite store under `<root>/.attnflow/`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = (Path(root) / ".attnflow" / "mlflow.db").resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def client(root: Path = Path(".")):
    """An MlflowClient on this project's tracking URI."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri(root))
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(root))


def experiment_id(mlc, root: Path = Path(".")) -> str:
    """The attnflow experiment, created on first use (local artifacts for a local store)."""
    exp = mlc.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not tracking_uri(root).startswith(("http://", "https://")):
        location = os.environ.get(ARTIFACTS_ENV) or (
            (Path(root) / ".attnflow" / "mlartifacts").resolve().as_uri()
        )
    return mlc.create_experiment(EXPERIMENT, artifact_location=location)


def git_commit(root: Path) -> tuple[str, bool]:
    """(commit, dirty) of the working tree, or ("unknown", False) outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
            ).stdout.strip()
            != ""
        )
        return sha, dirty
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown", False


def _flatten(prefix: str, obj: Any, out: dict[str, str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(obj) if isinstance(obj, list | tuple) else str(obj)


def run_params(cfg: Config) -> dict[str, str]:
    """The params a training run depends on, flattened (`model.hidden`, ...)."""
    params: dict[str, str] = {}
    dumped = cfg.model_dump(mode="json", by_alias=True)
    for section in ("ingest", "split", "model", "train"):
        section_dump = dumped[section]
        if section == "ingest":
            section_dump = {"dataset": section_dump["dataset"]}
        _flatten(section, section_dump, params)
    return params


def start_training_run(cfg: Config, root: Path, lineage: dict[str, Any]) -> str:
    """Create the run for a training, with params and lineage tags; returns its id."""
    from mlflow.entities import Param

    mlc = client(root)
    tags = {
        "attnflow.dataset": cfg.ingest.dataset,
        "git_commit": lineage["git_commit"],
        "git_dirty": str(lineage["git_dirty"]).lower(),
        "dvc_data_hash": lineage.get("dvc_data_hash") or "unknown",
        "data_sha256": lineage["data_sha256"],
        "attnflow.objective": cfg.model.objective,
        "attnflow.text": cfg.model.text.mode,
    }
    run = mlc.create_run(
        experiment_id(mlc, root), tags=tags, run_name=f"{cfg.ingest.dataset}-{cfg.model.objective}"
    )
    params = [Param(k, v[:6000]) for k, v in run_params(cfg).items()]
    for i in range(0, len(params), 100):
        mlc.log_batch(run.info.run_id, params=params[i : i + 100])
    return run.info.run_id


class EpochLog:
    """Per-epoch metrics (loss, validation metrics, cumulative training seconds), logged
    through MLflow's asynchronous queue so that training never waits on the tracking
    server between epochs; `wait()` sends what is left and raises what failed.

    The first epoch goes out at once (the MLflow UI shows the run moving), later ones
    together at most every `flush_s` seconds: on ml-latest-small about 8 requests to
    the tracking server per training instead of 40. Each send is an HTTP round trip in
    MLflow's logging thread, which wants the interpreter lock back from the training
    thread again and again (about 85 thread switches a send, measured in a retrain on
    2 cores); an A/B of the train stage could not tell the two apart within its noise.
    """

    FLUSH_S = 10.0
    _MAX_METRICS = 1000  # per log_batch request (MLflow's limit)

    def __init__(
        self,
        root: Path,
        run_id: str,
        flush_s: float = FLUSH_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._client = client(root)  # one client: one async queue for the whole training
        self._run_id = run_id
        self._flush_s, self._clock = flush_s, clock
        self._buffer: list[Any] = []
        self._sent_at: float | None = None
        self._pending: list[Any] = []

    def __call__(self, epoch: int, row: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [
            Metric(k.replace("@", "_at_"), float(v), now, epoch)
            for k, v in row.items()
            if k != "epoch"
        ]
        if self._sent_at is None or self._clock() - self._sent_at >= self._flush_s:
            self._send()

    def _send(self) -> None:
        """Hand the buffered metrics to MLflow's queue (returns at once)."""
        self._sent_at = self._clock()
        buffer, self._buffer = self._buffer, []
        for i in range(0, len(buffer), self._MAX_METRICS):
            self._pending.append(
                self._client.log_batch(
                    self._run_id, metrics=buffer[i : i + self._MAX_METRICS], synchronous=False
                )
            )

    def wait(self) -> None:
        """Send what is buffered, then block until every epoch's metrics are logged
        (raises the first failure)."""
        self._send()
        pending, self._pending = self._pending, []
        for op in pending:
            op.wait()


def _log_dict_metrics(mlc, run_id: str, prefix: str, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    rows = [
        Metric(f"{prefix}{k}".replace("@", "_at_"), float(v), now, 0) for k, v in metrics.items()
    ]
    if rows:
        mlc.log_batch(run_id, metrics=rows)


def log_trained_model(
    root: Path,
    run_id: str,
    model_dir: Path,
    history: list[dict],
    summary: dict[str, Any],
    curves: bool = True,
) -> str:
    """Curves, the training summary and the model (pyfunc, models-from-code); returns its URI.

    `curves=False` leaves the curves plot to `log_deferred_artifacts`.
    """
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from pipelines import plots
    from pipelines.inference import ServedModel

    mlc = client(root)
    with tempfile.TemporaryDirectory() as tmp:
        if curves:
            png = plots.training_curves(history, Path(tmp) / "training_curves.png")
            mlc.log_artifact(run_id, str(png), "plots")
        (Path(tmp) / "train.json").write_text(json.dumps(summary, indent=2, default=str))
        mlc.log_artifact(run_id, str(Path(tmp) / "train.json"))
    _log_dict_metrics(
        mlc,
        run_id,
        "",
        {
            "best_valid_metric": summary["best_metric"],
            "train_seconds": summary["train_seconds"],
            "sequences_per_s": summary["sequences_per_s"],
            "epochs_run": summary["epochs_run"],
        },
    )
    served = ServedModel.load(model_dir)
    example_history = " ".join(served.item_ids[1:4])
    example = pd.DataFrame({"history": [example_history], "k": [5]})
    signature = ModelSignature(
        inputs=Schema(
            [
                ColSpec("string", "history", required=False),
                ColSpec("string", "user_id", required=False),
                ColSpec("long", "k", required=False),
            ]
        ),
        outputs=Schema([ColSpec("string", "items"), ColSpec("string", "scores")]),
    )
    code = Path(__file__).with_name("mlflow_model.py")
    mlflow.set_tracking_uri(tracking_uri(root))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code),
            artifacts={"model_dir": str(model_dir)},
            signature=signature,
            input_example=example,
            pip_requirements=_requirements(),
        )
    return info.model_uri


def _requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ["torch", "transformers", "safetensors", "numpy", "pandas", "mlflow", "pydantic"]
    return [f"{p}=={version(p)}" for p in pkgs] + ["attnflow"]


def log_evaluation(
    cfg: Config, root: Path, report: dict[str, Any], recommender, data, artifacts: bool = True
) -> None:
    """Test metrics and baselines into the model's run; with `artifacts`, the report and plots.

    `artifacts=False` leaves the report and the plots to `log_deferred_artifacts`.
    """
    run_id = _model_run_id(cfg, root)
    if not run_id:
        log.warning("model has no MLflow run id; evaluation not logged to MLflow")
        return
    mlc = client(root)
    _log_dict_metrics(mlc, run_id, "test_", report["model"]["full"])
    _log_dict_metrics(mlc, run_id, "test_sampled_", report["model"]["sampled"])
    for name, res in report["baselines"].items():
        _log_dict_metrics(
            mlc,
            run_id,
            f"baseline_{name}_",
            {k: v for k, v in res["full"].items() if k in ("ndcg@10", "hr@10")},
        )
    if artifacts:
        _log_evaluation_artifacts(mlc, run_id, cfg, report, recommender, data)


def _model_run_id(cfg: Config, root: Path) -> str | None:
    """The MLflow run of the model in `paths.model_dir` (from its lineage)."""
    from pipelines.model import load_extra

    model_dir = root / cfg.paths.model_dir
    lineage = load_extra(model_dir, "lineage") if (model_dir / "lineage.json").exists() else {}
    return lineage.get("mlflow_run_id")


def _log_evaluation_artifacts(
    mlc, run_id: str, cfg: Config, report: dict[str, Any], recommender, data
) -> list[str]:
    """The segment and attention plots, then the report; the artifact paths logged."""
    from pipelines import plots

    logged = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        rows = attention_rows(recommender, data, cfg.evaluate.heatmap_users)
        mlc.log_artifact(
            run_id, str(plots.segment_bars(report["segments"], t / "segments.png")), "plots"
        )
        logged.append("plots/segments.png")
        if rows:
            mlc.log_artifact(
                run_id, str(plots.attention_heatmap(rows, t / "attention.png")), "plots"
            )
            logged.append("plots/attention.png")
        # last: its presence says the evaluation's artifacts are complete
        (t / "evaluation.json").write_text(json.dumps(report, indent=2))
        mlc.log_artifact(run_id, str(t / "evaluation.json"))
        logged.append("evaluation.json")
    return logged


def log_deferred_artifacts(cfg: Config, root: Path) -> list[str]:
    """The plots and evaluation report the model's run lacks, drawn and logged now.

    A warm retrain (flows/retrain.py) runs the train and evaluate stages without them
    and calls this after registration, beside serving or the rollout, which mostly
    wait; a run that has them (the command line logs them inline) gets nothing twice.
    Returns what it logged.
    """
    import math

    import pandas as pd

    from pipelines import plots

    run_id = _model_run_id(cfg, root)
    if not run_id:
        return []
    mlc = client(root)
    have = {a.path for a in mlc.list_artifacts(run_id)}
    have |= {a.path for a in mlc.list_artifacts(run_id, "plots")}
    reports = root / cfg.paths.reports_dir
    logged = []
    curve = reports / "train_curve.csv"
    if "plots/training_curves.png" not in have and curve.exists():
        history = [
            {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
            for row in pd.read_csv(curve).to_dict("records")
        ]
        with tempfile.TemporaryDirectory() as tmp:
            png = plots.training_curves(history, Path(tmp) / "training_curves.png")
            mlc.log_artifact(run_id, str(png), "plots")
        logged.append("plots/training_curves.png")
    evaluation = reports / "evaluate.json"
    if "evaluation.json" not in have and evaluation.exists():
        from pipelines.model import Recommender, load_model
        from pipelines.sequences import load_split

        encoder = load_model(root / cfg.paths.model_dir)
        data = load_split(root / cfg.paths.split_dir, encoder.spec.config.time_buckets)
        report = json.loads(evaluation.read_text())
        logged += _log_evaluation_artifacts(mlc, run_id, cfg, report, Recommender(encoder), data)
    return logged


def attention_rows(recommender, data, n_users: int) -> list[dict[str, Any]]:
    """Attention over the latest history of a few users with the longest histories.

    Users are named by their pseudonym (`pipelines.privacy`), never their raw id.
    """
    import numpy as np

    from pipelines.privacy import user_ref
    from pipelines.sequences import history_batch

    spec = recommender.spec
    cfg = spec.config
    seqs = data.history_test
    users = np.argsort(-seqs.lengths(), kind="stable")[:n_users]
    mask = spec.mask_token if cfg.objective == "masked" else None
    batch = history_batch(seqs, users, min(cfg.max_len, 20), cfg.weight_buckets, mask)
    attn = recommender.explain(batch)
    titles = data.items.set_index("item_idx")["title"]
    rows = []
    for b, u in enumerate(users):
        n = int(batch.lengths[b])
        items = batch.items[b, :n].tolist()
        rows.append(
            {
                # The heatmap is an MLflow artifact: it names the user by pseudonym only.
                "user": user_ref(str(data.users["user_id"].iloc[int(u)])),
                "attention": attn[b, :n].tolist(),
                "titles": [titles.get(i, "[mask]") or str(i) for i in items],
            }
        )
    return rows
