"""The MLflow webhook receiver: an alias moved in the MLflow UI starts a rollout.

    python -m services.webhook --host 127.0.0.1 --port 8090

POST /webhook accepts MLflow registry deliveries signed with `ATTNFLOW_WEBHOOK_SECRET`
(verified, fresh, never replayed: see `pipelines.webhooks`). A `challenger` or
`champion` alias set on the attnflow model starts the rollout of that version:
through the Prefect `rollout` deployment when a Prefect API is configured
(`PREFECT_API_URL`), otherwise as a background `attnflow rollout` process. A `champion`
set on the version the local stack already serves (the echo of a rollout's own
promotion) starts nothing. It answers 202 at once; the rollout runs on its own (and
refuses to start while another runs; the reconciler retries then). Anything
unverifiable gets 401/400 and starts nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pipelines.registry import CHALLENGER, CHAMPION, model_name, state_dir
from pipelines.webhooks import SECRET_ENV, ReplayGuard, WebhookRejected, alias_event, verify
from services.stack import Stack

log = logging.getLogger("attnflow.webhook")

MAX_BODY = 64 * 1024
ROOT = Path(os.environ.get("ATTNFLOW_ROOT", ".")).resolve()


def trigger_rollout(version: str, actor: str) -> str:
    """Start the rollout of `version`: a Prefect deployment run, or a local process."""
    api = os.environ.get("PREFECT_API_URL")
    if api:
        # Over REST, as the CLI does: Prefect's own `run_deployment` called from the
        # receiver's async handler returns a coroutine instead of a run (it dispatches on
        # the running event loop), and importing Prefect costs the receiver 2 CPU-s.
        import httpx

        from services.prefect_rest import create_run

        with httpx.Client(base_url=api.rstrip("/"), timeout=30) as client:
            run = create_run(
                client,
                "rollout/rollout",
                {"version": version, "root": str(ROOT), "actor": actor},
            )
        return f"prefect flow run {run['id']}"
    logs = state_dir(ROOT) / "run"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"rollout-v{version}.log", "ab") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "attnflow"),
                "rollout",
                "--version",
                version,
                "--actor",
                actor,
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return f"process {proc.pid}"


def _served_champion() -> str | None:
    """The version the local stack serves as champion, or None (no stack, or unreadable)."""
    try:
        champion = Stack(ROOT).served().get(CHAMPION)
    except (OSError, ValueError, KeyError) as exc:  # unreadable state: never skip on a guess
        log.warning("stack state under %s unreadable (%s); treating as no champion", ROOT, exc)
        return None
    return None if champion is None else str(champion["version"])


async def _capped_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None once it is over `limit` bytes.

    Read in chunks and given up early, so an oversize (or endless, chunked) delivery
    costs no more than `limit` bytes of memory before it is refused.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def receive(request: Request) -> JSONResponse:
    body = await _capped_body(request, MAX_BODY)
    if body is None:
        log.warning("delivery refused: body over %d bytes", MAX_BODY)
        return JSONResponse({"error": f"payload over {MAX_BODY} bytes"}, status_code=413)
    guard: ReplayGuard = request.app.state.guard
    try:
        payload = verify(os.environ.get(SECRET_ENV, ""), dict(request.headers), body, guard)
        event = alias_event(payload, request.headers.get("x-mlflow-delivery-id", ""))
    except WebhookRejected as exc:
        log.warning("delivery refused: %s", exc)
        status = 401 if "signature" in str(exc) or "secret" in str(exc) else 400
        return JSONResponse({"error": str(exc)}, status_code=status)
    if event is None or event.name != model_name() or event.action != "created":
        return JSONResponse({"status": "ignored"}, status_code=202)
    if event.alias not in (CHALLENGER, CHAMPION) or event.version is None:
        return JSONResponse({"status": "ignored", "alias": event.alias}, status_code=202)
    if event.alias == CHAMPION and _served_champion() == event.version:
        # The echo of a promotion: the rollout swaps the served champion before it moves
        # the alias, so a rollout started now would only find nothing to do.
        log.info(
            "alias %s -> v%s: already the served champion, ignored", event.alias, event.version
        )
        return JSONResponse(
            {"status": "ignored", "reason": "already the served champion"}, status_code=202
        )
    # blocking HTTP (or a process start): off the event loop
    started = await run_in_threadpool(
        trigger_rollout, event.version, f"webhook ({event.alias} set in MLflow)"
    )
    log.info("alias %s -> v%s: rollout started (%s)", event.alias, event.version, started)
    return JSONResponse(
        {"status": "rollout started", "version": event.version, "run": started}, status_code=202
    )


async def livez(request: Request) -> JSONResponse:
    return JSONResponse({"status": "alive"})


def app(guard_path: Path | None = None) -> Starlette:
    """The receiver app (replay memory persisted at `guard_path`)."""
    application = Starlette(
        routes=[
            Route("/webhook", receive, methods=["POST"]),
            Route("/livez", livez),
            Route("/readyz", livez),
        ]
    )
    application.state.guard = ReplayGuard(guard_path)
    return application


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="attnflow MLflow webhook receiver")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not os.environ.get(SECRET_ENV):
        log.warning("%s is not set: every delivery will be refused", SECRET_ENV)
    guard = state_dir(ROOT) / "run" / "webhook-deliveries.json"
    uvicorn.run(app(guard), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
