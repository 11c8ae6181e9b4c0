"""The `attnflow` command line: every stage is `attnflow <stage>`.

User mistakes (bad input, bad configuration, missing data) print one line,
``error: ...``, and exit non-zero without a traceback. Heavy libraries are imported
inside the commands, so `attnflow --help` and each DVC stage start fast.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.errors import AttnflowError

app = typer.Typer(
    name="attnflow",
    help="attnflow: attention-flow data, models and rollouts, one stage at a time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(
    help="Data versions in DVC: push, pull, status, verify.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a parameter: section.key=value (repeatable)."),
]
ParamsOpt = Annotated[Path, typer.Option("--params", help="The configuration file.")]


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("great_expectations", "py.warnings", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _use_running_stack() -> None:
    """When `attnflow up` runs a stack here, talk to its servers (unless told otherwise)."""
    import json

    run = Path(os.environ.get("ATTNFLOW_STATE_DIR") or ".attnflow") / "run"
    stack = run / "stack.json"
    if not stack.exists():
        return
    try:
        components = json.loads(stack.read_text()).get("components", {})
        secrets = (
            json.loads((run / "secrets.json").read_text())
            if (run / "secrets.json").exists()
            else {}
        )
    except (OSError, json.JSONDecodeError):
        return
    for name, value in secrets.items():
        os.environ.setdefault(name, value)

    def alive(rec: dict | None) -> bool:
        try:
            return bool(rec) and os.kill(rec["pid"], 0) is None
        except (OSError, KeyError):
            return False

    if alive(components.get("mlflow")):
        os.environ.setdefault("MLFLOW_TRACKING_URI", components["mlflow"]["url"])
    if alive(components.get("prefect")):
        os.environ.setdefault("PREFECT_API_URL", components["prefect"]["url"] + "/api")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """attnflow: attention-flow data, models and rollouts, one stage at a time."""
    _setup_logging(verbose)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # a busy small machine can take longer than Prefect's default to start its local API
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    _use_running_stack()


def _fail(exc: AttnflowError) -> None:
    message = " ".join(str(exc).split())  # one line, whatever the message held
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(exc.exit_code)


@contextmanager
def user_errors():
    """Turn `AttnflowError` into a one-line message and its exit code."""
    try:
        yield
    except AttnflowError as exc:
        _fail(exc)


@contextmanager
def spinner(text: str):
    """A progress spinner on stderr while long work runs (silent when not a terminal)."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(text):
        yield


def _config(params: Path, overrides: list[str] | None):
    from pipelines.config import load_config

    return load_config(params, overrides or [])


def _run_stage(
    label: str,
    fn: Callable[..., dict[str, Any]],
    params: Path,
    overrides: list[str] | None,
    **kwargs: Any,
) -> dict[str, Any]:
    with user_errors():
        cfg = _config(params, overrides)
        with spinner(f"{label}..."):
            return fn(cfg, Path("."), **kwargs)


@app.command()
def ingest(set_: SetOpt = None, params: ParamsOpt = Path("params.yaml")) -> None:
    """Read the configured dataset into canonical events and items (data/ingested)."""
    from pipelines import ingest as stage

    m = _run_stage("ingesting", stage.run, params, set_)
    typer.echo(
        f"ingested {m['dataset']}: {m['n_events']:,} events, {m['n_users']:,} users, "
        f"{m['n_items']:,} items -> data/ingested/"
    )


@app.command()
def validate(
    events: Annotated[
        Path | None, typer.Option("--events", help="Check this event file (CSV/Parquet) only.")
    ] = None,
    set_: SetOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Run the Great Expectations suites; exit non-zero if the data is rejected."""
    from pipelines import validate as stage

    if events is not None:
        r = _run_stage("validating", stage.check_file, params, set_, events_path=events)
    else:
        r = _run_stage("validating", stage.run, params, set_)
    typer.echo(f"valid: {r['rows']:,} events passed {r['expectations']} expectations")
    typer.echo(f"Data Docs: {Path(r['data_docs']).resolve()}")


@app.command()
def split(set_: SetOpt = None, params: ParamsOpt = Path("params.yaml")) -> None:
    """Build per-user sequences and the leave-one-out split (data/split)."""
    from pipelines import split as stage

    m = _run_stage("splitting", stage.run, params, set_)
    typer.echo(
        f"split: {m['n_users']:,} users, {m['n_items']:,} items, {m['n_events']:,} events "
        f"(avg length {m['avg_seq_len']}) -> data/split/"
    )


@app.command()
def baselines(set_: SetOpt = None, params: ParamsOpt = Path("params.yaml")) -> None:
    """Score the baselines (most popular, item-kNN, Markov) on the test split."""
    from pipelines import baselines as stage

    r = _run_stage("scoring the baselines", stage.run, params, set_)
    typer.echo("test (full ranking):")
    _print_baselines(r["baselines"])


@app.command()
def train(set_: SetOpt = None, params: ParamsOpt = Path("params.yaml")) -> None:
    """Train the attention-flow Transformer on data/split; track it in MLflow."""
    from pipelines import train as stage

    with user_errors():
        cfg = _config(params, set_)
        m = stage.run(cfg, Path("."), progress=True)
    if m.get("model_uri") is None:  # a non-zero rank under torchrun
        return
    typer.echo(
        f"trained: best {m['early_stop_metric']} {m['best_metric']:.4f} at epoch "
        f"{m['best_epoch']} ({m['epochs_run']} epochs, {m['train_seconds']:.0f}s, "
        f"{m['sequences_per_s']:.0f} sequences/s on {m['device']})"
    )
    typer.echo(f"model: {cfg.paths.model_dir}/  MLflow run: {m['mlflow_run_id']}")


@app.command()
def evaluate(set_: SetOpt = None, params: ParamsOpt = Path("params.yaml")) -> None:
    """Evaluate the trained model and the baselines on the test split."""
    from pipelines import evaluate as stage

    r = _run_stage("evaluating", stage.run, params, set_)
    full, sampled = r["model"]["full"], r["model"]["sampled"]
    typer.echo(
        f"test (full ranking): NDCG@10 {full['ndcg@10']:.4f}  HR@10 {full['hr@10']:.4f}  "
        f"MRR {full['mrr']:.4f}"
    )
    typer.echo(
        f"test (100 sampled negatives): NDCG@10 {sampled['ndcg@10']:.4f}  "
        f"HR@10 {sampled['hr@10']:.4f}"
    )
    _print_baselines(r["baselines"])


def _print_baselines(scores: dict[str, Any]) -> None:
    for name, res in scores.items():
        typer.echo(
            f"  baseline {name:<13} full NDCG@10 {res['full']['ndcg@10']:.4f}  "
            f"HR@10 {res['full']['hr@10']:.4f}"
        )


@app.command()
def register() -> None:
    """Register the trained model, run the offline gates, set `challenger` (or `champion`)."""
    from pipelines.registry import register_candidate

    with user_errors():
        cfg = _config(Path("params.yaml"), None)
        with spinner("registering and gating..."):
            out = register_candidate(cfg, Path("."))
    if out.get("already_registered"):
        typer.echo(
            f"this training run is already registered as version {out['version']} "
            f"(alias {out['alias'] or 'none'}); nothing to do"
        )
        return
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in out["gates"]["metrics"].items())
    typer.echo(f"version {out['version']} passed its gates ({metrics}) -> alias {out['alias']}")


@app.command()
def history() -> None:
    """Every alias move attnflow made: when, which alias, from which version to which."""
    from datetime import UTC, datetime

    from pipelines.registry import read_history

    moves = read_history(Path("."))
    if not moves:
        typer.echo("no alias moves recorded yet")
    for m in moves:
        when = datetime.fromtimestamp(m.ts, UTC).strftime("%Y-%m-%d %H:%M:%S")
        to = f"v{m.version}" if m.version else "(removed)"
        was = f"v{m.previous}" if m.previous else "-"
        typer.echo(f"{when}  {m.alias:<18} {was:>5} -> {to:<9} {m.actor}: {m.reason}")


@app.command()
def aliases() -> None:
    """The registered model's aliases now."""
    from pipelines.registry import aliases as current
    from pipelines.registry import model_name

    now = current(root=Path("."))
    typer.echo(
        f"{model_name()}: "
        + (", ".join(f"{a}=v{v}" for a, v in sorted(now.items())) or "no aliases")
    )


@app.command()
def retrain(
    stages: Annotated[
        list[str] | None, typer.Option("--stage", help="Run only these dvc.yaml stages.")
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="Run in this process even when the stack is up.")
    ] = False,
) -> None:
    """Run the retrain flow: the dvc.yaml stages, then register, gate, serve, roll out.

    With the local stack up (`attnflow up`), this runs the `retrain` deployment on its
    worker and waits; otherwise the flow runs here on Prefect's ephemeral API.
    """
    with user_errors():
        if os.environ.get("PREFECT_API_URL") and not stages and not local:
            _run_deployment("retrain/retrain", {"root": str(Path(".").resolve())})
            return
        from flows.retrain import retrain as retrain_flow

        result = retrain_flow(root=str(Path(".").resolve()), stages=stages)
    _print_stages(result)


def _print_stages(result: dict) -> None:
    for s in result["stages"]:
        state = "ran" if s["ran"] else "up to date"
        where = f" ({s['pool']} pool)" if s.get("pool") else ""
        typer.echo(f"  {s['stage']:<10} {state:<11} {s['seconds']:.1f}s{where}")
    reg = result.get("registered")
    if reg:
        typer.echo(f"  register   v{reg['version']} -> {reg.get('alias') or 'no alias'}")
    if result.get("rollout"):
        typer.echo(f"  rollout    {result['rollout'].get('status')}")


def _run_deployment(name: str, parameters: dict) -> None:
    """Run a deployment of the local Prefect server on its worker and wait for it."""
    from pipelines.errors import AttnflowError
    from services.prefect_rest import run_deployment

    typer.echo(f"running deployment {name} on the local Prefect server...")
    api = os.environ["PREFECT_API_URL"]
    run = run_deployment(api, name, parameters)
    state = run["state"]
    ui = api.rstrip("/").removesuffix("/api")
    typer.echo(f"  flow run {run['name']}: {state['name']}  ({ui}/runs/flow-run/{run['id']})")
    if state["type"] != "COMPLETED":
        raise AttnflowError(f"deployment {name} ended {state['name']}: {state.get('message')}")


def _show_recommendations(gateway: str, user: str, k: int = 5) -> None:
    import httpx

    r = httpx.post(
        f"{gateway}/recommend", json={"user_id": user, "k": k, "explain": True}, timeout=30
    )
    if r.status_code != 200:
        typer.echo(f"  (the gateway answered {r.status_code}: {r.text[:200]})")
        return
    body = r.json()
    typer.echo(
        f"\n  recommendations for user {user} (v{body.get('model_version')}, "
        f"{body.get('variant')}):"
    )
    titles = _titles()
    for item, score in zip(body["items"], body["scores"], strict=True):
        typer.echo(f"    {score:8.3f}  {titles.get(item, item)}")
    if body.get("explanation"):
        typer.echo("  because they attended to:")
        for e in body["explanation"][:3]:
            typer.echo(f"    attention {e['attention']:.2f}  {e['title'] or e['item_id']}")


def _titles() -> dict[str, str]:
    import json

    items = Path("models/attnflow/items.json")
    if not items.exists():
        return {}
    data = json.loads(items.read_text())
    return dict(zip(data["ids"], data["titles"], strict=True))


@app.command()
def demo() -> None:
    """The main job end to end: stack up, retrain, serve; prints recommendations and URLs."""
    import json

    from pipelines.expectations import data_docs_index
    from services.stack import LocalStack

    with user_errors():
        cfg = _config(Path("params.yaml"), None)
        stack = LocalStack(Path("."))
        typer.echo("attnflow demo: starting the local stack")
        urls = stack.up(progress=lambda msg: typer.echo(f"  {msg}..."))
        for k, v in stack.env().items():
            os.environ.setdefault(k, v)
        _run_deployment("retrain/retrain", {"root": str(Path(".").resolve())})
        served = stack.served().get("champion")
        if served is None:
            raise AttnflowError("no champion is being served after the retrain")
        users = json.loads((Path(served["folder"]) / "users.json").read_text())
        _show_recommendations(urls["gateway"], users[0])
    typer.echo(f"\n  dataset        {cfg.ingest.dataset} ({cfg.paths.split_dir.resolve()}/)")
    typer.echo(f"  Data Docs      file://{data_docs_index(cfg.paths.gx_root).resolve()}")
    typer.echo(f"  MLflow UI      {urls['mlflow']}")
    typer.echo(f"  Prefect UI     {urls['prefect']}")
    typer.echo(f"  served         {urls['gateway']}/recommend  (champion v{served['version']})")
    typer.echo(f"  metrics        {urls['gateway']}/metrics")
    typer.echo("  stop it all    attnflow down")


@app.command()
def up() -> None:
    """Start the local stack on 127.0.0.1: MLflow, Prefect, a worker, gateway, model service."""
    from services.stack import LocalStack

    with user_errors():
        stack = LocalStack(Path("."))
        urls = stack.up(progress=lambda msg: typer.echo(f"  {msg}..."))
    _print_status(stack, urls)


def _print_status(stack, urls: dict[str, str]) -> None:
    rows = stack.status()
    for r in rows:
        state = "up" if r["alive"] else "DOWN"
        extra = f" v{r['version']}" if r.get("version") else ""
        # the worker and the warm-start standby listen on no port: no URL to show
        where = r["url"] if r.get("port") else "(no port)"
        typer.echo(f"  {r['name']:<18} {state:<5} pid {r['pid']:<7} {where}{extra}")
    typer.echo(f"\n  MLflow UI    {urls['mlflow']}")
    typer.echo(f"  Prefect UI   {urls['prefect']}")
    typer.echo(f"  gateway      {urls['gateway']}/recommend  (metrics: {urls['gateway']}/metrics)")
    typer.echo(f"  logs         {stack.run_dir}/")


@app.command()
def status() -> None:
    """Every component of the local stack: up or down, pid, URL."""
    from services.stack import LocalStack

    stack = LocalStack(Path("."))
    if not stack.read()["components"]:
        typer.echo("the stack is not running (start it with `attnflow up`)")
        raise typer.Exit(1)
    _print_status(stack, stack.urls())
    if not all(r["alive"] for r in stack.status()):
        raise typer.Exit(1)


@app.command()
def down() -> None:
    """Stop every process of the local stack."""
    from services.stack import LocalStack

    stopped = LocalStack(Path(".")).down()
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command()
def rollout(
    version: Annotated[
        str | None, typer.Option(help="Version to roll out (default: challenger).")
    ] = None,
    actor: Annotated[str, typer.Option(help="Who asked, for the alias history.")] = "cli",
) -> None:
    """Canary a version through the gateway; promote it or roll it back."""
    from flows.rollout import rollout as rollout_flow

    with user_errors():
        report = rollout_flow(version=version, root=str(Path(".").resolve()), actor=actor)
    typer.echo(
        f"rollout: {report.get('status')}"
        + (f" (v{report['version']}, report {report['report']})" if report.get("report") else "")
    )


@app.command()
def rollback() -> None:
    """Serve the previous champion again (kept on standby) and move `champion` back."""
    from pipelines.registry import CHAMPION, set_alias
    from pipelines.rollout import GatewayClient
    from services.stack import LocalStack

    with user_errors():
        stack = LocalStack(Path("."))
        new, old = stack.swap_standby()
        GatewayClient(stack.gateway_url()).set_backends(new["url"], None)
        set_alias(
            CHAMPION,
            new["version"],
            "attnflow rollback",
            f"rolled back from v{old['version']}",
            root=Path("."),
        )
    typer.echo(f"champion is v{new['version']} again; v{old['version']} is on standby")


@app.command()
def reconcile() -> None:
    """Start the rollout the aliases ask for, if serving does not match them."""
    from flows.reconcile import reconcile as reconcile_flow

    with user_errors():
        out = reconcile_flow(root=str(Path(".").resolve()))
    typer.echo(
        f"reconcile: {out['action']}" + (f" ({out.get('reason')})" if out.get("reason") else "")
    )


@app.command()
def report() -> None:
    """The newest rollout report: each step's weight, checks and decision."""
    from pipelines.registry import state_dir
    from pipelines.rollout import latest_report

    rep = latest_report(state_dir(Path(".")))
    if rep is None:
        typer.echo("no rollout has run yet")
        return
    typer.echo(
        f"rollout of v{rep['version']} (champion v{rep['champion']}): {rep['status']}"
        + (f" - {rep['reason']}" if rep.get("reason") else "")
    )
    for step in rep.get("steps", []):
        typer.echo(f"  weight {step['weight']:>3}%  {'passed' if step['passed'] else 'FAILED'}")
        for c in step["checks"]:
            typer.echo(f"      {'ok ' if c['passed'] else 'BAD'} {c['name']:<14} {c['detail']}")


@app.command("datasets")
def list_datasets() -> None:
    """List the datasets the registry knows."""
    from pipelines.datasets import BUILTIN, REGISTRY

    for spec in REGISTRY.values():
        where = spec.url or "mirror only"
        typer.echo(f"{spec.name:<16} {spec.reader:<15} {where}")
    for name in BUILTIN:
        typer.echo(f"{name:<16} {'built-in':<15} (see params.yaml: ingest.{name})")


def _data(action: str) -> None:
    from pipelines.versioning import data_command

    with user_errors():
        typer.echo(data_command(action, Path(".")))


@data_app.command("push")
def data_push() -> None:
    """Push the DVC-tracked data versions to the remote."""
    _data("push")


@data_app.command("pull")
def data_pull() -> None:
    """Pull the data versions in dvc.lock from the remote."""
    _data("pull")


@data_app.command("status")
def data_status() -> None:
    """Compare the workspace, the DVC cache and the remote."""
    _data("status")


# `attnflow data verify` exit code on corruption: 3, as for data that failed validation.
CACHE_CORRUPT_EXIT = 3


@data_app.command("verify")
def data_verify() -> None:
    """Re-hash the DVC cache objects dvc.lock references; exit 3 naming each corrupt one."""
    from pipelines.versioning import verify_cache

    with user_errors():
        problems, counts = verify_cache(Path("."))
    for problem in problems:
        typer.echo(f"error: {problem.line()}", err=True)
    if problems:
        raise typer.Exit(CACHE_CORRUPT_EXIT)
    typer.echo(
        f"cache ok: {counts['checked']} objects match dvc.lock "
        f"({counts['missing']} not in the cache, {counts['legacy']} DVC 2 objects not checked)"
    )


if __name__ == "__main__":  # pragma: no cover
    app()
